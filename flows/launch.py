"""Start a stage worker process, stream its output, and hold the stage's lock meanwhile.

Training kinds start under ``torchrun`` (one process per rank, gloo on CPU); the others as plain
``python -m stages.worker``. On Slurm or Kubernetes the local process is salloc or kubectl, which
waits for the remote workers (``flows/launchers.py`` builds every command). The worker is its own
process group (a session of its own), so the orchestrator survives a worker crash and a test can
kill the worker; a SIGTERM or SIGINT to the orchestrator is passed on to it
(``forward_stop_signals``). Output goes line by line to ``worker.log`` in the output dir and to the
``log`` callback (Prefect's run logger).

The stage ends when its launcher process (torchrun, python, salloc, kubectl) ends, not when the
output pipe closes: a launcher killed from outside can leave ranks behind (torchrun starts each in
a session of its own) that hold the pipe open and wait forever for a rendezvous that is gone. Every
process a worker starts carries ``FORGE_WORKER_TOKEN`` in its environment; what is left of them (and
of the launcher's group and session) ``LAUNCHER_EXIT_GRACE_S`` seconds after the launcher ended is
killed (found through /proc on Linux; elsewhere the launcher's group only), so no process of a stage
outlives it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import IO, Callable, Iterator

from flows.launchers import check_available, prepare, settings_env, worker_command
from stages.cluster import ParallelSpec

__all__ = ["StageFailed", "run_worker", "stage_lock", "worker_command", "worker_env"]

# After the launcher ends, what is left of the worker gets this long to end on its own (ranks
# exiting after torchrun was killed) before it is killed, and then its output this long to end.
LAUNCHER_EXIT_GRACE_S = 5.0
DRAIN_S = 2.0
TOKEN_VAR = "FORGE_WORKER_TOKEN"   # in the environment of every process of one worker
# A worker that an exception in this process leaves running gets SIGTERM (checkpoint and exit), then
# SIGKILL this many seconds later (torchrun's own shutdown timeout).
STOP_TIMEOUT_S = 30.0


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int, tail: list[str], log_path: Path):
        self.stage, self.code, self.tail, self.log_path = stage, code, tail, log_path
        super().__init__(f"stage {stage} failed: worker exited with code {code}; last lines of "
                         f"{log_path}:\n" + "\n".join("    " + t for t in tail))


@contextlib.contextmanager
def stage_lock(store: Path, out_dir: Path, log: Callable[[str], None]) -> Iterator[None]:
    """One process at a time per output dir (two launches never train the same stage at once)."""
    locks = store / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{out_dir.name}.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting: another forge run is working on {out_dir.name}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def worker_env(cluster: ParallelSpec) -> dict[str, str]:
    env = dict(os.environ, **settings_env(cluster))
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_worker(stage: str, launcher: str, cluster: ParallelSpec, spec: dict, out_dir: Path,
               log: Callable[[str], None]) -> None:
    """Run one stage worker to completion; raise StageFailed with the log tail on error."""
    check_available(cluster)  # no srun / kubectl here: stop before anything starts
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2, default=str))
    prepare(launcher, cluster, spec_path)
    log_path = out_dir / "worker.log"
    tail: deque[str] = deque(maxlen=20)
    cmd = worker_command(launcher, cluster, spec_path)
    with open(log_path, "a") as logfile:
        logfile.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        logfile.flush()

        def show(line: str) -> None:
            logfile.write(line + "\n")
            logfile.flush()
            tail.append(line)
            if _worth_showing(line):
                log(line)

        token = uuid.uuid4().hex   # marks every process of this worker, wherever it moves
        env = dict(worker_env(cluster), **{TOKEN_VAR: token})
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True, bufsize=1)
        assert proc.stdout is not None
        output = _Lines(proc.stdout)
        try:
            with forward_stop_signals(proc, token):
                code = _follow(proc, token, output, show)
        except BaseException:
            # this process is going away (an error here, or a signal outside the main thread):
            # the worker must not train on unattended, holding its output dir
            _stop_worker(proc, token, output, show)
            raise
    if code != 0:
        raise StageFailed(stage, code, list(tail), log_path)


class _Lines:
    """A process's output, read line by line on a thread of its own: whoever else holds the pipe
    open (a rank whose launcher is gone) cannot keep the orchestrator waiting."""
    EOF = object()

    def __init__(self, stream: IO[str]):
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True,
                         name="worker-output").start()

    def _read(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._queue.put(line.rstrip("\n"))
        except (OSError, ValueError):
            pass
        self._queue.put(self.EOF)

    def get(self, timeout: float) -> object:
        """The next line, None if none came within ``timeout`` s, or ``EOF``."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self, seconds: float) -> Iterator[str]:
        """What is left of the output, until it ends or ``seconds`` have passed."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            line = self.get(left)
            if line is self.EOF:
                self._queue.put(self.EOF)
                return
            if line is not None:
                yield line


def _follow(proc: subprocess.Popen, token: str, output: _Lines, show: Callable[[str], None],
            grace: float | None = None) -> int:
    """Stream the worker's output until the launcher has ended and nothing of the worker is left,
    or until ``grace`` s after the launcher ended (then what is left is killed); the launcher's
    exit code."""
    grace = LAUNCHER_EXIT_GRACE_S if grace is None else grace
    ended_at: float | None = None
    eof = False
    next_look = 0.0
    while True:
        if eof:
            time.sleep(0.25)
        else:
            line = output.get(0.25)
            if line is _Lines.EOF:
                eof = True
            elif line is not None:
                show(line)
        now = time.monotonic()
        if ended_at is None:
            if not _ended(proc):
                continue
            ended_at = now
        if eof and now >= next_look:  # the usual end: the output closed, is anything left?
            if not _worker_processes(proc.pid, token):
                break
            next_look = now + 0.5
        if now - ended_at >= grace:
            left = _kill_worker(proc, token)
            if left:
                show(f"[forge] the launcher (pid {proc.pid}) ended with code {_code(proc)} but "
                     f"{len(left)} process(es) of the worker were still running {grace:g} s later; "
                     "killed: " + "; ".join(left))
            if not eof:
                for line in output.drain(DRAIN_S):
                    show(line)
            break
    return proc.wait()


def _ended(proc: subprocess.Popen) -> bool:
    """Whether the launcher has exited, without reaping it: while it is a zombie its pid (the
    group's id) cannot be reused, so killing the group cannot hit a stranger."""
    if not hasattr(os, "waitid"):
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True


def _code(proc: subprocess.Popen) -> int | str:
    if hasattr(os, "waitid"):
        with contextlib.suppress(ChildProcessError):
            res = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if res is not None:
                return res.si_status if res.si_code == os.CLD_EXITED else -res.si_status
    return proc.returncode if proc.returncode is not None else "?"


def _kill_worker(proc: subprocess.Popen, token: str, sig: int = signal.SIGKILL) -> list[str]:
    """``sig`` to every live process of a worker: its launcher's group and session and whatever
    carries its token; 'pid command' of each one found (the launcher not counted)."""
    left = _worker_processes(proc.pid, token)
    if proc.returncode is None:   # not reaped: its pid is still the group's, no stranger's
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return [f"{pid} {cmd}" for pid, cmd in left.items()]


def _worker_processes(sid: int, token: str) -> dict[int, str]:
    """Live (not zombie) processes of a worker, launcher excluded: pid -> command line. Linux
    (/proc); elsewhere nothing is found and only the launcher's group is ever signalled."""
    found: dict[int, str] = {}
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return found
    marker = f"{TOKEN_VAR}={token}".encode()
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit() or int(entry.name) == sid:
            continue
        try:
            stat = (entry / "stat").read_text()
            state, _ppid, pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
            if state in ("Z", "X"):
                continue
            if sid not in (int(pgrp), int(session)) and \
                    marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        found[int(entry.name)] = cmd.strip()[:120]
    return found


def _stop_worker(proc: subprocess.Popen, token: str, output: _Lines,
                 show: Callable[[str], None]) -> None:
    """SIGTERM to the worker's group (it checkpoints and exits), SIGKILL to what is left after
    ``STOP_TIMEOUT_S``; its output meanwhile goes where it always goes, as far as that still works."""
    if _ended(proc) and not _worker_processes(proc.pid, token):
        proc.wait()
        return
    _kill_worker(proc, token, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    with contextlib.suppress(Exception):
        while time.monotonic() < deadline and (not _ended(proc) or
                                               _worker_processes(proc.pid, token)):
            for line in output.drain(0.25):
                show(line)
    _kill_worker(proc, token)
    proc.wait()


@contextlib.contextmanager
def forward_stop_signals(proc: subprocess.Popen, token: str | None = None) -> Iterator[None]:
    """Pass a SIGTERM or SIGINT sent to this process on to the worker's process group.

    The worker runs in a session of its own, so without this a stopped orchestrator leaves it
    training. The worker finishes its step, checkpoints and exits (stages/training/preemption.py);
    its output is streamed meanwhile. Then the signal gets the handling it had before (Prefect's,
    Python's KeyboardInterrupt, or the default: this process ends). Asked again (a second Ctrl-C,
    a second SIGTERM, a second or more later), the worker is killed at once (every process carrying
    ``token``, too): it resumes from its newest periodic checkpoint instead. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, float]] = []

    def forward(signum, frame) -> None:
        again = bool(received) and time.monotonic() - received[0][1] > 1.0
        received.append((signum, time.monotonic()))
        if again and token:
            _kill_worker(proc, token)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL if again else signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    previous = {s: h for s, h in previous.items() if h is not None and h is not signal.SIG_IGN}
    for s in previous:
        signal.signal(s, forward)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        signal.raise_signal(received[0][0])


def _worth_showing(line: str) -> bool:
    """Progress and errors go to the console; library chatter stays in worker.log."""
    return line.startswith("[") or "Error" in line or "error:" in line
