"""Stopping the server as an operator or a process manager does: a signal to its main process alone.

Real servers on loopback with the bundled digits generator. "In flight" is made exact with
requests whose body arrives in two parts (``serving.held_request``).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from serving import Server, held_request, queue_depth, start_server, stop_server, wait_for

from dmd2_serve.server.launch import free_port, terminate
from dmd2_serve.server.metrics import OWNER_LOCK, remove_dead_servers_folders


def generate(server: Server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", json=body, timeout=60)


def process_tree(server: Server) -> list[psutil.Process]:
    main = psutil.Process(server.process.pid)
    return [main, *main.children(recursive=True)]


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie waiting for a reaper that is not ours has stopped)."""
    running = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


def port_is_free(port: int) -> bool:
    """Whether a new server could bind ``port`` now (with SO_REUSEADDR, as uvicorn binds)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def full_log(server: Server) -> str:
    with open(server.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()


def health(server: Server) -> int | str:
    try:
        return httpx.get(f"{server.url}/health", timeout=2).status_code
    except httpx.TransportError:
        return "no connection"


@pytest.fixture(scope="module")
def port() -> int:
    """One port for both signals: the second server binds the port the first one just left."""
    return free_port()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_admitted_requests_then_frees_the_port(sig: int, port: int):
    server = start_server("--max-batch-size", "4", "--batch-timeout", "0.05", port=port)
    try:
        bodies = [{"prompt": f"a {i % 10}", "seed": 100 + i, "num_images": 1 + i % 3} for i in range(16)]
        with ThreadPoolExecutor(len(bodies)) as pool:  # batched as they come: a seed's pixels never depend on it
            expected = [r.json()["images"] for r in pool.map(lambda b: generate(server, **b), bodies)]
        processes = process_tree(server)
        assert len(processes) >= 4, processes  # main, Manager, inference worker, HTTP process
        release = threading.Event()
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(held_request, server, b, release) for b in bodies]
            wait_for(lambda: queue_depth(server) == len(bodies), 20, "16 requests admitted")
            server.process.send_signal(sig)  # the main process only, as `kill PID` does
            wait_for(lambda: health(server) == 503, 5, "/health 503 while draining")
            assert "draining" in httpx.get(f"{server.url}/health").text
            late = generate(server, prompt="a 1", seed=1)
            assert late.status_code == 503 and late.headers["retry-after"] == "1", late.text
            assert "shutting down" in late.json()["detail"]
            assert server.process.poll() is None, "exited with requests still in flight"
            release.set()
            results = [f.result() for f in futures]
        assert [r.status_code for r in results] == [200] * len(bodies), [r.text[:200] for r in results]
        assert [r.json()["images"] for r in results] == expected  # the same seeds, the same pixels
        assert server.process.wait(timeout=30) == 0, server.log()
        wait_for(lambda: not alive(processes), 5, f"every process of the server gone: {alive(processes)}")
        assert port_is_free(port)
        assert "leaked semaphore" not in full_log(server)  # the worker's tqdm lock, a named semaphore, was left
    finally:
        stop_server(server)


def test_a_closed_terminal_drains_too():
    """SIGHUP comes with a terminal that is gone: every write to it fails (EIO). The drain's first log
    line raised in the supervisor, which stopped the server at once and lost the requests in flight."""
    import pty

    from dmd2_serve.server.launch import launch, stop

    main_side, terminal = pty.openpty()
    server = launch(log=terminal)
    os.close(terminal)
    try:
        release = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(held_request, server, {"prompt": "a 2", "seed": 4}, release)
            wait_for(lambda: queue_depth(server) == 1, 20, "the request admitted")
            os.close(main_side)  # the terminal hangs up ...
            server.process.send_signal(signal.SIGHUP)  # ... and says so to the session's processes
            wait_for(lambda: health(server) == 503, 5, "/health 503 while draining")
            release.set()
            assert held.result().status_code == 200, held.result().text
        assert server.process.wait(timeout=30) == 0
    finally:
        stop(server.process)


def test_grace_period_ends_the_wait_and_the_status_says_so():
    server = start_server("--grace", "1")
    try:
        processes = process_tree(server)
        release = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(held_request, server, {"prompt": "a 2"}, release)
            wait_for(lambda: queue_depth(server) == 1, 20, "the request admitted")
            started = time.monotonic()
            status = terminate(server.process, signal.SIGHUP, timeout=30)  # a closed terminal: as SIGTERM
            took = time.monotonic() - started
            release.set()
            cut_off = stuck.result()  # its body never came: answered by the middleware, not cancelled (a bare 500)
        assert cut_off.status_code == 503, cut_off.text
        assert cut_off.json()["detail"] == ("draining: SIGHUP received, the server is shutting down; the drain's"
                                            " --grace of 1 s ran out; it stopped before this request was answered:"
                                            " retry")
        assert cut_off.headers["retry-after"] == "1"
        assert status == 1 and 1 <= took < 10, (status, took, server.log())
        assert "1 request(s) still in flight: answering them 503 and stopping (the drain's --grace" in full_log(server)
        assert "Traceback" not in full_log(server)
        wait_for(lambda: not alive(processes), 5, f"every process of the server gone: {alive(processes)}")
    finally:
        stop_server(server)


def test_dead_worker_fails_health_and_the_server_exits_nonzero():
    server = start_server()
    try:
        processes = process_tree(server)
        worker = next(p for p in processes if "spawn_main" in " ".join(p.cmdline()))
        worker.send_signal(signal.SIGKILL)
        time.sleep(0.5)  # the supervisor wakes on the worker's exit at once; allow for a loaded machine
        seen = []
        while server.process.poll() is None and len(seen) < 1000:
            seen.append(health(server))
            time.sleep(0.01)
        assert 200 not in seen, seen
        assert server.process.wait(timeout=30) == 1, server.log()
        assert f"inference worker 0 (pid {worker.pid}) died with exit code -9" in full_log(server)
        wait_for(lambda: not alive(processes), 5, f"every process of the server gone: {alive(processes)}")
    finally:
        stop_server(server)


def test_sigkill_of_the_main_process_takes_the_workers_with_it_and_the_next_start_its_metrics_folder():
    """No exit handler runs after SIGKILL: the metrics folder stayed in /tmp until a later start removed it."""
    server = start_server()
    try:
        processes = process_tree(server)
        worker = next(p for p in processes if "spawn_main" in " ".join(p.cmdline()))
        folder = Path(worker.environ()["PROMETHEUS_MULTIPROC_DIR"])
        assert folder not in remove_dead_servers_folders(folder.parent) and folder.is_dir()  # running: kept
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
        wait_for(lambda: not alive(processes), 10, f"every process of the server gone: {alive(processes)}")
        assert port_is_free(int(server.url.rsplit(":", 1)[1]))
        assert folder.is_dir()
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"TMPDIR": str(folder.parent)}
        subprocess.run([sys.executable, "-c", "import dmd2_serve.server.metrics"], env=env, check=True, timeout=60)
        assert not folder.exists()  # the next start's metrics set-up removed it
    finally:
        stop_server(server)


def test_sigterm_while_starting_stops_at_once_with_exit_handlers(tmp_path: Path):
    """Before the server took over its signals (torch imports, model checks), SIGTERM killed the process
    without its exit handlers (its metrics folder stayed), and as PID 1 of a container it was ignored until
    the runtime's SIGKILL."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"TMPDIR": str(tmp_path)}
    starting = subprocess.Popen([sys.executable, "-m", "dmd2_serve", "--port", str(free_port())], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: list(tmp_path.glob("dmd2-metrics-*")), 60, "the metrics folder made, early in the start")
        starting.send_signal(signal.SIGTERM)
        assert starting.wait(timeout=30) == 128 + signal.SIGTERM
        assert not list(tmp_path.glob("dmd2-metrics-*"))
    finally:
        terminate(starting)


def test_the_sweep_removes_only_folders_whose_owner_lock_is_free(tmp_path: Path):
    dead, running, older = (tmp_path / f"dmd2-metrics-{name}" for name in ("dead", "running", "older"))
    for folder in dead, running, older:
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"x")
    (dead / OWNER_LOCK).touch()
    (running / OWNER_LOCK).touch()
    held = os.open(running / OWNER_LOCK, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as its server holds it (another open file: flock refuses the sweep's)
    try:
        assert remove_dead_servers_folders(tmp_path) == [dead]
    finally:
        os.close(held)
    assert running.is_dir() and older.is_dir()  # no lock file: mid-start, or a version before the lock
    assert remove_dead_servers_folders(tmp_path) == [running]


def test_middleware_refuses_and_fails_health_once_the_server_stops_admitting():
    import asyncio

    from dmd2_serve.server.lifecycle import ServingState
    from dmd2_serve.server.middleware import ServingMiddleware

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    state = ServingState()
    middleware = ServingMiddleware(app, generation_paths=("/generate", "/v1/images/generations"),
                                   known_paths=("/health",), max_queue=1, state=state)

    async def calls() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(middleware), base_url="http://test") as client:
            return [await client.get("/health"), await client.post("/generate"),
                    await client.post("/v1/images/generations"), await client.get("/metrics")]

    assert [r.status_code for r in asyncio.run(calls())] == [200, 200, 200, 200] and state.in_flight == 0
    assert state.admit(1) and not state.admit(1)  # the queue bound, shared with the main process
    state.release()
    state.stop_admitting("unhealthy: inference worker 0 (pid 7) died with exit code -9")
    state.stop_admitting("draining: SIGTERM received")  # the first reason stands
    health, native, openai, other = asyncio.run(calls())
    assert health.status_code == 503 and health.text == "unhealthy: inference worker 0 (pid 7) died with exit code -9"
    assert native.status_code == 503 and native.headers["retry-after"] == "1" and "died" in native.json()["detail"]
    assert openai.status_code == 503 and "died" in openai.json()["error"]["message"]
    assert other.status_code == 200 and not state.admit(1)
