"""The stage workers this orchestrator process is running now, whatever runs them.

A worker may be a local process group (torchrun, python, kubectl: ``flows/launch.py``) or
a Slurm batch job (``flows/slurm.py``), and with stages in parallel several run at once, each
followed from a thread of its own. A SIGINT or SIGTERM reaches the orchestrator's main thread
only; it is passed on to every live worker through this registry: ``stop_all`` asks each to
checkpoint and exit (the first signal), ``kill_all`` ends them at once (the second).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Protocol


class LiveWorker(Protocol):
    name: str   # the stage (or stage/part) it runs, for messages

    def stop(self, signum: int) -> None:
        """Pass ``signum`` on: the worker finishes its step, checkpoints and exits."""

    def kill(self) -> None:
        """End the worker now (it resumes from its newest periodic checkpoint)."""


_LOCK = threading.RLock()   # re-entrant: a signal handler may call in while the lock is held
_LIVE: dict[int, LiveWorker] = {}


@contextlib.contextmanager
def live(worker: LiveWorker) -> Iterator[LiveWorker]:
    """``worker`` is registered while the block runs."""
    with _LOCK:
        _LIVE[id(worker)] = worker
    try:
        yield worker
    finally:
        with _LOCK:
            _LIVE.pop(id(worker), None)


def live_workers() -> list[LiveWorker]:
    with _LOCK:
        return list(_LIVE.values())


def stop_all(signum: int) -> None:
    for worker in live_workers():
        with contextlib.suppress(Exception):   # one worker's trouble must not spare the others
            worker.stop(signum)


def kill_all() -> None:
    for worker in live_workers():
        with contextlib.suppress(Exception):
            worker.kill()
