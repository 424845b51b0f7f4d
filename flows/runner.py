"""Run a pipeline: compose -> validate -> plan -> (Prefect) execute -> summary.

Everything that can be wrong with the input is found before Prefect starts or any worker runs.
Prefect and MLflow default to files inside the store (``<store>/prefect``, ``<store>/mlflow.db``)
unless PREFECT_API_URL / PREFECT_HOME or ``tracking.uri`` point elsewhere.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Callable

from flows import config as config_mod
from flows.dag import Dag, build
from flows.plan import Step, check_runnable, format_plan, make_plan
from stages.schema import ConfigError


@dataclasses.dataclass
class Prepared:
    dag: Dag
    steps: list[Step]
    overrides: tuple[str, ...]
    only: str | None
    rerun: tuple[str, ...]


def prepare(overrides: list[str] | tuple[str, ...], only: str | None = None,
            rerun: tuple[str, ...] = ()) -> Prepared:
    pipeline = config_mod.load(overrides)
    dag = build(pipeline)
    return Prepared(dag, make_plan(dag, only, rerun), tuple(overrides), only, tuple(rerun))


def check_hardware(prep: Prepared) -> None:
    """What only this machine can tell: a GPU for cuda clusters and FP8 stages."""
    from stages.pretrain import require_fp8_runtime
    for s in prep.steps:
        precision = getattr(s.node.config, "precision", None)
        if s.executes and precision is not None:
            require_fp8_runtime(precision, f"stages.{s.name}.precision")
    if prep.dag.pipeline.cluster.device == "cuda" and any(s.executes for s in prep.steps):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("cluster.device: 'cuda' but this machine has no visible GPU; run with "
                              "cluster=cpu here, or launch on a GPU node")


def configure_services(store: Path) -> None:
    """Point Prefect at the store unless the user configured it; quiet, patient start-up."""
    store.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.pop("PREFECT_API_URL", None)  # empty means: use the embedded server
        os.environ.setdefault("PREFECT_HOME", str(store / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextlib.contextmanager
def store_lock(store: Path, name: str):
    locks = store / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / name, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def init_stores(prep: Prepared) -> None:
    """Create Prefect's and MLflow's databases once, under a lock (concurrent launches raced)."""
    store = prep.dag.pipeline.store
    with store_lock(store, "init.lock"):
        if not os.environ.get("PREFECT_API_URL"):
            from prefect.server.database import provide_database_interface
            asyncio.run(provide_database_interface().create_db())
        from flows.lineage import lineage_for
        lineage_for(prep.dag.pipeline.tracking_uri, prep.dag.pipeline.tracking.experiment)


def write_run_file(prep: Prepared) -> Path:
    runs = prep.dag.pipeline.store / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    path.write_text(json.dumps({"overrides": list(prep.overrides), "only": prep.only,
                                "rerun": list(prep.rerun), "resolved": prep.dag.pipeline.resolved},
                               indent=2, default=str))
    return path


def execute(prep: Prepared, say: Callable[[str], None] = print) -> dict:
    """Run the planned stages under Prefect; return the flow's result (raises on stage failure)."""
    check_runnable(prep.steps)
    check_hardware(prep)
    store = prep.dag.pipeline.store
    configure_services(store)
    init_stores(prep)
    run_file = write_run_file(prep)
    from flows.pipeline import forge_pipeline  # imports Prefect
    state = forge_pipeline(str(run_file), prep.dag.pipeline.name, return_state=True)
    if state.is_failed():
        try:
            state.result()
        except Exception as e:  # the flow's exception carries the failing stage and log tail
            raise PipelineFailed(str(e)) from e
    result = dict(state.result(), run_file=str(run_file))
    run_file.with_suffix(".result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


class PipelineFailed(RuntimeError):
    pass


def summary(prep: Prepared, result: dict) -> str:
    store = prep.dag.pipeline.store
    ran = [n for n, r in result["stages"].items() if r.get("executed")]
    cached = [n for n, r in result["stages"].items() if not r.get("executed")]
    lines = [f"pipeline {prep.dag.pipeline.name}: {len(ran)} stage(s) ran"
             + (f" ({', '.join(ran)})" if ran else "") + f", {len(cached)} cached"]
    for name, rec in result["stages"].items():
        if "checkpoint" in rec.get("outputs", {}):
            m = rec.get("metrics", {})
            loss = (f"  loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}"
                    if "loss_first" in m and "loss_last" in m else "")
            lines.append(f"  {name:<12} {Path(rec['out_dir']) / rec['outputs']['checkpoint']}{loss}")
    uri = result["tracking_uri"]
    lines.append(f"MLflow: parent run {result['parent_run']} in {uri}")
    lines.append(f"  open the UI:  mlflow ui --backend-store-uri {uri} --port 5000   "
                 "(then http://127.0.0.1:5000)")
    lines.append(f"  lineage:      forge lineage pretrain-4   (store: {store})")
    return "\n".join(lines)


def plan_text(prep: Prepared) -> str:
    pipe = prep.dag.pipeline
    head = (f"pipeline {pipe.name}  ({len(prep.steps)} stages, store {pipe.store}, cluster "
            f"{pipe.cluster.device} TP{pipe.cluster.tensor_parallel} DP{pipe.cluster.data_parallel})")
    return head + "\n" + format_plan(prep.steps, pipe.store)
