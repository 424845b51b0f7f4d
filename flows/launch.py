"""Start a stage worker process, stream its output, and hold the stage's lock meanwhile.

Training kinds start under ``torchrun`` (one process per rank, gloo on CPU); the others as plain
``python -m stages.worker``. On Kubernetes the local process is kubectl, which waits for the
remote workers (``flows/launchers.py`` builds every command); a Slurm stage is a batch job that
``flows/slurm.py`` submits and follows (it outlives this process). The worker is its own
process group (a session of its own), so the orchestrator survives a worker crash and a test can
kill the worker. Output goes line by line to ``worker.log`` in the output dir and to the ``log``
callback (Prefect's run logger).

Signals: while it runs, a worker is registered in ``flows/live_workers.py`` (its process group,
``LocalWorker``). A SIGTERM or SIGINT reaches the orchestrator's main thread only, and
``forward_stop_signals`` (held by the flow for all its stages, or by ``run_worker`` itself when it
is called alone from the main thread) passes it on to every live worker: the first asks each to
checkpoint and exit, a second one a second or more later kills them. Meanwhile the stop is
recorded (``stop_requested``): no new worker starts, a stage waiting on its lock stops waiting,
and a worker that exits on the signal ends its stage with ``Stopping`` (128 + signal in
failure.json) instead of a failure; once the workers have ended the signal gets the handling it
had before (``forge run``: the run is recorded as cancelled; ``forge resume`` continues).

The stage ends when its launcher process (torchrun, python, kubectl) ends, not when the
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
from pathlib import Path
from typing import IO, Callable, Iterator

from flows.launchers import (StageFailed, WorkerLog, check_available, prepare, settings_env,
                             worker_command)
from flows.live_workers import kill_all, live, stop_all
from stages.cluster import ParallelSpec

__all__ = ["StageFailed", "Stopping", "forward_stop_signals", "run_worker", "stage_lock",
           "stop_requested", "worker_command", "worker_env"]

# After the launcher ends, what is left of the worker gets this long to end on its own (ranks
# exiting after torchrun was killed) before it is killed, and then its output this long to end.
LAUNCHER_EXIT_GRACE_S = 5.0
DRAIN_S = 2.0
TOKEN_VAR = "FORGE_WORKER_TOKEN"   # in the environment of every process of one worker
# A worker that an exception in this process leaves running gets SIGTERM (checkpoint and exit), then
# SIGKILL this many seconds later (torchrun's own shutdown timeout).
STOP_TIMEOUT_S = 30.0
LOCK_POLL_S = 0.25   # a stage waiting on its lock looks this often whether a stop was asked for


class Stopping(BaseException):
    """A SIGINT or SIGTERM to the orchestrator ended this stage's attempt (its worker
    checkpointed, or never started). A BaseException: Prefect records the task run as crashed and
    never retries it; the flow ends the run as cancelled once every worker has ended."""

    def __init__(self, signum: int, stage: str = ""):
        self.signum = int(signum)
        super().__init__(f"{stage + ': ' if stage else ''}stopped by "
                         f"{signal.Signals(signum).name}")


class _StopRequest:
    """The first SIGINT/SIGTERM forwarded while ``forward_stop_signals`` is held (main thread),
    read by the stage threads."""
    signum: int | None = None
    forwarding = False


def stop_requested() -> int | None:
    """The signal that asked the running stages to stop, or None."""
    return _StopRequest.signum


@contextlib.contextmanager
def stage_lock(store: Path, out_dir: Path, log: Callable[[str], None]) -> Iterator[None]:
    """One process at a time per output dir (two launches never train the same stage at once)."""
    locks = store / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{out_dir.name}.lock", "a+") as fh:
        waiting = False
        while True:   # polled, not blocking: a stop asked for meanwhile must end the wait
            if (signum := stop_requested()) is not None:
                raise Stopping(signum, out_dir.name)
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    log(f"waiting: another forge run is working on {out_dir.name}")
                    waiting = True
                time.sleep(LOCK_POLL_S)
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
    """Run one stage worker to completion; raise StageFailed with the log tail on error, Stopping
    when a SIGINT/SIGTERM to this process stopped it (or came before it started)."""
    if cluster.launcher == "slurm":   # a batch job that outlives this process (flows/slurm.py)
        from flows import slurm
        if (signum := stop_requested()) is not None:   # asked to stop: submit nothing new
            raise Stopping(signum, stage)
        with forward_stop_signals():
            signum = slurm.run_job(stage, launcher, cluster, spec, out_dir, log,
                                   worker_env(cluster), stop_requested)
        if signum:   # the job checkpointed and ended on the signal
            raise Stopping(signum, stage)
        return
    check_available(cluster)  # no srun / kubectl here: stop before anything starts
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2, default=str))
    prepare(launcher, cluster, spec_path)
    log_path = out_dir / "worker.log"
    cmd = worker_command(launcher, cluster, spec_path)
    with open(log_path, "a") as logfile:
        sink = WorkerLog(logfile, log)
        sink.header(" ".join(cmd))
        show, tail = sink.show, sink.tail

        token = uuid.uuid4().hex   # marks every process of this worker, wherever it moves
        env = dict(worker_env(cluster), **{TOKEN_VAR: token})
        if (signum := stop_requested()) is not None:   # asked to stop: start nothing new
            raise Stopping(signum, stage)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True, bufsize=1)
        assert proc.stdout is not None
        output = _Lines(proc.stdout)
        try:
            with live(LocalWorker(stage, proc, token)) as worker, forward_stop_signals():
                if (signum := stop_requested()) is not None:   # asked while it was starting
                    worker.stop(signum)
                code = _follow(proc, token, output, show)
        except BaseException:
            # this process is going away (an error here, or a signal outside the main thread):
            # the worker must not train on unattended, holding its output dir
            _stop_worker(proc, token, output, show)
            raise
    if code != 0:
        if (signum := stop_requested()) is not None:   # it checkpointed and exited on the signal
            raise Stopping(signum, stage)
        raise StageFailed(stage, code, list(tail), log_path)


class LocalWorker:
    """A worker started here (torchrun, python, kubectl): its process group, and every
    process carrying its token (``flows/live_workers.LiveWorker``)."""

    def __init__(self, name: str, proc: subprocess.Popen, token: str):
        self.name, self.proc, self.token = name, proc, token

    def stop(self, signum: int) -> None:
        if self.proc.returncode is None:   # not reaped: the group's id is still its own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        _kill_worker(self.proc, self.token)


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
def forward_stop_signals() -> Iterator[None]:
    """Pass a SIGTERM or SIGINT sent to this process on to every live worker while the block runs.

    Workers run in sessions of their own, so without this a stopped orchestrator leaves them
    training. The first signal goes to each (``live_workers.stop_all``): it finishes its step,
    checkpoints and exits (stages/training/preemption.py), its output streamed meanwhile, and the
    stop is recorded (``stop_requested``) so that nothing new starts. Asked again (a second Ctrl-C,
    a second SIGTERM) a second or more later, every worker is killed at once (``kill_all``): each
    resumes from its newest periodic checkpoint instead. When the block ends (the flow has seen
    every worker end) the signal gets the handling it had before: Prefect's, ``forge run``'s
    (``Stopped``), Python's KeyboardInterrupt, or the default (this process ends).
    Main thread only; held already (the flow holds it for all its stages), it does nothing."""
    if threading.current_thread() is not threading.main_thread() or _StopRequest.forwarding:
        yield
        return
    received: list[tuple[int, float]] = []

    def forward(signum, frame) -> None:
        again = bool(received) and time.monotonic() - received[0][1] > 1.0
        received.append((signum, time.monotonic()))
        if _StopRequest.signum is None:
            _StopRequest.signum = signum
        if again:
            kill_all()
        else:
            stop_all(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    previous = {s: h for s, h in previous.items() if h is not None and h is not signal.SIG_IGN}
    for s in previous:
        signal.signal(s, forward)
    _StopRequest.forwarding = True
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _StopRequest.forwarding = False
        _StopRequest.signum = None
    if received:
        signal.raise_signal(received[0][0])
