"""The worker's loop (dmd2_serve/server/loop.py): every waiting request at once, answers from a thread."""

import queue
import threading
import time
from types import SimpleNamespace

import pytest
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError, collate_requests

from dmd2_serve.server import loop
from dmd2_serve.server.loop import ServingLoop


class SlowQueue(queue.Queue):
    """A request queue whose every take costs ``cost_s``, as a Manager queue's round trip does under load."""

    def __init__(self, cost_s: float = 0.0) -> None:
        super().__init__()
        self.cost_s = cost_s
        self.waits: list[float | None] = []  # the timeout of each blocking take

    def get(self, block=True, timeout=None):
        time.sleep(self.cost_s)
        if block:
            self.waits.append(timeout)
        return super().get(block, timeout)

    def get_nowait(self):
        return self.get(block=False)


def api(max_batch_size=16, batch_timeout=0.0, request_timeout=30.0):
    return SimpleNamespace(max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                           request_timeout=request_timeout, stream=False)


def fill(q, n, age_s=0.0):
    for i in range(n):
        q.put((0, f"uid-{i}", time.monotonic() - age_s, {"prompt": f"p{i}"}))


def uids(taken):
    return [uid for _, uid, _ in taken]


def test_every_waiting_request_is_taken_however_slow_the_queue():
    # The contrast first: LitServe's own collection stops when its 1 ms window closes.
    slow = SlowQueue(cost_s=0.0005)
    fill(slow, 16)
    cut, _ = collate_requests(ServingLoop(), api(batch_timeout=0.001), slow, None)
    assert len(cut) < 16

    slow = SlowQueue(cost_s=0.0005)
    fill(slow, 16)
    taken, expired = ServingLoop().get_batch_requests(api(batch_timeout=0.001), slow, None)
    assert uids(taken) == [f"uid-{i}" for i in range(16)] and expired == []


def test_a_lone_request_does_not_wait_for_company():
    q = SlowQueue()
    fill(q, 1)
    taken, _ = ServingLoop().get_batch_requests(api(batch_timeout=0.0), q, None)
    assert uids(taken) == ["uid-0"]
    assert q.waits == [loop.IDLE_WAIT_S]  # only the wait for the first request blocked


def test_the_batch_stops_at_max_batch_size_and_the_rest_waits_for_the_next():
    q = SlowQueue()
    fill(q, 20)
    loop = ServingLoop()
    first, _ = loop.get_batch_requests(api(max_batch_size=16, batch_timeout=0.05), q, None)
    second, _ = loop.get_batch_requests(api(max_batch_size=16), q, None)
    assert uids(first) == [f"uid-{i}" for i in range(16)]
    assert uids(second) == [f"uid-{i}" for i in range(16, 20)]


def test_batch_timeout_waits_for_requests_that_come_after_the_first():
    q = SlowQueue()
    fill(q, 1)
    late = threading.Timer(0.05, lambda: q.put((0, "late", time.monotonic(), {})))
    late.start()
    try:
        taken, _ = ServingLoop().get_batch_requests(api(batch_timeout=1.0, max_batch_size=2), q, None)
    finally:
        late.cancel()
    assert uids(taken) == ["uid-0", "late"]  # full at 2: the rest of the second is not waited for


def test_an_idle_worker_comes_back_empty_and_a_stop_ends_the_loop(monkeypatch):
    monkeypatch.setattr(loop, "IDLE_WAIT_S", 0.01)
    q = SlowQueue()
    assert ServingLoop().get_batch_requests(api(), q, None) == ([], [])
    q.put(_SENTINEL_VALUE)
    with pytest.raises(_StopLoopError):
        ServingLoop().get_batch_requests(api(), q, None)


def test_requests_past_the_request_timeout_are_answered_as_timed_out():
    q = SlowQueue()
    fill(q, 2, age_s=10.0)
    fill(q, 1)
    taken, expired = ServingLoop().get_batch_requests(api(request_timeout=5.0), q, None)
    assert len(taken) == 1 and expired == [(0, "uid-0"), (0, "uid-1")]


def cancelled_in_worker(loop: ServingLoop, go, tickets: list[int], answers) -> None:
    """A spawned worker's view of ``tickets`` once ``go`` is set."""
    go.wait(60)
    answers.put([ticket in loop.cancellations for ticket in tickets])


def test_the_loop_travels_to_a_spawned_worker_and_sees_cancellations_made_after():
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # as LitServe starts its inference workers
    worker, go, answers = ServingLoop(), ctx.Event(), ctx.Queue()
    worker.cancellations.cancel(5)
    process = ctx.Process(target=cancelled_in_worker, args=(worker, go, [5, 7, 9], answers))
    process.start()
    try:
        worker.cancellations.cancel(7)  # after the worker started: the ring is shared memory
        go.set()
        assert answers.get(timeout=60) == [True, True, False]
    finally:
        process.join(30)
    assert process.exitcode == 0


def test_jobs_whose_client_went_away_are_left_out_of_the_batch():
    from dmd2_serve.server import metrics
    from dmd2_serve.server.cancel import Cancellations

    q = SlowQueue()
    for i in range(4):
        q.put((0, f"uid-{i}", time.monotonic(), SimpleNamespace(ticket=100 + i)))
    q.put(_SENTINEL_VALUE)  # LitServe's stop, behind them
    worker = ServingLoop()
    for ticket in (100, 101, 103):
        worker.cancellations.cancel(ticket)
    before = metrics.CANCELLED._value.get()
    taken, _ = worker.get_batch_requests(api(max_batch_size=1), q, None)  # they take no place in the batch
    assert uids(taken) == ["uid-2"] and metrics.CANCELLED._value.get() == before + 2
    with pytest.raises(_StopLoopError):  # the stop still reaches the loop
        worker.get_batch_requests(api(), q, None)
    assert metrics.CANCELLED._value.get() == before + 3
    # the ring keeps the newest cancellations: an old one pushed out is run as before (its answer dropped)
    ring = Cancellations(size=2)
    for ticket in (1, 2, 3):
        ring.cancel(ticket)
    assert [t in ring for t in (1, 2, 3)] == [False, True, True] and len(ring) == 3


class SlowTransport:
    """LitServe's response transport, each send taking ``cost_s`` (a Manager round trip with a big answer);
    the first send for ``fail_on`` raises."""

    def __init__(self, cost_s: float, fail_on: str | None = None) -> None:
        self.cost_s, self.fail_on = cost_s, fail_on
        self.sent: list[tuple[str, str]] = []  # (uid, status)

    def send(self, item, consumer_id):
        time.sleep(self.cost_s)
        uid, (_, status, _, _) = item
        if uid == self.fail_on:
            self.fail_on = None
            raise BrokenPipeError("the response queue is gone")
        self.sent.append((uid, status))


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_answers_go_from_a_thread_in_order_while_the_worker_goes_on(capfd):
    from litserve.utils import LitAPIStatus, LoopResponseType

    transport = SlowTransport(cost_s=0.05, fail_on="b")
    worker = ServingLoop()
    t0 = time.perf_counter()
    for uid in "abcd":
        worker.put_response(transport, 0, uid, ("pixels",), LitAPIStatus.OK, LoopResponseType.REGULAR)
    assert time.perf_counter() - t0 < 0.05  # four sends of 50 ms each did not hold the worker
    wait_for(lambda: len(transport.sent) == 4)
    # in order; the answer that could not go became an error answer (a 500), so its request does not hang
    assert transport.sent == [("a", "OK"), ("b", "ERROR"), ("c", "OK"), ("d", "OK")]
    assert "an answer could not be sent (BrokenPipeError" in capfd.readouterr().err
    assert worker.__getstate__()["_outbox"] is None  # the thread stays in the worker that made it


class EchoAPI:
    """The LitAPI surface LitServe's batched loop calls."""

    max_batch_size, batch_timeout, request_timeout, stream, spec = 3, 0.0, 30.0, False, None

    def decode_request(self, x):
        return x

    def batch(self, x):
        return x

    def predict(self, x):
        return x

    def unbatch(self, x):
        return x

    def encode_response(self, y):
        return y


def test_a_stopping_loop_still_sends_the_answers_of_the_batches_it_ran():
    from litserve.callbacks import CallbackRunner

    q = SlowQueue()
    fill(q, 3)
    q.put(_SENTINEL_VALUE)
    transport = SlowTransport(cost_s=0.1)
    ServingLoop().run_batched_loop(EchoAPI(), q, transport, CallbackRunner())  # returns at the sentinel
    assert transport.sent == [("uid-0", "OK"), ("uid-1", "OK"), ("uid-2", "OK")]  # sent before it returned
