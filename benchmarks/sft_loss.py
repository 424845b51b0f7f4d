"""Does SFT on the curated chats help the tiny pipeline? Before (merge-3) and after (sft), side by side.

Runs (or reuses, when its stages are cached) the tiny pipeline through the chat evaluations with
the real CLI, then prints, for merge-3 and for sft, on the same held-out conversations and
evaluation prompts of the curate stage:

- the held-out assistant-token loss (each conversation alone, the loss on its assistant turns);
- greedy exact match on the evaluation prompts (the last number of the reply equals the answer);

and what curation kept: rows read, kept, held out, rejected per rule, the judge's verdicts.

    python benchmarks/sft_loss.py                  # uses ./forge-store (after `make demo`: cached)
    python benchmarks/sft_loss.py --store /tmp/s   # a fresh store: trains everything (~10 min)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.helpers import POST_TRAINING, forge, last_result  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", default=os.environ.get("FORGE_STORE", "forge-store"),
                   help="the store to run in / reuse (default ./forge-store, as `make demo`)")
    p.add_argument("overrides", nargs="*", help="extra overrides for the tiny pipeline")
    args = p.parse_args()
    store = Path(args.store).resolve()
    forge("run", "pipeline=granite-4.1-tiny", *args.overrides,
          "--only", f"eval-pretrain|eval-extend-.*|eval-merge-.*|{POST_TRAINING}",
          store=store, timeout=3600)
    result = last_result(store)

    def art(stage: str) -> dict:
        return json.loads((Path(result["stages"][stage]["out_dir"]) / "artifact.json").read_text())

    before, after = art("eval-chat-before")["metrics"], art("eval-chat-after")["metrics"]
    sft, report = art("sft"), art("curate")["extra"]["report"]
    print(f"store {store}")
    print(f"curation: {report['rows']} rows, kept {report['kept']} for SFT, {report['heldout']} "
          f"held out, {report['rejected']} rejected")
    for rule, n in report["rejected_by_rule"].items():
        print(f"  {rule:<22} {n}")
    judge = report.get("judge") or {}
    if judge:
        print(f"  judge: {judge['judged']} verdicts, {judge['unparsable']} unparsable "
              "(the tiny judge's scores are recorded, its quality is not claimed)")
    print(f"sft: {int(sft['metrics']['steps'])} steps, {sft['extra']['train_tokens']} tokens x "
          f"{sft['extra']['epochs']} epochs, train loss {sft['metrics']['loss_first']:.3f} -> "
          f"{sft['metrics']['loss_last']:.3f}")
    print(f"{'model':<10} {'held-out assistant loss':>24} {'exact match':>14}")
    for name, m in (("merge-3", before), ("sft", after)):
        print(f"{name:<10} {m['chat/heldout_loss']:>24.3f} "
              f"{m['chat/exact_match_correct']:>6.0f}/{m['chat/exact_match_prompts']:<3.0f} "
              f"({m['chat/exact_match']:.2f})")
    ratio = after["chat/heldout_loss"] / before["chat/heldout_loss"]
    print(f"held-out assistant loss after / before: {ratio:.3f} (goal < 1)")
    return 0 if ratio < 1 else 1


if __name__ == "__main__":
    sys.exit(main())
