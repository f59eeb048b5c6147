"""A request whose client went away (dmd2_serve/server/cancel.py): cancelled, forgotten, counted 499."""

import asyncio
import queue
from types import SimpleNamespace

import pytest

from dmd2_serve.server import metrics
from dmd2_serve.server.cancel import Cancellations, ForgettingRequestHandler
from dmd2_serve.server.lifecycle import ServingState
from dmd2_serve.server.middleware import ServingMiddleware

SCOPE = {"type": "http", "method": "POST", "path": "/generate", "headers": [(b"content-type", b"application/json")]}


def counted(status: str) -> float:
    return metrics.REQUESTS.labels("/generate", status)._value.get()


async def through_middleware(app, close_after_s: float) -> tuple[list[dict], ServingState]:
    """``app`` behind the middleware, for a client that sends its body and closes after ``close_after_s``."""
    state = ServingState()
    middleware = ServingMiddleware(app, generation_paths=("/generate",), known_paths=(), max_queue=1, state=state)
    body = [{"type": "http.request", "body": b"{}", "more_body": False}]
    closed, sent = asyncio.Event(), []

    async def receive():
        if body:
            return body.pop()
        await closed.wait()  # as uvicorn: after the body, the next message is the peer's disconnect
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.get_running_loop().call_later(close_after_s, closed.set)
    await asyncio.wait_for(middleware(SCOPE, receive, send), 5)
    return sent, state


def test_a_client_gone_before_its_answer_cancels_its_route_and_counts_499():
    ended = []

    async def waiting_app(scope, receive, send):  # a request in the worker's queue
        await receive()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    before = counted("499")
    sent, state = asyncio.run(through_middleware(waiting_app, close_after_s=0.05))
    assert sent == [] and ended == ["cancelled"] and state.in_flight == 0  # its queue place given back
    assert counted("499") == before + 1


def test_a_client_gone_once_its_answer_began_changes_nothing():
    async def slow_body_app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.1)  # the client closes meanwhile
        await send({"type": "http.response.body", "body": b"ok"})

    before = counted("200")
    sent, _ = asyncio.run(through_middleware(slow_body_app, close_after_s=0.02))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert counted("200") == before + 1


def test_the_handler_forgets_a_cancelled_request_and_cancels_its_job():
    requests: queue.Queue = queue.Queue()
    server = SimpleNamespace(response_buffer={}, app=SimpleNamespace(response_queue_id=0), active_requests=0,
                             _get_request_queue=lambda path: requests,
                             _callback_runner=SimpleNamespace(trigger_event=lambda *args, **kwargs: None))
    cancellations = Cancellations()
    handler = ForgettingRequestHandler(SimpleNamespace(api_path="/generate"), server, cancellations)
    job = SimpleNamespace(ticket=42)

    async def cancelled_while_queued():
        task = asyncio.ensure_future(handler.handle_request(job, SimpleNamespace))
        await asyncio.sleep(0.01)
        assert len(server.response_buffer) == 1  # waiting for its answer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_while_queued())
    _, _, _, queued = requests.get_nowait()
    assert queued is job and server.response_buffer == {} and 42 in cancellations and 43 not in cancellations
