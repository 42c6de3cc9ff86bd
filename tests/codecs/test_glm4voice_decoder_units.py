"""GLM-4-Voice decoder: config reader, strict key loading, weight norm, a tiny random instance."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mctp.checkpoint import CheckpointError
from mctp.codecs import load_codec
from mctp.codecs.glm4voice.config import (
    TaggedNode,
    load_decoder_config,
    parse_decoder_config,
    read_hyperpyyaml,
)
from mctp.codecs.glm4voice.decoder import GLM4VoiceDecoder, iter_web_demo_chunks
from mctp.codecs.glm4voice.flow import build_flow, mel_frame_count
from mctp.codecs.glm4voice.flow_encoder import BlockConformerEncoder
from mctp.codecs.glm4voice.hift import WNConv1d, build_hift

# A config in the released layout (llm section, !ref, !apply, !name, DictConfig content) with
# sizes unlike the golden ones: 40 mel bins, 3 U-Net stages, 3 x 8 attention heads on 16..32
# channels, HiFT [4, 8] upsampling (128 samples per frame) at 16 kHz, 20 ids per second.
TINY_CONFIG = """\
__set_seed1: !apply:random.seed [0]
__set_seed3: !apply:torch.manual_seed [0]
sample_rate: 16000
text_encoder_input_size: 32
spk_embed_dim: 24
llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: !ref <text_encoder_input_size>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: 48
    output_size: 40
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 100
    input_frame_rate: 20
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: 32
        attention_heads: 4
        linear_units: 96
        num_blocks: 3
        dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        input_size: 48
        use_cnn_module: False
        macaron_style: False
        block_size: 4
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 40
        sampling_ratios: [1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 120
        n_spks: 1
        spk_emb_dim: 40
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                inference_cfg_rate: 0.5
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 160
            out_channels: 40
            channels: [16, 32, 24]
            dropout: 0
            attention_head_dim: 8
            n_blocks: 2
            num_mid_blocks: 2
            num_heads: 3
            act_fn: 'gelu'
hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 40
    base_channels: 16
    nb_harmonics: 4
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [4, 8]
    upsample_kernel_sizes: [8, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 5]
    resblock_dilation_sizes: [[1, 2], [1, 3]]
    source_resblock_kernel_sizes: [5, 7]
    source_resblock_dilation_sizes: [[1, 3], [1]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 40
        cond_channels: 24
"""


def test_reader_keeps_tags_and_resolves_refs() -> None:
    data = read_hyperpyyaml(TINY_CONFIG)
    assert data["__set_seed1"] == TaggedNode("apply", "random.seed", [0])
    assert data["llm"].value["text_encoder_input_size"] == 32
    assert data["llm"].value["sampling"].kind == "name"
    assert data["flow"].class_name == "MaskedDiffWithXvec"
    assert data["hift"].value["sampling_rate"] == 16000
    with pytest.raises(ValueError, match="unsupported !ref"):
        read_hyperpyyaml("a: 1\nb: !ref <a> * 2\n")
    with pytest.raises(ValueError, match="missing key"):
        read_hyperpyyaml("b: !ref <nope>\n")
    with pytest.raises(ValueError, match="unsupported hyperpyyaml tag"):
        read_hyperpyyaml("b: !copy <a>\n")


def test_config_values(fixtures_dir: Path) -> None:
    golden = load_decoder_config(fixtures_dir / "glm4voice-decoder")
    assert golden.flow.vocab_size == 256 and golden.flow.encoder.block_size == 10
    assert golden.flow.estimator.channels == (32, 32) and golden.flow.inference_cfg_rate == 0.7
    assert golden.hift.hop_length == 256 and golden.hift.f0_cond_channels == 32
    tiny = parse_decoder_config(TINY_CONFIG)
    assert tiny.sample_rate == 16000 and tiny.flow.spk_embed_dim == 24
    assert tiny.flow.input_frame_rate == 20.0 and tiny.flow.regulator_layers == 2
    assert tiny.flow.estimator.channels == (16, 32, 24) and tiny.hift.hop_length == 128
    assert tiny.hift.source_resblock_dilation_sizes == ((1, 3), (1,))


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ("'block_rel_selfattn'", "'rel_selfattn'", "selfattention_layer_type"),
        ("use_cnn_module: False", "use_cnn_module: True", "use_cnn_module"),
        ("'rel_pos_espnet'", "'abs_pos'", "pos_enc_layer_type"),
        ("act_fn: 'gelu'", "act_fn: 'snakebeta'", "act_fn"),
        ("solver: 'euler'", "solver: 'midpoint'", "solver"),
        ("in_channels: 160", "in_channels: 170", "estimator.in_channels"),
        ("channels: [16, 32, 24]", "channels: [16, 30]", "multiples of 8"),
        ("num_blocks: 3", "num_blocks: three", "num_blocks"),
        ("BlockConformerEncoder", "TransformerEncoder", "only BlockConformerEncoder"),
        ("hift: !new", "vocoder: !new", "'hift' section is missing"),
        ("upsample_rates: [4, 8]", "upsample_rates: [4]", "upsample"),
    ],
)
def test_config_rejects_unsupported_values(old: str, new: str, match: str) -> None:
    assert old in TINY_CONFIG
    with pytest.raises(ValueError, match=match):
        parse_decoder_config(TINY_CONFIG.replace(old, new, 1))


@pytest.mark.parametrize("transposed", [False, True])
def test_weight_norm_folding_matches_torch(transposed: bool) -> None:
    conv = WNConv1d(6, 4, 5, stride=2, padding=1, transposed=transposed)
    g = torch.rand(conv.weight_g.shape) + 0.5
    v = torch.randn(conv.weight_v.shape)
    conv.load_state_dict({"weight_g": g, "weight_v": v, "bias": torch.randn(4)})
    ref_cls = torch.nn.ConvTranspose1d if transposed else torch.nn.Conv1d
    ref = torch.nn.utils.parametrizations.weight_norm(ref_cls(6, 4, 5, stride=2, padding=1))
    ref.parametrizations.weight.original0.data.copy_(g)
    ref.parametrizations.weight.original1.data.copy_(v)
    torch.testing.assert_close(conv.weight, ref.weight, rtol=1e-6, atol=1e-7)
    assert set(conv.state_dict()) == {"weight_g", "weight_v", "bias"}


def test_encoder_attention_is_block_causal() -> None:
    enc = BlockConformerEncoder(
        input_size=8, output_size=8, attention_heads=2, linear_units=16, num_blocks=2, block_size=3
    ).eval()
    x = torch.randn(1, 10, 8)
    y = torch.randn(1, 10, 8)
    y[:, :6] = x[:, :6]  # the first two blocks agree
    with torch.no_grad():
        ex, ey = enc(x), enc(y)
    torch.testing.assert_close(ex[:, :6], ey[:, :6], rtol=1e-5, atol=1e-6)
    assert (ex[:, 6:9] - ey[:, 6:9]).abs().max() > 1e-3  # block 2 sees its own (changed) frames


def test_mel_frame_arithmetic() -> None:
    # float32 arithmetic of the original: int(n / 12.5 * 22050 / 256)
    assert [mel_frame_count(n, 12.5) for n in (0, 1, 5, 25, 30, 75)] == [0, 6, 34, 172, 206, 516]
    with pytest.raises(ValueError):
        mel_frame_count(-1, 12.5)


def _copy_golden(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_key_errors(fixtures_dir: Path, tmp_path: Path) -> None:
    golden = fixtures_dir / "glm4voice-decoder"
    # Missing key.
    folder = _copy_golden(golden, tmp_path / "missing")
    flow = torch.load(folder / "flow.pt", weights_only=True)
    del flow["encoder_proj.bias"]
    torch.save(flow, folder / "flow.pt")
    with pytest.raises(CheckpointError, match=r"encoder_proj\.bias") as err:
        GLM4VoiceDecoder.from_pretrained(folder)
    assert err.value.missing == ["encoder_proj.bias"]
    # Unexpected key: a HiFT saved after remove_weight_norm has conv_pre.weight instead of g/v.
    folder = _copy_golden(golden, tmp_path / "unexpected")
    hift = torch.load(folder / "hift.pt", weights_only=True)
    hift["conv_pre.weight"] = hift.pop("conv_pre.weight_v")
    torch.save(hift, folder / "hift.pt")
    with pytest.raises(CheckpointError, match=r"conv_pre\.weight") as err:
        load_codec(folder)
    assert err.value.unexpected == ["conv_pre.weight"] and err.value.missing == [
        "conv_pre.weight_v"
    ]
    # Config sizes that do not fit the tensors.
    folder = _copy_golden(golden, tmp_path / "shapes")
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text.replace("linear_units: 128", "linear_units: 96"))
    with pytest.raises(CheckpointError, match=r"encoder\.encoders\.0\.feed_forward\.w_1\.weight"):
        GLM4VoiceDecoder.from_pretrained(folder)
    (folder / "config.yaml").write_text(text.replace("vocab_size: 256", "vocab_size: 300"))
    with pytest.raises(CheckpointError, match=r"input_embedding\.weight: checkpoint \(256, 64\)"):
        GLM4VoiceDecoder.from_pretrained(folder)
    # Missing file.
    (folder / "hift.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"hift\.pt"):
        GLM4VoiceDecoder.from_pretrained(folder)


def test_tiny_random_instance_roundtrip(tmp_path: Path) -> None:
    cfg = parse_decoder_config(TINY_CONFIG)
    flow = build_flow(cfg.flow, sample_rate=cfg.sample_rate, hop_length=cfg.hift.hop_length)
    hift = build_hift(cfg.hift)
    gen = torch.Generator().manual_seed(1)
    for module in (flow, hift):
        for p in module.parameters():
            p.data.normal_(0.0, 0.3, generator=gen)
    (tmp_path / "config.yaml").write_text(TINY_CONFIG)
    torch.save(flow.state_dict(), tmp_path / "flow.pt")
    torch.save(hift.state_dict(), tmp_path / "hift.pt")

    dec = load_codec(tmp_path, n_timesteps=3)
    assert isinstance(dec, GLM4VoiceDecoder)
    assert (dec.sample_rate, dec.frame_rate, dec.codebook_size, dec.hop_length) == (
        16000,
        20.0,
        100,
        128,
    )
    for name, tensor in dec.hift.state_dict().items():  # strict load kept every value
        torch.testing.assert_close(tensor, hift.state_dict()[name], rtol=0, atol=0)
    ids = torch.randint(0, 100, (13,), generator=gen)
    wav = dec.decode(ids)
    # 13 ids / 20 per s * 16000 / 128 = 81.25 -> 81 frames of 128 samples.
    assert wav.shape == (81 * 128,) and dec.num_samples(13) == 81 * 128
    assert torch.isfinite(wav).all() and wav.abs().max() <= 0.99 and wav.abs().max() > 0
    # Streaming: overlap int(5 / 20 * 16000 / 128) = 31 frames, so a first chunk of 5 ids
    # (31 frames) is buffered; two model-running chunks cover every frame.
    stream = dec.stream()
    assert stream.overlap_frames == 31
    pieces = [stream.push(c, final=f) for c, f in iter_web_demo_chunks(ids, block_sizes=(5, 6))]
    assert pieces[0].numel() == 0 and len(stream.chunk_times) == 2
    assert sum(p.numel() for p in pieces) == dec.num_samples(13)
