"""Run a pipeline: compose -> validate -> plan -> (Prefect) execute -> summary.

Everything that can be wrong with the input is found before Prefect starts or any worker runs.
Prefect and MLflow default to files inside the store (``<store>/prefect``, ``<store>/mlflow.db``)
unless PREFECT_API_URL / PREFECT_HOME or ``tracking.uri`` point elsewhere. Without PREFECT_API_URL a
run starts a Prefect server of its own (``flows/prefect_server.py``) in a session of its own, so that a
Ctrl-C typed into the terminal reaches forge (which stops the run) but not the server it still
needs to record that; the server stops when forge does.

SIGINT and SIGTERM stop a run the same way (``Stopped``): the stage in progress checkpoints, the run
is recorded as cancelled, and ``forge resume RUN_ID`` continues it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from flows import config as config_mod
from flows.dag import Dag, build
from flows.plan import Step, check_runnable, format_plan, make_plan
from flows.prefect_server import prefect_api
from flows.runs import write_status
from stages.schema import ConfigError


@dataclasses.dataclass
class Prepared:
    dag: Dag
    steps: list[Step]
    overrides: tuple[str, ...]
    only: str | None
    rerun: tuple[str, ...]
    compute: dict = dataclasses.field(default_factory=dict)   # stage -> StagePlan (training kinds)
    resumes: str | None = None                                 # the RUN_ID a resume continues


def prepare(overrides: list[str] | tuple[str, ...], only: str | None = None,
            rerun: tuple[str, ...] = ()) -> Prepared:
    return _prepared(build(config_mod.load(overrides)), tuple(overrides), only, tuple(rerun))


def prepare_dag(dag: Dag, only: str | None = None, rerun: tuple[str, ...] = ()) -> Prepared:
    """A pipeline built without Hydra (a config from code, a plugin's own composition)."""
    return _prepared(dag, (), only, tuple(rerun))


def prepare_resume(run_id: str, store: Path) -> Prepared:
    """A stored run again, from its own resolved config (today's conf/ is not read)."""
    from flows.runs import find_run
    run = find_run(store, run_id)
    prep = _prepared(run.dag(), tuple(run.spec.get("overrides", ())), run.spec.get("only"), ())
    prep.resumes = run.run_id
    return prep


def _prepared(dag: Dag, overrides: tuple[str, ...], only: str | None,
              rerun: tuple[str, ...]) -> Prepared:
    from flows.compute_view import compute_plans
    return Prepared(dag, make_plan(dag, only, rerun), overrides, only, rerun, compute_plans(dag))


def check_hardware(prep: Prepared) -> None:
    """What only this machine can tell: a GPU for cuda clusters and FP8 stages; for Slurm and
    Kubernetes, that this machine can launch there (the GPUs are the nodes', not ours)."""
    from flows.launchers import check_available
    if any(s.executes for s in prep.steps):
        check_available(prep.dag.pipeline.cluster)
    if prep.dag.pipeline.cluster.launcher != "torchrun":
        return
    for s in prep.steps:
        if s.executes:
            s.node.kind_cls.preflight(s.node.config, f"stages.{s.name}")
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
    # A tracking server that is down costs seconds, not MLflow's default ~4 minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


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
            from flows.pipeline import create_prefect_db  # imports Prefect
            create_prefect_db()
        from flows.tracking.sync import connect, needs_tracking
        if needs_tracking(prep.dag, prep.steps):   # MLflow down: the run goes on, lineage catches up
            connect(prep.dag.pipeline.tracking_uri, prep.dag.pipeline.tracking.experiment, print)


def write_run_file(prep: Prepared) -> tuple[Path, dict]:
    runs = prep.dag.pipeline.store / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    # the store as an absolute path: `forge resume` from another directory finds the same outputs
    resolved = dict(prep.dag.pipeline.resolved, store=str(prep.dag.pipeline.store))
    spec = {"overrides": list(prep.overrides), "only": prep.only, "rerun": list(prep.rerun),
            "resumes": prep.resumes, "resolved": resolved}
    path.write_text(json.dumps(spec, indent=2, default=str))
    return path, spec


def execute(prep: Prepared, say: Callable[[str], None] = print) -> dict:
    """Run the planned stages under Prefect; return the flow's result (raises on stage failure).

    A SIGINT or SIGTERM (``Stopped`` under `forge run`, else KeyboardInterrupt or Prefect's
    TerminationSignal) records the run as cancelled and goes on up (``Stopped`` with the run id)."""
    check_runnable(prep.steps)
    from flows.compute_view import check_fits
    check_fits(prep.compute, prep.steps)   # a stage that cannot fit its devices stops here
    check_hardware(prep)
    store = prep.dag.pipeline.store
    configure_services(store)
    init_stores(prep)
    run_file, spec = write_run_file(prep)
    say(f"run id {run_file.stem}  (forge runs {run_file.stem}; forge resume {run_file.stem})")
    write_status(run_file, "running")
    try:
        with prefect_api(say):   # forge's own server unless PREFECT_API_URL is set
            from flows.pipeline import forge_pipeline, remember_run  # imports Prefect
            remember_run(str(run_file), spec, prep.dag, prep.steps)   # planned once, above
            state = forge_pipeline(str(run_file), prep.dag.pipeline.name, return_state=True)
    except BaseException as e:
        signum = stop_signal(e)
        if signum is None:
            raise
        write_status(run_file, "cancelled", signal=signal.Signals(signum).name)
        if isinstance(e, Stopped):
            e.run_id = run_file.stem
        raise   # Prefect's own TerminationSignal unchanged: a deployment's engine handles it
    if state.is_failed():
        try:
            state.result()
        except Exception as e:  # the flow's exception carries the failing stage and log tail
            write_status(run_file, "failed", error=str(e))
            raise PipelineFailed(str(e)) from e
    result = dict(state.result(), run_file=str(run_file))
    run_file.with_suffix(".result.json").write_text(json.dumps(result, indent=2, default=str))
    write_status(run_file, "completed")
    return result


class Stopped(KeyboardInterrupt):
    """A SIGINT or SIGTERM to forge ended the run (``run_id``, once it has one). The worker got the
    signal too and checkpointed; the run is recorded as cancelled. A KeyboardInterrupt, so that
    every layer in between (Prefect's engines, MLflow, Python) unwinds as it does for a Ctrl-C."""

    def __init__(self, signum: int, run_id: str | None = None):
        super().__init__(signum)
        self.signum, self.run_id = int(signum), run_id


def raise_stopped(signum: int, frame) -> None:
    """The SIGINT and SIGTERM handler of `forge run` and `forge resume`."""
    raise Stopped(signum)


def stop_signal(e: BaseException) -> int | None:
    """The signal behind ``e`` if a SIGINT or SIGTERM ended the run, else None."""
    if isinstance(e, Stopped):
        return e.signum
    if isinstance(e, KeyboardInterrupt):
        return int(signal.SIGINT)
    terminated = getattr(sys.modules.get("prefect.exceptions"), "TerminationSignal", None)
    if terminated is not None and isinstance(e, terminated):   # Prefect's SIGTERM handler's
        return int(e.signal)
    return None


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
    lines.append(f"MLflow: parent run {result['parent_run']} in {uri}" if result["parent_run"] else
                 f"MLflow: nothing new to record; every stage's run is in {uri}")
    if uri.startswith(("http://", "https://")):
        lines.append(f"  open the UI:  {uri}")
    else:
        lines.append(f"  open the UI:  forge ui --store {store}   (starts mlflow server, prints its URL)")
    lines.append(f"  lineage:      forge lineage pretrain-4   (store: {store})")
    models = [n for n, r in result["stages"].items() if "checkpoint" in r.get("outputs", {})]
    if models:  # the key must match: promote takes the run's own overrides
        lines.append(f"  promote:      forge promote {models[-1]} --alias champion OVERRIDES")
    return "\n".join(lines)


def plan_text(prep: Prepared) -> str:
    pipe = prep.dag.pipeline
    c = pipe.cluster
    at_once = (f", up to {c.max_parallel_stages} stages at once"
               + (f" on {c.device_budget} devices" if c.device_budget else "")
               if c.max_parallel_stages > 1 else "")
    head = (f"pipeline {pipe.name}  ({len(prep.steps)} stages, store {pipe.store}, cluster "
            f"{c.device} TP{c.tensor_parallel} DP{c.data_parallel}{at_once})")
    return head + "\n" + format_plan(prep.steps, pipe.store)
