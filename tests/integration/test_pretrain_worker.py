"""The pretrain stage worker end to end on CPU: real Megatron-core, gloo, dist_checkpointing.

Every run goes through ``python -m stages.worker SPEC.json`` (or torchrun) in a subprocess, on a
tiny Granite-shaped model (2 layers x 64, 4 heads / 2 KV groups, vocab 512, seq 64) and a
synthetic tokenized corpus written as Megatron indexed datasets. Phase A (module fixture) is the
reference the other tests compare with:

- A trains and its loss falls;
- B continues from A (weights + AdamW state + token count) on another mixture, under TP=2;
- a run of A's config killed with SIGKILL after a checkpoint and rerun ends bit-identical to A;
- TP=2 and DP=2 (with gradient accumulation) under torchrun follow A's loss curve.

In-process tests cover the mixture (determinism, weights, zero weights, a half-built cache),
checkpoint completeness (checksums, missing markers) and a save/load round trip of the AdamW state.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.base import Artifact, read_artifact, write_artifact
from tests.support.helpers import (kill_at_first_checkpoint, losses, run_worker, worker_cmd,
                                   worker_env)

VOCAB, EOD = 512, 0
MODEL = {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
         "kv_channels": 16, "ffn_hidden_size": 192, "vocab_size": VOCAB,
         "max_position_embeddings": 256}
SEQ, GBS, STEPS_A = 64, 8, 120
CONFIG_A = {"data": "tokenize", "model": MODEL, "tokens": STEPS_A * GBS * SEQ, "seq_length": SEQ,
            "global_batch_size": GBS, "mixture": {"web": 0.5, "code": 0.5},
            "schedule": {"kind": "wsd", "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5,
                         "decay_fraction": 0.2},
            "checkpoint_interval": 20, "keep_checkpoints": 2, "log_interval": 20}


# ------------------------------------------------------------------ helpers
def synthetic_docs(rng, n: int, lo: int, hi: int) -> list[list[int]]:
    """Documents over tokens [lo, hi): mostly a fixed successor map (learnable), some noise."""
    span = hi - lo
    docs = []
    for _ in range(n):
        x = [int(rng.integers(lo, hi))]
        for _ in range(int(rng.integers(20, 200)) - 1):
            nxt = lo + (5 * (x[-1] - lo) + 3) % span if rng.random() < 0.85 else int(rng.integers(lo, hi))
            x.append(nxt)
        docs.append(x + [EOD])
    return docs


def make_tokenized(root: Path) -> Path:
    """A stand-in for a finished `tokenize` stage: web uses tokens 1..255, code 256..511."""
    from stages.training.mixture import write_indexed_dataset
    out = root / "tokenize"
    rng = np.random.default_rng(0)
    outputs = {}
    for src, (lo, hi) in {"web": (1, 256), "code": (256, VOCAB)}.items():
        docs = synthetic_docs(rng, 330, lo, hi)
        write_indexed_dataset(out / "tokens" / src, docs[:300])
        write_indexed_dataset(out / "heldout" / src, docs[300:])
        outputs[f"tokens/{src}"] = f"tokens/{src}"
        outputs[f"heldout/{src}"] = f"heldout/{src}"
    write_artifact(out, Artifact(kind="tokenize", stage="tokenize", key="tok0", outputs=outputs,
                                 extra={"vocab_size": VOCAB, "eod_id": EOD, "pad_id": 1}))
    return out


def write_spec(out_dir: Path, stage: str, config: dict, inputs: dict[str, Path],
               cluster: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"kind": "pretrain", "stage": stage, "key": f"key-{stage}", "config": config,
            "inputs": {name: {"out_dir": str(d), "artifact": dataclasses.asdict(read_artifact(d))}
                       for name, d in inputs.items()},
            "out_dir": str(out_dir), "cluster": cluster or {}, "seed": 1234}
    path = out_dir / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def final_tensors(out_dir: Path) -> dict:
    from stages.training.checkpoint import load_tensors
    art = read_artifact(out_dir)
    return load_tensors(out_dir / art.outputs["checkpoint"])


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tokenized(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def phase_a(data, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("runs") / "pretrain-a"
    log = run_worker(write_spec(out, "pretrain-a", CONFIG_A, {"tokenize": data}))
    return out, log


# ------------------------------------------------------------------ worker runs
def test_phase_trains_and_loss_falls(phase_a):
    out, log = phase_a
    art = read_artifact(out)
    assert art.kind == "pretrain" and art.outputs == {"checkpoint": "checkpoints/iter_0000120"}
    m = art.metrics
    assert m["steps"] == STEPS_A and m["tokens_total"] == STEPS_A * GBS * SEQ
    assert m["loss_first"] > 6.0  # ~ln(512) = 6.24 at init
    assert m["loss_last"] < m["loss_first"] - 2.0
    assert 0 < m["heldout_loss"] < m["loss_first"] - 2.0
    assert set(m) >= {"heldout_loss/web", "heldout_loss/code", "tokens_per_s", "startup_s"}
    assert art.extra["model"]["hidden_size"] == 64 and art.extra["world_size"] == 1
    assert sorted(losses(out)) == list(range(1, STEPS_A + 1))  # every step's loss, once
    assert "[pretrain-a] step 20/120 loss" in log
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["iter_0000100", "iter_0000120"]  # keep_checkpoints=2, final included


def test_second_phase_continues_from_parent(phase_a, data):
    a_out, _ = phase_a
    out = a_out.parent / "pretrain-b"
    config = dict(CONFIG_A, tokens=30 * GBS * SEQ, mixture={"web": 0.3, "code": 0.7},
                  schedule={"kind": "constant", "lr": 1e-3}, checkpoint_interval=0)
    config["from"] = "pretrain-a"
    # under TP=2: the TP=1 parent's weights and AdamW moments are resharded on load
    spec = write_spec(out, "pretrain-b", config, {"tokenize": data, "pretrain-a": a_out},
                      {"tensor_parallel": 2})
    log = run_worker(spec, nproc=2)
    assert "continuing from pretrain-a" in log
    art, a_art = read_artifact(out), read_artifact(a_out)
    assert art.metrics["tokens_total"] == a_art.metrics["tokens_total"] + 30 * GBS * SEQ
    assert art.extra["tokens_total"] == art.metrics["tokens_total"]
    state = json.loads((out / art.outputs["checkpoint"] / "state.json").read_text())
    assert state["step"] == 30 and state["optimizer_steps"] == STEPS_A + 30  # AdamW continued
    b, a = losses(out), losses(a_out)
    a_last = np.mean([a[s] for s in range(STEPS_A - 5, STEPS_A + 1)])
    assert abs(b[1] - a_last) < 0.3, (b[1], a_last)  # starts where the parent ended...
    assert b[1] < a[1] - 2.0  # ...far below a fresh model's first loss
    assert art.metrics["loss_last"] < a[1] - 2.0


def test_sigkill_then_resume_is_bit_identical(phase_a, data):
    a_out, _ = phase_a
    out = a_out.parent / "pretrain-killed"
    spec = write_spec(out, "pretrain-a", CONFIG_A, {"tokenize": data})
    assert kill_at_first_checkpoint(worker_cmd(spec), out, worker_env()) == -signal.SIGKILL
    assert not (out / "artifact.json").exists()
    assert not (out / "checkpoints" / "iter_0000120").exists(), "killed too late to test a resume"

    log = run_worker(spec)
    assert "resuming from" in log
    assert losses(out) == losses(a_out)  # every step's loss, once, equal to the reference
    got, want = final_tensors(out), final_tensors(a_out)
    assert got.keys() == want.keys() and any(k.startswith("optimizer.") for k in want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_world_size_two_follows_the_single_process_run(phase_a, data, layout):
    a_out, _ = phase_a
    out = a_out.parent / f"pretrain-{layout}"
    cluster = {"tensor_parallel": 2} if layout == "tp2" else {"data_parallel": 2}
    config = dict(CONFIG_A, micro_batch_size=2 if layout == "dp2" else 0)  # DP: 2 micro-batches
    log = run_worker(write_spec(out, "pretrain-a", config, {"tokenize": data}, cluster), nproc=2)
    assert f"TP={cluster.get('tensor_parallel', 1)} DP={cluster.get('data_parallel', 1)}" in log
    art = read_artifact(out)
    assert art.extra["world_size"] == 2
    got, want = losses(out), losses(a_out)
    assert got.keys() == want.keys()
    assert max(abs(got[s] - want[s]) for s in want) < 5e-3
    a, b = final_tensors(out), final_tensors(a_out)
    for key in b:  # the checkpoint is in the layout-free form: it compares across TP sizes
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-3), key


# ------------------------------------------------------------------ in-process parts
def test_a_phase_trains_on_a_source_split_into_prefixes(data, tmp_path):
    """A data stage whose web source came as two prefixes (a source over
    stages.layout.MAX_DOCUMENTS_PER_PREFIX): the phase blends both, web's weight shared by their
    tokens, and trains."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from stages.training.mixture import write_indexed_dataset
    split = tmp_path / "tokenize"
    shutil.copytree(data, split)
    web = IndexedDataset(str(data / "tokens" / "web"))
    docs = [web[i].tolist() for i in range(len(web))]
    outputs = dict(read_artifact(data).outputs)
    del outputs["tokens/web"]
    for i, rows in enumerate((docs[:200], docs[200:])):
        write_indexed_dataset(split / "tokens" / f"web.{i:05d}", rows)
        outputs[f"tokens/web.{i:05d}"] = f"tokens/web.{i:05d}"
    for f in ("web.bin", "web.idx"):
        (split / "tokens" / f).unlink()
    write_artifact(split, dataclasses.replace(read_artifact(data), outputs=outputs))
    out = tmp_path / "pretrain-split"
    run_worker(write_spec(out, "pretrain-split", dict(CONFIG_A, tokens=10 * GBS * SEQ,
                                                      checkpoint_interval=0), {"tokenize": split}))
    assert read_artifact(out).metrics["steps"] == 10
    (blend,) = [json.loads(p.read_text()) for p in (out / "data_cache").glob("*/description.json")
                if json.loads(p.read_text())["what"] == "blend"]
    assert [Path(p).name for p in blend["prefixes"]] == ["code", "web.00000", "web.00001"]
    tokens = [sum(len(d) for d in part) for part in (docs[:200], docs[200:])]
    assert blend["weights"] == pytest.approx([0.5, 0.5 * tokens[0] / sum(tokens),
                                              0.5 * tokens[1] / sum(tokens)])


def test_blend_is_deterministic_weighted_and_drops_zero_weights(data, tmp_path):
    from stages.training.mixture import build_blended_dataset
    prefixes = {s: str(data / "tokens" / s) for s in ("web", "code")}
    a = build_blended_dataset(prefixes, {"web": 0.25, "code": 0.75}, SEQ, 400, 7, EOD, tmp_path / "c1")
    b = build_blended_dataset(prefixes, {"web": 0.25, "code": 0.75}, SEQ, 400, 7, EOD, tmp_path / "c2")
    assert len(a) >= 400
    for i in (0, 1, 57, 399):
        assert np.array_equal(a[i]["tokens"].numpy(), b[i]["tokens"].numpy())
    code = [i for i, d in enumerate(a.datasets) if d.dataset_path.endswith("code")][0]
    share = float(np.mean(np.asarray(a.dataset_index[:400]) == code))
    assert abs(share - 0.75) < 0.02
    web_only = build_blended_dataset(prefixes, {"web": 1.0, "code": 0.0}, SEQ, 100, 7, EOD,
                                     tmp_path / "c1")
    tokens = np.concatenate([web_only[i]["tokens"].numpy() for i in range(100)])
    assert tokens.max() < 256  # no code token (256..511) anywhere


def test_half_built_cache_is_rebuilt(data, tmp_path):
    from stages.training.mixture import build_blended_dataset
    prefixes = {"web": str(data / "tokens" / "web")}
    first = build_blended_dataset(prefixes, {"web": 1.0}, SEQ, 50, 3, EOD, tmp_path)
    want = first[10]["tokens"].numpy().copy()
    (build_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (build_dir / ".complete").unlink()  # as if killed before the marker...
    for npy in build_dir.glob("*.npy"):
        npy.write_bytes(npy.read_bytes()[:40])  # ...while the index files were being written
    again = build_blended_dataset(prefixes, {"web": 1.0}, SEQ, 50, 3, EOD, tmp_path)
    assert np.array_equal(again[10]["tokens"].numpy(), want)
    assert (build_dir / ".complete").exists()


def test_only_complete_checkpoints_count(phase_a, tmp_path):
    from stages.training.checkpoint import is_complete, latest_complete
    a_out, _ = phase_a
    shutil.copytree(a_out / "checkpoints", tmp_path / "checkpoints")
    root = tmp_path / "checkpoints"
    assert latest_complete(tmp_path) == root / "iter_0000120"
    (root / ".tmp-iter_0000140").mkdir()  # a save killed before its rename
    (root / "iter_0000140").mkdir()  # renamed, killed before its done marker
    (root / "iter_0000140" / "common.pt").write_bytes(b"x")
    assert latest_complete(tmp_path) == root / "iter_0000120"
    shard = sorted((root / "iter_0000120").glob("*.distcp"))[0]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(blob))
    assert is_complete(root / "iter_0000120", verify=False)
    assert not is_complete(root / "iter_0000120", verify=True)
    assert latest_complete(tmp_path) == root / "iter_0000100"
    (root / "iter_0000100" / "done").unlink()
    assert latest_complete(tmp_path) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim must not be applied on a GPU machine")
def test_checkpoint_round_trip_restores_weights_and_adamw_state(tmp_path):
    from megatron.core import parallel_state as ps

    from stages.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from stages.training.cpu_shim import apply_cpu_shim, init_cpu_rng_tracker, local_process_group
    from stages.training.model import build_model, causal_mask, token_losses
    from stages.specs import ModelSpec, PrecisionSpec
    apply_cpu_shim()
    spec, precision = ModelSpec(**MODEL), PrecisionSpec()
    with local_process_group():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            init_cpu_rng_tracker()
            torch.manual_seed(0)
            model = build_model(spec, precision, device="cpu")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            tokens, mask = torch.randint(1, VOCAB, (4, SEQ)), causal_mask(SEQ, "cpu")
            for _ in range(3):
                token_losses(model, tokens, tokens, mask, precision, "cpu").mean().backward()
                opt.step()
                opt.zero_grad()
            state = TrainState(step=3, tokens_phase=768, tokens_total=1768, consumed_samples=12,
                               optimizer_steps=3)
            path = save_checkpoint(tmp_path, model, opt, state)
            torch.manual_seed(1)
            other = build_model(spec, precision, device="cpu")
            other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
            assert load_checkpoint(path, other, other_opt) == state
        finally:
            ps.destroy_model_parallel()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], other_opt.state[q][key]), (name, key)


def test_transformer_engine_and_fp8_are_refused_with_the_fix_on_cpu(monkeypatch):
    from stages.training import model
    from stages.specs import ModelSpec, PrecisionSpec
    monkeypatch.setattr(model, "have_transformer_engine", lambda: False)
    with pytest.raises(RuntimeError, match=r"granite-forge\[gpu\]"):
        model.layer_spec(use_te=True)
    with pytest.raises(RuntimeError, match="precision.fp8=none"):
        model.transformer_config(ModelSpec(**MODEL), PrecisionSpec(fp8="delayed"), device="cpu")
    config = model.transformer_config(ModelSpec(**MODEL), PrecisionSpec(), device="cpu")
    assert config.fp8 is None and config.normalization == "RMSNorm" and config.gated_linear_unit
