"""The Prefect flow: one task per stage, cached by the stage's key across runs.

With flows/schedule.py (the served deployment), the only module that imports Prefect. The flow
body reads as plain Python: plan, then start every stage whose parents are complete as a task run
of its own (``run_stage.submit`` on a thread pool), up to the cluster's limits of stages and
devices at once (``flows/scheduler.py`` decides; one at a time by default), each retried per the
stage's ``retry:`` (a retry resumes from the failed attempt's checkpoints). The task takes the
stage's lock, re-checks ``artifact.json`` (the truth; Prefect's cache is only a fast path above
it), launches the worker, streams its log, and records the stage in MLflow. Task results are small
records (with the stage's start and end time), never tensors; the flow's result lists them in plan
order, so a parallel run's result reads like a serial one's.

After a failure no new stage starts; those running finish, then the run fails with the first
failure. A SIGINT/SIGTERM reaches the flow's main thread, which passes it on to every running
worker (``flows/launch.forward_stop_signals``); once all have checkpointed and exited the run ends
cancelled, and ``forge resume`` continues each of them.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dag import Dag, Node
from flows.failures import attempt_failure, clear_failure, write_failure
from flows.launch import StageFailed, forward_stop_signals, run_worker, stage_lock, stop_requested
from flows.live_workers import stop_all
from flows.scheduler import Schedule, next_to_start, schedule_for, why_not_run
from flows.tracking.lineage import MetricsTail
from flows.tracking.sync import (connect, guarded, needs_tracking, note_recorded, noted_run,
                                 sync_pipeline)
from flows.plan import Step, complete, make_plan, write_stage_record
from flows.runs import run_dag
from stages.base import read_artifact
from stages.layout import ARTIFACT_FILE, PART_DONE, part_dir, part_record
from stages.schema import to_dict


# run file -> (its spec, DAG, plan): a run builds its DAG and plan once, for the flow and every task
_RUNS: dict[str, tuple[dict, Dag, list[Step]]] = {}
# stage threads connect to MLflow at once: one of them opens the client (lineage_for caches it)
_CONNECT = threading.Lock()


def remember_run(run_file: str, spec: dict, dag: Dag, steps: list[Step]) -> None:
    """What `forge run` already built and planned, so the flow does not do it again."""
    _RUNS[str(run_file)] = (spec, dag, steps)


def load_run(run_file: str) -> tuple[dict, Dag, list[Step]]:
    """The run's spec, DAG and plan; built from the run file only when this process has not
    (a deployment's flow run). Tasks take the DAG from here and never re-plan."""
    if str(run_file) not in _RUNS:
        spec = json.loads(Path(run_file).read_text())
        dag = run_dag(Path(run_file), spec)
        remember_run(run_file, spec, dag, make_plan(dag, spec.get("only"), tuple(spec.get("rerun", ()))))
    return _RUNS[str(run_file)]


def refresh_prefect_settings() -> None:
    """Prefect re-reads its settings (PREFECT_API_URL changed after it was imported)."""
    from prefect.context import refresh_global_settings_context
    refresh_global_settings_context()


def create_prefect_db() -> None:
    """Create the embedded server's database once (concurrent launches raced on its migrations)."""
    import asyncio

    from prefect.server.database import provide_database_interface
    asyncio.run(provide_database_interface().create_db())


def cache_key(context: TaskRunContext, params: dict[str, Any]) -> str:
    """The stage's identity key, scoped to its output folder: Prefect's result storage can be
    shared by stores (a work pool's worker keeps its own PREFECT_HOME), and the same stage in
    another store is not this one. A hit is checked against artifact.json by the flow."""
    where = hashlib.blake2b(params["out_dir"].encode(), digest_size=6).hexdigest()
    return f"forge-{params['key']}-{where}"


@task(persist_result=True, cache_key_fn=cache_key, result_serializer="json")
def run_stage(stage: str, key: str, out_dir: str, run_file: str, parent_run: str | None,
              force: bool) -> dict:
    """Run one stage's worker unless its artifact already exists; return a small record."""
    logger = get_run_logger()
    _, dag, _ = load_run(run_file)
    node = dag.nodes[stage]
    store = dag.pipeline.store
    attempt = TaskRunContext.get().task_run.run_count   # > 1: a retry of a failed attempt
    with stage_lock(store, node.out_dir, logger.info):
        if complete(node) and not force:
            logger.info(f"{stage}: cached (artifact.json with key {key[:12]} already there)")
            return record(node, executed=False)
        if attempt > 1:
            logger.info(f"{stage}: attempt {attempt}, resuming what the failed one left")
        elif force and node.out_dir.exists():   # a retry keeps its own first attempt's checkpoints
            aside = node.out_dir.with_name(f"{node.out_dir.name}.replaced-{int(time.time())}")
            node.out_dir.rename(aside)
            logger.info(f"{stage}: forced rerun; previous output kept at {aside}")
        started = time.time()
        parent_keys = {p: dag.nodes[p].key for p in node.parents}
        config = to_dict(node.config)
        write_stage_record(node, parent_keys, config, started)
        clear_failure(node.out_dir)  # this attempt replaces the last one
        cluster, spec = worker_spec(dag, node)
        warn = logger.warning
        with _CONNECT:
            lineage = connect(dag.pipeline.tracking_uri, dag.pipeline.tracking.experiment, warn)
        mlflow_run = lineage and guarded(warn, f"opening {stage}'s run", lineage.start_stage,
                                         parent_run, dag.pipeline.name, node, config, parent_keys)
        logger.info(f"{stage}: starting {node.kind} worker in {node.out_dir} (MLflow run {mlflow_run})")
        tail = (MetricsTail(lineage, mlflow_run, node.out_dir / "metrics.jsonl", warn=warn) if mlflow_run
                else contextlib.nullcontext())
        try:
            with tail:
                run_parts(stage, node.kind_cls.parts(node.config), run_file,   # a fan-out first
                          dag.pipeline.stages[stage].retry, parts_at_once(node, cluster))
                run_worker(stage, node.kind_cls.launcher, cluster, spec, node.out_dir, logger.info)
            artifact = read_artifact(node.out_dir)
            if artifact is None or artifact.key != key:
                raise StageFailed(stage, 0, ["worker exited 0 but wrote no artifact.json"],
                                  node.out_dir / "worker.log")
        except BaseException as e:
            # whatever ended the attempt (the worker, a signal, an error here), on disk first:
            # MLflow may be the next thing to fail, and a signal ends the task Crashed
            write_failure(node.out_dir, stage, key, *attempt_failure(e, node.out_dir / "worker.log"))
            if mlflow_run:
                guarded(warn, f"closing {stage}'s run", lineage.fail_stage, mlflow_run)
            raise
        upstream = {p: read_artifact(dag.nodes[p].out_dir) for p in node.parents}
        recorded = bool(mlflow_run) and guarded(  # else the end-of-run sync records it from disk
            warn, f"recording {stage}", lineage.finish_stage, mlflow_run, node, config, artifact,
            parent_keys, upstream) is not None
        if recorded:
            note_recorded(node, dag.pipeline.tracking_uri, mlflow_run)
        ended = time.time()
        logger.info(f"{stage}: done in {ended - started:.1f}s -> {node.out_dir}")
        return record(node, executed=True, mlflow_run=mlflow_run, seconds=ended - started,
                      recorded=recorded, started=started, ended=ended)


def worker_spec(dag: Dag, node: Node) -> tuple[Any, dict]:
    """The stage's layout and the spec its worker reads (parents' artifacts, resolved config)."""
    inputs = {p: {"out_dir": str(dag.nodes[p].out_dir),
                  "artifact": json.loads((dag.nodes[p].out_dir / ARTIFACT_FILE).read_text())}
              for p in node.parents}
    cluster = node.kind_cls.layout(node.config, dag.pipeline.cluster)
    return cluster, {"kind": node.kind, "kind_module": node.kind_cls.__module__, "stage": node.name,
                     "key": node.key, "config": to_dict(node.config), "inputs": inputs,
                     "out_dir": str(node.out_dir), "cluster": to_dict(cluster)}


@task(cache_policy=NO_CACHE)
def stage_part(stage: str, part: str, run_file: str) -> dict:
    """One part of a fanned-out stage (a curation shard): a worker run of its own, in
    ``parts/<part>/``, unless its done.json (the part's truth) is there already."""
    logger = get_run_logger()
    _, dag, _ = load_run(run_file)
    node = dag.nodes[stage]
    done = part_record(node.out_dir, part)
    if done is not None:
        logger.info(f"{stage}: {part} cached ({part_dir(node.out_dir, part) / PART_DONE})")
        return {"part": part, "executed": False, "record": done}
    if TaskRunContext.get().task_run.run_count > 1:
        logger.info(f"{stage}: {part}: attempt {TaskRunContext.get().task_run.run_count}")
    cluster, spec = worker_spec(dag, node)
    folder = part_dir(node.out_dir, part)
    started = time.time()
    run_worker(f"{stage}/{part}", node.kind_cls.launcher, cluster, dict(spec, part=part), folder,
               logger.info)
    done = part_record(node.out_dir, part)
    if done is None:
        raise StageFailed(stage, 0, [f"{part}: worker exited 0 but wrote no {PART_DONE}"],
                          folder / "worker.log")
    logger.info(f"{stage}: {part} done in {time.time() - started:.1f}s")
    return {"part": part, "executed": True, "record": done}


def parts_at_once(node: Node, cluster: Any) -> int:
    """How many of a fan-out's parts run at once: 1 (in order) unless the kind's parts are
    independent; then all of them where each is a cluster job (the cluster queues them), else up
    to ``max_parallel_stages``."""
    if not node.kind_cls.parts_together:
        return 1
    if cluster.device_budget is None:
        return max(1, len(node.kind_cls.parts(node.config)))
    return cluster.max_parallel_stages


def run_parts(stage: str, parts: tuple[str, ...], run_file: str, retry: Any, at_once: int) -> None:
    """The parts in order, ``at_once`` at a time, each its own task run; once a batch has ended,
    the first failed part's error is raised (the parts done stay done)."""
    options = {"retries": retry.retries, "retry_delay_seconds": retry.delay_s} if retry else {}
    for i in range(0, len(parts), max(1, at_once)):
        batch = parts[i:i + max(1, at_once)]
        if len(batch) == 1:
            run_part(stage, batch[0], run_file, retry)
            continue
        futures = [stage_part.with_options(task_run_name=f"{stage}/{part}", **options).submit(
            stage, part, run_file) for part in batch]
        for future in futures:
            future.wait()
        for future in futures:
            future.result()   # raises the part's own error (StageFailed with its log tail)


def run_part(stage: str, part: str, run_file: str, retry: Any = None) -> dict:
    """Part ``part`` as its own task run (named ``stage/part`` in the Prefect UI), retried alone
    per the stage's ``retry:``; its failure fails the stage, and the parts done stay done."""
    options = {"retries": retry.retries, "retry_delay_seconds": retry.delay_s} if retry else {}
    state = stage_part.with_options(task_run_name=f"{stage}/{part}", **options)(
        stage, part, run_file, return_state=True)
    return state.result()   # raises the part's own error (StageFailed with its log tail)


def record(node: Node, executed: bool, mlflow_run: str | None = None, seconds: float = 0.0,
           recorded: bool = False, started: float | None = None, ended: float | None = None) -> dict:
    """The task's result. ``recorded``: MLflow holds the stage's lineage (the end-of-run sync
    leaves it alone). ``started``/``ended``: when this run's attempt began and ended (Unix time;
    None for a cached stage), which shows what ran beside what."""
    art = read_artifact(node.out_dir)
    return {"stage": node.name, "key": node.key, "out_dir": str(node.out_dir), "executed": executed,
            "mlflow_run": mlflow_run, "seconds": round(seconds, 2), "recorded": recorded,
            "started": started, "ended": ended,
            "outputs": art.outputs if art else {}, "metrics": art.metrics if art else {}}


@flow(name="forge-pipeline", flow_run_name="{name}", task_runner=ThreadPoolTaskRunner())
def forge_pipeline(run_file: str, name: str = "pipeline") -> dict:
    logger = get_run_logger()
    spec, dag, steps = load_run(run_file)
    warn = logger.warning
    uri = dag.pipeline.tracking_uri
    tracking = needs_tracking(dag, steps)
    if not tracking:
        logger.info("nothing to run, and MLflow holds every stage's lineage: nothing to record")
    lineage = tracking and connect(uri, dag.pipeline.tracking.experiment, warn) or None
    parent_run = lineage and guarded(warn, "opening the pipeline run", lineage.start_pipeline,
                                     dag.pipeline.name, spec["resolved"], spec["overrides"],
                                     str(flow_run.get_id()))
    records: dict[str, dict] = {}
    failed: str | None = None
    skipped: dict[str, list[str]] = {}
    for step in steps:
        if step.action == "skip":
            skipped.setdefault(step.why, []).append(step.name)
    for why, names in skipped.items():
        logger.info(f"skipped ({why}): {', '.join(names)}")
    schedule = schedule_for(steps, dag.pipeline.cluster)
    if schedule.max_stages > 1:
        budget = schedule.device_budget
        logger.info(f"up to {schedule.max_stages} stages at once"
                    + (f", {budget} devices among them" if budget else ""))

    def cached(step: Step, rec: dict) -> None:   # a stage this run did not execute
        if lineage and parent_run:
            producer = guarded(warn, f"recording cached {step.name}", lineage.record_cached,
                               parent_run, step.name, step.node.key, noted_run(step.node, uri))
            if producer is not None:
                note_recorded(step.node, uri, producer)
            rec["mlflow_run"] = producer
            rec["recorded"] = producer is not None
        logger.info(f"{step.name}: cached -> {step.node.out_dir}")

    try:
        failed = run_stages(schedule, steps, run_file, parent_run, set(spec.get("rerun", ())),
                            records, cached)
    finally:
        # MLflow catches up on whatever an outage kept from it (flows/tracking/sync.py)
        ran = [s.name for s in steps if s.action != "skip"
               and not records.get(s.name, {}).get("recorded")]   # MLflow has these already
        parent_run, pending = sync_pipeline(dag, ran, parent_run, spec, str(flow_run.get_id()), warn)
        if pending:
            warn(f"MLflow: lineage of {', '.join(pending)} is not recorded yet; the next run of "
                 "this pipeline records it from disk")
        if parent_run:   # MLflow answered: this run has a pipeline run to close
            lineage = lineage or connect(uri, dag.pipeline.tracking.experiment, warn)
        if lineage and parent_run:
            if any(r.get("executed") for r in records.values()):   # else the same picture again
                lineage.log_loss_plot(parent_run, dag.nodes.values(),
                                      f"{dag.pipeline.name}: training loss across phases", warn)
            guarded(warn, "closing the pipeline run", lineage.end_pipeline, parent_run,
                    failed is None)
    result = {"parent_run": parent_run, "failed": failed, "tracking_uri": dag.pipeline.tracking_uri,
              "stages": {n: records[n] for n in schedule.order if n in records}}   # plan order
    if failed is not None:
        raise RuntimeError(records[failed]["error"])
    return result


def run_stages(schedule: Schedule, steps: list[Step], run_file: str, parent_run: str | None,
               rerun: set[str], records: dict[str, dict], cached: Any) -> str | None:
    """Run the schedule's stages, each as a task run on the flow's thread pool, as many at once as
    its limits allow; fill ``records`` (``cached(step, record)`` for each stage served from
    cache); return the stage that failed first, or None. A SIGINT/SIGTERM meanwhile reaches every
    running worker; once they have ended it is raised here (``forward_stop_signals``)."""
    logger = get_run_logger()
    _, dag, _ = load_run(run_file)
    by_name = {s.name: s for s in steps}
    running: dict[str, Any] = {}   # stage -> its PrefectFuture
    done: set[str] = set()
    ended: set[str] = set()        # failed or stopped
    failed: str | None = None

    def submit(step: Step, refresh: bool, force: bool) -> None:
        retry = dag.pipeline.stages[step.name].retry
        options = {"retries": retry.retries, "retry_delay_seconds": retry.delay_s,
                   "retry_condition_fn": _not_stopping} if retry else {}
        task_run = run_stage.with_options(task_run_name=step.name, refresh_cache=refresh, **options)
        running[step.name] = task_run.submit(step.name, step.node.key, str(step.node.out_dir),
                                             run_file, parent_run, force)

    with forward_stop_signals():
        try:
            while True:
                halted = failed is not None or stop_requested() is not None
                for name in next_to_start(schedule, done, running, ended, halted):
                    step = by_name[name]
                    logger.info(f"{name}: {step.action} ({step.why})")
                    submit(step, refresh=name in rerun, force=name in rerun)
                if not running:
                    break
                finished, _ = concurrent.futures.wait(
                    [f.wrapped_future for f in running.values()], timeout=1.0,
                    return_when=concurrent.futures.FIRST_COMPLETED)
                for name in [n for n, f in running.items() if f.wrapped_future in finished]:
                    step, future = by_name[name], running.pop(name)
                    error = future.wrapped_future.exception()
                    state = None if error is not None else future.wrapped_future.result()
                    broke = error is not None or state.is_failed()
                    if broke and stop_requested() is not None:
                        ended.add(name)   # stopped by the signal: it resumes in `forge resume`
                        continue
                    if state is not None and state.name == "Cached" and not complete(step.node):
                        # Prefect's cache is a fast path, artifact.json the truth: a stale hit reruns
                        logger.info(f"{name}: Prefect cache hit but no artifact.json; running it")
                        submit(step, refresh=True, force=False)
                        continue
                    if broke:
                        failed = failed or name
                        ended.add(name)
                        why = error if error is not None else _exception(state)
                        records[name] = {"stage": name, "failed": True, "error": str(why)}
                        if failed == name and running:
                            logger.info(f"{name} failed: no new stage starts; waiting for "
                                        f"{', '.join(running)} to finish")
                        continue
                    done.add(name)
                    records[name] = dict(state.result())
                    if state.name == "Cached":   # an earlier run's result: this run recorded
                        records[name].update(executed=False, recorded=False, started=None,
                                             ended=None)
                    if not records[name]["executed"]:
                        cached(step, records[name])
        except BaseException:
            # an error in this thread: the workers must not train on unattended; they checkpoint
            if running:
                stop_all(signal.SIGTERM)
                concurrent.futures.wait([f.wrapped_future for f in running.values()])
            raise
    if failed is not None:
        for name in schedule.order:
            if name not in records and name not in ended:
                logger.info(f"{name}: not run ({why_not_run(schedule, name, failed)})")
    return failed


def _not_stopping(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed attempt per the stage's ``retry:``, unless forge was asked to stop."""
    return stop_requested() is None


def _exception(state: Any) -> BaseException | str:
    try:
        state.result()
    except BaseException as e:  # the task's own exception, re-raised by Prefect
        return e
    return state.message or "failed"
