"""The compute planner: its formulas against published ones and a real Megatron model, and
`forge plan` / `forge run` refusing a stage that cannot fit, with a suggestion that does fit."""
from __future__ import annotations

import dataclasses
import re

import pytest

from flows import cli
from stages.training.compute import (Layout, Shape, flops_per_token, layer_activation_bytes,
                                     memory_per_device, state_bytes_per_param)

# GPT-3 175B as in Korthikanti et al. 2022 / Narayanan et al. 2021: MHA, GELU MLP of 4h, dropout.
GPT3 = Shape(hidden=12288, layers=96, heads=96, groups=96, head_dim=128, ffn=4 * 12288,
             vocab=51200, tied=True, gated_mlp=False, dropout=True)


def granite(model: str):
    from flows import config
    return config.load([f"model={model}"]).stages["pretrain-1"].config.model


def test_published_parameter_counts():
    assert round(Shape.of(granite("granite-8b")).params() / 1e9, 2) == 8.79
    assert round(Shape.of(granite("granite-30b")).params() / 1e9, 1) == 28.9
    # the 30B's published count holds only with tied embeddings, the 8B's only untied
    assert round(dataclasses.replace(Shape.of(granite("granite-30b")), tied=False).params() / 1e9, 1) != 28.9
    assert granite("granite-8b").num_parameters() == Shape.of(granite("granite-8b")).params()


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_equals_a_real_megatron_model(tied):
    import torch
    from stages.training.cpu_shim import megatron_world
    from stages.training.model import build_model
    from stages.specs import ModelSpec, PrecisionSpec
    spec = ModelSpec(hidden_size=64, num_layers=3, num_attention_heads=4, num_query_groups=2,
                     kv_channels=16, ffn_hidden_size=176, vocab_size=1024, tied_embeddings=tied)
    with megatron_world():
        torch.manual_seed(0)
        model = build_model(spec, PrecisionSpec(), device="cpu")
        real = sum(p.numel() for p in model.parameters())
    assert Shape.of(spec).params() == real


def test_training_flops_equal_megatron_formula():
    s, b, l, h, v = 2048, 8, GPT3.layers, GPT3.hidden, GPT3.vocab
    megatron = 96 * b * s * l * h ** 2 * (1 + s / (6 * h) + v / (16 * l * h))  # full recompute
    assert flops_per_token(GPT3, s, recompute=True) * b * s == pytest.approx(megatron, rel=1e-12)
    model_flops = 72 * b * s * l * h ** 2 * (1 + s / (6 * h) + v / (12 * l * h))
    assert flops_per_token(GPT3, s) * b * s == pytest.approx(model_flops, rel=1e-12)


def test_training_flops_near_6n_for_short_sequences():
    shape = Shape.of(granite("granite-8b"))
    ratio = flops_per_token(shape, 4096) / (6 * shape.params())
    assert 1.0 < ratio < 1.15     # 6N, plus attention over 4K tokens, less the embedding lookup


@pytest.mark.parametrize("tp, sp, recompute, flash, per_sbh", [
    (1, False, "none", False, lambda a, s, h, t: 34 + 5 * a * s / h),
    (8, False, "none", False, lambda a, s, h, t: 10 + 24 / t + 5 * a * s / (h * t)),
    (8, True, "none", False, lambda a, s, h, t: 34 / t + 5 * a * s / (h * t)),
    (8, True, "selective", False, lambda a, s, h, t: 34 / t),
    (8, True, "none", True, lambda a, s, h, t: 34 / t),     # flash attention keeps no s x s
    (8, True, "full", False, lambda a, s, h, t: 2 / t),
])
def test_activation_memory_equals_korthikanti_formulas(tp, sp, recompute, flash, per_sbh):
    s, b = 2048, 1
    lay = Layout(tp=tp, micro_batch=b, act_bytes=2, sequence_parallel=sp, recompute=recompute,
                 flash_attention=flash)
    expected = s * b * GPT3.hidden * per_sbh(GPT3.heads, s, GPT3.hidden, tp)
    assert layer_activation_bytes(GPT3, s, lay) == pytest.approx(expected, rel=1e-12)


def test_optimizer_bytes_equal_megatron_table():
    assert sum(state_bytes_per_param("fp32", False, 8)) == 16
    assert sum(state_bytes_per_param("bf16", False, 8)) == 18
    assert sum(state_bytes_per_param("bf16", True, 8)) == 6 + 12 / 8
    assert sum(state_bytes_per_param("fp32", True, 4)) == 8 + 8 / 4


@pytest.mark.parametrize("dtype, table", [("fp32", lambda d: 8 + 8 / d), ("bf16", lambda d: 6 + 12 / d)])
def test_distributed_optimizer_shards_the_state_as_megatron_does(dtype, table):
    """Megatron's distributed-optimizer rows (docs: distrib_optimizer) per device, sharded over the
    DP x CP ranks: Megatron's DDP and optimizer use the data-parallel group with context parallel,
    whose ranks hold the same weights."""
    shape = dataclasses.replace(GPT3, layers=4)
    for tp, dp, cp in [(1, 8, 1), (1, 2, 4), (4, 4, 2)]:
        lay = Layout(tp=tp, dp=dp, cp=cp, params_dtype=dtype, distributed_optimizer=True)
        m = memory_per_device(shape, 2048, lay)
        n = m.weights / (4 if dtype == "fp32" else 2)    # parameters on the device (norms whole)
        assert n == (shape.params() if tp == 1 else pytest.approx(shape.params() / tp, rel=1e-4))
        assert m.weights + m.grads + m.optimizer == pytest.approx(n * table(dp * cp), rel=1e-12)
        plain = memory_per_device(shape, 2048, dataclasses.replace(lay, distributed_optimizer=False))
        assert plain.weights + plain.grads + plain.optimizer == pytest.approx(n * table(1), rel=1e-12)


def test_recompute_activation_memory_is_korthikanti_plus_the_layer_being_rerun():
    """Full recompute keeps each layer's input (2 sbh, Korthikanti et al. 2022, Table 2); in
    backward one layer at a time holds its full activations again (34 sbh + 5 a s^2 b for GPT-3,
    no flash attention), which the paper leaves out and the peak does not."""
    s, b, t = 2048, 1, 1
    h, a, l, v = GPT3.hidden, GPT3.heads, GPT3.layers, GPT3.vocab
    full = memory_per_device(GPT3, s, Layout(tp=t, recompute="full", flash_attention=False))
    outside = 2 * s * b * h + s * b * v * (2 + 4)            # embedding output, logits + fp32 copy
    rerun = s * b * h * (34 + 5 * a * s / h) - 2 * s * b * h
    assert full.activations == pytest.approx(l * 2 * s * b * h + rerun + outside, rel=1e-12)
    sel = memory_per_device(GPT3, s, Layout(tp=t, recompute="selective", flash_attention=False))
    scores = 5 * a * s * s * b                                 # one layer's attention core again
    assert sel.activations == pytest.approx(l * 34 * s * b * h + scores + outside, rel=1e-12)
    none = memory_per_device(GPT3, s, Layout(tp=t, flash_attention=False))
    assert full.activations < sel.activations < none.activations


def test_recompute_costs_the_flops_it_reruns():
    s, shape = 2048, GPT3
    base = flops_per_token(shape, s)
    layer_fwd = 2 * shape.layer_matmul_params() + 4 * s * shape.q_width
    assert flops_per_token(shape, s, "full") - base == pytest.approx(shape.layers * layer_fwd)
    assert flops_per_token(shape, s, "selective") - base == pytest.approx(
        shape.layers * 4 * s * shape.q_width)                # QK^T and scores x V, forward again
    assert flops_per_token(shape, s, "none") == base


def test_state_bytes_equal_what_the_training_loop_allocates():
    """16 B/param (fp32 weights, fp32 grads, AdamW's two moments), measured on real tensors."""
    import torch
    from stages.training.cpu_shim import megatron_world
    from stages.training.model import build_model
    from stages.specs import ModelSpec, PrecisionSpec
    from stages.training.step import make_optimizer
    spec = ModelSpec(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                     kv_channels=16, ffn_hidden_size=176, vocab_size=1024)
    cfg = type("C", (), {"schedule": type("S", (), {"lr": 1e-3})(), "adam_beta1": 0.9,
                         "adam_beta2": 0.95, "adam_eps": 1e-8, "weight_decay": 0.1})()
    with megatron_world():
        model = build_model(spec, PrecisionSpec(), device="cpu")
        opt = make_optimizer(model, cfg)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
        tensors += [t for st in opt.state.values() for t in st.values()
                    if torch.is_tensor(t) and t.dim() > 0]
        real = sum(t.numel() * t.element_size() for t in tensors)
    mem = memory_per_device(Shape.of(spec), 128, Layout(act_bytes=4, flash_attention=False))
    assert mem.weights + mem.grads + mem.optimizer == real


def test_more_tensor_and_context_parallelism_lowers_memory_per_device():
    shape, seq = Shape.of(granite("granite-8b")), 32768
    base = memory_per_device(shape, seq, Layout(tp=2, dp=4))
    assert memory_per_device(shape, seq, Layout(tp=8, dp=4)).total < base.total
    cp = memory_per_device(shape, seq, Layout(tp=2, cp=4, dp=4))
    assert cp.activations == pytest.approx(base.activations / 4, rel=0.01)
    assert cp.weights == base.weights                        # CP does not split the weights


def plan(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def suggested(err: str, stage: str) -> list[str]:
    """The overrides a refusal suggests, ready for the command line."""
    line = next(l for l in err.splitlines() if f"stages.{stage}: does not fit" in l)
    return [o.strip() for o in line.split(": set ", 1)[1].split(" (or, ")[0].split(" and ")]


def savers_suggested(err: str, stage: str) -> list[str]:
    """The same-devices alternative a refusal offers (distributed optimizer / recompute)."""
    line = next(l for l in err.splitlines() if f"stages.{stage}: does not fit" in l)
    return [o.strip() for o in line.split("): set ")[-1].rstrip(")").split(" and ")]


def test_plan_refuses_a_stage_that_cannot_fit_and_its_suggestions_fit(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_STORE", str(tmp_path / "store"))
    # the 8B's pretraining without its layout's distributed optimizer: 16 B/param do not fit TP2
    over = ["pipeline=granite-4.1", "model=granite-8b", "stages.pretrain-1.parallel={}"]
    code, out, err = plan(capsys, *over)
    assert code == 2
    assert "stages.pretrain-1: does not fit" in err and "on h100 (TP2 PP1 CP1 DP4" in err
    assert "stages.pretrain-2" not in err                      # the others keep the layout
    fix = suggested(err, "pretrain-1")
    assert fix == ["stages.pretrain-1.parallel.tensor_parallel=4"]
    code, out, err = plan(capsys, *over, *fix)
    assert code == 0 and "stages.pretrain-" not in err, err
    assert re.search(r"pretrain-1 +8\.79G +10T .* TP4 PP1 CP1 DP4 +- .* yes", out)
    saver = savers_suggested(plan(capsys, *over)[2], "pretrain-1")
    assert saver == ["stages.pretrain-1.parallel.distributed_optimizer=true"]
    code, out, err = plan(capsys, *over, *saver)
    assert code == 0, err
    assert re.search(r"pretrain-1 +8\.79G +10T .* TP2 PP1 CP1 DP4 +dist-opt .* yes", out)


def test_a_suggestion_keeps_the_stages_other_layout_fields(capsys, tmp_path, monkeypatch):
    """One override per field: applying `tensor_parallel` must not drop the stage's DP and
    distributed optimizer (a whole `parallel={...}` dict would replace them, and then TP8 would
    not fit)."""
    monkeypatch.setenv("FORGE_STORE", str(tmp_path / "store"))
    over = ["pipeline=granite-4.1", "model=granite-8b", "stages.extend-1.parallel.recompute=none"]
    code, _, err = plan(capsys, *over)
    assert code == 2 and "stages.extend-1: does not fit" in err
    fix = suggested(err, "extend-1")
    assert fix == ["stages.extend-1.parallel.tensor_parallel=8"]
    code, out, err = plan(capsys, *over, *fix)
    assert code == 0, err
    assert re.search(r"extend-1 +8\.79G .* TP8 PP1 CP1 DP2 +dist-opt +1 ", out)


@pytest.mark.parametrize("model", ["granite-3b", "granite-8b", "granite-30b"])
def test_the_full_recipe_plans_for_every_published_size(model, capsys, tmp_path, monkeypatch):
    """The README's `forge plan pipeline=granite-4.1 model=...`: every stage fits its devices on
    cluster=gpu-node with the size's layouts (conf/layout/)."""
    monkeypatch.setenv("FORGE_STORE", str(tmp_path / "store"))
    code, out, err = plan(capsys, "pipeline=granite-4.1", f"model={model}")
    assert code == 0, err
    rows = [l for l in out.splitlines() if re.match(r"  (pretrain|extend)-\d +\S+G ", l)]
    assert len(rows) == 7 and all(r.rstrip().endswith("yes") for r in rows), "\n".join(rows)
    assert "on h100" not in err


def test_the_layout_follows_the_model_and_can_be_chosen(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_STORE", str(tmp_path / "store"))
    from flows import config
    cfg = config.load(["pipeline=granite-4.1", "model=granite-30b"])
    assert cfg.stages["extend-3"].config.parallel == {
        "tensor_parallel": 8, "context_parallel": 16, "data_parallel": 2,
        "distributed_optimizer": True, "recompute": "full"}
    assert cfg.stages["pretrain-2"].config.parallel["tensor_parallel"] == 8
    code, _, err = plan(capsys, "pipeline=granite-4.1", "model=granite-30b", "layout=granite-3b")
    assert code == 2 and "stages.pretrain-1: does not fit" in err   # the 3B's layouts are too small


def test_plan_of_the_published_recipe_fits_and_blocks_what_is_not_built(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_STORE", str(tmp_path / "store"))
    code, out, err = plan(capsys, "pipeline=granite-4.1")
    assert code == 0, err
    rows = {l.split()[0]: l for l in out.splitlines() if re.match(r"  (pretrain|extend)-\d +\S+G ", l)}
    assert set(rows) == {f"pretrain-{i}" for i in range(1, 5)} | {f"extend-{i}" for i in range(1, 4)}
    assert all(r.rstrip().endswith("yes") for r in rows.values())
    assert "TP4 PP1 CP16 DP2" in rows["extend-3"]
    assert re.search(r"extend-3 +blocked .* context parallelism", out)
    assert re.search(r"extend-1 +run ", out)
    # 10T tokens of the 3B at 40% MFU of an H100: ~1.8e5 GPU-hours
    hours = float(rows["pretrain-1"].split()[4])
    assert 1.5e5 < hours < 2.1e5


def test_run_refuses_before_compute_and_touches_nothing(capsys, tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("FORGE_STORE", str(store))
    code = cli.main(["run", "cluster.memory_gib=0.01", "--only", "pretrain-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "stages.pretrain-1: does not fit" in err and "micro_batch_size=" in err
    assert not store.exists(), list(store.rglob("*"))   # nothing was created, not even the store
    fix = suggested(err, "pretrain-1")
    code, out, err = plan(capsys, "cluster.memory_gib=0.01", *fix)
    assert "stages.pretrain-1: does not fit" not in err


def test_memory_savers_are_refused_on_cpu_with_the_field(capsys, tmp_path, monkeypatch):
    """Megatron's distributed optimizer and recompute need CUDA: a CPU plan that counted on them
    would promise memory the CPU loop never saves."""
    monkeypatch.setenv("FORGE_STORE", str(tmp_path / "store"))
    code, _, err = plan(capsys, "stages.pretrain-2.parallel.distributed_optimizer=true")
    assert code == 2 and "stages.pretrain-2: distributed_optimizer=true" in err
    assert "GPUs only" in err and "stages.pretrain-2.parallel.distributed_optimizer=false" in err
    code, _, err = plan(capsys, "cluster.recompute=full")
    assert code == 2 and "stages.pretrain-1: recompute='full'" in err and "cluster.recompute=none" in err
    code, _, err = plan(capsys, "stages.pretrain-1.parallel.recompute=partial")
    assert code == 2
    assert "stages.pretrain-1.parallel.recompute: must be one of none, selective, full" in err
    code, _, err = plan(capsys, "stages.pretrain-1.parallel.distributed_optimizer=1")
    assert code == 2 and "parallel.distributed_optimizer: must be one of true, false" in err


def test_bad_stage_layout_is_rejected_with_the_field(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_STORE", str(tmp_path / "store"))
    code, _, err = plan(capsys, "stages.pretrain-1.parallel={tensor_parallell: 2}")
    assert code == 2 and "stages.pretrain-1.parallel.tensor_parallell: unknown" in err
    code, _, err = plan(capsys, "stages.pretrain-1.micro_batch_size=3")
    assert code == 2 and "stages.pretrain-1.micro_batch_size: 3 does not divide" in err
    code, _, err = plan(capsys, "cluster.accelerator=h100")
    assert code == 2 and "accelerator: 'h100' does not match device 'cpu'" in err


def test_pipeline_parallel_plans_runs_and_counts_its_bubble(capsys, tmp_path, monkeypatch):
    """PP is built (Megatron's 1F1B schedule, on CPU too): a PP layout is no longer blocked, CPU
    refusals may suggest it, and its hours carry the bubble (p - 1) / (m + p - 1)."""
    monkeypatch.setenv("FORGE_STORE", str(tmp_path / "store"))
    code, out, err = plan(capsys, "stages.pretrain-1.parallel.pipeline_parallel=2")
    assert code == 0, err
    assert "TP1 PP2 CP1 DP1" in out
    assert re.search(r"pretrain-1 +run ", out) and "pipeline parallelism" not in out
    # the bubble: 4 stages, 8 micro-batches per replica -> 3/11 of each step idle
    lay = Layout(pp=4, micro_batch=2, replica_batch=16)
    assert lay.micro_batches == 8 and lay.bubble == pytest.approx(3 / 11)
    assert dataclasses.replace(lay, pp=1).bubble == 0.0
    from flows import config
    from stages.cluster import ParallelSpec
    from stages.training.compute import candidate_layouts, plan_training_stage
    cfg = config.load([]).stages["pretrain-1"].config
    one = plan_training_stage("pretrain-1", cfg, ParallelSpec())
    two = plan_training_stage("pretrain-1", cfg, ParallelSpec(pipeline_parallel=2))
    m = cfg.global_batch_size // (cfg.micro_batch_size or cfg.global_batch_size)
    assert two.bubble == pytest.approx(1 / (m + 1))
    assert two.gpu_hours == pytest.approx(one.gpu_hours / (1 - two.bubble))  # same FLOPs + idle
    # CPU candidates now include PP (CP stays GPU-only)
    shape = Shape.of(cfg.run_model)
    cands = candidate_layouts(shape, 256, Layout(), gpus_per_node=8, cpu=True)
    assert any(c.pp > 1 for c in cands) and all(c.cp == 1 for c in cands)


def test_rl_refuses_pipeline_parallelism_with_the_field(capsys, tmp_path, monkeypatch):
    """The RL loop (rollout engine, fused policy loss) takes the whole model: PP is refused at
    validation, before compute, naming the field."""
    monkeypatch.setenv("FORGE_STORE", str(tmp_path / "store"))
    code, _, err = plan(capsys, "stages.rl-math.parallel={pipeline_parallel: 2}")
    assert code == 2, err
    assert "stages.rl-math.parallel: RL runs with tensor_parallel=1 and pipeline_parallel=1" in err
