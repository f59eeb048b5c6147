"""ASGI middleware around the LitServe app: admission control and metrics.

- A bounded queue: at most ``max_queue`` generation requests are admitted at once; the next one
  gets 503 with ``Retry-After`` at once instead of waiting in an ever-growing queue.
- Draining: once the main process stops admitting (a SIGTERM, a dead worker; see ``lifecycle``),
  generation requests get 503 with ``Retry-After`` and ``/health`` 503 saying why.
- Metrics: requests by endpoint and status, latency, queue depth (see ``metrics``).

Answers pass through as the app sends them; the raw-image answers of ``Accept: image/png`` are
made by the route itself (see ``encoding``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import metrics

if TYPE_CHECKING:
    from .lifecycle import ServingState

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def openai_error(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    """The OpenAI API's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_body(path: str, message: str) -> dict[str, Any]:
    """An error body in the shape the endpoint's clients expect."""
    return openai_error(message, kind="server_error") if path.startswith("/v1/") else {"detail": message}


async def _respond(send: Callable, status: int, raw: bytes, content_type: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(raw)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": raw})


async def _json_response(send: Callable, status: int, body: dict[str, Any], headers: list | None = None) -> None:
    await _respond(send, status, json.dumps(body).encode(), b"application/json", headers)


class ServingMiddleware:
    """Admission control, draining and metrics for the generation endpoints.

    ``state`` is shared with the main process, which counts on it the requests still to answer.
    """

    def __init__(self, app: ASGIApp, *, generation_paths: tuple[str, ...], known_paths: tuple[str, ...],
                 max_queue: int, state: ServingState, health_path: str = "/health", retry_after_s: int = 1) -> None:
        self.app = app
        self.generation_paths = set(generation_paths)
        self.known_paths = set(known_paths) | self.generation_paths
        self.max_queue = max_queue
        self.state = state
        self.health_path = health_path
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in self.known_paths else "other"
        status = {"code": 500}
        started = time.perf_counter()

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if path in self.generation_paths and scope["method"] == "POST":
                await self._generation(scope, receive, tracked_send, path)
            elif path == self.health_path and (reason := self.state.stop_reason):
                await _respond(tracked_send, 503, reason.encode(), b"text/plain; charset=utf-8")
            else:
                await self.app(scope, receive, tracked_send)
        finally:
            metrics.REQUESTS.labels(endpoint, str(status["code"])).inc()
            metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - started)

    async def _generation(self, scope: Scope, receive: Callable, send: Callable, path: str) -> None:
        if not self.state.admit(self.max_queue):
            reason = self.state.stop_reason
            if not reason:
                metrics.REJECTED.inc()
                reason = f"the server is at its queue limit ({self.max_queue} requests)"
            msg = f"{reason}; retry in {self.retry_after_s} s"
            await _json_response(send, 503, error_body(path, msg), [(b"retry-after", str(self.retry_after_s).encode())])
            return
        metrics.QUEUE_DEPTH.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.release()
            metrics.QUEUE_DEPTH.dec()
