"""Trials of the services around a run failing mid-stage: the Prefect server restarts, or the MLflow
server goes away and comes back. Each returns a ``tests.support.faults.Trial``; the CI tests
(``tests/reliability/test_service_faults.py``) run one each, ``benchmarks/faults.py`` more.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.faults import Trial
from tests.support.helpers import ROOT, SMALL, executed, last_result, start_prefect_server

UP_TO_P1 = ["data", "tokenizer", "tokenize", "pretrain-1"]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def forge_run(store: Path, url: str, *overrides: str, only: list[str]) -> subprocess.Popen:
    env = dict(os.environ, FORGE_STORE=str(store), OMP_NUM_THREADS="1", PREFECT_API_URL=url)
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *SMALL, *overrides,
                             "--only", "|".join(only)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check_stages(trial: Trial, store: Path, stages: list[str]) -> None:
    """Every stage has its output and its worker was launched once."""
    for stage in stages:
        dirs = list(store.glob(f"{stage}-*"))
        if len(dirs) != 1 or not (dirs[0] / "artifact.json").exists():
            trial.lose(f"no output for {stage}")
        elif (dirs[0] / "worker.log").read_text().count("--- ") != 1:
            trial.miss(f"{stage} was launched more than once")


async def _flow_run_states(url: str) -> dict[str, str]:
    from prefect.client.orchestration import PrefectClient
    async with PrefectClient(url) as client:
        return {r.name: r.state.type.value for r in await client.read_flow_runs()}


def prefect_restart_trial(work: Path) -> Trial:
    """Restart the Prefect server (same database and port) while pretrain-1 trains."""
    t0, trial = time.time(), Trial("Prefect restart")
    home, store = work / "prefect-home", work / "store"
    home.mkdir(parents=True)
    server, url = start_prefect_server(home)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    run = forge_run(store, url, "stages.pretrain-1.tokens=81920", only=UP_TO_P1)
    try:
        wait_for(lambda: list(store.glob("pretrain-1-*/checkpoints/*/done")) or run.poll() is not None,
                 300, "pretrain-1's first checkpoint")
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        trial.detail = "server down after pretrain-1's first checkpoint"
        if list(store.glob("pretrain-1-*/artifact.json")) or run.poll() is not None:
            trial.miss("the restart came too late to matter")
        server, _ = start_prefect_server(home, port=port)
        output, _ = run.communicate(timeout=600)
        states = asyncio.run(_flow_run_states(url))
    finally:
        if run.poll() is None:
            run.kill()
        server.terminate()
        server.wait(timeout=30)
    if run.returncode != 0:
        trial.miss(f"the run failed: {output[-800:]}")
    check_stages(trial, store, UP_TO_P1)
    if states.get("granite-4.1-tiny") != "COMPLETED":
        trial.miss(f"the restarted server has the run as {states}")
    trial.recovered = run.returncode == 0 and executed(last_result(store)) == set(UP_TO_P1)
    trial.seconds = time.time() - t0
    return trial


def mlflow_outage_trial(work: Path, prefect_url: str) -> Trial:
    """Stop the MLflow server mid-pretrain-1, start it again once pretrain-2 has started. Afterwards
    every stage has a finished run, and each run's metrics equal what its output dir holds: every
    key, every step of each key's history, every value (``mlflow_gaps``)."""
    from mlflow import MlflowClient
    from flows.tracking import ui
    t0, trial = time.time(), Trial("MLflow outage")
    backend, store = work / "mlflow", work / "store"
    backend.mkdir(parents=True)
    db = f"sqlite:///{backend / 'mlflow.db'}"
    server, url = ui.start(db, backend, log=work / "mlflow-1.log")
    stages = UP_TO_P1 + ["pretrain-2"]
    run = forge_run(store, prefect_url, f"tracking.uri={url}", "stages.pretrain-1.tokens=81920",
                    "stages.pretrain-2.tokens=163840", only=stages)
    try:
        wait_for(lambda: list(store.glob("pretrain-1-*/checkpoints/*/done")) or run.poll() is not None,
                 300, "pretrain-1's first checkpoint")
        ui.stop(server)
        # down until pretrain-1 has finished and pretrain-2 has started: both find MLflow gone
        wait_for(lambda: list(store.glob("pretrain-2-*/worker.log")) or run.poll() is not None,
                 300, "pretrain-2 to start without MLflow")
        server, _ = ui.start(db, backend, port=int(url.rsplit(":", 1)[1]), log=work / "mlflow-2.log")
        if run.poll() is not None:
            trial.miss("the run ended while MLflow was down")
        output, _ = run.communicate(timeout=600)
        trial.detail = "down from pretrain-1's first checkpoint until pretrain-2 started"
        for said in ("MLflow: recording pretrain-1 failed", "MLflow: opening pretrain-2's run failed"):
            if said not in output:
                trial.miss(f"no warning {said!r}")
        if run.returncode != 0:
            trial.miss(f"the run failed: {output[-800:]}")
        check_stages(trial, store, stages)
        lost = mlflow_gaps(MlflowClient(url), store, stages)
        for what in lost:
            trial.lose(what)
    finally:
        if run.poll() is None:
            run.kill()
        ui.stop(server)
    trial.recovered = run.returncode == 0 and not lost
    trial.seconds = time.time() - t0
    return trial


def mlflow_gaps(client, store: Path, stages: list[str]) -> list[str]:
    """What MLflow misses of what the store holds: finished stage runs under one pipeline run;
    every metric of every stage run equal to what its output dir holds (``metric_gaps``); the
    logged models and their registry versions."""
    exp = client.get_experiment_by_name("granite-forge")
    runs = {r.data.tags["forge.stage"]: r for r in client.search_runs(
        [exp.experiment_id], "tags.`forge.stage` != ''") if r.info.status == "FINISHED"}
    gaps = [f"no finished MLflow run for {s}" for s in stages if s not in runs]
    for stage in [s for s in stages if s in runs]:
        outs = [d for d in store.glob(f"{stage}-*") if (d / "artifact.json").is_file()]
        if len(outs) != 1:
            gaps.append(f"{stage}: {len(outs)} complete output dirs to compare its metrics with")
            continue
        gaps += [f"{stage}: {g}" for g in metric_gaps(client, runs[stage].info.run_id, outs[0])]
    for stage in [s for s in stages if s.startswith("pretrain-") and s in runs]:
        models = client.search_logged_models([exp.experiment_id],
                                             filter_string=f"tags.`forge.stage` = '{stage}'")
        if [m.source_run_id for m in models] != [runs[stage].info.run_id]:
            gaps.append(f"{stage}: logged models {len(models)}, expected one from its run")
        if not client.search_model_versions(f"name = 'granite-4.1-tiny.{stage}'"):
            gaps.append(f"{stage}: no registered model version")
    parents = {runs[s].data.tags.get("mlflow.parentRunId") for s in stages if s in runs}
    if len(parents) != 1 or None in parents:
        gaps.append(f"stage runs under {len(parents)} pipeline runs")
    return gaps


def expected_metrics(out: Path) -> dict[str, list[tuple[int, float, int | None]]]:
    """What a stage run's metrics must be, by key: (step, value, timestamp in ms) for every value
    of every line of metrics.jsonl (its step, its ``time``), and the final metrics of artifact.json
    at step 0 (timestamp: when they were sent, not on disk: None)."""
    want: dict[str, list[tuple[int, float, int | None]]] = {}
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    for line in lines:
        row = json.loads(line)
        for key, value in row.items():
            if key not in ("step", "time"):
                want.setdefault(key, []).append((int(row["step"]), value, int(row["time"] * 1000)))
    artifact = json.loads((out / "artifact.json").read_text())
    for key, value in artifact.get("metrics", {}).items():
        want.setdefault(key.replace("/", "."), []).append((0, value, None))
    return want


def metric_gaps(client, run_id: str, out: Path) -> list[str]:
    """How the MLflow run's metrics differ from ``expected_metrics(out)``: every key on both sides,
    and for each key its whole history, step by step: the same steps (none missing, none doubled),
    the same values bit for bit, the timestamps of the metrics.jsonl lines."""
    want = expected_metrics(out)
    gaps = []
    for key in sorted(set(want) | set(client.get_run(run_id).data.metrics)):
        got = sorted(((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)),
                     key=_step_and_bits)
        exp = sorted(want.get(key, []), key=_step_and_bits)
        if [_step_and_bits(m) for m in got] != [_step_and_bits(m) for m in exp]:
            gaps.append(f"metric {key}: {_first_difference(got, exp)}")
        elif any(t is not None and t != tg for (_, _, tg), (_, _, t) in zip(got, exp)):
            gaps.append(f"metric {key}: timestamps differ from metrics.jsonl's")
    return gaps


def _step_and_bits(m: tuple) -> tuple[int, str]:
    """(step, the value's exact bits): NaN equals NaN; a value that is no number stays unequal."""
    step, value = m[0], m[1]
    return step, float(value).hex() if isinstance(value, (int, float)) else f"not a number: {value!r}"


def _first_difference(got: list[tuple], exp: list[tuple]) -> str:
    steps_got, steps_exp = [m[0] for m in got], [m[0] for m in exp]
    if steps_got != steps_exp:
        return (f"{len(got)} values in MLflow, {len(exp)} on disk (steps missing "
                f"{sorted(set(steps_exp) - set(steps_got))[:8]}, extra "
                f"{sorted(set(steps_got) - set(steps_exp))[:8]}, doubled "
                f"{sorted({s for s in steps_got if steps_got.count(s) > 1})[:8]})")
    for g, e in zip(got, exp):
        if _step_and_bits(g) != _step_and_bits(e):
            return f"step {g[0]}: {g[1]!r} in MLflow, {e[1]!r} on disk"
    return "differs"
