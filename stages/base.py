"""The stage contract: a kind has a frozen ``Config`` and ``run(config, inputs, out_dir) -> Artifact``.

``artifact.json`` is written atomically, last, and is the only proof that a stage is complete.
``inputs`` maps each parent stage name to a ``StageInput`` (its output dir and its artifact).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, ClassVar

ARTIFACT_FILE = "artifact.json"


@dataclasses.dataclass(frozen=True)
class Artifact:
    """What a finished stage leaves behind, as recorded in ``artifact.json``."""
    kind: str
    stage: str
    key: str
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)   # name -> path relative to out_dir
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # final scalars
    datasets: list[dict] = dataclasses.field(default_factory=list)       # {name, path, digest, rows}
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    created_at: float = dataclasses.field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Artifact":
        return cls(**json.loads(text))


@dataclasses.dataclass(frozen=True)
class StageInput:
    name: str
    out_dir: Path
    artifact: Artifact

    def path(self, output: str) -> Path:
        if output not in self.artifact.outputs:
            raise KeyError(f"stage {self.name!r} has no output {output!r} "
                           f"(it has {sorted(self.artifact.outputs)})")
        return self.out_dir / self.artifact.outputs[output]


def write_artifact(out_dir: Path, artifact: Artifact) -> Path:
    """Write ``artifact.json`` atomically (tmp file, fsync, rename)."""
    out_dir = Path(out_dir)
    tmp = out_dir / f".{ARTIFACT_FILE}.tmp"
    with open(tmp, "w") as fh:
        fh.write(artifact.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    final = out_dir / ARTIFACT_FILE
    os.replace(tmp, final)
    return final


def read_artifact(out_dir: Path) -> Artifact | None:
    p = Path(out_dir) / ARTIFACT_FILE
    if not p.exists():
        return None
    try:
        return Artifact.from_json(p.read_text())
    except (ValueError, TypeError):
        return None  # a damaged record is not proof of completion


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class StageKind:
    """Base class of every stage kind. Subclasses set ``name``, ``Config`` and ``run``.

    ``parent_fields`` names the Config fields that reference other stages (a name or a list).
    ``launcher`` is "torchrun" for training kinds, "python" for the rest.
    ``built`` is False for kinds a later issue implements: they validate and plan, but do not run.
    """
    name: ClassVar[str]
    Config: ClassVar[type]
    parent_fields: ClassVar[tuple[str, ...]] = ("parents",)
    launcher: ClassVar[str] = "python"
    built: ClassVar[bool] = True
    not_built_reason: ClassVar[str] = ""

    @classmethod
    def parents(cls, config: Any) -> list[str]:
        out: list[str] = []
        for f in cls.parent_fields:
            v = getattr(config, f, None)
            if v is None:
                continue
            out += [v] if isinstance(v, str) else list(v)
        return out

    @classmethod
    def check(cls, config: Any, stage: str, configs: dict[str, Any], cluster: Any) -> None:
        """Cross-stage checks against every stage's config (parents exist); raise ConfigError."""

    @classmethod
    def blocked(cls, config: Any, cluster: Any) -> str:
        """Why this stage validates but cannot run yet ("" when it can)."""
        return "" if cls.built else f"kind {cls.name!r} {cls.not_built_reason}"

    @classmethod
    def tokens(cls, config: Any) -> int:
        """Tokens this stage trains on (0 for non-training stages), for ``forge plan``."""
        return 0

    @classmethod
    def run(cls, config: Any, inputs: dict[str, StageInput], out_dir: Path, ctx: "RunContext") -> Artifact:
        raise NotImplementedError(f"stage kind {cls.name!r}: {cls.not_built_reason}")


@dataclasses.dataclass
class RunContext:
    """What a worker knows besides the config: who it is and where to report."""
    stage: str
    key: str
    cluster: Any
    seed: int = 1234
    kind: str = ""

    def metric(self, out_dir: Path, step: int, **values: float) -> None:
        """Append one line to metrics.jsonl (metrics are on disk before they reach MLflow)."""
        with open(Path(out_dir) / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
