"""The tiny pipeline end to end through the real CLI, Prefect server, workers and MLflow store.

One store is built once for the module; later tests rerun against it and check what executes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.helpers import ONLY_BUILT, SMALL, executed, forge, last_result

pytestmark = pytest.mark.slow
PHASES = ["pretrain-1", "pretrain-2", "pretrain-3", "pretrain-4"]
DATA = ["data", "tokenizer", "tokenize"]


@pytest.fixture(scope="module")
def built(prefect_server, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    out = forge("run", *SMALL, "--only", ONLY_BUILT, store=store)
    return store, out, last_result(store)


def test_first_run_trains_every_built_stage_and_says_what_it_left_out(built):
    store, out, result = built
    assert executed(result) == set(DATA + PHASES)
    text = out.stdout + out.stderr
    assert "extend-1" in text and "left out by --only" in text
    assert "forge ui --store" in out.stdout
    for phase in PHASES:
        rec = result["stages"][phase]
        ckpt = Path(rec["out_dir"]) / rec["outputs"]["checkpoint"]
        assert ckpt.is_dir() and str(ckpt) in out.stdout
        # training loss falls within each phase
        assert rec["metrics"]["loss_last"] < rec["metrics"]["loss_first"], (phase, rec["metrics"])
        assert "step" in (Path(rec["out_dir"]) / "worker.log").read_text()


def test_second_run_executes_nothing(built):
    store, _, _ = built
    logs = {p: p.read_text() for p in store.glob("*/worker.log")}
    forge("run", *SMALL, "--only", ONLY_BUILT, store=store)
    assert executed(last_result(store)) == set()
    assert {p: p.read_text() for p in store.glob("*/worker.log")} == logs


def test_without_prefect_database_still_executes_nothing(built):
    """Ephemeral Prefect on a brand-new (deleted) database: artifact.json is the truth."""
    store, _, _ = built
    home = store / "prefect-ephemeral"
    shutil.rmtree(home, ignore_errors=True)
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": ""}
    out = forge("run", *SMALL, "--only", ONLY_BUILT, store=store, env=env)
    assert executed(last_result(store)) == set(), out.stdout[-2000:]


def test_identity_change_in_phase3_reruns_phases_3_and_4_only(built):
    store, _, first = built
    out = forge("run", *SMALL, "stages.pretrain-3.schedule.lr=0.0015", "--only", ONLY_BUILT, store=store)
    assert executed(last_result(store)) == {"pretrain-3", "pretrain-4"}
    assert "changed since" in out.stdout and "schedule.lr" in out.stdout
    forge("run", *SMALL, "stages.pretrain-3.log_interval=1", "--only", ONLY_BUILT, store=store)
    assert executed(last_result(store)) == set()


def test_mlflow_holds_lineage(built):
    from mlflow import MlflowClient
    store, _, result = built
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("granite-forge")
    parent = client.get_run(result["parent_run"])
    assert parent.data.tags["forge.pipeline"] == "granite-4.1-tiny"
    # one picture of the loss across the four phases, drawn from their metrics.jsonl
    assert "loss_across_phases.png" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    # search_runs leaves run inputs/outputs of models out: read each run whole
    by_stage = {r.data.tags["forge.stage"]: client.get_run(r.info.run_id) for r in children}
    assert set(by_stage) == set(DATA + PHASES)
    p3 = by_stage["pretrain-3"]
    assert p3.data.params["schedule.kind"] == "exponential"
    assert p3.data.tags["forge.key"] == result["stages"]["pretrain-3"]["key"]
    parent_keys = json.loads(p3.data.tags["forge.parent_keys"])
    assert parent_keys["pretrain-2"] == result["stages"]["pretrain-2"]["key"]
    assert len(p3.data.tags["mlflow.source.git.commit"]) >= 7
    losses = client.get_metric_history(p3.info.run_id, "loss")
    assert len(losses) >= 5
    # dataset inputs with digests: the token sources of the phase's mixture
    names = {d.dataset.name: d.dataset.digest for d in p3.inputs.dataset_inputs}
    assert {n.split("/")[-1] for n in names} == {"web", "math", "code", "technical", "chat", "recall"}
    assert all(len(d) >= 16 for d in names.values())
    # the checkpoint is a logged model, output of its run and input of the next phase's run
    out_models = [o.model_id for o in p3.outputs.model_outputs]
    assert len(out_models) == 1
    model = client.get_logged_model(out_models[0])
    assert model.source_run_id == p3.info.run_id
    assert model.tags["forge.uri"].startswith("file://") and "pretrain-3-" in model.tags["forge.uri"]
    p4_inputs = [m.model_id for m in by_stage["pretrain-4"].inputs.model_inputs]
    assert out_models[0] in p4_inputs
    # data stages record their sources with digests
    data_inputs = by_stage["data"].inputs.dataset_inputs
    assert len(data_inputs) >= 6


def test_cached_stage_is_linked_to_its_producer(built):
    """A fully cached rerun records nothing (no MLflow run: nothing was made); a rerun in which one
    stage runs links each cached stage to the run that made it."""
    from mlflow import MlflowClient
    store, _, first = built
    forge("run", *SMALL, "--only", ONLY_BUILT, store=store)
    assert last_result(store)["parent_run"] is None
    forge("run", *SMALL, "--only", ONLY_BUILT, "--rerun", "data", store=store)
    rerun = last_result(store)
    assert executed(rerun) == {"data"}
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    tags = client.get_run(rerun["parent_run"]).data.tags
    producer = tags["forge.cached.pretrain-2"]
    assert client.get_run(producer).data.tags["forge.key"] == first["stages"]["pretrain-2"]["key"]


def test_lineage_command_walks_back_to_the_data(built):
    store, _, _ = built
    out = forge("lineage", "pretrain-4", *SMALL, store=store)
    lines = out.stdout
    for stage in PHASES + DATA:
        assert f"{stage} [" in lines
    assert "digest" in lines and "model " in lines


def test_multirun_over_a_downstream_field_shares_upstream_stages(built):
    store, _, first = built
    before = set((store / "runs").glob("*.result.json"))
    forge("run", "-m", *SMALL, "stages.pretrain-4.schedule.lr=0.0004,0.0006", "--only", ONLY_BUILT,
          store=store)
    results = [json.loads(p.read_text()) for p in sorted(set((store / "runs").glob("*.result.json")) - before)]
    assert len(results) == 2
    assert [executed(r) for r in results] == [{"pretrain-4"}, {"pretrain-4"}]
    keys = [r["stages"]["pretrain-4"]["key"] for r in results]
    assert keys[0] != keys[1]
    for r in results:
        assert r["stages"]["pretrain-3"]["key"] == first["stages"]["pretrain-3"]["key"]


def test_status_and_forced_rerun(built):
    store, _, first = built
    out = forge("status", *SMALL, store=store)
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    assert all("complete" in lines[s] for s in DATA + PHASES)
    assert "not run" in lines["extend-1"]
    old_dir = Path(first["stages"]["pretrain-4"]["out_dir"])
    old_artifact = (old_dir / "artifact.json").read_text()
    forge("run", *SMALL, "--rerun", "pretrain-4", "--only", "pretrain-4", store=store)
    assert executed(last_result(store)) == {"pretrain-4"}
    kept = list(store.glob(f"{old_dir.name}.replaced-*"))
    assert len(kept) == 1 and (kept[0] / "artifact.json").read_text() == old_artifact
    assert (old_dir / "artifact.json").exists()
