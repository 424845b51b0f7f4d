"""Composition, schemas, DAG checks, identity keys and plans (no Prefect, no training)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows import config as config_mod
from flows.config import expand_sweeps
from flows.dag import build
from flows.plan import make_plan
from stages.data.prepare import PrepareDataConfig
from stages.data.tokenize import TokenizeConfig
from stages.data.tokenizer import TrainTokenizerConfig
from stages.training.pretrain import PretrainConfig
from stages.schema import ConfigError, identity_field_paths

ROOT = Path(__file__).resolve().parents[2]


def dag_for(*overrides, store=None):
    ov = list(overrides) + ([f"store={store}"] if store else [])
    return build(config_mod.load(ov))


def test_identity_fields_are_pinned():
    """Which fields change a stage's key. Changing this list re-trains users' pipelines."""
    model = ["hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "kv_channels",
             "ffn_hidden_size", "vocab_size", "max_position_embeddings", "rope_theta",
             "layernorm_epsilon", "tied_embeddings", "init_std", "embedding_multiplier",
             "residual_multiplier", "logits_scaling", "attention_multiplier"]
    schedule = ["kind", "lr", "min_lr", "warmup_steps", "power_a", "power_b", "decay_fraction", "gamma"]
    assert identity_field_paths(PretrainConfig) == (
        ["from_", "data"] + [f"model.{f}" for f in model] + ["tokens", "seq_length", "global_batch_size",
                                                             "mixture", "loss_weights"]
        + [f"schedule.{f}" for f in schedule] + ["precision.dtype", "precision.fp8", "weight_decay",
                                                 "adam_beta1", "adam_beta2", "adam_eps", "grad_clip", "seed"])
    assert identity_field_paths(PrepareDataConfig) == [
        "sources.generator", "sources.documents", "sources.builder", "sources.data_files",
        "sources.split", "sources.text_field", "sources.prompt_field", "seed", "validation_fraction"]
    assert identity_field_paths(TrainTokenizerConfig) == ["data", "vocab_size", "max_documents",
                                                          "min_frequency", "chat_roles"]
    assert identity_field_paths(TokenizeConfig) == ["data", "tokenizer"]
    from stages.rl.grpo import RlConfig
    prompts = ["generator", "prompts", "operands", "builder", "data_files", "split",
               "prompt_field", "answer_field", "extra_fields", "heldout"]
    judge = ["serve", "model", "rubric.question", "rubric.min_score", "rubric.max_score",
             "rubric.threshold", "structured_output", "on_unparsable", "max_tokens", "temperature"]
    assert identity_field_paths(RlConfig) == (
        ["from_", "task"] + [f"prompts.{f}" for f in prompts] + ["steps"]
        + [f"schedule.{f}" for f in schedule] + [f"judge.{f}" for f in judge]
        + ["group_size", "prompts_per_step", "updates_per_batch", "advantage", "eps_low",
           "eps_high", "dual_clip", "is_cap", "kl_coef", "dynamic_sampling", "max_extra_rounds",
           "max_new_tokens", "overlong_buffer", "overlong_filter", "temperature", "top_p",
           "engine", "reward_shuffle_control", "precision.dtype", "precision.fp8",
           "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "grad_clip", "seed"])


def keys(dag):
    return {n: node.key for n, node in dag.nodes.items()}


def test_identity_change_in_phase3_changes_phase3_and_descendants_only():
    base = keys(dag_for())
    changed = keys(dag_for("stages.pretrain-3.schedule.lr=0.001"))
    differ = {n for n in base if base[n] != changed[n]}
    assert {"pretrain-3", "pretrain-4"} <= differ
    assert not differ & {"data", "tokenizer", "tokenize", "pretrain-1", "pretrain-2"}
    # every differing stage descends from pretrain-3
    dag = dag_for()
    assert all(n == "pretrain-3" or "pretrain-3" in dag.ancestors(n) for n in differ)


@pytest.mark.parametrize("override", ["stages.pretrain-3.log_interval=1",
                                      "stages.pretrain-3.checkpoint_interval=7",
                                      "stages.pretrain-3.keep_checkpoints=5",
                                      "stages.tokenize.workers=2", "cluster=cpu-tp2",
                                      "tracking=server", "stages.rl-math.sample_interval=3",
                                      "stages.rl-math.reward_workers=4",
                                      "stages.rl-math.micro_batch_size=8"])
def test_non_identity_fields_change_no_key(override):
    assert keys(dag_for(override)) == keys(dag_for())


def test_output_dir_is_name_and_key_prefix(tmp_path):
    dag = dag_for(store=tmp_path)
    node = dag.nodes["pretrain-2"]
    assert node.out_dir == tmp_path / f"pretrain-2-{node.key[:12]}"


def test_full_recipe_validates_with_8b_and_has_every_stage():
    dag = dag_for("pipeline=granite-4.1", "model=granite-8b")
    tiny = dag_for()
    assert list(dag.nodes) == list(tiny.nodes)          # same stage names...
    assert all(dag.nodes[n].parents == tiny.nodes[n].parents for n in dag.nodes)  # ...and edges
    for phase, tokens in {"pretrain-1": 10e12, "pretrain-2": 2e12, "pretrain-3": 2e12,
                          "pretrain-4": 0.5e12}.items():
        assert dag.nodes[phase].config.tokens == tokens
        assert dag.nodes[phase].config.model.hidden_size == 4096
    kinds = {n.kind for n in dag.nodes.values()}
    assert kinds == {"prepare_data", "train_tokenizer", "tokenize", "pretrain", "evaluate",
                     "extend_context", "merge", "curate", "sft", "rl"}
    schedules = [dag.nodes[f"pretrain-{i}"].config.schedule.kind for i in range(1, 5)]
    assert schedules == ["power", "power", "exponential", "linear"]


def test_published_model_shapes():
    shapes = {m: config_mod.load([f"model={m}"]).resolved["model"]
              for m in ("granite-3b", "granite-8b", "granite-30b")}
    assert (shapes["granite-3b"]["hidden_size"], shapes["granite-3b"]["num_attention_heads"]) == (2560, 40)
    assert shapes["granite-8b"]["ffn_hidden_size"] == 12800
    assert shapes["granite-30b"]["num_layers"] == 64
    from stages.specs import ModelSpec
    from stages.schema import from_dict
    params = {m: from_dict(ModelSpec, s, "model").num_parameters() for m, s in shapes.items()}
    assert abs(params["granite-8b"] / 8.79e9 - 1) < 0.01
    assert abs(params["granite-30b"] / 28.9e9 - 1) < 0.01


BAD_INPUTS = [
    (["stages.pretrain-2.from=pretrain-4"], "cycle"),
    (["stages.tokenize.tokenizer=nope"], "stages.tokenize.tokenizer: unknown stage 'nope'"),
    (["stages.data.kind=magic"], "stages.data.kind: unknown kind 'magic'"),
    (["cluster=cpu-tp2", "model.num_query_groups=3", "model.num_attention_heads=6"],
     "cluster.tensor_parallel: 2 does not divide"),
    (["~stages.data.sources.web", "+stages.data.sources.web={builder: json, data_files: [/nope/x.jsonl]}"],
     "stages.data.sources.web.data_files: '/nope/x.jsonl' matches no file"),
    (["stages.pretrain-1.mixture.web=-1"], "stages.pretrain-1.mixture.web: weight -1.0 is negative"),
    (["stages.pretrain-1.mixture.web=0", "stages.pretrain-1.mixture.code=0",
      "stages.pretrain-1.mixture.math=0", "stages.pretrain-1.mixture.technical=0",
      "stages.pretrain-1.mixture.long=0", "stages.pretrain-1.mixture.recall=0"], "stages.pretrain-1.mixture: all weights are zero"),
    (["stages.pretrain-1.mixture.nosuch=1"], "stages.pretrain-1.mixture.nosuch: no such source"),
    (["stages.pretrain-1.loss_weights={nosuch:2.0}"],
     "stages.pretrain-1.loss_weights.nosuch: no such source"),
    (["stages.pretrain-3.precision.fp8=delayed"], "stages.pretrain-3.precision.fp8: FP8 (delayed) needs a GPU"),
    (["stages.pretrain-1.tokens=[1"], "override:"),
    (["stages.pretrain-1.tokens=lots"], "stages.pretrain-1.tokens: expected an integer"),
    (["stages.pretrain-1.nosuch_field=1"], "stages.pretrain-1.nosuch_field: unknown field. Known fields:"),
    (["stages.pretrain-1.seq_length=100000"], "stages.pretrain-1.seq_length: 100000 must be in"),
    (["model.vocab_size=300"], "vocab_size: 300 is smaller than stage 'tokenizer'"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS)
def test_bad_input_is_rejected_with_the_field(overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        dag_for(*overrides)
    assert message in str(err.value)


def test_empty_mixture_is_rejected():
    data = config_mod.compose([])
    bad = copy.deepcopy(data)
    bad["stages"]["pretrain-2"]["mixture"] = {}
    with pytest.raises(ConfigError, match=r"stages.pretrain-2.mixture: is empty"):
        build(config_mod.typed(bad))


def test_cli_rejects_before_compute_and_touches_nothing(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "keep.txt").write_text("earlier work")
    before = sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*"))
    env = dict(os.environ, FORGE_STORE=str(store))
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "cluster=cpu-tp2",
                          "model.num_query_groups=3", "model.num_attention_heads=6"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert "cluster.tensor_parallel" in out.stderr and "use one of [1, 3]" in out.stderr
    after = sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*"))
    assert after == before


def test_running_unbuilt_kinds_stops_at_validation_naming_them(tmp_path, monkeypatch):
    """Every kind of the recipe is built today; a kind marked unbuilt (as rl was before issue 12)
    stops the plan at validation, naming the issue, its descendants and what can run."""
    from flows.plan import check_runnable
    from tests.support.kinds import mark_rl_unbuilt
    mark_rl_unbuilt(monkeypatch)
    steps = make_plan(dag_for(store=tmp_path))
    with pytest.raises(ConfigError) as err:
        check_runnable(steps)
    assert "rl-math (rl): kind 'rl' is not built yet" in str(err.value)
    assert "GRPO with the DAPO loss) is issue 12" in str(err.value)   # names the issue that builds it
    assert "eval-final (evaluate): parent rl-chat cannot run yet" in str(err.value)  # downstream too
    assert "--only 'data|tokenizer|tokenize|pretrain-1|" in str(err.value)
    assert "|merge-3|eval-merge-3|curate|eval-chat-before|sft|eval-chat-after'" in str(err.value)


def test_only_takes_unfinished_ancestors(tmp_path):
    steps = {s.name: s for s in make_plan(dag_for(store=tmp_path), only="pretrain-2")}
    assert [n for n, s in steps.items() if s.action == "run"] == [
        "data", "tokenizer", "tokenize", "pretrain-1", "pretrain-2"]
    assert steps["pretrain-3"].action == "skip" and "left out by --only" in steps["pretrain-3"].why
    assert "left out by --only" in steps["rl-math"].why


def test_sweep_expansion():
    combos = expand_sweeps(["stages.pretrain-4.schedule.lr=1e-3,2e-3", "cluster=cpu", "model=tiny"])
    assert combos == [["stages.pretrain-4.schedule.lr=0.001", "cluster=cpu", "model=tiny"],
                      ["stages.pretrain-4.schedule.lr=0.002", "cluster=cpu", "model=tiny"]]
    a, b = (keys(dag_for(*c)) for c in combos)
    assert {n for n in a if a[n] != b[n]} == {n for n in a if n == "pretrain-4" or
                                              "pretrain-4" in dag_for().ancestors(n)}


def test_fp8_on_a_machine_without_gpu_stops_before_compute(tmp_path):
    """A GPU cluster config with FP8 passes static validation, then fails on this CPU machine."""
    env = dict(os.environ, FORGE_STORE=str(tmp_path / "store"))
    no_mask = [*(f"stages.extend-{i}.document_mask=false" for i in (1, 2, 3)),  # refused on GPUs
               "stages.sft.document_mask=false"]
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "cluster=gpu-node", *no_mask,
                          "stages.pretrain-1.precision.fp8=delayed", "--only", "pretrain-1"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "stages.pretrain-1.precision.fp8: FP8 (delayed) asked for, but no GPU is visible" in out.stderr
    assert not (tmp_path / "store").exists()
