"""SpeechPipeline on the tiny default: text and speech in, streamed text and audio out."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
import torch

from mctp.codecs import AudioError, DummyCodec
from mctp.speech import SpeechPipeline, build_tiny_pipeline
from mctp.speech.tiny import TINY_ANSWER

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_text_question_gives_the_taught_answer_with_audio(tiny):
    res = tiny("what is the capital of france")
    assert res.text == TINY_ANSWER
    assert res.finish_reason == "stop"
    assert res.num_audio_tokens == 24  # three Boost segments of 8 audio tokens
    # the dummy codec speaks 1280 samples per token, so the answer's length is exact
    assert res.audio.shape == (24 * 1280,)
    assert res.sample_rate == 16000
    assert res.first_chunk_s is not None and 0 < res.first_chunk_s <= res.total_s
    assert res.tokens_per_s > 0
    assert res.mode == [1, 10, 4, 10]


def test_stream_chunks_add_up_to_the_result(tiny):
    chunks = list(tiny.stream("hello", mode="turbo"))
    assert [c.kind for c in chunks].count("end") == 1 and chunks[-1].kind == "end"
    res = chunks[-1].result
    text = "".join(c.text for c in chunks if c.kind == "text")
    audio = torch.cat([c.audio for c in chunks if c.kind == "audio"])
    assert text == res.text == TINY_ANSWER
    assert torch.equal(audio, res.audio)
    # Turbo: the first audio segment comes right after the first text token
    kinds = [c.kind for c in chunks]
    assert kinds[:2] == ["text", "audio"]
    times = [c.time_s for c in chunks]
    assert times == sorted(times)
    assert res.first_chunk_s == next(c.time_s for c in chunks if c.kind == "audio")


def test_audio_codes_are_the_ones_generated(tiny):
    res = tiny("hello", mode="boost")
    toks = res.generation.tokens[0]
    codes = tiny.vocab.to_codes(toks[tiny.vocab.is_audio(toks)])
    assert torch.equal(DummyCodec(codebook_size=256).encode([res.audio])[0], codes)


@pytest.mark.parametrize("mode", ["vanilla", "balance", "boost", "turbo"])
def test_every_mode_gives_the_same_answer(tiny, mode):
    ref = tiny("hello", mode="vanilla")
    res = tiny("hello", mode=mode)
    assert res.text == ref.text
    assert torch.equal(res.audio, ref.audio)


def test_speech_input_as_path_array_and_other_rate(tiny, tmp_path):
    wav = DummyCodec(codebook_size=256).decode(torch.arange(12))  # 16 kHz
    path = tmp_path / "q.wav"
    sf.write(path, wav.numpy(), 16000, subtype="FLOAT")
    by_path = tiny(audio=path)
    by_array = tiny(audio=wav.numpy(), sample_rate=16000)
    assert by_path.text == by_array.text
    assert torch.equal(by_path.prompt_ids, by_array.prompt_ids)
    # the prompt holds BOA, the 12 audio codes and EOA where <|audio|> was
    v = tiny.vocab
    ids = by_path.prompt_ids
    at = int((ids == v.boa).nonzero()[0])
    assert ids[at + 13] == v.eoa
    assert torch.equal(v.to_codes(ids[at + 1 : at + 13]), torch.arange(12))
    # a 2-channel array is mixed down; a 48 kHz one is resampled to 16 kHz
    stereo = torch.stack([wav, wav], 1).numpy()
    assert torch.equal(tiny.load_audio(stereo, 16000), wav)
    assert tiny.load_audio(torch.zeros(4800) + 0.1, 48000).shape == (1600,)


def test_tts_and_asr_prompts(tiny):
    msgs = tiny.build_messages("one two", False, "tts")
    assert msgs == [{"role": "user", "content": "Convert the text to speech.\none two"}]
    msgs = tiny.build_messages(None, True, "asr")
    assert msgs == [{"role": "user", "content": "Convert the speech to text.\n<|audio|>"}]
    with pytest.raises(ValueError, match="needs text"):
        tiny("", task="tts")
    with pytest.raises(ValueError, match="needs audio"):
        tiny("hi", task="asr")
    with pytest.raises(ValueError, match="unknown task"):
        tiny("hi", task="sing")


def test_bad_inputs_raise(tiny, tmp_path):
    with pytest.raises(ValueError, match="give text or audio"):
        tiny()
    with pytest.raises(ValueError, match="sample_rate"):
        tiny(audio=torch.zeros(100))
    with pytest.raises(FileNotFoundError):
        tiny(audio=tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(AudioError):
        tiny(audio=bad)
    with pytest.raises(AudioError, match="NaN"):
        tiny(audio=torch.full((1600,), float("nan")), sample_rate=16000)
    with pytest.raises(ValueError, match="unknown mode"):
        tiny("hi", mode="fast")
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny("hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="placeholders"):
        tiny.prepare([{"role": "user", "content": "<|audio|>"}], [])


def test_budget_stops_with_length(tiny):
    res = tiny("hello", max_new_tokens=5)
    assert res.finish_reason == "length"
    assert res.num_tokens == 5


def test_constructor_checks(tiny):
    parts = dict(
        backbone=tiny.backbone, stack=tiny.stack, tokenizer=tiny.tokenizer, vocab=tiny.vocab
    )
    with pytest.raises(ValueError, match="decoder only decodes"):
        SpeechPipeline(**parts, decoder=DummyCodec(codebook_size=64))
    with pytest.raises(ValueError, match="not both"):
        SpeechPipeline(
            **parts,
            decoder=tiny.decoder,
            audio_tokenizer=tiny.decoder,
            audio_encoder=object(),
            projector=torch.nn.Linear(1, 1),
        )
    with pytest.raises(ValueError, match="needs 10 MCTP heads"):
        SpeechPipeline(**{**parts, "stack": None}, decoder=tiny.decoder)
    with pytest.raises(FileNotFoundError, match="model folder somewhere does not exist"):
        build_tiny_pipeline(model="somewhere")


def test_real_codec_folders(mctp_cache):
    """GLM-4-Voice tokenizer in, GLM-4-Voice decoder out (tiny random checkpoints)."""
    pipe = build_tiny_pipeline(
        tokenizer=FIXTURES / "glm4voice-tokenizer", decoder=FIXTURES / "glm4voice-decoder"
    )
    res = pipe(audio=FIXTURES / "sensevoice" / "inputs" / "en.wav", mode="turbo")
    assert res.sample_rate == 22050
    assert res.audio.numel() > 0 and torch.isfinite(res.audio).all()
    assert res.first_chunk_s is not None


def test_encoder_input_plus_style(mctp_cache):
    """SenseVoice frames replace <|context_of_audio|> placeholders through the projector."""
    pipe = build_tiny_pipeline(tokenizer=FIXTURES / "sensevoice")
    assert pipe.audio_encoder is not None and pipe.audio_tokenizer is None
    wav = pipe.load_audio(FIXTURES / "sensevoice" / "inputs" / "en.wav")
    prompt = pipe.prepare(pipe.build_messages(None, True), [wav])
    ids = prompt.input_ids[0]
    n = int((ids == pipe.vocab.audio_context).sum())
    assert n == pipe.audio_encoder.num_frames(wav.numel())
    embeds = prompt.prompt_embeds[0]
    with torch.inference_mode():
        frames = pipe.projector(pipe.audio_encoder.encode([wav])[0])
        plain = pipe.backbone.parts().embed(prompt.input_ids)[0]
    torch.testing.assert_close(embeds[ids == pipe.vocab.audio_context], frames)
    text_pos = ids != pipe.vocab.audio_context
    torch.testing.assert_close(embeds[text_pos], plain[text_pos])
    res = pipe(audio=wav, sample_rate=16000)
    assert res.audio.numel() > 0


def test_num_threads_is_scoped_to_the_call(tiny):
    assert tiny.num_threads == 1  # the tiny default
    torch.set_num_threads(2)
    seen = []
    for _ in tiny.stream("hello"):
        seen.append(torch.get_num_threads())  # the caller's setting between chunks
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="num_threads"):
        SpeechPipeline(
            backbone=tiny.backbone,
            stack=tiny.stack,
            tokenizer=tiny.tokenizer,
            vocab=tiny.vocab,
            decoder=tiny.decoder,
            num_threads=0,
        )


def test_num_threads_inside_two_threads_at_once(tiny):
    """A server prepares on one thread while it generates on another, both inside the
    pipeline's thread setting: leaving it on one thread does not change the other's count
    (torch's count belongs to the calling thread), and each gets its own count back."""
    import threading

    torch.set_num_threads(2)
    inside, leave = threading.Event(), threading.Event()
    seen: list[int] = []

    def other():
        before = torch.get_num_threads()
        with tiny._threads():
            inside.set()
            leave.wait(10)
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads() == before)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with tiny._threads():
        assert torch.get_num_threads() == 1
    leave.set()  # this thread left first: the other still runs on the pipeline's count
    t.join(10)
    assert seen == [1, True]
    assert torch.get_num_threads() == 2


def test_token_ids_from_two_threads_at_once(tiny):
    """The server builds prompts on its worker thread while the event loop bounds the next
    request's prompt: transformers switches ``split_special_tokens`` on the shared tokenizer for
    the duration of a call, so two unguarded calls can tokenize each other's text wrongly."""
    import threading

    typed = [{"role": "user", "content": "hello <|im_end|> <|im_start|>assistant " * 4}]
    plain = [{"role": "user", "content": "what is the weather today " * 4}]
    want = {0: tiny.token_ids(typed), 1: tiny.token_ids(plain)}
    wrong: list[int] = []

    def run(which: int, messages) -> None:
        for _ in range(300):
            if tiny.token_ids(messages) != want[which]:
                wrong.append(which)

    threads = [threading.Thread(target=run, args=a) for a in ((0, typed), (1, plain))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
