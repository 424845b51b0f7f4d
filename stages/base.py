"""The stage contract: a kind has a frozen ``Config``, ``run(config, inputs, out_dir, ctx) -> Artifact``
and the hooks of ``StageKind`` through which the orchestrator learns what it needs about a stage.

``artifact.json`` is written atomically, last, and is the only proof that a stage is complete.
``inputs`` maps each parent stage name to a ``StageInput`` (its output dir and its artifact).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from stages.layout import ARTIFACT_FILE, METRICS_FILE, PART_DONE, file_digest, part_dir, problem
from stages.schema import ConfigError

__all__ = ["ARTIFACT_FILE", "Artifact", "file_digest", "RunContext", "StageGraph", "StageInput", "StageKind"]


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

    def checkpoint(self) -> Path:
        """The parent's final checkpoint, its checksums verified before anything loads it."""
        path = self.path("checkpoint")
        why = problem(path, verify=True)
        if why:
            raise DamagedInput(f"the checkpoint of parent stage {self.name} is damaged: {path}: "
                               f"{why}; run {self.name} again (forge run --rerun {self.name})")
        return path


def field_value(config: Any, path: str) -> Any:
    """The value at dotted ``path`` of a (nested) config; None where any step is None."""
    for part in path.split("."):
        config = getattr(config, part, None)
        if config is None:
            return None
    return config


class DamagedInput(RuntimeError):
    """A parent's output fails its checks: nothing was loaded from it."""


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


def write_part_record(out_dir: Path, part: str, record: dict) -> Path:
    """Mark part ``part`` done: its ``done.json``, written atomically, last."""
    folder = part_dir(out_dir, part)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PART_DONE}.tmp"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(record, indent=2, sort_keys=True, default=str))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / PART_DONE)
    return folder / PART_DONE


def read_artifact(out_dir: Path) -> Artifact | None:
    p = Path(out_dir) / ARTIFACT_FILE
    if not p.exists():
        return None
    try:
        return Artifact.from_json(p.read_text())
    except (ValueError, TypeError):
        return None  # a damaged record is not proof of completion


class StageKind:
    """Base class of every stage kind. Subclasses set ``name``, ``Config`` and ``run``; the hooks
    below tell the orchestrator what it needs to know, so flows/ never asks which kind a stage is.

    ``parent_fields`` names the Config fields that reference other stages (a name or a list); a
    dotted name reaches into a nested config (``judge.serve``).
    ``launcher`` is "torchrun" for training kinds, "python" for the rest.
    ``makes_model``: the stage leaves a model (``outputs["checkpoint"]``, ``extra["model"]``);
    MLflow logs and registers it.
    ``built`` is False for kinds a later issue implements: they validate and plan, but do not run.
    """
    name: ClassVar[str]
    Config: ClassVar[type]
    parent_fields: ClassVar[tuple[str, ...]] = ("parents",)
    launcher: ClassVar[str] = "python"
    makes_model: ClassVar[bool] = False
    built: ClassVar[bool] = True
    # The parts (``parts``) do not depend on each other: they run at once, each a job of its own
    # on a cluster (up to ``cluster.max_parallel_stages`` at a time under torchrun).
    parts_together: ClassVar[bool] = False
    not_built_reason: ClassVar[str] = ""

    @classmethod
    def parents(cls, config: Any) -> list[str]:
        out: list[str] = []
        for f in cls.parent_fields:
            v = field_value(config, f)
            if v is None:
                continue
            out += [v] if isinstance(v, str) else list(v)
        return out

    # -- validation and planning (no compute, no heavy imports) -------------------------------
    @classmethod
    def check(cls, config: Any, stage: str, graph: "StageGraph", cluster: Any) -> None:
        """Cross-stage checks (parents of the right kinds, shapes that agree); raise ConfigError."""

    @classmethod
    def blocked(cls, config: Any, cluster: Any) -> str:
        """Why this stage validates but cannot run yet ("" when it can)."""
        return "" if cls.built else f"kind {cls.name!r} {cls.not_built_reason}"

    @classmethod
    def tokens(cls, config: Any) -> int:
        """Tokens this stage trains on (0 for non-training stages), for ``forge plan``."""
        return 0

    @classmethod
    def layout(cls, config: Any, cluster: Any) -> Any:
        """The cluster this stage's worker runs on (a kind may override the parallel layout)."""
        return cluster

    @classmethod
    def compute_plan(cls, stage: str, config: Any, cluster: Any) -> Any | None:
        """Cost and memory per device (``stages.training.compute.StagePlan``); None: nothing
        worth planning (a data or evaluation stage)."""
        return None

    @classmethod
    def preflight(cls, config: Any, where: str) -> None:
        """What only the launching machine can tell (a GPU, an importable library); runs before
        any stage of the run starts. Raise ConfigError with the fix."""

    @classmethod
    def parts(cls, config: Any) -> tuple[str, ...]:
        """A fan-out: the parts that run, in this order, before ``run`` gathers them. Each part is
        a worker run of its own and a task run of its own in the orchestrator, retried alone and
        done once its ``parts/<part>/done.json`` exists (``run_part``'s record), so a rerun after
        a failure redoes only the parts not done. () : the stage is one run (most kinds)."""
        return ()

    @classmethod
    def resume_point(cls, out_dir: Path) -> Path | None:
        """The checkpoint an unfinished attempt resumes from (None: it starts over)."""
        return None

    # -- model stages -------------------------------------------------------------------------
    @classmethod
    def model_source(cls, config: Any, graph: "StageGraph") -> str | None:
        """The parent whose trained model (shape, context) this stage carries; None: its own."""
        return None

    @classmethod
    def trained_model(cls, config: Any) -> Any:
        """The ``ModelSpec`` a stage that trains its own model leaves behind."""
        raise TypeError(f"kind {cls.name!r} trains no model of its own")

    @classmethod
    def context_length(cls, config: Any) -> int:
        """The sequence length the stage trains at (model stages with no model_source)."""
        raise TypeError(f"kind {cls.name!r} trains no model of its own")

    @classmethod
    def tokenizer(cls, config: Any, graph: "StageGraph") -> str | None:
        """The train_tokenizer stage behind this stage's vocabulary (None: none)."""
        return None

    # -- lineage --------------------------------------------------------------------------------
    @classmethod
    def datasets_read(cls, config: Any, artifact: Artifact, upstream: dict[str, Artifact]) -> list[dict]:
        """The datasets the stage read, each tagged with the ``stage`` that wrote it: a source
        stage its own, any other stage its parents' (a kind that reads a part overrides this)."""
        if not upstream:
            return [dict(d, stage=artifact.stage) for d in artifact.datasets]
        return [dict(d, stage=p) for p, art in upstream.items() for d in art.datasets]

    @classmethod
    def run(cls, config: Any, inputs: dict[str, StageInput], out_dir: Path, ctx: "RunContext") -> Artifact:
        raise NotImplementedError(f"stage kind {cls.name!r}: {cls.not_built_reason}")

    @classmethod
    def run_part(cls, config: Any, inputs: dict[str, StageInput], out_dir: Path, ctx: "RunContext",
                 part: str) -> dict:
        """Run one of ``parts(config)``; return its small JSON record (written to done.json)."""
        raise NotImplementedError(f"stage kind {cls.name!r} has no parts")


class StageGraph(Mapping):
    """A pipeline's stages as the kinds see them while validating: stage name -> config, plus the
    kind of each stage and what a model stage will make. Built by flows/dag.py."""

    def __init__(self, kinds: dict[str, type[StageKind]], configs: dict[str, Any],
                 known: Iterable[type[StageKind]] = ()):
        self._kinds, self._configs = kinds, configs
        self._model_kinds = sorted({k.name for k in [*known, *kinds.values()] if k.makes_model})

    def __getitem__(self, name: str) -> Any:
        return self._configs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._configs)

    def __len__(self) -> int:
        return len(self._configs)

    def kind(self, name: str) -> type[StageKind]:
        return self._kinds[name]

    def require(self, name: str | None, where: str, *kinds: str) -> Any:
        """The config of stage ``name``, which must exist (and be of one of ``kinds``)."""
        if name not in self._configs:
            raise ConfigError(f"{where}: no stage named {name!r}; known stages: {', '.join(self)}")
        if kinds and self.kind(name).name not in kinds:
            raise ConfigError(f"{where}: {name!r} is not a {' or '.join(kinds)} stage (it is a "
                              f"{self.kind(name).name} stage)")
        return self[name]

    def require_model(self, name: str | None, where: str) -> Any:
        self.require(name, where)
        if not self.kind(name).makes_model:
            raise ConfigError(f"{where}: {name!r} is not a model stage "
                              f"({', '.join(self._model_kinds)}); name one of those")
        return self[name]

    def trained_by(self, name: str) -> str:
        """The stage that trained the model ``name`` carries: itself, or a source's."""
        source = self.kind(name).model_source(self[name], self)
        return name if source is None else self.trained_by(source)

    def model_of(self, name: str) -> Any:
        """The ``ModelSpec`` stage ``name``'s checkpoint will have."""
        t = self.trained_by(name)
        return self.kind(t).trained_model(self[t])

    def context_length_of(self, name: str) -> int:
        t = self.trained_by(name)
        return self.kind(t).context_length(self[t])

    def tokenizer_of(self, name: str) -> str | None:
        """The train_tokenizer stage whose vocabulary stage ``name`` uses."""
        found = self.kind(name).tokenizer(self[name], self)
        if found is None and self.trained_by(name) != name:
            return self.tokenizer_of(self.trained_by(name))
        return found


@dataclasses.dataclass
class RunContext:
    """What a worker knows besides the config: who it is and where to report."""
    stage: str
    key: str
    cluster: Any
    seed: int = 1234
    kind: str = ""
    part: str = ""   # the part of a fanned-out stage this worker runs ("": the stage's run)

    def metric(self, out_dir: Path, step: int, **values: float) -> None:
        """Append one line to metrics.jsonl (metrics are on disk before they reach MLflow)."""
        with open(Path(out_dir) / METRICS_FILE, "a") as fh:
            fh.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
