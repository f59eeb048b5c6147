"""The server's process tree, started and stopped by its main process.

LitServe runs the model and the HTTP side in child processes: a multiprocessing Manager (the
request queues), the inference workers (spawned; each holds the model) and the HTTP process
(forked; uvicorn on the listening socket). ``LitServer.run`` stops them only in a ``finally``
block, which a SIGTERM never reaches: Python's default SIGTERM action ends the main process on the
spot, and the children, which nothing ties to it, keep the port and go on answering.

``SupervisedServer.serve`` owns shutdown instead:

1. SIGTERM, SIGINT or SIGHUP (a closed terminal or SSH session): stop admitting (generation requests get 503 with ``Retry-After``,
   ``/health`` 503 "draining"), wait until the admitted requests are answered or ``grace_s``
   passes (those left are answered 503 by the HTTP process), then let LitServe stop its
   processes. A second signal ends the wait.
2. A child that dies (an inference worker or the HTTP process): ``/health`` 503 naming it, the
   same stop, exit status 1. The server is not repaired in place: the process manager (systemd,
   Kubernetes, Docker's restart policy) starts a fresh one, the state the tests cover.
3. Every child dies with the main process, even after a SIGKILL of it (Linux: PR_SET_PDEATHSIG),
   and has its own process group, so Ctrl-C in a terminal reaches the main process alone.

Exit status 0 when every admitted request was answered and every child stopped when asked;
1 after a crash, an expired grace period, or a child that had to be killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from multiprocessing.process import BaseProcess

import litserve as ls
from litserve.utils import WorkerSetupStatus

from ..terminal import leave_hung_up_terminal
from .middleware import POLL_S

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # each drains, then stops

HTTP_STOP_S = 3.0  # uvicorn's own graceful shutdown, after our drain: only idle connections are left
LIFESPAN_STOP_S = 2.0  # then LitServe's lifespan shutdown, before LitServe kills the HTTP process
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def http_address(host: str, port: int) -> str:
    """The URL of a listening address (an IPv6 one in brackets: ``http://[::]:8000``)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def say(message: str) -> None:
    try:
        print(f"dmd2_serve: {message}", file=sys.stderr, flush=True)
    except OSError:  # a terminal that hung up: the drain goes on without its log
        pass


class ServingState:
    """What the main process and the HTTP process share (inherited through fork): the requests in
    flight, and why the server stopped admitting (empty while it serves)."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")  # LitServe forks its HTTP processes
        self._in_flight = ctx.Value("i", 0)
        self._reason = ctx.Array("c", 256, lock=False)  # guarded by the counter's lock
        self._abandoned = ctx.Value("b", 0, lock=False)  # set once, by the main process

    @property
    def in_flight(self) -> int:
        return self._in_flight.value

    @property
    def stop_reason(self) -> str:
        """Empty while serving; otherwise what ``/health`` and refused requests say."""
        with self._in_flight.get_lock():
            return self._reason.value.decode()

    def admit(self, limit: int) -> bool:
        """Count one more request in flight, unless ``limit`` already are or the server stopped admitting."""
        with self._in_flight.get_lock():
            if self._reason.value or self._in_flight.value >= limit:
                return False
            self._in_flight.value += 1
            return True

    def release(self) -> None:
        with self._in_flight.get_lock():
            self._in_flight.value -= 1

    @property
    def abandoned(self) -> bool:
        """Whether the drain gave up: the requests still in flight are answered 503 now."""
        return bool(self._abandoned.value)

    def abandon(self, why: str) -> None:
        """Give up on the requests in flight; ``why`` joins the stop reason they are answered with."""
        with self._in_flight.get_lock():
            self._reason.value = f"{self._reason.value.decode()}; {why}".encode()[:255]
        self._abandoned.value = 1

    def stop_admitting(self, reason: str) -> None:
        """From now on refuse new requests, saying ``reason``; the first reason given stands."""
        with self._in_flight.get_lock():
            if not self._reason.value:
                self._reason.value = reason.encode()[:255]


def thread_lock_for_progress_bars() -> None:
    """In an inference worker: tqdm's lock (diffusers' loading bars) as a thread lock. Its default is
    a multiprocessing lock, a named semaphore in a spawned process; the worker is stopped before it
    could unlink it, so every stop ended in "resource_tracker: There appear to be 1 leaked semaphore
    objects to clean up at shutdown"."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def bind_to_parent(parent_pid: int) -> None:
    """In a child process: die with the server's main process, and leave terminal signals to it.

    Linux: the kernel sends SIGKILL when the parent goes (PR_SET_PDEATHSIG fires when the parent
    *thread* that started this process ends; the main thread starts them all). Elsewhere a
    watchdog thread polls the parent's pid.
    """
    if hasattr(os, "setpgid"):
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)  # Ctrl-C signals the terminal's foreground group: now the main process only
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the parent went before the kernel was told
        os._exit(1)


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


# Children that LitServe forks (the Manager and the HTTP processes) are bound in a fork hook; the
# spawned inference workers bind themselves in ``LitAPI.setup``.
_bound_parent: int | None = None  # set while ``serve`` runs
_forked_from_main_thread = False
_fork_hook_registered = False


def _before_fork() -> None:
    global _forked_from_main_thread
    _forked_from_main_thread = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    if _bound_parent is not None and _forked_from_main_thread and os.getppid() == _bound_parent:
        # The main process's handlers (drain on a signal) are not the child's: uvicorn installs
        # its own and restores these when it stops, and the Manager's SIGTERM must simply end it.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        bind_to_parent(_bound_parent)


def _bind_forked_children_to(parent_pid: int | None) -> None:
    global _bound_parent, _fork_hook_registered
    if not _fork_hook_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)  # cannot be undone
        _fork_hook_registered = True
    _bound_parent = parent_pid


class SupervisedServer(ls.LitServer):
    """A LitServer whose main process owns shutdown (see the module docstring). Start it with ``serve``."""

    def __init__(self, *args, state: ServingState, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.state = state
        self.grace_s = 30.0
        self._serving = False  # set once the HTTP process runs; before that a signal abandons start-up
        self._stop = threading.Event()
        self._hurry = threading.Event()
        self._signal = ""
        self._crash = ""  # what died, for /health and the log
        self._crashed: BaseProcess | None = None
        self._drained = True
        self._children: list[BaseProcess] = []
        self._address = ""  # http://host:port, once serve is called

    def serve(self, host: str, port: int, grace_s: float = 30.0) -> int:
        """Serve until SIGTERM, SIGINT, SIGHUP or a dead child; return the exit status (module docstring)."""
        self.grace_s = grace_s
        self._address = http_address(host, port)
        self.uvicorn_graceful_timeout = HTTP_STOP_S
        _bind_forked_children_to(os.getpid())
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            self.run(host=host, port=port, num_api_servers=1, generate_client_file=False)
        except KeyboardInterrupt:  # raised by _on_signal while the workers were still starting
            say(f"{self._signal or 'interrupted'} during start-up: stopping")
        except BaseException:
            self._stop_children()  # a failed start (a worker's setup raised) leaves no process behind either
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _bind_forked_children_to(None)
        killed = self._stop_children()
        status = 1 if self._crash or not self._drained or killed else 0
        say(f"stopped (exit status {status})")
        return status

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signal = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            leave_hung_up_terminal()  # its messages would fail, and end the drain with them
        if not self._serving:
            raise KeyboardInterrupt  # start-up has nothing to drain; serve stops what it started
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()  # the supervisor thread drains; a signal handler must not block

    def _start_worker_monitoring(self, manager: object, uvicorn_workers: dict) -> None:
        # LitServe calls this once its HTTP processes run. Its own monitor shuts down from its
        # thread and leaves run() waiting on the Manager it has just stopped; ours replaces it.
        http = [w for w in uvicorn_workers.values() if isinstance(w, BaseProcess)]
        self.uvicorn_graceful_timeout = HTTP_STOP_S + LIFESPAN_STOP_S  # uvicorn's config keeps HTTP_STOP_S
        self._children = [*self.inference_workers, *http]
        self._serving = True
        threading.Thread(target=self._announce_when_ready, daemon=True, name="dmd2-ready").start()
        threading.Thread(target=self._supervise, args=(list(self.inference_workers), http), daemon=True,
                         name="dmd2-supervisor").start()

    def _announce_when_ready(self) -> None:
        """The operator's sign that the server serves, once every inference worker is set up and warmed.

        LitServe starts the HTTP process (and calls :meth:`_start_worker_monitoring`) as soon as one
        worker is ready; with several, the others may be loading their weights for minutes still
        (``/health`` says 503 until they are). A worker that fails its setup is reported by the
        supervisor, not here.
        """
        names = [m["name"] for m in (self.model_metadata or {}).get("models", [])]
        while not (self._stop.is_set() or self._crash):  # (a child that died: the supervisor is stopping)
            try:
                states = list(self.workers_setup_status.values())
            except (OSError, EOFError):  # LitServe's manager is gone: the server is stopping
                return
            if any(v == WorkerSetupStatus.ERROR for v in states):
                return
            if states and all(v == WorkerSetupStatus.READY for v in states):
                say(f"ready on {self._address or 'its port'}: serving {', '.join(names) or 'the model'} (every"
                    " worker set up and warmed; the playground at /, the API's pages at /docs)")
                return
            time.sleep(0.02)  # /health turns 200 at the same moment: the line follows within this

    def _supervise(self, workers: list[BaseProcess], http: list[BaseProcess]) -> None:
        """Wait for a signal or a dead child, drain, then release LitServe's ``run``."""
        try:
            watched = {p.sentinel: p for p in [*workers, *http]}
            dead = None
            while dead is None and not self._stop.is_set():
                ready = multiprocessing.connection.wait(list(watched), timeout=0.1)
                dead = watched[ready[0]] if ready else None
            if dead is not None:
                dead.join(1)  # its sentinel closes a moment before its exit status can be read
                role = f"inference worker {workers.index(dead)}" if dead in workers else "the HTTP process"
                self._crashed = dead
                self._crash = f"{role} (pid {dead.pid}) died with exit code {dead.exitcode}"
                self.state.stop_admitting(f"unhealthy: {self._crash}")
                say(f"{self._crash}; stopping the server")
                can_finish = all(p.is_alive() for p in http) and any(p.is_alive() for p in workers)
            else:
                self.state.stop_admitting(f"draining: {self._signal} received, the server is shutting down")
                can_finish = True
            self._drained = self._drain() if can_finish else self._abandon("nothing is left to answer it")
        finally:
            self._shutdown_event.set()  # LitServe's run() now stops the HTTP processes, workers and Manager

    def _drain(self) -> bool:
        """Wait until no admitted request is left (True) or the grace period ends (False)."""
        deadline = time.monotonic() + self.grace_s
        if self.state.in_flight:
            say(f"draining: waiting up to {self.grace_s:g} s for {self.state.in_flight} request(s) in flight")
        while self.state.in_flight and time.monotonic() < deadline and not self._hurry.is_set():
            self._hurry.wait(0.05)
        return self._abandon("a second signal ended the drain" if self._hurry.is_set()
                             else f"the drain's --grace of {self.grace_s:g} s ran out")

    def _abandon(self, why: str) -> bool:
        """Have the HTTP process answer the requests still in flight 503 (saying ``why``); whether there were none."""
        if not self.state.in_flight:
            return True
        say(f"{self.state.in_flight} request(s) still in flight: answering them 503 and stopping ({why})")
        self.state.abandon(why)
        settle = time.monotonic() + 4 * POLL_S  # the HTTP process answers them within one poll
        while self.state.in_flight and time.monotonic() < settle:
            time.sleep(0.01)
        return False

    def _stop_children(self) -> list[BaseProcess]:
        """Stop any child LitServe left running; those that had to be killed (by LitServe or here)."""
        killed = [p for p in self._children if p is not self._crashed and p.exitcode == -signal.SIGKILL]
        for p in multiprocessing.active_children():
            p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
                killed.append(p)
        for p in killed:
            say(f"{p.name} (pid {p.pid}) did not stop when asked and was killed")
        return killed
