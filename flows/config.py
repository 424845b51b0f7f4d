"""Composition -> typed, frozen ``PipelineConfig``. The only module that imports Hydra.

YAML groups under ``conf/`` are the data (pipeline, model, cluster, tracking); the dataclasses of
each stage kind and of ``stages.specs`` and ``stages.cluster`` are the schema. Compose once, validate once.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
from pathlib import Path
from typing import Any

from stages import KINDS
from stages.schema import ConfigError, configclass, from_dict, setting
from stages.cluster import ParallelSpec
from stages.specs import ModelSpec

CONF_DIR = Path(os.environ.get("FORGE_CONF_DIR", Path(__file__).resolve().parents[1] / "conf"))


@configclass
class TrackingSpec:
    uri: str = setting("", "MLflow tracking URI; empty = sqlite:///<store>/mlflow.db")
    experiment: str = setting("granite-forge", "MLflow experiment name")

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            raise ConfigError("experiment: is empty; name the MLflow experiment "
                              "(tracking.experiment=granite-forge)")


GROUPS = ("pipeline", "model", "cluster", "tracking", "layout")   # config groups under conf/
TOP_LEVEL = {"pipeline_name", "store", "cluster", "tracking", "stages", "model", "seed", "layout"}
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@configclass
class RetrySpec:
    """How often the orchestrator re-launches a failed stage worker (per stage: `retry:`). A
    training stage resumes from its newest checkpoint, so a retry loses at most one interval."""
    retries: int = setting(0, "re-launches after a failed attempt (0: fail at once)", ge=0)
    delay_s: float = setting(10.0, "seconds between attempts", ge=0)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    config: Any        # the kind's frozen Config dataclass
    retry: RetrySpec = RetrySpec()   # orchestration, not identity: it never changes a key


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
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    parsed = _parse(overrides)
    later = [(line, o) for line, o in parsed if _sets_stage_field(o)]
    early = [_add_or_set(line, o) for line, o in parsed if not _sets_stage_field(o)]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=early)
    except MissingConfigException as e:
        group, _, option = str(e.missing_cfg_file or "").rpartition("/")
        if group in GROUPS and e.options:
            raise ConfigError(f"{group}: no option {option!r}; options: {', '.join(e.options)} "
                              f"(the files in {CONF_DIR / group})") from e
        raise ConfigError(f"override: {_first_line(e)}") from e
    except HydraException as e:
        hint = ("\n  A pipeline file starts with `# @package _global_` (see "
                "conf/pipeline/granite-4.1-tiny.yaml)" if "@pipeline." in str(e) else "")
        raise ConfigError(f"override: {_first_line(e)}\n  Overrides look like key=value, "
                          "group=option, +new.key=value or ~key; see `forge run --help`" + hint) from e
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_error(e)) from e
    except YAMLError as e:
        raise ConfigError(_yaml_error(e)) from e
    for line, o in later:
        try:
            _set_stage_field(cfg, o.key_or_group, o.value())
        except OmegaConfBaseException as e:
            raise ConfigError(f"{o.key_or_group}: cannot apply override {line!r} "
                              f"({_first_line(e)})") from e
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_error(e)) from e


def _omegaconf_error(e) -> str:
    """An interpolation that does not resolve (`${modle}`, `${oc.env:UNSET}`): the key, the cause."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{getattr(e, 'full_key', None) or 'config'}: {text}; fix the value or the name it refers to"


def _parse(overrides) -> list:
    """Each override parsed by Hydra's grammar; a malformed one is named in the error."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    parser = OverridesParser.create()
    out = []
    for line in overrides:
        try:
            out.append((line, parser.parse_override(line)))
        except HydraException as e:
            key = line.split("=", 1)[0].lstrip("+~") or line
            raise ConfigError(f"{key}: bad override: {line!r} does not parse ({str(e).splitlines()[0]}). "
                              "Overrides look like key=value, key=[a,b], key={a: 1}, group=option, "
                              "+new.key=value or ~key; quote values with spaces or commas") from e
        if not out[-1][1].key_or_group:
            raise ConfigError(f"override: {line!r} has no key before `=`; write key=value")
        if out[-1][1].is_sweep_override():
            key = out[-1][1].key_or_group
            raise ConfigError(f"{key}: {line!r} is a sweep (comma-separated values); sweep with "
                              f"`forge run -m`, or write a list as {key}=[a,b]")
    return out


def _sets_stage_field(o) -> bool:
    """A plain `stages.X.field=value` (applied after composition by ``_set_stage_field``)."""
    from hydra.core.override_parser.types import OverrideType
    return (o.key_or_group.startswith("stages.") and o.type == OverrideType.CHANGE
            and o.package is None and not o.is_sweep_override())


def _set_stage_field(cfg, key: str, value) -> None:
    """Add-or-set ``key``: a field the YAML leaves at its schema default may be set (typos still
    fail, with the known fields listed, when the schema checks the stage). A dict or list value
    replaces the YAML's (`mixture={web: 1.0}` means "just web"). A node on the way that is an
    interpolation (`model: ${model}`) is copied into the stage first, so that
    `stages.pretrain-2.model.hidden_size=128` changes that one field of that stage's model."""
    from omegaconf import DictConfig, OmegaConf
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            break
        if OmegaConf.is_interpolation(node, part) and isinstance(node[part], DictConfig):
            node[part] = OmegaConf.to_container(node[part], resolve=True)
        node = node[part]
    OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def _add_or_set(line: str, o) -> str:
    """`model.F=v`, `cluster.F=v`, `tracking.F=v` may name a field the YAML group leaves at its
    schema default, and `seed=N` a key config.yaml leaves out: add-or-set them (typos fail in the
    schema check, with the known fields listed). An unknown top-level key fails here, named."""
    from hydra.core.override_parser.types import OverrideType
    if o.type != OverrideType.CHANGE or o.package is not None:
        return line
    root, dot, _ = o.key_or_group.partition(".")
    if root not in TOP_LEVEL and root not in GROUPS and root != "hydra":
        raise ConfigError(f"{root}: unknown top-level key in override {line!r}; known: "
                          f"{', '.join(sorted(TOP_LEVEL | set(GROUPS)))} (check the spelling; "
                          "groups take an option: model=granite-8b)")
    if (dot and root in ("model", "cluster", "tracking")) or root == "seed":
        return "++" + line
    return line


def _yaml_error(e) -> str:
    """A YAML file that does not parse: the file, the line and the problem."""
    mark = getattr(e, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "conf"
    problem = " ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
    return (f"{where}: YAML does not parse: {problem or str(e).splitlines()[0]}; fix the file "
            "there (indent with spaces, close brackets, no key twice in one mapping)")


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
    known = TOP_LEVEL
    for key in data:
        if key == "pipeline":
            raise ConfigError("pipeline: the pipeline file put its fields under `pipeline:` (or "
                              "declares nothing); start it with `# @package _global_` and declare "
                              f"`stages:` at the top level, as {CONF_DIR / 'pipeline'}/"
                              "granite-4.1-tiny.yaml does")
        if key not in known and not str(key).startswith("_"):  # _name: YAML anchors/helpers
            raise ConfigError(f"{key}: unknown top-level field; known: {', '.join(sorted(known))}")
    if data.get("stages") is not None and not isinstance(data["stages"], dict):
        raise ConfigError(f"stages: expected a mapping of stage name -> stage config "
                          f"(`stages: {{data: {{kind: prepare_data, ...}}, ...}}`), got {data['stages']!r}")
    if not data.get("stages"):
        raise ConfigError("stages: the pipeline declares no stages; pick one with pipeline=NAME "
                          f"(see {CONF_DIR / 'pipeline'})")
    store = data.get("store")
    if store is not None and (not isinstance(store, str) or not store.strip()):
        raise ConfigError(f"store: expected a directory path, got {store!r}; set store=/path/to/store "
                          "or the FORGE_STORE environment variable")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed: expected an integer, got {seed!r}")
    if data.get("model") is not None:  # the model group, before `${model}` copies it
        from_dict(ModelSpec, data["model"], "model")
    cluster = from_dict(ParallelSpec, data.get("cluster") or {}, "cluster")
    tracking = from_dict(TrackingSpec, data.get("tracking") or {}, "tracking")
    stages: dict[str, StageSpec] = {}
    for name, body in data["stages"].items():
        where = f"stages.{name}"
        if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
            raise ConfigError(f"{where}: bad stage name {name!r}; a stage name is letters, digits, "
                              "'-' and '_', starting with a letter or digit (it names the stage's "
                              "output directory); rename it")
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: expected a mapping with a `kind`, got {body!r}")
        body = dict(body)
        kind = body.pop("kind", None)
        if kind is None:
            raise ConfigError(f"{where}.kind: missing; one of {', '.join(KINDS)}")
        if kind not in KINDS:
            raise ConfigError(f"{where}.kind: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
        retry = from_dict(RetrySpec, body.pop("retry", None) or {}, f"{where}.retry")
        stages[name] = StageSpec(name, kind, from_dict(KINDS[kind].Config, body, where), retry)
    store = Path(str(data.get("store") or "forge-store")).expanduser().resolve()
    return PipelineConfig(name=str(data.get("pipeline_name", "pipeline")), store=store,
                          cluster=cluster, tracking=tracking, stages=stages, resolved=data,
                          overrides=overrides)


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """a=1,2 b=3 -> [[a=1, b=3], [a=2, b=3]] (Hydra's override grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    parser, parsed = OverridesParser.create(), []
    for line in overrides:  # one at a time, so the error names the override that is wrong
        try:
            parsed += parser.parse_overrides([line])
        except HydraException as e:
            key = line.split("=", 1)[0] or line
            raise ConfigError(f"{key}: bad override {line!r} ({str(e).splitlines()[0]}); a sweep "
                              "looks like key=a,b,c") from e
    choices = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.product(*choices)]
