"""What the GPU tests that train through the stage worker share: a tokenized corpus (Megatron
indexed datasets, written without the `datasets` library), a spec file for one GPU, and a run of
``python -m stages.worker SPEC.json`` in a subprocess, as `forge run` starts it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from stages.base import Artifact, read_artifact, write_artifact

REPO = Path(__file__).resolve().parents[2]
VOCAB, EOD, SEQ, GBS = 1024, 0, 128, 16
# every dimension a multiple of 16, as FP8 GEMMs want
MODEL = {"hidden_size": 128, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
         "kv_channels": 32, "ffn_hidden_size": 512, "vocab_size": VOCAB,
         "max_position_embeddings": 512}
# ParallelSpec refuses device=cuda with its default accelerator (cpu); the accelerator only sizes
# `forge plan`, so any GPU type will do
CLUSTER = {"device": "cuda", "accelerator": "h100"}


def write_tokenized(out: Path) -> Path:
    """A finished `tokenize` stage in ``out``: one source, ``web``, of 400 documents that follow a
    fixed successor map 85% of the time (a loss that falls within tens of steps)."""
    from stages.training.mixture import write_indexed_dataset
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


def worker_spec(data: Path, out: Path, precision: dict, steps: int) -> Path:
    """``out/spec.json``: a pretrain phase of ``steps`` steps on one GPU."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"data": "tokenize", "model": MODEL, "tokens": steps * GBS * SEQ, "seq_length": SEQ,
              "global_batch_size": GBS, "mixture": {"web": 1.0}, "precision": precision,
              "schedule": {"kind": "constant", "lr": 1e-3, "warmup_steps": 5},
              "checkpoint_interval": 0, "log_interval": 10}
    spec = {"kind": "pretrain", "stage": "gpu-pretrain", "key": "gpu", "config": config,
            "inputs": {"tokenize": {"out_dir": str(data),
                                    "artifact": dataclasses.asdict(read_artifact(data))}},
            "out_dir": str(out), "cluster": CLUSTER, "seed": 1234}
    path = out / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def run_worker(spec: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run the worker on ``spec``; its output, or an AssertionError with the end of it."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "stages.worker", str(spec)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=path, **(env or {})), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, f"worker exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}
