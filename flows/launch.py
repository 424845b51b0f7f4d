"""Start a stage worker process, stream its output, and hold the stage's lock meanwhile.

Training kinds start under ``torchrun`` (one process per rank, gloo on CPU); the others as plain
``python -m stages.worker``. On Slurm or Kubernetes the local process is salloc or kubectl, which
waits for the remote workers (``flows/launchers.py`` builds every command). The worker is its own
process group, so the orchestrator survives a worker crash and a test can kill the worker; a
SIGTERM or SIGINT to the orchestrator is passed on to it (``forward_stop_signals``). Output goes line
by line to ``worker.log`` in the output dir and to the ``log`` callback (Prefect's run logger).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

from flows.launchers import check_available, prepare, settings_env, worker_command
from stages.cluster import ParallelSpec

__all__ = ["StageFailed", "run_worker", "stage_lock", "worker_command", "worker_env"]


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
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=worker_env(cluster), start_new_session=True, bufsize=1)
        assert proc.stdout is not None
        with forward_stop_signals(proc):
            for line in proc.stdout:
                line = line.rstrip("\n")
                logfile.write(line + "\n")
                logfile.flush()
                tail.append(line)
                if _worth_showing(line):
                    log(line)
            code = proc.wait()
    if code != 0:
        raise StageFailed(stage, code, list(tail), log_path)


@contextlib.contextmanager
def forward_stop_signals(proc: subprocess.Popen) -> Iterator[None]:
    """Pass a SIGTERM or SIGINT sent to this process on to the worker's process group.

    The worker runs in a session of its own, so without this a stopped orchestrator leaves it
    training. The worker finishes its step, checkpoints and exits (stages/training/preemption.py);
    its output is streamed meanwhile. Then the signal gets the handling it had before (Prefect's,
    Python's KeyboardInterrupt, or the default: this process ends). Main thread only (signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

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
        signal.raise_signal(received[0])


def _worth_showing(line: str) -> bool:
    """Progress and errors go to the console; library chatter stays in worker.log."""
    return line.startswith("[") or "Error" in line or "error:" in line
