"""Start ``python -m dmd2_serve`` as a child process on a free loopback port, and stop it cleanly.

Used by the load benchmark and the tests. The server runs in its own process group, so that
stopping it also stops LitServe's worker processes (they outlive a SIGTERM to the parent alone).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import IO

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalServer:
    url: str
    process: subprocess.Popen
    health_seen: list[int] = field(default_factory=list)  # /health answers before it said 200


def stop(process: subprocess.Popen, grace_s: float = 20) -> None:
    """Ctrl-C the whole process group (LitServe shuts its workers down), then kill what is left."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the parent if it hung, and any worker left behind
    except ProcessLookupError:
        pass
    process.wait()


def launch(*args: str, log: IO | int = subprocess.DEVNULL, env: dict | None = None,
           ready_timeout: float = 180) -> LocalServer:
    """Start the server with ``args`` and return once ``/health`` answers 200."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "dmd2_serve", "--port", str(port), *args], stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True)
    server = LocalServer(f"http://127.0.0.1:{port}", process)
    deadline = time.time() + ready_timeout
    while time.time() < deadline:
        if process.poll() is not None:
            stop(process)
            raise RuntimeError(f"the server exited with status {process.returncode} before it was ready")
        try:
            status = httpx.get(f"{server.url}/health", timeout=2).status_code
            server.health_seen.append(status)
            if status == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    stop(process)
    raise RuntimeError(f"the server was not healthy within {ready_timeout} s")
