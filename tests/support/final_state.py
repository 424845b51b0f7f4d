"""What "a resumed run ends bit-identical to an uninterrupted one" compares, for a training stage's
output dir (tests/support/faults.py, tests/integration/test_resume_and_concurrency.py):

- every tensor of the final checkpoint, weights and AdamW moments, bit for bit (dtype, shape, bytes);
- its train state (``state.json``: phase steps, tokens of the phase and in total, consumed samples,
  AdamW's step counter, the layout), field by field;
- the RNG states it saved for every rank (``rng/rank_*.pt``: python, numpy, torch), exactly;
- the training curve: every line of ``metrics.jsonl`` in order (each step once), every value of
  every key but the wall-clock ones (``WALL_CLOCK``), bit for bit.

``final_state(out)`` reads one run; ``differences(got, want)`` lists what differs ([] = identical).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

WALL_CLOCK = ("time", "tokens_per_s")   # when a line was written, how fast that step ran


@dataclasses.dataclass
class FinalState:
    checkpoint: str                 # the final checkpoint, relative to the output dir
    tensors: dict[str, Any]         # sharded key -> full tensor (model and "optimizer.*")
    train_state: dict[str, Any]     # state.json
    rng: dict[str, Any]             # rng file name (rank_00000.pt, ...) -> saved RNG states
    curve: list[dict[str, Any]]     # metrics.jsonl lines, WALL_CLOCK keys dropped


def curve(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]


def final_state(out: Path) -> FinalState:
    import torch

    from stages.base import read_artifact
    from stages.training.checkpoint import STATE, load_tensors
    out = Path(out)
    rel = read_artifact(out).outputs["checkpoint"]
    ckpt = out / rel
    rng = {p.name: torch.load(p, weights_only=False) for p in sorted((ckpt / "rng").glob("*.pt"))}
    return FinalState(checkpoint=rel, tensors=load_tensors(ckpt),
                      train_state=json.loads((ckpt / STATE).read_text()), rng=rng, curve=curve(out))


def differences(got: FinalState, want: FinalState) -> list[str]:
    """Everything in which ``got`` differs from ``want`` (the uninterrupted run); [] if nothing."""
    out = []
    if got.checkpoint != want.checkpoint:
        out.append(f"final checkpoint {got.checkpoint}, the reference's {want.checkpoint}")
    if not any(k.startswith("optimizer.") for k in want.tensors):
        out.append("the reference's final checkpoint holds no AdamW moments to compare")
    if got.tensors.keys() != want.tensors.keys():
        out.append(f"tensors differ in keys: {sorted(got.tensors.keys() ^ want.tensors.keys())[:6]}")
    bad = [k for k in sorted(got.tensors.keys() & want.tensors.keys())
           if not same(got.tensors[k], want.tensors[k])]
    if bad:
        out.append(f"{len(bad)} tensors differ: {bad[:6]}")
    for field in sorted(got.train_state.keys() | want.train_state.keys()):
        a, b = got.train_state.get(field), want.train_state.get(field)
        if a != b:
            out.append(f"train state {field}: {a}, the reference's {b}")
    if not want.rng:
        out.append("the reference's final checkpoint holds no RNG state")
    if got.rng.keys() != want.rng.keys():
        out.append(f"RNG files {sorted(got.rng)}, the reference's {sorted(want.rng)}")
    for name in sorted(got.rng.keys() & want.rng.keys()):
        a, b = got.rng[name], want.rng[name]
        which = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not same(a[k], b[k]))
        if which:
            out.append(f"RNG state {name} differs: {which}")
    steps, ref_steps = [r.get("step") for r in got.curve], [r.get("step") for r in want.curve]
    if steps != ref_steps:
        at = next((i for i, (a, b) in enumerate(zip(steps, ref_steps)) if a != b),
                  min(len(steps), len(ref_steps)))
        out.append(f"metrics.jsonl has {len(steps)} lines, the reference's {len(ref_steps)}; line "
                   f"{at + 1} is step {steps[at:at + 1] or 'none'}, the reference's "
                   f"{ref_steps[at:at + 1] or 'none'}")
    else:
        for a, b in zip(got.curve, want.curve):
            if not same(a, b):
                keys = sorted(k for k in a.keys() | b.keys() if not same(a.get(k), b.get(k)))
                out.append(f"metrics.jsonl step {a.get('step')}: {keys} = "
                           f"{[a.get(k) for k in keys]}, the reference's {[b.get(k) for k in keys]}")
                break
    return out


def same(a: Any, b: Any) -> bool:
    """Equal bit for bit: tensors and arrays in dtype, shape and bytes; containers item by item."""
    import numpy as np
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b)))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex()   # NaN equals NaN, -0.0 differs from 0.0
    return type(a) is type(b) and a == b


def _bytes(t):
    import torch
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
