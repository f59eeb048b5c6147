"""The inference worker's loop: a batch of every request already waiting, answers sent from a thread.

**Batches.** LitServe's batched loop gathers a batch for ``batch_timeout`` seconds from the
moment it starts looking, one request at a time from its request queue, a
``multiprocessing.Manager`` queue: each ``get`` is a round trip to the Manager process (~70 us
on an idle machine, more under load). With a short window the batch is cut when the window
closes, not when the waiting requests run out: on an H200 at 32 clients the batches averaged
11.4 requests with 16 and more waiting (``served-sd15-nvidia-h200-2026-12-04.json``), so each
pass of the bucket-16 graph carried a quarter padding. A longer window would fill them, but
would also hold a lone request that long.

:class:`ServingLoop` forms a batch the way a serving system's dynamic batcher does (Triton's
with no queue delay): wait for the first request, take every request already queued behind it
up to ``max_batch_size`` however long taking them lasts, and only then wait up to
``batch_timeout`` for more (0: do not wait; the server's default). A lone request runs as soon
as it arrives; under load every batch is as full as the queue allows. Each request still goes
through LitServe's own bookkeeping (its start notice, its request timeout, the stop sentinel):
the loop hands LitServe's ``collate_requests`` a view of the API with the window it should use.

**Answers.** LitServe's loop sends a batch's answers one by one through its response queue,
another Manager queue, before it takes the next batch, and each send waits while the Manager
receives the whole answer: a 512x512 image's pixels (0.8 MB) cost ~1.1 ms, a 1024x1024 one's
(3.1 MB) ~6 ms on our 2-core CPU, so 16 SDXL images would keep the GPU idle ~100 ms a batch.
:class:`ServingLoop` hands the answers to a sender thread of the worker instead, which sends
them in order while the worker runs the next batch (and, when the loop stops, before it ends).
An answer that cannot be sent is answered with a 500, so that its request does not wait forever.

**Cancelled requests.** A request whose client went away while it waited is left out of the batch
(see ``cancel``).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from queue import Queue
from typing import Any

from fastapi import HTTPException
from litserve.loops.base import _SENTINEL_VALUE, collate_requests
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, dump_exception

from . import metrics
from .cancel import Cancellations
from .lifecycle import say

IDLE_WAIT_S = 0.5  # an idle worker blocks this long on the queue per look (LitServe's loop polls every 1 ms)
FLUSH_S = 30.0  # a stopping loop waits at most this long for its queued answers to go
_DONE = object()  # the end of the sender thread's queue


@dataclass(frozen=True)
class _Window:
    """What ``collate_requests`` reads of a ``LitAPI``, with the window and room of one look."""

    batch_timeout: float
    max_batch_size: int
    request_timeout: float | bool | None
    stream: bool


class _Waiting:
    """The request queue as a batch sees it: one request already taken put back in front, and the
    requests whose client went away taken out as they come (counted), so they take no place in it."""

    def __init__(self, first: Any, rest: Queue, cancellations: Cancellations) -> None:
        self._first, self._queue, self._cancellations = [first], rest, cancellations

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._first:
                request = self._first.pop()
            else:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                request = self._queue.get(block, left)
            if not self._cancelled(request):
                return request

    def _cancelled(self, request: Any) -> bool:
        """Whether ``request`` (LitServe's (queue id, uid, time, job), or its stop sentinel) was cancelled."""
        if request == _SENTINEL_VALUE or getattr(request[3], "ticket", None) not in self._cancellations:
            return False
        metrics.CANCELLED.inc()
        return True


class ServingLoop(BatchedLoop):
    """LitServe's batched loop with the batch formed, and the answers sent, as the module docstring says."""

    def __init__(self) -> None:
        super().__init__()
        self._outbox: queue.SimpleQueue | None = None  # made in the worker, with the sender, on the first answer
        self._sender: threading.Thread | None = None
        self._sending = threading.Lock()  # one thread at a time on the transport (a ZMQ socket is not thread-safe)
        self.cancellations = Cancellations()  # written by the HTTP processes, read here

    def __getstate__(self) -> dict[str, Any]:
        state = {**self.__dict__, "_outbox": None, "_sender": None}  # the loop travels to spawned workers
        del state["_sending"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._sending = threading.Lock()

    def run_batched_loop(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().run_batched_loop(*args, **kwargs)
        finally:
            self.flush()  # a stopping loop still answers the batches it ran

    def put_response(self, transport: Any, response_queue_id: int, uid: str, response_data: Any, status: str,
                     response_type: Any) -> None:
        """Queue an answer for the sender thread (a start notice goes at once: it carries nothing)."""
        message = (transport, response_queue_id, uid, response_data, status, response_type)
        if status == LitAPIStatus.START:
            self._put(message)
            return
        if self._sender is None:
            self._outbox = queue.SimpleQueue()
            self._sender = threading.Thread(target=self._send, args=(self._outbox,), daemon=True, name="dmd2-answers")
            self._sender.start()
        self._outbox.put(message)

    def flush(self, timeout: float = FLUSH_S) -> None:
        """Send every answer still queued, then end the sender thread (waits at most ``timeout`` seconds)."""
        if self._sender is not None:
            self._outbox.put(_DONE)
            self._sender.join(timeout)
            self._outbox = self._sender = None

    def _put(self, message: tuple) -> None:
        with self._sending:
            super().put_response(*message)

    def _send(self, outbox: queue.SimpleQueue) -> None:
        """The sender thread: each queued answer through LitServe's response queue, in order, until ``_DONE``."""
        while (message := outbox.get()) is not _DONE:
            try:
                self._put(message)
            except Exception as e:  # noqa: BLE001 - that request gets a 500 instead; the rest still go
                self._answer_failure(message, e)

    def _answer_failure(self, message: tuple, error: Exception) -> None:
        """An answer that could not be sent: say so, and answer its request with a 500 so it does not wait forever."""
        transport, response_queue_id, uid, _, _, response_type = message
        say(f"an answer could not be sent ({type(error).__name__}: {error}); its request gets a 500")
        failure = HTTPException(500, "the inference worker could not send this answer back; see the server's log")
        try:
            self._put((transport, response_queue_id, uid, dump_exception(failure), LitAPIStatus.ERROR, response_type))
        except Exception as e:  # noqa: BLE001 - the transport itself is gone: the server is stopping or broken
            say(f"nor could its error ({type(e).__name__}: {e})")

    def get_batch_requests(self, lit_api: Any, request_queue: Queue, transport: Any) -> tuple[list, list]:
        """(requests, timed-out requests) of the next batch, without the requests whose client went away;
        both empty when none came within ``IDLE_WAIT_S``."""
        first = self.get_request(request_queue, timeout=IDLE_WAIT_S)
        if first is None:
            return [], []
        return take_batch(self, lit_api, _Waiting(first, request_queue, self.cancellations), transport)


def take_batch(loop: Any, lit_api: Any, queue: Any, transport: Any) -> tuple[list, list]:
    """Every request in ``queue`` up to the API's ``max_batch_size``, then up to its ``batch_timeout``
    more seconds of arrivals; (requests, timed-out requests) as LitServe's ``collate_requests`` gives them."""
    def window(seconds: float, room: int) -> _Window:
        return _Window(seconds, room, lit_api.request_timeout, lit_api.stream)

    taken, expired = collate_requests(loop, window(0.0, lit_api.max_batch_size), queue, transport)  # no clock
    room = lit_api.max_batch_size - len(taken)
    if lit_api.batch_timeout > 0 and room > 0:
        more, late = collate_requests(loop, window(lit_api.batch_timeout, room), queue, transport)
        taken, expired = taken + more, expired + late
    return taken, expired

