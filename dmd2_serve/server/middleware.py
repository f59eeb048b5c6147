"""ASGI middleware around the LitServe app: admission control and metrics.

- The API key first: with ``api_key`` set, a generation request without it gets 401 before its
  body is read or a queue place taken (an unauthenticated client learns nothing of the body's
  checks and cannot hold a place while it uploads).
- A bounded queue: at most ``max_queue`` generation requests are admitted at once; the next one
  gets 503 with ``Retry-After`` at once instead of waiting in an ever-growing queue.
- Draining: once the main process stops admitting (a SIGTERM, a dead worker; see ``lifecycle``),
  generation requests get 503 with ``Retry-After`` and ``/health`` 503 saying why.
- Request bodies: one declared (Content-Length) over ``max_body_bytes`` gets 413 before it is
  read; an admitted request whose body has not arrived whole ``body_timeout_s`` after admission
  gets 408 and gives its place back (a stalled or trickling upload cannot hold a queue place).
- An expired drain: once the main process gives up waiting (``--grace``), a generation request
  not yet answered gets 503 in the endpoint's error shape, not a cancelled task's bare 500.
- A client gone before its answer began: its route is cancelled (its job is skipped, see
  ``cancel``), its place given back, and it counts as status 499 ("client closed request").
- Metrics: requests by endpoint and status, latency, queue depth (see ``metrics``).
- HEAD is answered as GET without the body (``/health`` probes that use HEAD).

Answers pass through as the app sends them; the raw-image answers of ``Accept: image/png`` are
made by the route itself (see ``encoding``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
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

POLL_S = 0.25  # how often a waiting request looks at its body's clock and at the drain
CLIENT_GONE = 499  # the status a request whose client closed the connection counts as (nginx's)
# On answers sent before the body was read whole: the connection's next bytes would be the body's rest.
CLOSE = (b"connection", b"close")


def openai_error(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    """The OpenAI API's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_body(path: str, message: str) -> dict[str, Any]:
    """An error body in the shape the endpoint's clients expect."""
    return openai_error(message, kind="server_error") if path.startswith("/v1/") else {"detail": message}


KEY_MESSAGE = "missing or wrong API key: send 'Authorization: Bearer <key>'"
WWW_AUTHENTICATE = {"WWW-Authenticate": "Bearer"}


def key_matches(authorization: str, api_key: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <api_key>`` (compared in constant time)."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def unauthorized_body(path: str) -> dict[str, Any]:
    """The 401 body in the endpoint's error shape (on /v1/, OpenAI's, with the code its clients look for)."""
    if not path.startswith("/v1/"):
        return {"detail": KEY_MESSAGE}
    body = openai_error(KEY_MESSAGE)
    body["error"]["code"] = "invalid_api_key"  # OpenAI's code for it, which its clients look for
    return body


def too_large_body(path: str, limit: int) -> dict[str, Any]:
    """The 413 body for a request over ``limit`` bytes, in the endpoint's error shape."""
    message = (f"the request body is over this server's limit of {limit:,} bytes (--max-body-mb); an input image"
               " is most of a body: send a smaller one")
    if path.startswith("/v1/"):
        return openai_error(message)
    return {"detail": [{"loc": ["body"], "msg": message, "type": "too_large"}]}


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length header, if it has a valid one."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value)
    return None


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
                 max_queue: int, state: ServingState, health_path: str = "/health", retry_after_s: int = 1,
                 max_body_bytes: int | None = None, body_timeout_s: float = 30.0,
                 item_prefixes: tuple[str, ...] = (), api_key: str | None = None) -> None:
        self.app = app
        self.api_key = api_key
        self.item_prefixes = item_prefixes  # routes of one item (/v1/models/{id}): one endpoint label for all
        self.generation_paths = set(generation_paths)
        self.known_paths = set(known_paths) | self.generation_paths
        self.max_queue = max_queue
        self.state = state
        self.health_path = health_path
        self.retry_after_s = retry_after_s
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":  # as GET (load balancers' health checks); uvicorn leaves the body out
            scope = {**scope, "method": "GET"}
        path = scope["path"]
        endpoint = path if path in self.known_paths else next(
            (f"{prefix}{{id}}" for prefix in self.item_prefixes if path.startswith(prefix)), "other")
        status = {"code": 500}
        started = time.perf_counter()

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = message.get("headers", []) if path == self.health_path else None
                if headers is not None and not any(k.lower() == b"content-type" for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"content-type", b"text/plain; charset=utf-8")]}
            await send(message)

        declared = _declared_length(scope)
        try:
            if path in self.generation_paths and scope["method"] == "POST" and not self._authorized(scope):
                await _json_response(tracked_send, 401, unauthorized_body(path),  # before any check of the body
                                     [(b"www-authenticate", b"Bearer"), CLOSE])  # (left unread)
            elif self.max_body_bytes is not None and declared is not None and declared > self.max_body_bytes:
                await _json_response(tracked_send, 413, too_large_body(path, self.max_body_bytes), [CLOSE])
            elif path in self.generation_paths and scope["method"] == "POST":
                if await self._generation(scope, receive, tracked_send, path):
                    status["code"] = CLIENT_GONE
            elif path == self.health_path and (reason := self.state.stop_reason):
                await _respond(tracked_send, 503, reason.encode(), b"text/plain; charset=utf-8")
            else:
                await self.app(scope, receive, tracked_send)
        finally:
            metrics.REQUESTS.labels(endpoint, str(status["code"])).inc()
            metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - started)

    def _authorized(self, scope: Scope) -> bool:
        """No key is required, or the request's ``Authorization`` header carries it."""
        if not self.api_key:
            return True
        given = [value for name, value in scope.get("headers", ()) if name == b"authorization"]
        return len(given) == 1 and key_matches(given[0].decode("latin-1"), self.api_key)

    async def _generation(self, scope: Scope, receive: Callable, send: Callable, path: str) -> bool:
        """Admit and answer a generation request; True when its client went away before its answer."""
        if not self.state.admit(self.max_queue):
            reason = self.state.stop_reason
            if not reason:
                metrics.REJECTED.inc()
                reason = f"the server is at its queue limit ({self.max_queue} request{'s' if self.max_queue > 1 else ''})"
            msg = f"{reason}; retry in {self.retry_after_s} s"
            await _json_response(send, 503, error_body(path, msg), [(b"retry-after", str(self.retry_after_s).encode())])
            return False
        metrics.QUEUE_DEPTH.inc()
        try:
            return await self._answer_in_time(scope, receive, send, path)
        finally:
            self.state.release()
            metrics.QUEUE_DEPTH.dec()

    async def _answer_in_time(self, scope: Scope, receive: Callable, send: Callable, path: str) -> bool:
        """Run the app, watched: before it has begun its answer, a body not whole ``body_timeout_s``
        after admission gets 408, a request the main process's drain gave up on gets 503, and one
        whose client closed the connection is cancelled unanswered (True).

        Without the first, a stalled upload holds its queue place for ever (and one that sends a
        byte now and then, were the limit a pause between parts); without the second, the HTTP
        process's own stop cancels the request and its client gets a bare 500; without the third,
        a request nobody waits for is run all the same (and a retrying client's load multiplied).
        Once the body is whole the app reads no more, so the next ``receive`` is the peer's
        ``http.disconnect`` (uvicorn answers it when the connection closes, or once the answer is sent).
        """
        started = whole = client_left = False
        watch: asyncio.Future | None = None  # the connection's next message, once the body is whole
        deadline = time.monotonic() + self.body_timeout_s

        async def watch_connection() -> None:
            nonlocal client_left
            try:
                message = await receive()
            except Exception:  # noqa: BLE001 - a connection that cannot be read is for uvicorn to report
                return
            if message.get("type") == "http.disconnect" and not started:
                client_left = True
                app.cancel()

        async def timed_receive() -> Message:
            nonlocal whole, watch
            message = await receive()
            whole = whole or message["type"] != "http.request" or not message.get("more_body", False)
            if whole and watch is None:
                watch = asyncio.ensure_future(watch_connection())
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        app = asyncio.ensure_future(self.app(scope, timed_receive, tracked_send))
        try:
            while not (await asyncio.wait({app}, timeout=POLL_S))[0]:
                if started:
                    continue
                if self.state.abandoned:
                    status, body = 503, error_body(path, f"{self.state.stop_reason or 'the server is shutting down'};"
                                                   " it stopped before this request was answered: retry")
                elif not whole and time.monotonic() > deadline:
                    message = (f"the request body did not arrive whole within {self.body_timeout_s:g} s"
                               " (--body-timeout); send it again, whole")
                    status, body = 408, openai_error(message) if path.startswith("/v1/") else {"detail": message}
                else:
                    continue
                app.cancel()
                await asyncio.wait({app})  # its end, without taking its cancellation for this request's own
                if not app.cancelled():
                    app.exception()  # retrieved: whatever it ended with is superseded by this answer
                retry = [(b"retry-after", str(self.retry_after_s).encode())] if status == 503 else []
                await _json_response(send, status, body, retry + ([] if whole else [CLOSE]))
                return False
        finally:
            app.cancel()  # a no-op once it is done; else this request was cancelled from outside
            if watch is not None:
                watch.cancel()
        if client_left and app.cancelled():
            return True
        app.result()
        return False
