"""Requests whose client went away before they ran: forgotten by the HTTP process, skipped by the worker.

A client that closes its connection (a timeout of its own, a Ctrl-C, a retry) leaves its request
in the queue; LitServe would still run it, answer into the void and count it 200, so a retrying
client multiplied the load exactly when the server was too slow. Now:

- the middleware watches the connection of each admitted request once its body is read (``receive``
  answers ``http.disconnect`` when the peer closes) and cancels the route's task when the client
  goes before its answer starts: 499 in the metrics (nginx's "client closed request"), and its queue
  place is given back at once;
- :class:`ForgettingRequestHandler` (the route's LitServe handler) then drops the request's answer
  slot and writes its job's ticket into :class:`Cancellations`;
- the worker's loop skips every job whose ticket is there as it takes requests for a batch
  (``dmd2_cancelled_total``), so they take no place in it. A job already in a running batch is
  finished; its answer is dropped.

The queue place goes back at once, while the skipped job stays in LitServe's queue until the worker
next takes requests: for the length of one batch that queue may hold more than ``--max-queue`` jobs
(cancelled ones, skipped at no cost). Linux only, as the rest of the server (fork; and the ring
pickles only while a worker is being spawned).

:class:`Cancellations` is a ring of tickets in shared memory: written by the HTTP processes (forked,
under a lock), read by the inference workers (spawned: it travels with the loop) without a round
trip to any other process. A worker rebuilds its set only when the count moved, so a server nobody
leaves pays one shared-memory read per batch. A cancellation pushed out of the ring before a worker
looked (more than ``size`` in one batch's time) is run as before, its answer dropped.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import multiprocessing
import secrets
from multiprocessing.sharedctypes import RawArray, RawValue
from typing import Any

from litserve.server import RegularRequestHandler

RING = 4096  # cancellations a worker can still see after one batch's time

_submitted: contextvars.ContextVar[str | None] = contextvars.ContextVar("dmd2_submitted_uid")  # per request task


def new_ticket() -> int:
    """A job's ticket: a random nonzero 63-bit number (0 marks an empty slot of the ring)."""
    return secrets.randbits(63) | 1


class Cancellations:
    """The tickets of jobs whose client went away, shared across the server's processes."""

    def __init__(self, size: int = RING) -> None:
        self._tickets = RawArray(ctypes.c_uint64, size)
        self._count = RawValue(ctypes.c_uint64, 0)
        self._lock: Any = multiprocessing.get_context("fork").Lock()  # the HTTP processes are forked
        self._seen, self._known = 0, frozenset()

    def __getstate__(self) -> dict[str, Any]:
        # to a spawned worker, which only reads (a fork context's lock cannot travel there)
        return {"_tickets": self._tickets, "_count": self._count, "_lock": None, "_seen": 0, "_known": frozenset()}

    def cancel(self, ticket: int) -> None:
        """Mark ``ticket``'s job cancelled (HTTP process)."""
        with self._lock:
            count = self._count.value
            self._tickets[count % len(self._tickets)] = ticket
            self._count.value = count + 1  # after the ticket: a reader that sees the count sees it

    def __contains__(self, ticket: object) -> bool:
        count = self._count.value
        if count == 0:
            return False
        if count != self._seen:
            self._seen, self._known = count, frozenset(self._tickets[:min(count, len(self._tickets))])
        return ticket in self._known

    def __len__(self) -> int:
        """Cancellations so far (the ring holds the newest ``size``)."""
        return self._count.value


class ForgettingRequestHandler(RegularRequestHandler):
    """LitServe's handler for one request, which forgets a request whose task is cancelled (its client
    went away, or the drain gave up on it): its answer slot is dropped and its job's ticket cancelled."""

    def __init__(self, lit_api: Any, server: Any, cancellations: Cancellations) -> None:
        super().__init__(lit_api, server)
        self.cancellations = cancellations

    async def _submit_request(self, payload: dict) -> tuple[str, Any]:
        uid, queue_id = await super()._submit_request(payload)
        _submitted.set(uid)  # the same task's context: handle_request below reads it
        return uid, queue_id

    async def handle_request(self, request: Any, request_type: Any) -> Any:
        """The request's answer, as LitServe's handler gives it; on cancellation, forget it first."""
        _submitted.set(None)
        try:
            return await super().handle_request(request, request_type)
        except asyncio.CancelledError:
            uid = _submitted.get(None)
            if uid is not None:
                self.server.response_buffer.pop(uid, None)  # a late answer for it is then dropped
                ticket = getattr(request, "ticket", None)
                if ticket is not None:
                    self.cancellations.cancel(ticket)
            raise
