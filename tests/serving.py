"""Start a real ``python -m dmd2_serve`` on a free loopback port for the server tests."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

from dmd2_serve.server.launch import LocalServer, launch, stop


@dataclass
class Server(LocalServer):
    log_path: str = ""

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]


def start_server(*args: str, port: int | None = None) -> Server:
    """The server with its own metrics folder and a log file (shown when it fails to start)."""
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    env = {"PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="dmd2-test-metrics-")}
    try:
        s = launch(*args, log=log, env=env, port=port)
    except RuntimeError as e:
        raise RuntimeError(f"{e}:\n{open(log.name).read()[-4000:]}") from None
    return Server(s.url, s.process, s.health_seen, log.name)


def stop_server(server: Server) -> None:
    stop(server.process)
