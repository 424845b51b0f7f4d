"""The `rl` stage through the real worker on a tiny chat model (Megatron-core on CPU, the CPU
rollout engine, the math reward in its process pool): what it logs and reports, bit-exact resume
after a SIGKILL, and the same step for DP=1, DP=2 and another micro-batch split."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from stages.base import read_artifact
from tests.support.helpers import kill_at_first_checkpoint, worker_cmd, worker_env
from tests.support.helpers import run_worker as run_spec
from tests.support.tiny_models import run_worker, trained_chat_model

STEP_KEYS = ("reward/mean", "reward/std", "pass_rate/math", "response_length/mean",
             "clip_fraction/low", "clip_fraction/high", "entropy", "loss", "grad_norm",
             "dynamic_sampling/dropped_fraction", "dynamic_sampling/rounds", "time/generate_s",
             "time/train_s", "time/weight_sync_s", "lr")


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A tiny model pretrained on "What is a + b?" chats (a in [10, 60), b in [10, 40))."""
    return trained_chat_model(tmp_path_factory.mktemp("rl-parent"), steps=300)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """Arithmetic prompts from the parent's training distribution, as a JSON Lines builder source."""
    rng = random.Random(7)
    path = tmp_path_factory.mktemp("rl-prompts") / "arith.jsonl"
    rows = []
    for i in range(240):
        a, b = rng.randrange(10, 60), rng.randrange(10, 40)
        rows.append({"question": f"What is {a} + {b}?", "sum": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rl_config(prompt_file: Path, **over) -> dict:
    base = {"from": "pretrain", "task": "math", "steps": 4, "group_size": 4,
            "prompts_per_step": 6, "updates_per_batch": 2, "max_new_tokens": 16,
            "overlong_buffer": 4, "max_extra_rounds": 1,
            "prompts": {"builder": "json", "data_files": [str(prompt_file)],
                        "prompt_field": "question", "answer_field": "sum", "heldout": 24},
            "schedule": {"kind": "constant", "lr": 0.001}, "checkpoint_interval": 2,
            "sample_interval": 2, "log_interval": 1}
    return {**base, **over}


def write_spec(out: Path, parent: Path, config: dict, cluster: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    spec = {"kind": "rl", "stage": "rl", "key": f"key-{out.name}", "config": config,
            "inputs": {"pretrain": {"out_dir": str(parent), "artifact": json.loads(
                (parent / "artifact.json").read_text())}},
            "out_dir": str(out), "cluster": cluster or {}, "seed": 1234}
    (out / "spec.json").write_text(json.dumps(spec))
    return out / "spec.json"


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rl_stage_trains_logs_and_reports(parent, prompts, tmp_path):
    out = tmp_path / "rl"
    log = run_worker(out, "rl", "rl", rl_config(prompts), {"pretrain": parent})
    assert "held-out reward before" in log and "held-out reward after" in log
    art = read_artifact(out)
    assert art.kind == "rl" and art.extra["parent"] == "pretrain"
    for key in ("heldout_reward_before", "heldout_reward_after", "heldout_se_before",
                "heldout_pass_rate_after"):
        assert key in art.metrics, key
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    trained = [r for r in rows if "loss" in r]
    assert trained, "no step had a group with unequal rewards: the parent never hits the answer"
    for key in STEP_KEYS:
        assert key in trained[0], key
    assert 0.0 <= trained[0]["clip_fraction/high"] <= 1.0
    table = out / art.outputs["report/rollouts/step_000002"]
    sample = [json.loads(line) for line in table.read_text().splitlines()]
    assert sample and {"prompt", "completion", "reward", "reason"} <= set(sample[0])
    held = (out / "report" / "heldout_after.jsonl").read_text().splitlines()
    assert len(held) == 24
    # the policy moved: the final checkpoint's weights differ from the parent's
    from stages.training.checkpoint import load_tensors
    mine = load_tensors(out / art.outputs["checkpoint"])
    theirs = load_tensors(parent / read_artifact(parent).outputs["checkpoint"])
    key = "decoder.layers.self_attention.linear_qkv.weight"
    assert key in mine and not mine[key].equal(theirs[key])


def final_weights(out: Path) -> dict:
    from stages.training.checkpoint import load_tensors
    return load_tensors(out / read_artifact(out).outputs["checkpoint"])


def test_sigkill_mid_rl_then_rerun_is_bit_identical(parent, prompts, tmp_path):
    config = rl_config(prompts)
    whole = tmp_path / "whole"
    run_worker(whole, "rl", "rl", config, {"pretrain": parent})
    cut = tmp_path / "cut"
    code = kill_at_first_checkpoint(worker_cmd(write_spec(cut, parent, config)), cut, worker_env())
    assert code != 0
    assert not (cut / "artifact.json").exists()
    log = run_spec(cut / "spec.json")
    assert "resuming from" in log
    a, b = final_weights(whole), final_weights(cut)
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])]
    untimed = [[{k: v for k, v in r.items() if not k.startswith("time")} for r in metric_rows(o)]
               for o in (whole, cut)]
    assert untimed[0] == untimed[1]


def test_one_step_is_the_same_for_dp1_dp2_and_micro_batches(parent, prompts, tmp_path):
    """The same rollouts (seeds per prompt), so the same token-mean loss and gradient norm: a
    minibatch of 12 sequences in one forward pass, in micro-batches of 1 and of 4, and split over
    two data-parallel ranks (loss and gradient norm within 1e-5 relative, weights within 1e-6)."""
    config = rl_config(prompts, steps=1, checkpoint_interval=0, prompts={
        **rl_config(prompts)["prompts"], "heldout": 1})
    runs = {}
    for name, over, cluster, nproc in (("dp1", {}, {}, 1),
                                       ("dp1-mbs1", {"micro_batch_size": 1}, {}, 1),
                                       ("dp1-mbs4", {"micro_batch_size": 4}, {}, 1),
                                       ("dp2", {}, {"data_parallel": 2}, 2)):
        out = tmp_path / name
        run_spec(write_spec(out, parent, {**config, **over}, cluster), nproc=nproc)
        runs[name] = metric_rows(out)[0]
    ref = runs["dp1"]
    assert "loss" in ref, "the step trained nothing"
    for name in ("dp1-mbs1", "dp1-mbs4", "dp2"):
        assert runs[name]["reward/mean"] == ref["reward/mean"], name   # the same rollouts
        assert runs[name]["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7), name
        assert runs[name]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), name
        a, b = final_weights(tmp_path / "dp1"), final_weights(tmp_path / name)
        assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a if not k.startswith("opt")), name
