"""FP8 pretraining through Transformer Engine on a GPU (run on the accelerator machine).

Trains the same tiny Granite-shaped model for a few steps with the TE layer spec twice, in bf16 and
with the "delayed" FP8 recipe, through the real worker (``python -m stages.worker``), and checks
that both losses are finite, fall, and stay close to each other. Skipped where no CUDA device or no
Transformer Engine is available. ``pytest -m gpu tests/gpu``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.base import Artifact, read_artifact, write_artifact

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
VOCAB, EOD, SEQ, GBS, STEPS = 1024, 0, 128, 16, 40
# FP8 GEMMs want every dimension a multiple of 16
MODEL = {"hidden_size": 128, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
         "kv_channels": 32, "ffn_hidden_size": 512, "vocab_size": VOCAB,
         "max_position_embeddings": 512}


def _have_te() -> bool:
    from stages.training.model import have_transformer_engine
    return have_transformer_engine()


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from stages.training.mixture import write_indexed_dataset
    out = tmp_path_factory.mktemp("data") / "tokenize"
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(400):
        x = [int(rng.integers(1, VOCAB))]
        for _ in range(int(rng.integers(50, 400))):
            x.append(1 + (7 * x[-1] + 3) % (VOCAB - 1) if rng.random() < 0.85
                     else int(rng.integers(1, VOCAB)))
        docs.append(x + [EOD])
    write_indexed_dataset(out / "tokens" / "web", docs)
    write_artifact(out, Artifact(kind="tokenize", stage="tokenize", key="tok", outputs={
        "tokens/web": "tokens/web"}, extra={"vocab_size": VOCAB, "eod_id": EOD, "pad_id": 1}))
    return out


def train(data: Path, out: Path, precision: dict) -> dict[int, float]:
    out.mkdir(parents=True)
    config = {"data": "tokenize", "model": MODEL, "tokens": STEPS * GBS * SEQ, "seq_length": SEQ,
              "global_batch_size": GBS, "mixture": {"web": 1.0}, "precision": precision,
              "schedule": {"kind": "constant", "lr": 1e-3, "warmup_steps": 5},
              "checkpoint_interval": 0, "log_interval": 10}
    spec = {"kind": "pretrain", "stage": "gpu-pretrain", "key": "gpu", "config": config,
            "inputs": {"tokenize": {"out_dir": str(data),
                                    "artifact": dataclasses.asdict(read_artifact(data))}},
            "out_dir": str(out), "cluster": {"device": "cuda"}, "seed": 1234}
    (out / "spec.json").write_text(json.dumps(spec))
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-m", "stages.worker", str(out / "spec.json")], cwd=REPO,
                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@needs_gpu
def test_fp8_delayed_tracks_bf16(data, tmp_path):
    if not _have_te():
        pytest.skip("Transformer Engine is not importable here")
    bf16 = train(data, tmp_path / "bf16", {"dtype": "bf16"})
    fp8 = train(data, tmp_path / "fp8", {"dtype": "bf16", "fp8": "delayed"})
    assert sorted(bf16) == sorted(fp8) == list(range(1, STEPS + 1))
    for curve in (bf16, fp8):
        assert all(np.isfinite(v) for v in curve.values())
        assert np.mean([curve[s] for s in range(STEPS - 4, STEPS + 1)]) < curve[1] - 1.0
    last = lambda c: np.mean([c[s] for s in range(STEPS - 4, STEPS + 1)])  # noqa: E731
    assert abs(last(fp8) - last(bf16)) < 0.15 * last(bf16)

