"""Does context extension work on the tiny pipeline, and do the merges keep short-context quality?

Runs (or reuses, when its stages are cached) the tiny pipeline's extension chain through the real
CLI, then prints, for each extension step k with new length L_k:

- retrieval accuracy at L_k before the step (the evaluation of the step's parent), after the
  extension, and after the merge; the share of the extension's gain the merge keeps;
- the held-out short-context loss (at the pretraining length, mean over the short-document
  sources) of the pre-extension parent and of the merge, and their ratio (goal: the merge within
  2% of the pre-extension model); the last column compares with pretrain-4.

    python benchmarks/long_context.py                  # uses ./forge-store (after `make demo`: cached)
    python benchmarks/long_context.py --store /tmp/s   # a fresh store: trains everything (~10 min)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.helpers import LONG_CONTEXT, forge, last_result  # noqa: E402


def artifact(result: dict, stage: str) -> dict:
    return json.loads((Path(result["stages"][stage]["out_dir"]) / "artifact.json").read_text())


def metrics(result: dict, stage: str) -> dict:
    return artifact(result, stage)["metrics"]


# What the extensions add (counting them would hide a regression), and the retrieval drills (their
# held-out loss is the loss on the drills' answers, not language modelling).
LONG_SOURCES = ("long", "repos", "recall")


def short_loss(m: dict) -> float:
    """Mean held-out loss at the pretraining length over the short-document sources."""
    vals = [v for k, v in m.items() if k.startswith("heldout_loss/")
            and k.split("/", 1)[1] not in LONG_SOURCES]
    return sum(vals) / len(vals)


def by_keys(m: dict, length: int) -> dict[int, float]:
    """Retrieval at ``length`` per key count (mean over depths)."""
    cells: dict[int, list[float]] = {}
    for name, v in m.items():
        parts = name.split("/")
        if len(parts) == 4 and parts[0] == "retrieval" and parts[1] == f"L{length}":
            cells.setdefault(int(parts[2][1:]), []).append(v)
    return {k: sum(v) / len(v) for k, v in sorted(cells.items())}


def significant_rise(before: float, after: float, n_before: int, n_after: int) -> bool:
    """A rise beyond two standard errors of the difference of two accuracies (pooled)."""
    p = (before * n_before + after * n_after) / (n_before + n_after)
    se = math.sqrt(max(p * (1 - p), 1e-12) * (1 / n_before + 1 / n_after))
    return after - before > 2 * se


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=os.environ.get("FORGE_STORE", str(ROOT / "forge-store")),
                    help="forge store to run in (default: $FORGE_STORE or ./forge-store)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the tiny pipeline")
    args = ap.parse_args()
    store = Path(args.store).resolve()
    print(f"running the extension chain in {store} (cached stages are reused) ...", flush=True)
    forge("run", "pipeline=granite-4.1-tiny", *args.overrides, "--only", LONG_CONTEXT, store=store,
          timeout=3600)
    result = last_result(store)
    ran = sorted(n for n, r in result["stages"].items() if r.get("executed"))
    print(f"stages executed now: {', '.join(ran) or 'none (all cached)'}\n")

    base_loss = short_loss(metrics(result, "eval-pretrain"))
    header = (f"{'step':<8}{'length':>7}{'before':>8}{'extended':>10}{'merged':>8}{'kept':>7}"
              f"{'loss before':>13}{'loss merged':>13}{'ratio':>8}{'vs pretrain-4':>15}")
    print(header)
    print("-" * len(header))
    rises, within, kept_most, per_key = [], [], [], []
    parent_eval = "eval-pretrain"
    for k in (1, 2, 3):
        length = artifact(result, f"eval-extend-{k}")["extra"]["trained_length"]
        before, ext, merged = (metrics(result, s) for s in (parent_eval, f"eval-extend-{k}",
                                                             f"eval-merge-{k}"))
        key = f"retrieval/L{length}"
        gain = ext[key] - before[key]
        kept = (merged[key] - before[key]) / gain if gain > 0 else float("nan")
        loss_before, loss_merged = short_loss(before), short_loss(merged)
        ratio = loss_merged / loss_before
        print(f"{'extend-' + str(k):<8}{length:>7}{before[key]:>8.3f}{ext[key]:>10.3f}{merged[key]:>8.3f}"
              f"{kept:>7.2f}{loss_before:>13.4f}{loss_merged:>13.4f}{ratio:>8.4f}"
              f"{loss_merged / base_loss:>15.4f}")
        n_before, n_after = (artifact(result, s)["extra"].get("probes_per_length", 1)
                             for s in (parent_eval, f"eval-extend-{k}"))
        chance = artifact(result, f"eval-extend-{k}")["extra"].get("chance", 0.0)
        # a rise counts when it is beyond noise and lands beyond a uniform guess of a name, too
        rises.append(significant_rise(before[key], ext[key], n_before, n_after)
                     and significant_rise(chance, ext[key], n_after, n_after))
        within.append(ratio - 1 <= 0.02)  # no worse than 2% (a better loss passes)
        kept_most.append(kept > 0.5)
        per_key.append((k, length, *(by_keys(m, length) for m in (before, ext, merged))))
        parent_eval = f"eval-merge-{k}"
    print("\nper key count (1 = a single needle; more = distractor facts too), before / extended / merged:")
    for k, length, b, e, mg in per_key:
        print(f"  extend-{k} at {length}: " + ";  ".join(
            f"{n} key{'s' if n > 1 else ''} {b[n]:.3f} / {e[n]:.3f} / {mg[n]:.3f}" for n in b))
    print()
    print(f"retrieval at the new length rises after each extension, beyond 2 standard errors of "
          f"the difference and of chance ({chance:.3f}): {rises}  (goal: all True)")
    print(f"merged short-context loss no more than 2% above the pre-extension model's: {within}  "
          "(goal: all True)")
    print(f"merge keeps more than half of the extension's retrieval gain: {kept_most}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
