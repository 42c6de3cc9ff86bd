"""Cohorts: requests generated together give each its own answer, and rows stop on their own."""

from __future__ import annotations

import pytest
import torch

from mctp import EngineConfig, GenerationConfig, Generator, generate
from mctp.engine.batching import BatchScheduler, Cohort, JoinTicket, RowRequest, left_pad


def _joinable_model():
    """A 2-layer Qwen2 backbone, 10 heads and a speech vocabulary whose greedy answers tell
    rows apart (the join tests)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mctp import MCTPStack
    from mctp.backbones import HFBackbone
    from mctp.speech_vocab import AUDIO_PLACEHOLDER, BOA, EOA, SpeechVocab

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    bb = HFBackbone(Qwen2ForCausalLM(cfg).eval())
    stack = MCTPStack.from_backbone(bb.parts(), 10).eval()
    vocab = SpeechVocab(special={BOA: 100, EOA: 101, AUDIO_PLACEHOLDER: 99}, audio_start=102,
                        num_audio=26, vocab_size=128)  # fmt: skip
    return bb, stack, vocab


@pytest.mark.parametrize("mode", ["boost", "vanilla"])
def test_cohort_rows_equal_their_lone_answers_and_stop_on_their_own(toy, mode):
    cfg = GenerationConfig(mode=mode, max_new_tokens=60, eos_token_id=2)
    g = torch.Generator().manual_seed(11)
    prompts = [toy.prompt, torch.randint(3, 60, (1, 9), generator=g), toy.prompt[:, 2:]]
    lone = [
        generate(toy.backbone, toy.stack, p, config=cfg, vocab=toy.vocab).tokens[0].tolist()
        for p in prompts
    ]
    assert lone[0] == toy.answer  # the taught answer (ends with EOS)
    lengths = [len(t) for t in lone]
    short = lengths.index(min(lengths))
    assert min(lengths) < max(lengths)  # one row stops before another: not vacuous
    gen = Generator(
        toy.backbone,
        toy.stack,
        cfg,
        engine=EngineConfig(max_batch=4, max_len=96),
        vocab=toy.vocab,
    )
    cohort = Cohort(gen, [RowRequest(p, cfg) for p in prompts])
    streams = [cohort.events(r) for r in range(3)]
    first = list(streams[short])  # read that row alone: it ends while the others still run
    assert first[-1].kind == "end" and not cohort.finished
    assert first[-1].row_result.tokens[0].tolist() == lone[short]
    rest = [list(s) for i, s in enumerate(streams) if i != short]
    assert cohort.finished
    order = [short, *[i for i in range(3) if i != short]]
    for events, want in zip([first, *rest], [lone[i] for i in order]):
        got = events[-1].row_result.tokens[0].tolist()
        assert got == want
        assert all(ev.row == 0 for ev in events) and [ev.kind for ev in events].count("end") == 1


def test_abandoned_rows_free_the_lane_and_the_scheduler_picks_compatible_requests(toy):
    cfg = GenerationConfig(mode="boost", max_new_tokens=40, eos_token_id=2)
    other = cfg.replace(mode="turbo")
    lanes = [
        Generator(
            toy.backbone,
            toy.stack,
            cfg,
            engine=EngineConfig(max_batch=2, max_len=64),
            vocab=toy.vocab,
        )
    ]
    sched = BatchScheduler(lanes)
    reqs = [RowRequest(toy.prompt, cfg), RowRequest(toy.prompt, other), RowRequest(toy.prompt, cfg)]
    assert BatchScheduler.pick(reqs, 2) == [0, 2]
    streams = sched.start([reqs[0], reqs[2]])
    next(streams[0])
    assert sched.free_lane() is None
    with pytest.raises(RuntimeError, match="no free lane"):
        sched.start([reqs[1]])
    for s in streams:
        s.close()  # both readers left: the generation stops, the lane is free again
    assert sched.free_lane() is lanes[0]
    (again,) = sched.start([reqs[1]])
    assert list(again)[-1].row_result.tokens[0].tolist() == (
        generate(toy.backbone, toy.stack, toy.prompt, config=other, vocab=toy.vocab)
        .tokens[0]
        .tolist()
    )
    with pytest.raises(ValueError, match="max_batch=1"):
        Cohort(Generator(toy.backbone, toy.stack, cfg, max_len=64, vocab=toy.vocab), reqs[:2])
    with pytest.raises(ValueError, match="equal request settings"):
        Cohort(lanes[0], reqs[:2])
    with pytest.raises(ValueError, match=r"must be \[1, P\]"):
        RowRequest(torch.zeros(2, 3, dtype=torch.long), cfg)


def test_left_pad_marks_only_padding():
    cfg = GenerationConfig()
    ids, mask, embeds = left_pad([RowRequest(torch.tensor([[5, 6, 7]]), cfg)] * 2)
    assert mask is None and embeds is None and ids.tolist() == [[5, 6, 7]] * 2
    ids, mask, _ = left_pad([RowRequest(torch.tensor([[5, 6, 7]]), cfg),
                             RowRequest(torch.tensor([[8]]), cfg)])  # fmt: skip
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize(
    ("mode", "verify"), [("vanilla", False), ("turbo", False), ("boost", False), ("vanilla", True)]
)
def test_a_request_joins_a_running_cohort_and_gets_its_lone_answer(mode, verify):
    bb, stack, vocab = _joinable_model()
    gcfg = GenerationConfig(mode=mode, max_new_tokens=30, verify=verify)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, 90, (1, 7), generator=g), torch.randint(3, 90, (1, 5), generator=g)
    lone = [generate(bb, stack, x, config=gcfg, vocab=vocab).tokens[0].tolist() for x in (a, b)]
    assert lone[0] != lone[1] and len(set(lone[1])) > 3  # answers that can tell rows apart
    gen = Generator(bb, stack, gcfg, engine=EngineConfig(max_batch=2, max_len=128), vocab=vocab)
    cohort = Cohort(gen, [RowRequest(a, gcfg)])
    first = cohort.events(0)
    seen = [next(first) for _ in range(2)]
    ticket = cohort.offer(RowRequest(b, gcfg))
    assert ticket is not None and ticket.row is None  # waits for the next join point
    while ticket.row is None:
        seen.append(next(first))
    assert ticket.row == 1 and not cohort.finished  # joined while row 0 still runs
    joined = list(cohort.claim(ticket))
    seen += list(first)
    assert seen[-1].row_result.tokens[0].tolist() == lone[0]
    assert joined[-1].row_result.tokens[0].tolist() == lone[1]
    assert cohort.offer(RowRequest(b, gcfg.replace(max_new_tokens=5))) is None  # other settings


@pytest.mark.parametrize("mode", ["vanilla", "boost"])
def test_a_request_joining_a_row_does_not_read_its_predecessors_unread_events(toy, mode):
    # Row 0 (the taught answer) ends early; a waiting request takes that row while row 0's
    # reader has not read its events yet. The newcomer reads first: it must get its own
    # events only, and row 0's reader still gets row 0's whole answer.
    cfg = GenerationConfig(mode=mode, max_new_tokens=60, eos_token_id=2)
    g = torch.Generator().manual_seed(11)
    prompts = [toy.prompt, toy.prompt[:, 2:], *(torch.randint(3, 60, (1, 9), generator=g)
                                                for _ in range(3))]  # fmt: skip
    answers = [
        generate(toy.backbone, toy.stack, p, config=cfg, vocab=toy.vocab).tokens[0].tolist()
        for p in prompts
    ]
    by_length = sorted(range(len(prompts)), key=lambda i: len(answers[i]))
    first_row, long_row = by_length[0], by_length[-1]
    late_row = next(i for i in by_length[1:-1] if answers[i] != answers[first_row])
    early, long, late = (prompts[i] for i in (first_row, long_row, late_row))
    lone = [answers[i] for i in (first_row, long_row, late_row)]
    assert len(lone[0]) < len(lone[1])  # row 0 ends first: its row is taken while row 1 runs
    gen = Generator(toy.backbone, toy.stack, cfg, engine=EngineConfig(max_batch=2, max_len=128),
                    vocab=toy.vocab)  # fmt: skip
    cohort = Cohort(gen, [RowRequest(early, cfg), RowRequest(long, cfg)])
    short, other = cohort.events(0), cohort.events(1)
    assert cohort.offer(RowRequest(late, cfg)) is None  # both rows taken
    seen_other = []
    while cohort.load == 2:  # only row 1 is read: row 0's events pile up unread
        seen_other.append(next(other))
    ticket = cohort.offer(RowRequest(late, cfg))
    assert ticket is not None
    while ticket.row is None:  # only row 1 is read: row 0's events pile up unread
        seen_other.append(next(other))
    assert ticket.row == 0
    joined = list(cohort.claim(ticket))  # read before row 0's reader reads anything
    assert joined[-1].row_result.tokens[0].tolist() == lone[2]
    assert [ev.kind for ev in joined].count("end") == 1
    first = list(short)
    assert first[-1].row_result.tokens[0].tolist() == lone[0]
    seen_other += list(other)
    assert seen_other[-1].row_result.tokens[0].tolist() == lone[1]
    assert cohort.finished


def test_no_request_joins_a_stream_past_its_last_step(toy):
    # A request offered while a stream hands out its final events (its last generation step
    # done) must be refused at once: a ticket left behind would join the lane's next stream,
    # whose rows it does not belong to.
    cfg = GenerationConfig(mode="vanilla", max_new_tokens=60, eos_token_id=2)
    gen = Generator(toy.backbone, toy.stack, cfg, engine=EngineConfig(max_batch=2, max_len=128),
                    vocab=toy.vocab)  # fmt: skip
    assert not gen.accepts_joins
    with pytest.raises(RuntimeError, match="no stream takes requests"):
        gen.offer_join(JoinTicket(RowRequest(toy.prompt, cfg)))
    cohort = Cohort(gen, [RowRequest(toy.prompt, cfg)])
    assert cohort.offer(RowRequest(toy.prompt, cfg)) is None  # not started yet
    stream = gen.stream(toy.prompt, config=cfg)
    seen = [next(stream)]
    assert gen.accepts_joins
    for ev in stream:
        seen.append(ev)
        if ev.result is not None:  # the very last event: the stream is suspended in it
            assert gen.streaming and not gen.accepts_joins
            with pytest.raises(RuntimeError, match="no stream takes requests"):
                gen.offer_join(JoinTicket(RowRequest(toy.prompt, cfg)))
    assert seen[-1].result is not None and seen[-1].result.tokens[0].tolist() == toy.answer
    assert not gen.streaming
    # the lane's next stream runs its own rows only
    again = Cohort(gen, [RowRequest(toy.prompt, cfg)])
    assert list(again.events(0))[-1].row_result.tokens[0].tolist() == toy.answer


def test_a_prompt_longer_than_the_running_sequence_is_not_taken(toy):
    # it could only join once the sequence grew past it: a free lane starts it sooner
    cfg = GenerationConfig(mode="vanilla", max_new_tokens=60, eos_token_id=2)
    gen = Generator(toy.backbone, toy.stack, cfg, engine=EngineConfig(max_batch=2, max_len=128),
                    vocab=toy.vocab)  # fmt: skip
    cohort = Cohort(gen, [RowRequest(toy.prompt, cfg)])
    events = cohort.events(0)
    next(events)
    running = gen.buffer.length  # prompt + tokens so far
    longer = torch.randint(3, 60, (1, running + 3))
    assert cohort.offer(RowRequest(longer, cfg)) is None
    assert cohort.offer(RowRequest(toy.prompt[:, :3], cfg)) is not None
    list(events)


def test_a_request_offered_between_events_joins_and_gets_its_lone_answer():
    """``between`` runs after every event while the stream is suspended; a request offered
    from there (the server admits arrivals so) joins at the next join point and still gets
    exactly its lone answer, as does the row being read."""
    bb, stack, vocab = _joinable_model()
    gcfg = GenerationConfig(mode="boost", max_new_tokens=30)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, 90, (1, 7), generator=g), torch.randint(3, 90, (1, 5), generator=g)
    lone = [generate(bb, stack, x, config=gcfg, vocab=vocab).tokens[0].tolist() for x in (a, b)]
    assert lone[0] != lone[1] and len(set(lone[1])) > 3
    gen = Generator(bb, stack, gcfg, engine=EngineConfig(max_batch=2, max_len=128), vocab=vocab)
    calls: list[int] = []
    tickets: list[JoinTicket] = []

    def between() -> None:
        calls.append(len(calls))
        if len(calls) == 2:  # an arrival while row 0's second event is being read
            tickets.append(cohort.offer(RowRequest(b, gcfg)))

    cohort = Cohort(gen, [RowRequest(a, gcfg)], between=between)
    first = cohort.events(0)
    seen = [next(first) for _ in range(2)]
    assert len(calls) >= 2 and tickets and tickets[0] is not None
    while tickets[0].row is None:
        seen.append(next(first))
    assert tickets[0].row == 1 and tickets[0].joined_at is not None
    joined = list(cohort.claim(tickets[0]))
    seen += list(first)
    assert seen[-1].row_result.tokens[0].tolist() == lone[0]
    assert joined[-1].row_result.tokens[0].tolist() == lone[1]


def _count_rows(monkeypatch, backbone) -> list[int]:
    """Rows of every backbone decode from now on (the rows a step really ran)."""
    rows: list[int] = []
    decode = backbone.decode

    def counted(embeds, *args, **kwargs):
        rows.append(embeds.shape[0])
        return decode(embeds, *args, **kwargs)

    monkeypatch.setattr(backbone, "decode", counted)
    return rows


def test_the_eager_path_runs_a_calls_own_rows_and_compiled_shapes_pad(toy, monkeypatch):
    """A lone request on a 3-row engine costs one row on the eager path (and gives exactly
    what a 1-row engine gives); compiled regions run it on 1 row too and pad 2 rows to 3;
    whole compiled graphs pad every call to 3 rows."""
    cfg = GenerationConfig(mode="boost", max_new_tokens=40, eos_token_id=2)
    one = Generator(toy.backbone, toy.stack, cfg, engine=EngineConfig(max_len=96), vocab=toy.vocab)
    want = one.generate(toy.prompt)
    rows = _count_rows(monkeypatch, toy.backbone)
    eager = Generator(
        toy.backbone, toy.stack, cfg, engine=EngineConfig(max_batch=3, max_len=96), vocab=toy.vocab
    )
    got = eager.generate(toy.prompt)
    assert rows and set(rows) == {1}, rows
    assert eager.state.active_rows == 1 and eager.max_batch == 3
    assert got.tokens[0].tolist() == want.tokens[0].tolist() == toy.answer
    assert eager.state.buffer.all_ids.shape[0] == 3  # allocated once for max_batch rows
    two = torch.cat([toy.prompt, toy.prompt])
    for regions, lone_rows in ((True, 1), (False, 3)):
        fixed = Generator(
            toy.backbone,
            toy.stack,
            cfg,
            engine=EngineConfig(
                max_batch=3,
                max_len=96,
                compile=True,
                compile_options={"backend": "eager"},
                compile_regions=regions,
            ),
            vocab=toy.vocab,
        )
        rows.clear()
        assert fixed.generate(toy.prompt).tokens[0].tolist() == toy.answer
        assert rows and set(rows) == {lone_rows}, (regions, rows)
        rows.clear()
        both = fixed.generate(two).tokens
        assert both[0].tolist() == both[1].tolist() == toy.answer
        assert rows and set(rows) == {3}, (regions, rows)  # 2 rows run as 3


def test_rows_grow_when_a_request_joins_and_shrink_when_the_last_ones_end(toy, monkeypatch):
    """Eager cohort: rows past the last live one stop running; a join past the running rows
    brings one back; every request still gets its lone answer."""
    cfg = GenerationConfig(mode="vanilla", max_new_tokens=40, eos_token_id=2)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 60, (1, 9), generator=g), toy.prompt]
    answers = [
        generate(toy.backbone, toy.stack, p, config=cfg, vocab=toy.vocab).tokens[0].tolist()
        for p in prompts
    ]
    (short, s_ans), (long_, l_ans) = sorted(zip(prompts, answers), key=lambda pa: len(pa[1]))
    lone = {"short": s_ans, "long": l_ans}
    assert len(lone["short"]) + 5 < len(lone["long"])  # one stops well before the other
    gen = Generator(
        toy.backbone, toy.stack, cfg, engine=EngineConfig(max_batch=3, max_len=160), vocab=toy.vocab
    )
    rows = _count_rows(monkeypatch, toy.backbone)
    cohort = Cohort(gen, [RowRequest(long_, cfg), RowRequest(short, cfg)])
    first, second = cohort.events(0), cohort.events(1)
    got_short = list(second)  # row 1 ends: only row 0 runs from then on
    assert got_short[-1].row_result.tokens[0].tolist() == lone["short"]
    assert rows[0] == 2
    events = [next(first)]
    while gen.state.active_rows != 1:
        events.append(next(first))
    shrunk = len(rows)
    ticket = cohort.offer(RowRequest(short, cfg))
    assert ticket is not None
    while ticket.row is None:
        events.append(next(first))
    assert ticket.row == 1 and gen.state.active_rows == 2  # the join brought row 1 back
    joined = list(cohort.claim(ticket))
    events += list(first)
    assert events[-1].row_result.tokens[0].tolist() == lone["long"]
    assert joined[-1].row_result.tokens[0].tolist() == lone["short"]
    assert 1 in rows[:shrunk] and max(rows) == 2  # row 2 (never used) never ran
    assert rows[shrunk:].count(1) >= 1 and 2 in rows[shrunk:]


def test_a_joining_row_catches_up_alone_and_still_gets_its_lone_answer(monkeypatch):
    """With ``join_heads_alone`` the heads read a joining request's prompt for its row alone
    (the other rows' heads do not re-read those slots); the answers are those the other way
    (every row re-reads) gives, which are the lone answers."""
    from mctp.engine.decoding import MCTPDecoder

    bb, stack, vocab = _joinable_model()
    gcfg = GenerationConfig(mode="turbo", max_new_tokens=40)
    g = torch.Generator().manual_seed(3)
    # the joining prompt is longer than a Turbo chain: re-reading it costs every row more
    a, b, c = (torch.randint(3, 90, (1, n), generator=g) for n in (7, 6, 16))
    lone = [generate(bb, stack, x, config=gcfg, vocab=vocab).tokens[0].tolist() for x in (a, b, c)]
    assert len({tuple(t) for t in lone}) == 3
    head_states = MCTPDecoder._head_states

    def run(alone: bool | None) -> tuple[list[list[int]], int]:
        work = [0]

        def counted(self, k, idx, *args, **kwargs):
            work[0] += idx.numel() * self.buffer.batch_size  # slot-rows a head ran
            return head_states(self, k, idx, *args, **kwargs)

        monkeypatch.setattr(MCTPDecoder, "_head_states", counted)
        engine = EngineConfig(max_batch=3, max_len=160, join_heads_alone=alone)
        gen = Generator(bb, stack, gcfg, engine=engine, vocab=vocab)
        cohort = Cohort(gen, [RowRequest(a, gcfg), RowRequest(b, gcfg)])
        first, second = cohort.events(0), cohort.events(1)
        seen = [next(first)]
        while gen.buffer.length < 24:  # room for the prompt before the cursor
            seen.append(next(first))
        before = work[0]
        ticket = cohort.offer(RowRequest(c, gcfg))
        assert ticket is not None
        while ticket.row is None:
            seen.append(next(first))
        assert ticket.row == 2
        joined = list(cohort.claim(ticket))
        answers = [list(first)[-1], list(second)[-1], joined[-1]]
        monkeypatch.setattr(MCTPDecoder, "_head_states", head_states)
        return [ev.row_result.tokens[0].tolist() for ev in answers], work[0] - before

    alone_answers, alone_work = run(True)
    reread_answers, reread_work = run(False)  # every row's heads re-read the joined prompt
    assert alone_answers == reread_answers == lone
    assert alone_work < reread_work  # the other rows did not re-read the joined prompt
    # the default picks by the heads' width (32 here: re-read; from JOIN_ALONE_WIDTH: alone)
    assert run(None)[1] == reread_work
    monkeypatch.setattr("mctp.engine.joins.JOIN_ALONE_WIDTH", 32)
    assert run(None)[1] == alone_work
    with pytest.raises(TypeError, match="join_heads_alone"):
        EngineConfig(join_heads_alone="yes")


@pytest.mark.parametrize(("alone", "regions"), [(True, True), (False, True), (True, False)])
def test_a_request_joins_a_fixed_shape_batch_and_gets_its_lone_answer(alone, regions, monkeypatch):
    """The fixed-shape path (uncompiled here: ``backend="eager"``) runs a lone request on 1
    row with regions (on all ``max_batch`` rows with whole graphs); a request that joins
    brings every row back (compiled shapes: 1 row or all), gets its lone answer whichever way
    the heads read its prompt, and once it ended the lone row runs alone again."""
    bb, stack, vocab = _joinable_model()
    gcfg = GenerationConfig(mode="turbo", max_new_tokens=40)
    g = torch.Generator().manual_seed(3)
    a, c = torch.randint(3, 90, (1, 7), generator=g), torch.randint(3, 90, (1, 8), generator=g)
    lone = [generate(bb, stack, x, config=gcfg, vocab=vocab).tokens[0].tolist() for x in (a, c)]
    # a stop id that ends the joining request early and never the first one
    stop = next(t for t in lone[1][14:] if t not in lone[0] and t not in lone[1][:14])
    gcfg = gcfg.replace(eos_token_id=stop)
    lone = [generate(bb, stack, x, config=gcfg, vocab=vocab).tokens[0].tolist() for x in (a, c)]
    assert 14 < len(lone[1]) < 30 and len(lone[0]) == 40
    engine = EngineConfig(
        max_batch=3,
        max_len=200,
        compile=True,
        compile_options={"backend": "eager"},
        compile_regions=regions,
        join_heads_alone=alone,
    )
    gen = Generator(bb, stack, gcfg, engine=engine, vocab=vocab)
    rows = _count_rows(monkeypatch, bb)  # rows of each backbone call, the join's prefill too
    cohort = Cohort(gen, [RowRequest(a, gcfg)])
    first = cohort.events(0)
    seen = [next(first)]
    while gen.buffer.length < 10:  # room for the prompt before the cursor
        seen.append(next(first))
    assert gen.state.active_rows == (1 if regions else 3)
    ticket = cohort.offer(RowRequest(c, gcfg))
    assert ticket is not None
    while ticket.row is None:
        seen.append(next(first))
    assert ticket.row == 1
    joined = list(cohort.claim(ticket))
    seen += list(first)
    assert seen[-1].row_result.tokens[0].tolist() == lone[0]
    assert joined[-1].row_result.tokens[0].tolist() == lone[1]
    if regions:  # 1 row, all 3 while the joined request ran, 1 again once it stopped
        assert rows[0] == 1 and rows[-1] == 1 and set(rows) == {1, 3}, rows
        widths = [r for i, r in enumerate(rows) if i == 0 or r != rows[i - 1]]
        assert widths[-3:] == [1, 3, 1], widths  # ... the join's 1-row prefill, 3, 1
    else:  # every step runs 3 rows (the join's prefill runs its own row)
        assert rows[0] == 3 and rows[-1] == 3 and set(rows) == {1, 3}, rows


def test_sampled_rows_with_a_repetition_penalty_grow(toy):
    """Sampling with a repetition penalty keeps a history per row: rows that join past the
    running ones keep theirs in step with the rows run (no shape error; every row ends with
    its whole budget of in-range tokens)."""
    from mctp.engine.sampling import SamplingConfig

    sampling = SamplingConfig(do_sample=True, temperature=0.8, top_k=20, repetition_penalty=1.3)
    cfg = GenerationConfig(mode="boost", max_new_tokens=30, eos_token_id=(), text_sampling=sampling)
    gen = Generator(
        toy.backbone, toy.stack, cfg, engine=EngineConfig(max_batch=4, max_len=160), vocab=toy.vocab
    )
    torch.manual_seed(0)
    cohort = Cohort(gen, [RowRequest(torch.randint(3, 60, (1, 9)), cfg)])
    first = cohort.events(0)
    seen = [next(first) for _ in range(2)]
    assert gen.state.active_rows == 1
    tickets = [cohort.offer(RowRequest(toy.prompt[:, i:], cfg)) for i in (0, 1)]
    assert all(t is not None for t in tickets)
    while any(t.row is None for t in tickets):
        seen.append(next(first))
    assert sorted(t.row for t in tickets) == [1, 2] and gen.state.active_rows == 3
    results = [[*seen, *first][-1], *(list(cohort.claim(t))[-1] for t in tickets)]
    for ev in results:
        assert ev.kind == "end"
        toks = ev.row_result.tokens[0]
        assert toks.numel() == 30 and int(toks.min()) >= 0 and int(toks.max()) < 128


@pytest.mark.parametrize("mode", ["vanilla", "turbo"])
def test_once_the_first_rows_end_attention_skips_the_slots_no_row_reads(mode, monkeypatch):
    """A batch that keeps taking requests keeps its cursor growing; once its first rows ended,
    every step reads the cache from the first slot a live row reads (the backbone's decode
    gets ``key_start`` > 0, its ``valid`` narrower than the cursor), and the answers stay the
    lone ones."""
    bb, stack, vocab = _joinable_model()
    gcfg = GenerationConfig(mode=mode, max_new_tokens=30)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, 90, (1, 7), generator=g), torch.randint(3, 90, (1, 5), generator=g)
    lone = [generate(bb, stack, x, config=gcfg, vocab=vocab).tokens[0].tolist() for x in (a, b)]
    gen = Generator(bb, stack, gcfg, engine=EngineConfig(max_batch=2, max_len=128), vocab=vocab)
    starts: list[tuple[int, int]] = []  # (key_start, slots read) of every backbone decode
    decode = bb.decode

    def spy(embeds, positions, slots, valid, cache, **kwargs):
        starts.append((kwargs.get("key_start", 0), valid.shape[1]))
        return decode(embeds, positions, slots, valid, cache, **kwargs)

    monkeypatch.setattr(bb, "decode", spy)
    cohort = Cohort(gen, [RowRequest(a, gcfg)])
    first = cohort.events(0)
    seen = [next(first) for _ in range(3)]
    ticket = cohort.offer(RowRequest(b, gcfg))
    assert ticket is not None
    while ticket.row is None:
        seen.append(next(first))
    joined = cohort.claim(ticket)
    seen += list(first)  # row 0 ends; row 1 goes on alone
    assert seen[-1].row_result.tokens[0].tolist() == lone[0]
    assert list(joined)[-1].row_result.tokens[0].tolist() == lone[1]
    late = [(lo, width) for lo, width in starts if lo > 0]
    assert len(late) > 1, starts  # the joined row's prefill, then its steps after row 0 ended
    assert all(width < 128 - lo for lo, width in late)


@pytest.mark.parametrize(
    ("mode", "regions"), [("turbo", False), ("vanilla", False), ("turbo", True)]
)
def test_a_prompt_longer_than_the_sequence_joins_at_once_into_the_cohorts_room(
    mode, regions, monkeypatch
):
    """A cohort's room takes a joining prompt longer than its sequence at the next join point;
    no step computes or reads the room (the eager path, and compiled regions: uncompiled
    here, ``backend="eager"``), every answer is the lone one."""
    bb, stack, vocab = _joinable_model()
    gcfg = GenerationConfig(mode=mode, max_new_tokens=30)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, 90, (1, 3), generator=g), torch.randint(3, 90, (1, 20), generator=g)
    lone = [generate(bb, stack, x, config=gcfg, vocab=vocab).tokens[0].tolist() for x in (a, b)]
    assert lone[0] != lone[1] and len(set(lone[1])) > 3  # answers that can tell rows apart
    fixed = dict(compile=True, compile_options={"backend": "eager"}, compile_regions=True, window=8)
    reads = []  # (first slot computed, first slot read) of every backbone step
    decode = type(bb).decode

    def spy(self, x, positions, idx, valid, cache, **kw):
        reads.append((int(idx[0]), kw.get("key_start", 0)))
        return decode(self, x, positions, idx, valid, cache, **kw)

    monkeypatch.setattr(type(bb), "decode", spy)
    from mctp.engine.cache import KVCache

    head_reads = []  # the first slot each head call reads
    set_positions = KVCache.set_positions

    def spy_heads(self, positions, *, visible=None, start=0):
        if self.single_layer:
            head_reads.append(start)
        return set_positions(self, positions, visible=visible, start=start)

    monkeypatch.setattr(KVCache, "set_positions", spy_heads)

    def cohort(room):
        engine = EngineConfig(
            max_batch=2, max_len=200, join_room=room, **(fixed if regions else {})
        )
        gen = Generator(bb, stack, gcfg, engine=engine, vocab=vocab)
        c = Cohort(gen, [RowRequest(a, gcfg)])
        first = c.events(0)
        return gen, c, first, [next(first)]

    # no room: the 20-token prompt does not fit before the cursor of a 3-token one
    gen, c, first, _ = cohort(0)
    assert gen.buffer.length - 1 < b.shape[1] and c.offer(RowRequest(b, gcfg)) is None
    first.close()
    # room: the cohort's prompt starts 64 slots in, padding that is never computed
    reads.clear()
    head_reads.clear()
    gen, c, first, seen = cohort(64)
    assert gen.buffer.length == 64 + 1 and not gen.buffer.valid[0, :61].any()
    ticket = c.offer(RowRequest(b, gcfg))
    assert ticket is not None
    while ticket.row is None:
        seen.append(next(first))
    assert ticket.row == 1 and not c.finished
    assert gen.buffer.length - 1 < 64 + 12  # joined at the first join points, not much later
    joined = list(c.claim(ticket))
    seen += list(first)
    assert seen[-1].row_result.tokens[0].tolist() == lone[0]
    assert joined[-1].row_result.tokens[0].tolist() == lone[1]
    # a row's sequence holds its own prompt, not the room
    assert seen[-1].row_result.sequences[0, :3].tolist() == a[0].tolist()
    # no step computed a slot of the room, none read one before the joined prompt's
    start = 64 + 1 - 1 - 20  # the lowest slot the joined prompt took (cursor - 1 - 20), or more
    # (the prefill: the prompt's slots; a fixed window widened back over 5 slots of the room)
    assert reads[0] == ((56, 56) if regions else (61, 61)), reads
    assert all(lo >= start and ks >= start for lo, ks in reads), reads
    # the heads too (a fixed window reaches back at most its 8 slots)
    if mode != "vanilla":  # (Vanilla runs no head)
        assert head_reads and min(head_reads) >= start - (8 if regions else 0), head_reads


def test_the_room_leaves_half_the_free_slots_for_joins(toy):
    cfg = GenerationConfig(mode="boost", max_new_tokens=40)
    req = [RowRequest(toy.prompt, cfg)]

    def room(**kw):
        gen = Generator(toy.backbone, toy.stack, cfg, engine=EngineConfig(**kw), vocab=toy.vocab)
        return Cohort._room(gen, req)

    assert room(max_batch=2, max_len=4096) == 256  # the default
    assert room(max_batch=2, max_len=101) == (101 - 41) // 2
    assert room(max_batch=2, max_len=4096, join_room=0) == 0
    assert room(max_batch=1, max_len=4096) == 0  # nothing can join one row
    fixed = dict(max_batch=2, max_len=4096, compile=True, compile_options={"backend": "eager"})
    assert room(**fixed, compile_regions=True) == 256  # regions read from the first live slot
    assert room(**fixed, compile_regions=False) == 0  # whole graphs read every slot
    with pytest.raises(ValueError, match="join_room"):
        EngineConfig(join_room=-1)


def test_compiled_regions_with_room_and_a_join_compile_nothing_after_the_first_run():
    """Reads that start at ``key_start`` change only the symbolic slot dimension: a second
    cohort with room and a join (compiled regions, ``aot_eager``) recompiles nothing and
    gives the lone answers."""
    bb, stack, vocab = _joinable_model()
    gcfg = GenerationConfig(mode="turbo", max_new_tokens=30)
    engine = EngineConfig(max_batch=2, max_len=200, join_room=64, compile=True,
                          compile_options={"backend": "aot_eager"}, window=8)  # fmt: skip
    gen = Generator(bb, stack, gcfg, engine=engine, vocab=vocab)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, 90, (1, 3), generator=g), torch.randint(3, 90, (1, 20), generator=g)

    def run():
        cohort = Cohort(gen, [RowRequest(a, gcfg)])
        first = cohort.events(0)
        seen = [next(first)]
        ticket = cohort.offer(RowRequest(b, gcfg))
        assert ticket is not None
        while ticket.row is None:
            seen.append(next(first))
        joined = list(cohort.claim(ticket))
        seen += list(first)
        return [seen[-1].row_result.tokens[0].tolist(), joined[-1].row_result.tokens[0].tolist()]

    warm = run()
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert run() == warm
    assert warm == [
        generate(bb, stack, x, config=gcfg, vocab=vocab).tokens[0].tolist() for x in (a, b)
    ]
