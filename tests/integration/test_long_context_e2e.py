"""Context extension, merges and evaluations of the tiny pipeline through the real CLI (issue 3).

A small version of the whole chain: pretrain-4 -> extend-1 -> merge-1 -> ... -> merge-3, every
evaluation included, with real Megatron workers, mergekit, Prefect and MLflow.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.helpers import (LONG_CONTEXT, POST_TRAINING, RL, SMALL, SMALL_LONG_CONTEXT,
                                   SMALL_POST_TRAINING, SMALL_RL, executed, forge, last_result)

pytestmark = pytest.mark.slow
STEPS = [f"{kind}-{i}" for i in (1, 2, 3) for kind in ("extend", "eval-extend", "merge", "eval-merge")]


@pytest.fixture(scope="module")
def chain(prefect_server, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    out = forge("run", *SMALL, *SMALL_LONG_CONTEXT, "--only", LONG_CONTEXT, store=store, timeout=900)
    return store, out, last_result(store)


def store_dir(store: Path, stage: str) -> Path:
    """The one output dir of ``stage`` in ``store`` (a test store holds one key per stage)."""
    found = [p for p in store.glob(f"{stage}-*") if (p / "artifact.json").exists()]
    assert len(found) == 1, found
    return found[0]


def artifact(result: dict, stage: str) -> dict:
    return json.loads((Path(result["stages"][stage]["out_dir"]) / "artifact.json").read_text())


def test_the_whole_chain_runs(chain):
    _, _, result = chain
    assert set(STEPS) | {"eval-pretrain", "pretrain-4"} <= executed(result)


def test_each_extension_raises_length_and_theta_and_starts_fresh_adamw(chain):
    _, _, result = chain
    pre = artifact(result, "pretrain-4")["extra"]
    previous = (pre["seq_length"], pre["model"]["rope_theta"])
    for i in (1, 2, 3):
        art = artifact(result, f"extend-{i}")
        now = (art["extra"]["seq_length"], art["extra"]["model"]["rope_theta"])
        assert now[0] > previous[0] and now[1] > previous[1], (i, now, previous)
        assert art["extra"]["model"]["max_position_embeddings"] == now[0]
        log = (Path(result["stages"][f"extend-{i}"]["out_dir"]) / "worker.log").read_text()
        parent = "pretrain-4" if i == 1 else f"merge-{i - 1}"
        assert f"continuing from {parent}" in log and "weights only" in log
        previous = now


def test_merges_take_the_extended_context_and_exist_in_both_formats(chain):
    _, _, result = chain
    for i in (1, 2, 3):
        art = artifact(result, f"merge-{i}")
        out = Path(result["stages"][f"merge-{i}"]["out_dir"])
        ext = artifact(result, f"extend-{i}")
        assert art["extra"]["model"]["rope_theta"] == ext["extra"]["model"]["rope_theta"]
        assert art["extra"]["seq_length"] == ext["extra"]["seq_length"]
        assert (out / art["outputs"]["hf"] / "config.json").exists()
        assert (out / art["outputs"]["checkpoint"] / "done").exists()
        assert (out / "tokenizer.json").exists()


def test_evaluations_report_loss_and_retrieval_per_length_and_depth(chain):
    _, _, result = chain
    art = artifact(result, "eval-merge-2")
    m = art["metrics"]
    assert 0 < m["heldout_loss"] < 10
    # the drills' held-out loss is their answers' loss only (their prompts carry none)
    assert 0 < m["heldout_loss/recall"] < 10
    for n in (128, 256, 384, 512):
        assert 0.0 <= m[f"retrieval/L{n}"] <= 1.0
        for d in (0, 0.5, 1):
            for k in (1, 3):
                assert f"retrieval/L{n}/k{k}/d{d:g}" in m
    png = Path(result["stages"]["eval-merge-2"]["out_dir"]) / art["outputs"]["heatmap"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlflow_has_the_heatmap_and_merge_lineage(chain):
    from mlflow import MlflowClient
    store, _, result = chain
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("granite-forge")
    runs = {r.data.tags["forge.stage"]: client.get_run(r.info.run_id) for r in client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{result['parent_run']}'")}
    ev = runs["eval-merge-1"]
    assert [a.path for a in client.list_artifacts(ev.info.run_id)] == ["retrieval.png"]
    assert "retrieval.L256" in ev.data.metrics and "heldout_loss" in ev.data.metrics
    # the merge read both parents' logged models and made one of its own
    producers = {runs[s].outputs.model_outputs[0].model_id: s for s in ("extend-1", "pretrain-4")}
    merged_from = {producers.get(m.model_id) for m in runs["merge-1"].inputs.model_inputs}
    assert merged_from == {"extend-1", "pretrain-4"}
    assert len(runs["merge-1"].outputs.model_outputs) == 1


def test_post_training_on_the_merged_model_and_its_exports(chain, tmp_path):
    """curate (its judge: merge-3 behind a real `transformers serve`), SFT, the chat evaluations
    before and after, then `forge export` of merge-3 and of sft, loaded by transformers."""
    import subprocess

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.support.tiny_models import stage_logits
    store = chain[0]
    small = [*SMALL, *SMALL_LONG_CONTEXT, *SMALL_POST_TRAINING]
    forge("run", *small, "--only", POST_TRAINING, store=store, timeout=900)
    result = last_result(store)
    assert executed(result) == {"curate", "eval-chat-before", "sft", "eval-chat-after"}
    cur = artifact(result, "curate")
    report, shard = cur["extra"]["report"], Path(result["stages"]["curate"]["out_dir"]) / "parts"
    assert cur["extra"]["judge_model"] == "merge-3"
    assert report["judge"]["judged"] > 0                # the served model answered every request
    assert report["kept"] + report["heldout"] == report["judge"]["judged"] - sum(
        n for rule, n in report["rejected_by_rule"].items() if rule.startswith("judge"))
    assert "judge at http://127.0.0.1:" in (shard / "shard-0-of-1" / "worker.log").read_text()
    left = subprocess.run(["pgrep", "-f", "transformers serve"], capture_output=True, text=True)
    assert left.stdout == "", "the judge's server outlived its shard"
    sft = artifact(result, "sft")
    assert sft["kind"] == "sft" and 0 < sft["metrics"]["heldout_assistant_loss"] < 20
    for stage in ("eval-chat-before", "eval-chat-after"):
        m = artifact(result, stage)["metrics"]
        assert 0 < m["chat/heldout_loss"] < 20 and 0.0 <= m["chat/exact_match"] <= 1.0, stage

    # MLflow: the curation's report on its run; the kept set, with its digest, an input of SFT's
    from mlflow import MlflowClient

    from stages.layout import fast_file_digest
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("granite-forge")
    runs = {r.data.tags["forge.stage"]: r for r in client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{result['parent_run']}'")}
    logged = {a.path for a in client.list_artifacts(runs["curate"].info.run_id, "report")}
    assert {"report/report.json", "report/rejected_by_rule.png"} <= logged
    kept = Path(result["stages"]["curate"]["out_dir"]) / "kept.parquet"
    inputs = {d.dataset.name: d.dataset.digest for d in runs["sft"].inputs.dataset_inputs}
    assert inputs == {"curate/kept": fast_file_digest(kept)[:36]}

    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    for stage in ("merge-3", "sft"):
        out = tmp_path / stage
        forge("export", stage, "--format", "hf", "--out", str(out), *small, store=store)
        tok = AutoTokenizer.from_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out)
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert text == "<|start_of_role|>user<|end_of_role|>What is 2 + 3?<|end_of_text|>\n" \
                       "<|start_of_role|>assistant<|end_of_role|>", text
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
        # the export computes what the stage's Megatron model computes (fp32; test_export.py's bound)
        with torch.no_grad():
            hf = model(input_ids=ids).logits.float()
        mc = stage_logits(Path(result["stages"][stage]["out_dir"]) if stage in result["stages"]
                          else store_dir(store, stage), ids[0].tolist())
        diff, scale = (hf - mc).abs().max().item(), hf.abs().max().item()
        assert diff <= 3e-6 * scale, (stage, diff, scale)


def test_rl_stages_chain_after_sft_with_their_numbers_in_mlflow(chain):
    """rl-math -> rl-code (the sandbox) -> rl-if -> rl-chat (the judge: merge-3 served), each from
    the one before, through the flow; per-step metrics and rollout tables on each stage's run."""
    import subprocess

    from mlflow import MlflowClient
    store = chain[0]
    small = [*SMALL, *SMALL_LONG_CONTEXT, *SMALL_POST_TRAINING, *SMALL_RL]
    forge("run", *small, "--only", RL, store=store, timeout=900)
    result = last_result(store)
    stages = ("rl-math", "rl-code", "rl-if", "rl-chat")
    assert {"rl-math", "rl-code", "rl-if", "rl-chat"} <= executed(result)
    for stage, parent in zip(stages, ("sft", *stages)):
        art = artifact(result, stage)
        assert art["kind"] == "rl" and art["extra"]["parent"] == parent, stage
        assert 0.0 <= art["metrics"]["heldout_reward_after"] <= 1.0, stage
        assert art["metrics"]["heldout_prompts_after"] == 8, stage
    code = Path(result["stages"]["rl-code"]["out_dir"]) / "report" / "heldout_before.jsonl"
    reasons = [json.loads(line)["reason"] for line in code.read_text().splitlines()]
    assert len(reasons) == 8 and all(r for r in reasons)   # every score says why (sandbox runs)
    chat = (Path(result["stages"]["rl-chat"]["out_dir"]) / "worker.log").read_text()
    assert "judge merge-3 served at http://127.0.0.1:" in chat
    left = subprocess.run(["pgrep", "-f", "transformers serve"], capture_output=True, text=True)
    assert left.stdout == "", "the judge's server outlived rl-chat"
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("granite-forge")
    runs = {r.data.tags["forge.stage"]: r for r in client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{result['parent_run']}'")}
    run = runs["rl-math"].info.run_id
    for key in ("reward/mean", "clip_fraction/high", "dynamic_sampling/dropped_fraction",
                "time/generate_s"):
        assert [m.step for m in client.get_metric_history(run, key)] == [1, 2], key
    tables = {a.path for a in client.list_artifacts(run, "report/rollouts")}
    assert "report/rollouts/step_000001.jsonl" in tables
    inputs = {d.dataset.name for d in runs["rl-math"].inputs.dataset_inputs}
    assert inputs == {"rl-math/prompts", "rl-math/prompts (heldout)"}
