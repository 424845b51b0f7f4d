"""Context parallelism on GPUs: CP=2 follows CP=1 through the stage worker (bf16, one node).

The same bf16 pretraining phase (Transformer Engine layer spec: its ring attention is what CP
runs on; Megatron's local spec has none) runs once on one GPU and once under torchrun on two GPUs
with ``context_parallel=2``: each rank keeps chunks r and 3 - r of the 4 chunks of every sequence
(``step.context_parallel_part``), the loss sums and token counts add up over the CP ranks and DDP
averages the gradients over them, so every step is the CP=1 step up to bf16 noise.

Tolerance: |loss(CP=2) - loss(CP=1)| <= 0.02 + 1% of the loss at every step.
Not measured yet (no machine here has two GPUs and Transformer Engine):
it is bf16's own noise (logits differ by ~1e-2 between bf16 runs of the same model, FACTS.md)
plus the ring attention's other summation order; tighten it once a run has measured the
difference (the test prints it).

Needs two GPUs on the node and Transformer Engine; skipped (with the reason) elsewhere.
The orchestrator keeps ``context_parallel > 1`` blocked (``ParallelSpec.not_built``) until this
passes on a GPU node; the worker itself runs it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from stages.base import read_artifact
from tests.gpu.worker_runs import CLUSTER, GBS, MODEL, REPO, SEQ, losses

pytestmark = [pytest.mark.gpu, pytest.mark.needs("transformer_engine"),
              pytest.mark.skipif(torch.cuda.device_count() < 2,
                                 reason="context parallelism needs 2 GPUs on the node")]

STEPS = 30
TOL_ABS, TOL_REL = 0.02, 0.01


def _spec(data, out, cp: int):
    out.mkdir(parents=True, exist_ok=True)
    config = {"data": "tokenize", "model": MODEL, "tokens": STEPS * GBS * SEQ, "seq_length": SEQ,
              "global_batch_size": GBS, "mixture": {"web": 1.0}, "precision": {"dtype": "bf16"},
              "schedule": {"kind": "constant", "lr": 1e-3, "warmup_steps": 5},
              "checkpoint_interval": 0, "log_interval": 10}
    spec = {"kind": "pretrain", "stage": "gpu-cp", "key": f"cp{cp}", "config": config,
            "inputs": {"tokenize": {"out_dir": str(data),
                                    "artifact": dataclasses.asdict(read_artifact(data))}},
            "out_dir": str(out), "cluster": dict(CLUSTER, context_parallel=cp), "seed": 1234}
    path = out / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def _run(spec, nproc: int) -> str:
    cmd = [sys.executable, "-m", "stages.worker", str(spec)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "stages.worker", str(spec)]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=path), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, f"worker exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


def test_cp2_gives_the_cp1_losses_within_bf16_tolerance(tokenized, tmp_path, figure):
    one = _run(_spec(tokenized, tmp_path / "cp1", 1), 1)
    two = _run(_spec(tokenized, tmp_path / "cp2", 2), 2)
    assert "CP=2" in two and "CP=" not in one
    a, b = losses(tmp_path / "cp1"), losses(tmp_path / "cp2")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    worst = max(abs(b[s] - a[s]) for s in a)
    figure(f"CP=2 vs CP=1, bf16, {STEPS} steps of {GBS}x{SEQ}: max |d loss| {worst:.2e}")
    for s in a:
        assert abs(b[s] - a[s]) <= TOL_ABS + TOL_REL * abs(a[s]), (s, a[s], b[s])
    assert read_artifact(tmp_path / "cp2").extra["context_parallel"] == 2
