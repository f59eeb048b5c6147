"""Start ``python -m dmd2_serve`` as a child process on a loopback port, and stop it.

Used by the load benchmark and the tests. ``terminate`` stops it as an operator or a process
manager does, with a SIGTERM to its main process alone (which drains, then stops its workers);
``stop`` also signals its whole process group and kills whatever is left, for tests that want
everything gone whatever state the server is in.
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


def terminate(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """Send ``sig`` to the server's main process only, as ``kill PID`` does; its exit status."""
    process.send_signal(sig)
    return process.wait(timeout=timeout)


def stop(process: subprocess.Popen, grace_s: float = 20) -> None:
    """Ctrl-C the whole process group (the server drains and stops its workers), then kill what is left."""
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


def _environment(env: dict[str, str | None] | None) -> dict[str, str]:
    """This process's environment with ``env`` applied (a None value removes that variable). This
    process's metrics folder is not passed on unless ``env`` names it: each server makes its own."""
    merged = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": None, **(env or {})}
    return {k: v for k, v in merged.items() if v is not None}


def launch(*args: str, log: IO | int = subprocess.DEVNULL, env: dict[str, str | None] | None = None,
           ready_timeout: float = 180, port: int | None = None) -> LocalServer:
    """Start the server with ``args`` on ``port`` (default: a free one); return once ``/health`` answers 200.

    ``env``: variables to set for it (None: unset one this process has; see ``_environment``).
    """
    port = port or free_port()
    process = subprocess.Popen([sys.executable, "-m", "dmd2_serve", "--port", str(port), *args], stdout=log,
                               stderr=subprocess.STDOUT, env=_environment(env), start_new_session=True)
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
