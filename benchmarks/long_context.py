"""Does context extension work on the tiny pipeline, and do the merges keep short-context quality?

Runs (or reuses, when its stages are cached) the tiny pipeline's extension chain through the real
CLI, then prints, for each extension step k with new length L_k:

- retrieval accuracy at L_k before the step (the evaluation of the step's parent), after the
  extension, and after the merge; the share of the extension's gain the merge keeps;
- the held-out short-context loss of the pre-extension parent and of the merge, and their ratio
  (goal: the merge within 2% of the pre-extension model).

    python benchmarks/long_context.py                  # uses ./forge-store (after `make demo`: cached)
    python benchmarks/long_context.py --store /tmp/s   # a fresh store: trains everything (~10 min)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import LONG_CONTEXT, forge, last_result  # noqa: E402


def artifact(result: dict, stage: str) -> dict:
    return json.loads((Path(result["stages"][stage]["out_dir"]) / "artifact.json").read_text())


def metrics(result: dict, stage: str) -> dict:
    return artifact(result, stage)["metrics"]


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

    base_loss = metrics(result, "eval-pretrain")["heldout_loss"]
    header = (f"{'step':<8}{'length':>7}{'before':>8}{'extended':>10}{'merged':>8}{'kept':>7}"
              f"{'loss before':>13}{'loss merged':>13}{'ratio':>8}{'vs pretrain-4':>15}")
    print(header)
    print("-" * len(header))
    rises, within, kept_most = [], [], []
    parent_eval = "eval-pretrain"
    for k in (1, 2, 3):
        length = artifact(result, f"eval-extend-{k}")["extra"]["trained_length"]
        before, ext, merged = (metrics(result, s) for s in (parent_eval, f"eval-extend-{k}",
                                                             f"eval-merge-{k}"))
        key = f"retrieval/L{length}"
        gain = ext[key] - before[key]
        kept = (merged[key] - before[key]) / gain if gain > 0 else float("nan")
        ratio = merged["heldout_loss"] / before["heldout_loss"]
        print(f"{'extend-' + str(k):<8}{length:>7}{before[key]:>8.3f}{ext[key]:>10.3f}{merged[key]:>8.3f}"
              f"{kept:>7.2f}{before['heldout_loss']:>13.4f}{merged['heldout_loss']:>13.4f}{ratio:>8.4f}"
              f"{merged['heldout_loss'] / base_loss:>15.4f}")
        rises.append(gain > 0)
        within.append(abs(ratio - 1) <= 0.02)
        kept_most.append(kept > 0.5)
        parent_eval = f"eval-merge-{k}"
    print()
    print(f"retrieval at the new length rises after each extension: {rises}  (goal: all True)")
    print(f"merged held-out loss within 2% of the pre-extension model: {within}  (goal: all True)")
    print(f"merge keeps more than half of the extension's retrieval gain: {kept_most}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
