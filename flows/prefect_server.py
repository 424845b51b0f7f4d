"""forge's own local Prefect API server, for runs without PREFECT_API_URL.

Prefect's embedded (ephemeral) server is a child in forge's process group: a Ctrl-C typed into the
terminal killed it along with forge, and forge then retried a dead API instead of ending. This one
runs in a session of its own, is shared by the runs of one process (a sweep), and is stopped when
forge exits (on Linux, by the kernel even when forge is SIGKILLed).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator


# `prefect server start` runs services for deployments, workers and schedules as well; a local run
# needs none of them (Prefect's own ephemeral server does not run them either)
_UNUSED_SERVICES = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "CANCELLATION_CLEANUP",
                    "PAUSE_EXPIRATIONS", "REPOSSESSOR")
# Linux: the server gets SIGTERM when forge ends, however it ends (even SIGKILL); then the command
_TIED_TO_PARENT = ("import ctypes, os, signal, sys\n"
                   "ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
                   "if os.getppid() != int(sys.argv[1]):\n"
                   "    sys.exit('forge ended before its Prefect server started')\n"
                   "os.execv(sys.argv[2], sys.argv[2:])\n")


class LocalPrefectServer:
    """``prefect server start`` on 127.0.0.1 (a free port) for this process's runs.

    In a session of its own: Prefect's embedded server is a child in forge's process group, so a
    Ctrl-C typed into the terminal killed it along with forge, and forge then retried a dead API
    instead of ending. This one is stopped by ``stop`` (at exit), or on Linux by the kernel when
    forge ends without it. Its output goes to ``$PREFECT_HOME/server.log``."""

    def __init__(self, home: Path):
        self.home = home
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float, tries: int = 3) -> str:
        self.home.mkdir(parents=True, exist_ok=True)
        log_path = self.home / "server.log"
        for attempt in range(tries):
            port = _free_port()
            cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                   "--port", str(port)]
            if sys.platform.startswith("linux"):
                cmd = [sys.executable, "-c", _TIED_TO_PARENT, str(os.getpid()), *cmd]
            with open(log_path, "a") as log:
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} forge pid {os.getpid()}: "
                          f"prefect server start on port {port}\n")
                log.flush()
                self.proc = subprocess.Popen(cmd, env=self._env(), stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            self.url = f"http://127.0.0.1:{port}/api"
            if self._wait_healthy(timeout):
                return self.url
            if self.proc.poll() is None:   # up but never healthy: not a port clash
                self.stop()
                break
            self.stop()                    # exited: most likely another process took the port
        raise RuntimeError(f"the local Prefect server did not start (see {log_path}); its log "
                           "ends:\n" + _tail(log_path, 30) + "\nSet PREFECT_API_URL to use a "
                           "Prefect server of your own.")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PREFECT_API_URL", None)
        env.setdefault("PREFECT_UI_ENABLED", "false")
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        for name in _UNUSED_SERVICES:
            env.setdefault(f"PREFECT_SERVER_SERVICES_{name}_ENABLED", "false")
        return env

    def _wait_healthy(self, timeout: float) -> bool:
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc is not None and self.proc.poll() is None:
            try:
                with direct.open(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):  # anything it started
            os.killpg(proc.pid, signal.SIGKILL)


_SERVER: LocalPrefectServer | None = None


@contextlib.contextmanager
def prefect_api(say: Callable[[str], None] = print) -> Iterator[None]:
    """The Prefect API for a run: PREFECT_API_URL when the user set it, else this process's local
    server, started on first use (a sweep's runs share it) and stopped when the process ends."""
    global _SERVER
    if _SERVER is None and os.environ.get("PREFECT_API_URL"):
        yield
        return
    if _SERVER is None or not _SERVER.alive():
        if _SERVER is not None:
            say("Prefect: the local server has stopped; starting another")
        server = LocalPrefectServer(Path(os.environ.get("PREFECT_HOME") or
                                         Path.home() / ".prefect"))
        atexit.register(server.stop)
        t0 = time.monotonic()
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120))
        try:
            url = server.start(timeout)
        except BaseException:
            server.stop()
            raise
        _SERVER = server
        _use_api(url)
        say(f"Prefect: local server {url} started in {time.monotonic() - t0:.1f}s (log: "
            f"{server.home / 'server.log'})")
    yield


def _use_api(url: str) -> None:
    """Point this process's Prefect at ``url``, also where Prefect was imported already."""
    os.environ["PREFECT_API_URL"] = url
    if "prefect.context" in sys.modules:
        from flows.pipeline import refresh_prefect_settings
        refresh_prefect_settings()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
