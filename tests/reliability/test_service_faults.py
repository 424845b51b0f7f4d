"""Faults of the services around a run: the Prefect server restarts, or the MLflow server goes
away, while a stage trains."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, SMALL, executed, last_result, start_prefect_server

pytestmark = pytest.mark.slow
UP_TO_P1 = "data|tokenizer|tokenize|pretrain-1"


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


async def flow_run_states(url: str) -> dict[str, str]:
    from prefect.client.orchestration import PrefectClient
    async with PrefectClient(url) as client:
        return {r.name: r.state.type.value for r in await client.read_flow_runs()}


def test_prefect_server_restart_mid_stage_loses_nothing(tmp_path):
    home, store = tmp_path / "prefect-home", tmp_path / "store"
    home.mkdir()
    server, url = start_prefect_server(home)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    env = dict(os.environ, FORGE_STORE=str(store), OMP_NUM_THREADS="1", PREFECT_API_URL=url)
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *SMALL,
                            "stages.pretrain-1.tokens=81920", "--only", UP_TO_P1], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # restart the server (same database, same port) while pretrain-1 trains
        wait_for(lambda: list(store.glob("pretrain-1-*/checkpoints/*/done")) or run.poll() is not None,
                 300, "pretrain-1's first checkpoint")
        assert run.poll() is None, "the run ended before the restart"
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        assert not list(store.glob("pretrain-1-*/artifact.json")), "restart came too late to matter"
        server, url2 = start_prefect_server(home, port=port)
        output, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
        server.terminate()
        server.wait(timeout=30)
    assert run.returncode == 0, output[-3000:]
    assert executed(last_result(store)) == {"data", "tokenizer", "tokenize", "pretrain-1"}
    for stage in ("data", "tokenizer", "tokenize", "pretrain-1"):
        (out_dir,) = store.glob(f"{stage}-*")
        assert (out_dir / "artifact.json").exists()
        assert (out_dir / "worker.log").read_text().count("--- ") == 1, stage   # launched once
    # the restarted server knows the run finished
    server, url = start_prefect_server(home, port=port)
    try:
        states = asyncio.run(flow_run_states(url))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert states.get("granite-4.1-tiny") == "COMPLETED", states


def test_mlflow_down_for_part_of_a_run_training_goes_on_and_nothing_is_dropped(prefect_server, tmp_path):
    from mlflow import MlflowClient
    from flows import ui
    backend = tmp_path / "mlflow"
    backend.mkdir()
    db = f"sqlite:///{backend / 'mlflow.db'}"
    server, url = ui.start(db, backend, log=tmp_path / "mlflow-1.log")
    port = int(url.rsplit(":", 1)[1])
    store = tmp_path / "store"
    env = dict(os.environ, FORGE_STORE=str(store), OMP_NUM_THREADS="1", PREFECT_API_URL=prefect_server)
    stages = ["data", "tokenizer", "tokenize", "pretrain-1", "pretrain-2"]
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *SMALL, f"tracking.uri={url}",
                            "stages.pretrain-1.tokens=81920", "stages.pretrain-2.tokens=163840",
                            "--only", "|".join(stages)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: list(store.glob("pretrain-1-*/checkpoints/*/done")) or run.poll() is not None,
                 300, "pretrain-1's first checkpoint")
        ui.stop(server)                                       # MLflow goes away mid-stage...
        # down until pretrain-1 has finished and pretrain-2 has started: both find MLflow gone
        wait_for(lambda: list(store.glob("pretrain-2-*/worker.log")) or run.poll() is not None,
                 300, "pretrain-2 to start without MLflow")
        server, _ = ui.start(db, backend, port=port, log=tmp_path / "mlflow-2.log")  # ...and is back
        assert run.poll() is None, "the run ended while MLflow was down: the test proves nothing"
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output[-3000:]
        assert "MLflow: recording pretrain-1 failed" in output, output[-3000:]
        assert "MLflow: opening pretrain-2's run failed" in output, output[-3000:]

        client = MlflowClient(url)
        exp = client.get_experiment_by_name("granite-forge")
        runs = {r.data.tags["forge.stage"]: r for r in client.search_runs(
            [exp.experiment_id], "tags.`forge.stage` != ''") if r.info.status == "FINISHED"}
        assert set(runs) == set(stages)
        for stage in ("pretrain-1", "pretrain-2"):          # every metric line reached MLflow
            lines = [json.loads(l) for l in next(store.glob(f"{stage}-*/metrics.jsonl")).read_text()
                     .splitlines() if '"loss"' in l]
            history = client.get_metric_history(runs[stage].info.run_id, "loss")
            assert sorted(m.step for m in history) == sorted(int(l["step"]) for l in lines), stage
            models = client.search_logged_models([exp.experiment_id],
                                                 filter_string=f"tags.`forge.stage` = '{stage}'")
            assert [m.source_run_id for m in models] == [runs[stage].info.run_id]
            assert client.search_model_versions(f"name = 'granite-4.1-tiny.{stage}'")
        parents = {runs[s].data.tags.get("mlflow.parentRunId") for s in stages}
        assert len(parents) == 1 and None not in parents     # all under one pipeline run
    finally:
        if run.poll() is None:
            run.kill()
        ui.stop(server)
