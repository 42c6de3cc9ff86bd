"""One generation worker: queued requests, 503 when the queue is full, disconnects free slots.

A pipeline that holds its answers at a gate after their first chunk makes the order of events
deterministic; the server is a real uvicorn on 127.0.0.1 in a thread of the test process.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
from mctp_serve_helpers import InProcessServer, post_json, request

from mctp.serve import GenerationWorker, Job, QueueFull, ServerConfig, create_app
from mctp.speech import SpeechPipeline


class GatedPipeline(SpeechPipeline):
    """Yields the first chunk of an answer at once, the others only while ``gate`` is open."""

    gate: threading.Event

    def answer(self, *args, **kwargs):
        inner = super().answer(*args, **kwargs)

        def gated():
            for i, chunk in enumerate(inner):
                if i:
                    assert self.gate.wait(30), "the test never opened the gate"
                yield chunk

        return gated()


@pytest.fixture
def slow(tiny):
    pipe = GatedPipeline(
        backbone=tiny.backbone,
        stack=tiny.stack,
        tokenizer=tiny.tokenizer,
        vocab=tiny.vocab,
        decoder=tiny.decoder,
        audio_tokenizer=tiny.audio_tokenizer,
        name="slow",
    )
    pipe.gate = threading.Event()
    return pipe


def _wait_cancelled(app, timeout: float = 10.0) -> None:
    """Wait until the running job is marked cancelled (the server saw its client leave)."""
    worker = app.state.api.worker
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(job.cancelled.is_set() for job in worker.active_jobs):
            return
        time.sleep(0.02)
    raise TimeoutError("the server did not notice that the client left")


def _wait_completed(w: GenerationWorker, n: int, timeout: float = 10.0) -> None:
    """Wait (at most ``timeout`` s) until the worker completed ``n`` jobs."""
    end = time.monotonic() + timeout
    while w.completed < n and time.monotonic() < end:
        time.sleep(0.01)


def _health(url: str) -> dict:
    return json.loads(request(url, "/health")[2])


def test_worker_runs_jobs_in_order_and_refuses_when_full():
    gate = threading.Event()
    seen: list = []
    w = GenerationWorker(max_queue=1)

    def blocked():
        gate.wait(10)
        yield "a"

    w.submit(blocked, seen.append)
    end = time.monotonic() + 5
    while not w.busy and time.monotonic() < end:
        time.sleep(0.01)
    w.submit(lambda: iter(["b"]), seen.append)  # waits
    with pytest.raises(QueueFull, match="1 requests are waiting"):
        w.submit(lambda: iter(["c"]), seen.append)
    gate.set()
    w.close()
    assert [s for s in seen if s is not w and isinstance(s, str)] == ["a", "b"]
    assert w.completed == 2
    with pytest.raises(ValueError, match="max_queue"):
        GenerationWorker(max_queue=0)


def test_a_job_being_admitted_still_counts_against_the_queue_bound():
    """While the worker runs a job's function (its request being prepared) the job is out of
    the queue but not placed yet: it still counts as waiting, so the bound lets no extra job
    in (the race behind an occasional 200 instead of 503 in the server test below)."""
    inside, release = threading.Event(), threading.Event()
    w = GenerationWorker(max_queue=1)

    def preparing():
        inside.set()
        assert release.wait(10)
        return iter(["b"])

    w.submit(preparing, lambda _item: None)
    assert inside.wait(10)
    assert w.waiting == 1
    with pytest.raises(QueueFull):
        w.submit(lambda: iter(["c"]), lambda _item: None)
    release.set()
    w.close()
    assert w.completed == 1 and w.waiting == 0


def test_worker_hands_errors_to_the_job_and_goes_on():
    seen: list = []
    w = GenerationWorker()

    def boom():
        raise ValueError("bad input")
        yield

    w.submit(boom, seen.append)
    w.submit(lambda: iter([1]), seen.append)
    w.close()
    assert isinstance(seen[0], ValueError) and seen[1] == 1
    assert w.failed == 1 and w.completed == 1


def test_full_queue_answers_503_and_disconnect_frees_the_slot(slow):
    # one Generator and no joins: a request arriving while it runs a batch waits for it (with
    # joins, B could join A's batch while A's next chunk is being made, and not wait at all)
    cfg = ServerConfig(max_queue=1, warmup=False, lanes=1, joins=False)
    body = {"messages": [{"role": "user", "content": "hello"}], "modalities": ["text", "audio"]}
    app = create_app(slow, cfg)
    with InProcessServer(app) as srv:
        # A: a streaming request; read its first event, then hang up
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({**body, "stream": True}),
            {"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")
        assert _health(srv.url)["busy"]
        # B waits in the queue (in a thread); C finds the queue full
        results: dict = {}
        t = threading.Thread(
            target=lambda: results.update(b=post_json(srv.url, "/v1/chat/completions", body))
        )
        t.start()
        end = time.monotonic() + 10
        while _health(srv.url)["waiting"] < 1 and time.monotonic() < end:
            time.sleep(0.02)
        status, out = post_json(srv.url, "/v1/chat/completions", body)
        assert status == 503 and out["error"]["type"] == "server_busy"
        status, _, _ = request(srv.url, "/v1/audio/speech", {"input": "hi"})
        assert status == 503
        # A hangs up: the worker drops it at its next chunk and B runs
        conn.sock.shutdown(2)
        conn.close()
        _wait_cancelled(app)  # the server noticed the hang-up
        slow.gate.set()
        t.join(60)
        status, out = results["b"]
        assert status == 200 and out["choices"][0]["message"]["content"]
        # B's answer is sent from inside the worker's turn, which ends a moment later
        end = time.monotonic() + 10
        while (health := _health(srv.url))["busy"] and time.monotonic() < end:
            time.sleep(0.02)
        assert health["cancelled"] == 1 and health["completed"] == 1
        assert not health["busy"] and health["waiting"] == 0


def test_non_streaming_client_that_leaves_is_cancelled(slow):
    cfg = ServerConfig(max_queue=2, warmup=False, lanes=1)
    body = {"messages": [{"role": "user", "content": "hello"}]}
    app = create_app(slow, cfg)
    with InProcessServer(app) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        end = time.monotonic() + 10
        while not _health(srv.url)["busy"] and time.monotonic() < end:
            time.sleep(0.01)
        conn.sock.shutdown(2)
        conn.close()
        _wait_cancelled(app)  # the server noticed the hang-up
        slow.gate.set()
        end = time.monotonic() + 10
        while _health(srv.url)["cancelled"] < 1 and time.monotonic() < end:
            time.sleep(0.05)
        health = _health(srv.url)
        assert health["cancelled"] == 1 and health["completed"] == 0 and not health["busy"], health


def test_a_job_waiting_for_its_first_answer_goes_first_and_keeps_the_turn():
    # "first" marks an answer ("a..."); text items ("t...") before it do not count. A job
    # that started later but has no answer yet runs before the older one, until it has one.
    order: list = []
    gate = threading.Event()
    w = GenerationWorker(max_queue=4, first=lambda item: item.startswith("a"))

    def old():
        yield "a-old-1"
        gate.wait(10)  # the next job is queued while this one runs
        yield from ("a-old-2", "a-old-3", "a-old-4")

    def new():
        yield from ("t-new-1", "t-new-2", "a-new-1", "a-new-2")

    w.submit(old, order.append)
    end = time.monotonic() + 5
    while not order and time.monotonic() < end:
        time.sleep(0.01)
    w.submit(new, order.append)
    time.sleep(0.05)
    gate.set()
    w.close()
    items = [x for x in order if isinstance(x, str)]
    # once admitted, the new job's three items up to its first answer come in one run
    i = items.index("t-new-1")
    assert items[i : i + 3] == ["t-new-1", "t-new-2", "a-new-1"]
    assert items.index("a-new-1") < items.index("a-old-4")
    assert w.completed == 2


class _FaultyBatcher:
    """Accepts ``"req"`` jobs and never starts them; its ``offer`` raises."""

    max_batch = 1

    def accepts(self, request):
        return request == "req"

    def pick(self, requests):
        return [0]

    def can_start(self):
        return False

    def start(self, requests):
        raise AssertionError("never started")

    def offer(self, request):
        raise RuntimeError("offer broke")


def test_a_batcher_fault_fails_that_request_and_the_worker_goes_on():
    seen: list = []
    w = GenerationWorker(max_queue=4, batcher=_FaultyBatcher())
    w.submit(lambda: "req", seen.append)
    w.submit(lambda: iter(["plain"]), seen.append)  # not batched: runs as usual
    w.close()
    errors = [s for s in seen if isinstance(s, Exception)]
    assert len(errors) == 1 and "offer broke" in str(errors[0])
    assert "plain" in seen and w.failed == 1 and w.completed == 1


class _JoiningBatcher:
    """One lane; a request offered while it runs joins at once (like a free row at a join
    point)."""

    max_batch = 2

    def __init__(self, items):
        self.items, self.started = items, False

    def accepts(self, request):
        return isinstance(request, str)

    def pick(self, requests):
        return list(range(min(len(requests), self.max_batch)))

    def can_start(self):
        return not self.started

    def start(self, requests):
        self.started = True
        return [iter(self.items[r]) for r in requests]

    def offer(self, request):
        if not self.started:
            return None
        items = self.items[request]

        class Handle:
            joined, refused = True, False

            def start(self):
                return iter(items)

        return Handle()


def test_a_request_arriving_during_a_turn_joins_and_answers_within_it():
    # A and C run together; while A makes its second item, B arrives. B is offered to the
    # running batch before C's next item and, once joined, gives its first answer right
    # after, before A's third item (not a whole turn later).
    seen: list = []
    holder: dict = {}

    def a_items():
        yield "a-1"
        holder["worker"].submit(lambda: "B", seen.append)  # B arrives now
        yield "a-2"
        yield "a-3"

    items = {"A": a_items(), "C": iter(["c-1", "c-2", "c-3"]), "B": iter(["b-1", "b-2"])}
    w = GenerationWorker(max_queue=4, batcher=_JoiningBatcher(items))
    holder["worker"] = w
    gate = threading.Event()
    w.submit(lambda: (gate.wait(10), "A")[1], seen.append)
    w.submit(lambda: "C", seen.append)
    gate.set()
    _wait_completed(w, 3)
    w.close()
    order = [x for x in seen if isinstance(x, str)]
    assert sorted(order) == ["a-1", "a-2", "a-3", "b-1", "b-2", "c-1", "c-2", "c-3"]
    assert order.index("b-1") < order.index("a-3"), order
    assert w.joined == 1 and w.completed == 3


class _BetweenBatcher(_JoiningBatcher):
    """Records offers; its running batch calls ``between`` between events, as cohorts do."""

    def __init__(self, items):
        super().__init__(items)
        self.between = None
        self.offers: list = []

    def offer(self, request):
        self.offers.append(request)
        return super().offer(request)


def test_an_arrival_is_offered_between_the_events_of_the_item_being_made():
    # While A makes its second item, B arrives and the batch reaches an event boundary: the
    # worker admits B and offers it to the running batch there, inside A's item, not after.
    seen: list = []
    holder: dict = {}

    def a_items():
        yield "a-1"
        holder["worker"].submit(lambda: "B", seen.append)
        holder["batcher"].between()  # the running batch between two of its events
        holder["offered_inside_item"] = list(holder["batcher"].offers)
        yield "a-2"
        yield "a-3"

    items = {"A": a_items(), "B": iter(["b-1", "b-2"])}
    batcher = _BetweenBatcher(items)
    w = GenerationWorker(max_queue=4, batcher=batcher)
    assert batcher.between == w._between_events  # the worker installed its hook
    holder.update(worker=w, batcher=batcher)
    w.submit(lambda: "A", seen.append)
    _wait_completed(w, 2)
    w.close()
    # A was offered first (no batch ran yet: refused, then started); B inside A's item
    assert holder["offered_inside_item"] == ["A", "B"]
    assert [x for x in seen if isinstance(x, str) and x.startswith("b")] == ["b-1", "b-2"]
    assert w.joined == 1 and w.completed == 2


def test_an_unbatched_job_arriving_during_a_turn_is_not_lost():
    # A and C take turns; B (a plain item iterator, not a batched request) arrives during A's
    # second item and is admitted before C's item: it must run from the next turn on (it
    # was dropped when the turn ended, and its client waited forever).
    seen: list = []
    holder: dict = {}

    def a_items():
        yield "a-1"
        holder["worker"].submit(lambda: iter(["b-1", "b-2"]), seen.append)
        yield "a-2"
        yield "a-3"

    w = GenerationWorker(max_queue=4)
    holder["worker"] = w
    gate = threading.Event()
    w.submit(lambda: (gate.wait(10), a_items())[1], seen.append)
    w.submit(lambda: iter(["c-1", "c-2", "c-3"]), seen.append)
    gate.set()
    _wait_completed(w, 3)
    w.close()
    order = [x for x in seen if isinstance(x, str)]
    assert sorted(order) == ["a-1", "a-2", "a-3", "b-1", "b-2", "c-1", "c-2", "c-3"], order
    assert w.completed == 3


@pytest.mark.parametrize("apart", [True, False])
def test_a_preparation_on_its_own_thread_does_not_stall_the_running_answers(apart):
    """A request's preparation (here one that waits until the running answer has produced
    five more items) runs beside the generation with ``prepare=True``: the answer goes on
    meanwhile. With ``prepare=False`` it runs on the generation thread, where the answer
    cannot move until it returns (its wait runs out). Plain job functions stay on the
    generation thread either way."""
    from mctp.serve import Preparation

    produced: list[int] = []
    progressed = threading.Event()
    mark: dict = {}
    stop = threading.Event()

    def answer():
        i = 0
        while not stop.is_set():
            i += 1
            produced.append(i)
            if "from" in mark and len(produced) >= mark["from"] + 5:
                progressed.set()
            yield i

    def prepare():
        mark["thread"] = threading.current_thread().name
        mark["from"] = len(produced)
        return iter([progressed.wait(10 if apart else 0.5)])

    w = GenerationWorker(max_queue=4, prepare=1 if apart else 0)
    assert w.prepares == (1 if apart else 0)
    seen: list = []
    w.submit(answer, lambda _item: None)
    end = time.monotonic() + 10
    while not produced and time.monotonic() < end:
        time.sleep(0.01)
    assert produced, "the answer never started"
    w.submit(Preparation(prepare), seen.append)
    end = time.monotonic() + 20
    while len(seen) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    stop.set()
    w.close()
    assert seen[:2] == [apart, Job.DONE], seen
    assert mark["thread"] == ("mctp-preparation-0" if apart else "mctp-generation")


def test_a_preparation_that_fails_or_is_cancelled_is_answered_and_counted():
    """On a preparation thread, a failing preparation hands its error to its job (one that
    raises SystemExit too, and the thread goes on); one cancelled before its turn is never
    run; none of them counts as waiting afterwards; the worker goes on."""
    from mctp.serve import Preparation

    gate = threading.Event()
    ran: list[str] = []

    def blocked():
        ran.append("blocked")
        gate.wait(10)
        return iter(["x"])

    def failing():
        ran.append("failing")
        raise ValueError("bad question")

    def exiting():
        ran.append("exiting")
        raise SystemExit(3)

    w = GenerationWorker(max_queue=5, prepare=1)
    seen: dict[str, list] = {"a": [], "b": [], "c": [], "d": [], "e": []}
    w.submit(Preparation(blocked), seen["a"].append)
    end = time.monotonic() + 10
    while not ran and time.monotonic() < end:
        time.sleep(0.01)
    b = w.submit(Preparation(failing), seen["b"].append)
    c = w.submit(Preparation(lambda: iter(["never"])), seen["c"].append)
    w.submit(Preparation(exiting), seen["d"].append)
    w.submit(Preparation(lambda: iter(["e"])), seen["e"].append)  # the thread outlived d
    assert w.waiting == 5  # one being prepared, four queued for preparation
    c.cancel()
    gate.set()
    _wait_completed(w, 2)
    end = time.monotonic() + 10
    while (w.waiting or not seen["b"] or not seen["d"]) and time.monotonic() < end:
        time.sleep(0.01)
    w.close()
    assert seen["a"] == ["x", Job.DONE] and seen["e"] == ["e", Job.DONE]
    assert len(seen["b"]) == 1 and isinstance(seen["b"][0], ValueError)
    assert len(seen["d"]) == 1 and "raised SystemExit" in str(seen["d"][0])
    assert seen["c"] == [] and ran == ["blocked", "failing", "exiting"]
    assert w.failed == 2 and w.cancelled == 1 and w.waiting == 0 and b.id < c.id


def test_a_short_request_is_not_held_behind_a_long_preparation():
    """With two preparation threads, a request that arrives while another one's preparation
    runs long (here until the short one has answered) is prepared and answered meanwhile;
    a negative thread count is refused."""
    from mctp.serve import Preparation

    short_done = threading.Event()
    w = GenerationWorker(max_queue=4, prepare=2)
    seen: dict[str, list] = {"long": [], "short": []}
    w.submit(Preparation(lambda: iter([short_done.wait(10)])), seen["long"].append)
    w.submit(Preparation(lambda: iter(["s"])), seen["short"].append)
    end = time.monotonic() + 10
    while len(seen["short"]) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    short_done.set()
    _wait_completed(w, 2)
    w.close()
    assert seen["short"] == ["s", Job.DONE] and seen["long"] == [True, Job.DONE]
    with pytest.raises(ValueError, match="prepare must be >= 0 threads"):
        GenerationWorker(prepare=-1)


def test_prepare_threads_auto_follows_the_input_codec(tiny):
    """``ServerConfig.prepare_threads=None``: none with the dummy codec (the tiny default),
    no speech input, or on CUDA; two with any other speech-input codec on the CPU; a number
    is kept; anything else is refused."""
    from mctp.serve.protocol import preparation_threads

    assert preparation_threads(tiny, ServerConfig()) == 0  # the tiny default's dummy codec
    assert preparation_threads(tiny, ServerConfig(prepare_threads=3)) == 3

    def stand_in(codec, device="cpu"):
        engine = type("E", (), {"device": device})()
        return type("P", (), {"input_codec": codec, "engine": engine})()

    assert preparation_threads(stand_in(object(), "cuda:0"), ServerConfig()) == 0
    assert preparation_threads(stand_in(None), ServerConfig()) == 0  # text only
    assert preparation_threads(stand_in(object()), ServerConfig()) == 2  # an encoder
    real = stand_in(object())  # e.g. GLM-4-Voice's speech tokenizer
    assert preparation_threads(real, ServerConfig()) == 2
    assert preparation_threads(real, ServerConfig(prepare_threads=0)) == 0
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="prepare_threads must be an int >= 0 or None"):
            ServerConfig(prepare_threads=bad)
