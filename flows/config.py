"""Composition -> typed, frozen ``PipelineConfig``. The only module that imports Hydra.

YAML groups under ``conf/`` are the data (pipeline, model, cluster, tracking); the dataclasses of
each stage kind and of ``stages.training.specs`` are the schema. Compose once, validate once.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from stages import KINDS
from stages.schema import ConfigError, from_dict, setting
from stages.training.specs import ParallelSpec

CONF_DIR = Path(os.environ.get("FORGE_CONF_DIR", Path(__file__).resolve().parents[1] / "conf"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrackingSpec:
    uri: str = setting("", "MLflow tracking URI; empty = sqlite:///<store>/mlflow.db")
    experiment: str = setting("granite-forge", "MLflow experiment name")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    config: Any        # the kind's frozen Config dataclass


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    name: str
    store: Path
    cluster: ParallelSpec
    tracking: TrackingSpec
    stages: dict[str, StageSpec]
    resolved: dict      # the composed config as plain data (for records and MLflow params)
    overrides: tuple[str, ...]

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.store / 'mlflow.db'}"


def compose(overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Compose ``conf/config.yaml`` with Hydra overrides into plain, resolved data."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=[_add_or_set(o) for o in overrides])
        for key, value in _stage_dicts(overrides):
            # Hydra merges a dict value into the YAML's dict; `mixture={web: 1.0}` means "just web"
            OmegaConf.update(cfg, key, value, merge=False)
        return OmegaConf.to_container(cfg, resolve=True)
    except HydraException as e:
        raise ConfigError(f"override: {_first_line(e)}\n  Overrides look like key=value, "
                          "group=option, +new.key=value or ~key; see `forge run --help`") from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {_first_line(e)}") from e


def _add_or_set(override: str) -> str:
    """`stages.X.field=v` may name a field the YAML leaves at its schema default: add-or-set it.
    Typos still fail, with the known fields listed, when the schema checks the stage."""
    if override.startswith("stages.") and "=" in override:
        return "++" + override
    return override


def _stage_dicts(overrides) -> list[tuple[str, dict]]:
    """The `stages.X.field={...}` overrides, parsed (their dicts replace, never merge)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    picked = [o for o in overrides if o.startswith("stages.") and "={" in o]
    parsed = OverridesParser.create().parse_overrides(picked) if picked else []
    return [(o.key_or_group, o.value()) for o in parsed if isinstance(o.value(), dict)]


def _first_line(e: BaseException) -> str:
    """Hydra's message plus its cause's first line (which names the missing key)."""
    text = " ".join(str(e).strip().split("\n")[:2]) or type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        text += f" ({str(cause).strip().splitlines()[0]})"
    return text


def load(overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    return typed(compose(overrides), tuple(overrides))


def typed(data: dict, overrides: tuple[str, ...] = ()) -> PipelineConfig:
    """Check composed data against the schemas; every error names its field."""
    known = {"pipeline_name", "store", "cluster", "tracking", "stages", "model", "seed"}
    for key in data:
        if key not in known and not key.startswith("_"):  # _name: YAML anchors/helpers
            raise ConfigError(f"{key}: unknown top-level field; known: {', '.join(sorted(known))}")
    if not isinstance(data.get("stages"), dict) or not data["stages"]:
        raise ConfigError("stages: the pipeline declares no stages; pick one with pipeline=NAME "
                          f"(see {CONF_DIR / 'pipeline'})")
    cluster = from_dict(ParallelSpec, data.get("cluster") or {}, "cluster")
    tracking = from_dict(TrackingSpec, data.get("tracking") or {}, "tracking")
    stages: dict[str, StageSpec] = {}
    for name, body in data["stages"].items():
        where = f"stages.{name}"
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: expected a mapping with a `kind`, got {body!r}")
        body = dict(body)
        kind = body.pop("kind", None)
        if kind is None:
            raise ConfigError(f"{where}.kind: missing; one of {', '.join(KINDS)}")
        if kind not in KINDS:
            raise ConfigError(f"{where}.kind: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
        stages[name] = StageSpec(name, kind, from_dict(KINDS[kind].Config, body, where))
    store = Path(str(data.get("store") or "forge-store")).expanduser().resolve()
    return PipelineConfig(name=str(data.get("pipeline_name", "pipeline")), store=store,
                          cluster=cluster, tracking=tracking, stages=stages, resolved=data,
                          overrides=overrides)
