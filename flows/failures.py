"""A stage's last failed attempt, on disk: ``<out_dir>/failure.json``.

Written when the stage's worker fails and removed when the stage starts again, so its presence
(with the node's key, and no ``artifact.json`` for that key) means "the last attempt failed". Like
``artifact.json`` it lives in the output dir, so ``forge plan --graph`` can show failures without
Prefect or MLflow.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

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
