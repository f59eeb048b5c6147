"""Start a real ``python -m dmd2_serve`` on a free loopback port for the server tests."""

from __future__ import annotations

import io
import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from PIL import Image

from dmd2_serve.server.launch import LocalServer, launch, stop


@dataclass
class Server(LocalServer):
    log_path: str = ""

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]


def start_server(*args: str, port: int | None = None) -> Server:
    """The server with a log file (shown when it fails to start). Its metrics folder is the one its CLI
    makes, as for an operator (``launch`` does not pass on this process's)."""
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    try:
        s = launch(*args, log=log, port=port)
    except RuntimeError as e:
        raise RuntimeError(f"{e}:\n{open(log.name).read()[-4000:]}") from None
    return Server(s.url, s.process, s.health_seen, log.name)


def stop_server(server: Server) -> None:
    stop(server.process)


def held_request(server: Server, body: dict, release: threading.Event) -> httpx.Response:
    """A POST whose body is sent in two parts, the second once ``release`` is set.

    The server admits a generation request on its headers, so it holds this one, counted in
    its queue, until the test sends the rest: "in flight" made exact.
    """
    raw = json.dumps(body).encode()

    def parts():
        yield raw[:4]
        release.wait(timeout=60)  # bounded: a failed assertion must not leave the thread waiting
        yield raw[4:]

    return httpx.post(f"{server.url}/generate", content=parts(), headers={"content-type": "application/json"},
                      timeout=60)


def raw_post(server: Server, path: str, head_body: bytes, *, content_length: int, timeout: float = 20,
             opened: Callable[[], None] | None = None, headers: dict[str, str] | None = None,
             ) -> tuple[int, bytes, bytes]:
    """POST ``head_body`` (maybe less than ``content_length`` bytes: a stalled upload) on a plain socket;
    the answer's status, head and body, read until the server closes the connection. ``opened`` runs once
    the request is sent, before the answer is read; ``headers`` are sent besides the content type and length."""
    host, port = server.url.removeprefix("http://").split(":")
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
                     f"Content-Length: {content_length}\r\n\r\n".encode() + head_body)
        if opened is not None:
            opened()
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.lower(), body


def metric(server: Server, name: str) -> float:
    """The value of an unlabelled metric on ``/metrics``."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} "))


def queue_depth(server: Server) -> float:
    return metric(server, "dmd2_queue_depth")


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def jpeg_quality_table(quality: int | None) -> list[int]:
    """The luminance quantisation table Pillow writes at ``quality`` (None: its default): it names a JPEG's
    quality (``Image.open(jpeg).quantization[0]``), greyscale or colour."""
    out = io.BytesIO()
    Image.new("L", (8, 8)).save(out, format="JPEG", **({} if quality is None else {"quality": quality}))
    return Image.open(out).quantization[0]
