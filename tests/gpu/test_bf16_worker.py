"""A bf16 pretraining phase on one GPU through the stage worker, on Megatron's local layer spec.

``python -m stages.worker SPEC.json`` with ``cluster.device=cuda``, as `forge run` starts it: NCCL
in a world of one, the blended dataset, bf16 autocast over fp32 master weights, AdamW, the final
checkpoint. ``FORGE_LAYER_SPEC=local`` keeps Transformer Engine out (the GPU machine of
tests/gpu/run_all.sh has none); the FP8 tests train through TE where it is installed.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.base import read_artifact
from tests.gpu.worker_runs import GBS, SEQ, losses, run_worker, worker_spec

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 40


def test_bf16_phase_trains_through_the_worker_on_the_local_spec(tokenized, tmp_path, figure):
    from stages.training.checkpoint import is_complete
    out = tmp_path / "bf16"
    log = run_worker(worker_spec(tokenized, out, {"dtype": "bf16"}, STEPS),
                     env={"FORGE_LAYER_SPEC": "local"})
    curve = losses(out)
    assert sorted(curve) == list(range(1, STEPS + 1)), log[-3000:]
    bad = [s for s, v in curve.items() if not math.isfinite(v)]
    assert not bad, f"non-finite loss at steps {bad[:10]}"
    last = float(np.mean([curve[s] for s in range(STEPS - 4, STEPS + 1)]))
    assert last < curve[1] - 1.0, f"the loss did not fall: step 1 {curve[1]:.3f}, last 5 {last:.3f}"
    art = read_artifact(out)
    assert art.outputs["checkpoint"] == f"checkpoints/iter_{STEPS:07d}"
    assert is_complete(out / art.outputs["checkpoint"])
    figure(f"loss {curve[1]:.2f} -> {last:.2f} in {STEPS} steps of {GBS}x{SEQ}; "
           f"{art.metrics['tokens_per_s']:.0f} tok/s, start-up {art.metrics['startup_s']:.0f}s")
