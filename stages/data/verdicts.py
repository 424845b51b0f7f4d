"""The judge's verdicts and their cache: a ``Verdict`` per conversation, kept in a sqlite file
keyed by (conversation digest, rubric digest, judge model) and written as each verdict arrives, so
a shard killed mid-way keeps what it got and no rerun asks the judge the same thing twice
(``judge.py`` asks; this module only remembers)."""
from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One judgement. ``passed``: every score reaches its threshold; for an unparsable verdict,
    what ``on_unparsable`` decided (None in the cache, where no policy applies yet)."""
    scores: dict[str, int] | None
    passed: bool | None
    unparsable: bool
    reason: str
    raw: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Verdict":
        return cls(**json.loads(text))

    def failed(self, spec: Any) -> list[str]:
        """The criteria whose score is below its threshold (for the report)."""
        if self.scores is None:
            return []
        return [n for n, c in spec.rubric.items() if self.scores[n] < c.threshold]


class VerdictCache:
    """Verdicts in a sqlite file, keyed by (sample digest, rubric digest, judge model). Each
    ``put`` commits at once; several processes may share the file (sqlite's locks, busy time-out)."""

    def __init__(self, path: Path | str, busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (sample TEXT NOT NULL, "
                             "rubric TEXT NOT NULL, model TEXT NOT NULL, verdict TEXT NOT NULL, "
                             "created REAL NOT NULL, PRIMARY KEY (sample, rubric, model))")

    def get_many(self, samples: Sequence[str], rubric: str, model: str) -> dict[str, Verdict]:
        out: dict[str, Verdict] = {}
        with self._lock:
            for i in range(0, len(samples), 500):  # sqlite's limit on bound variables
                chunk = list(samples[i:i + 500])
                rows = self._db.execute(
                    f"SELECT sample, verdict FROM verdicts WHERE rubric = ? AND model = ? AND sample "
                    f"IN ({','.join('?' * len(chunk))})", [rubric, model, *chunk]).fetchall()
                out.update({s: Verdict.from_json(v) for s, v in rows})
        return out

    def put(self, sample: str, rubric: str, model: str, verdict: Verdict) -> None:
        with self._lock, self._db:  # one transaction, committed on exit
            self._db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?)",
                             (sample, rubric, model, verdict.to_json(), time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "VerdictCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
