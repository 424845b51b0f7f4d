"""A stage's last failed attempt, on disk: ``<out_dir>/failure.json``.

Written when the stage's worker fails and removed when the stage starts again, so its presence
(with the node's key, and no ``artifact.json`` for that key) means "the last attempt failed". Like
``artifact.json`` it lives in the output dir, so ``forge plan --graph`` can show failures without
Prefect or MLflow.
"""
from __future__ import annotations

import json
import signal
import time
import traceback
from pathlib import Path
from typing import Any

from flows.launchers import StageFailed
from flows.plan import complete
from stages.layout import FAILURE_FILE


def write_failure(out_dir: Path, stage: str, key: str, code: int, tail: list[str],
                  log_path: Path | str) -> Path:
    """Record a failed attempt atomically (a reader never sees half a file)."""
    now = time.time()
    rec = {"stage": stage, "key": key, "exit_code": code, "time": now,
           "time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
           "tail": list(tail), "log_path": str(log_path)}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{FAILURE_FILE}.tmp"
    tmp.write_text(json.dumps(rec, indent=2))
    tmp.replace(out_dir / FAILURE_FILE)
    return out_dir / FAILURE_FILE


def clear_failure(out_dir: Path) -> None:
    (out_dir / FAILURE_FILE).unlink(missing_ok=True)


def last_failure(node: Any) -> dict | None:
    """The record of the node's last attempt if that attempt failed, else None.

    A record for another key (a hand-copied dir) or beside a complete artifact (a crash between
    completion and clean-up) does not count.
    """
    path = node.out_dir / FAILURE_FILE
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("key") != node.key or complete(node):
        return None
    return rec


def attempt_failure(e: BaseException, log_path: Path) -> tuple[int, list[str], Path]:
    """failure.json's exit code, lines and log for an attempt that ``e`` ended: the worker's own
    for StageFailed; 128 + signal for a SIGINT or SIGTERM to forge (KeyboardInterrupt, forge's
    runner.Stopped, Prefect's TerminationSignal), which the worker got too and checkpointed on;
    1 for an error in this process. The lines: the end of worker.log, then forge's word."""
    if isinstance(e, StageFailed):
        return e.code, list(e.tail), e.log_path
    tail = _log_tail(log_path)
    signum = getattr(e, "signum", None) or getattr(e, "signal", None)
    if signum is None and isinstance(e, KeyboardInterrupt):
        signum = signal.SIGINT
    if isinstance(signum, int) and signum > 0:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return 128 + signum, tail + [f"[forge] stopped by {name}; the stage resumes from its newest "
                                     "checkpoint when it runs again"], log_path
    return 1, tail + [f"[forge] {line}" for line in
                      "".join(traceback.format_exception_only(type(e), e)).splitlines()], log_path


def _log_tail(log_path: Path, progress: int = 6, last: int = 12) -> list[str]:
    """The end of the last attempt in worker.log: its last ``progress`` lines of the worker's own
    (``[stage] ...``: where it stopped, what it saved) and its last ``last`` lines (a launcher's
    traceback can be longer than everything else)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    starts = [i for i, line in enumerate(lines) if line.startswith("--- ")]
    lines = lines[starts[-1] + 1:] if starts else lines
    keep = {i for i, line in enumerate(lines) if line.startswith("[")}
    keep = set(sorted(keep)[-progress:]) | set(range(max(0, len(lines) - last), len(lines)))
    return [lines[i] for i in sorted(keep)]
