"""Does RL teach the tiny pipeline arithmetic? rl-math against a control with shuffled rewards.

Runs (or reuses, when cached) the tiny pipeline through ``rl-math`` with the real CLI, then the same
stage again with ``reward_shuffle_control=true`` (the rewards of each rollout batch permuted
across its completions before the advantages: the same prompts, the same amount of training, no
information about which completion was right), for each seed asked. Prints, per run, the
held-out reward (one completion per held-out prompt, fixed seeds, the prompts never trained on)
before and after, with standard errors, and the rise in units of the combined standard error
sqrt(se_before^2 + se_after^2).

    python benchmarks/rl_signal.py                     # ./forge-store (after `make demo`: cached)
    python benchmarks/rl_signal.py --seeds 1234 7      # more seeds (each a new rl-math key)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.helpers import forge, last_result  # noqa: E402


def rl_math(store: Path, overrides: list[str]) -> tuple[dict, list[dict]]:
    """The rl-math stage's artifact and its per-step metrics."""
    forge("run", "pipeline=granite-4.1-tiny", *overrides, "--only", "rl-math", store=store,
          timeout=3600)
    out = Path(last_result(store)["stages"]["rl-math"]["out_dir"])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "artifact.json").read_text()), steps


def time_split(steps: list[dict]) -> str:
    """Mean seconds per step: generation (+ rewards), training, weight sync; and their shares."""
    parts = {k: sum(r.get(f"time/{k}_s", 0.0) for r in steps) / len(steps)
             for k in ("generate", "train", "weight_sync")}
    total = sum(parts.values()) or 1.0
    return ", ".join(f"{k} {v:.3f} s ({100 * v / total:.0f}%)" for k, v in parts.items())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", default=os.environ.get("FORGE_STORE", "forge-store"),
                   help="the store to run in / reuse (default ./forge-store, as `make demo`)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1234],
                   help="rl-math seeds (prompt order and rollout seeds); 1234 is the pipeline's")
    args = p.parse_args()
    store = Path(args.store).resolve()
    print(f"store {store}")
    print(f"{'run':<10} {'seed':>6} {'held-out reward before':>24} {'after':>16} "
          f"{'rise / se':>10} {'prompts':>8}")
    ok, splits = True, []
    for seed in args.seeds:
        for name, extra in (("rl-math", []), ("control", ["stages.rl-math.reward_shuffle_control=true"])):
            art, steps = rl_math(store, [f"stages.rl-math.seed={seed}", *extra])
            m = art["metrics"]
            b, a = m["heldout_reward_before"], m["heldout_reward_after"]
            se = (m["heldout_se_before"] ** 2 + m["heldout_se_after"] ** 2) ** 0.5
            z = (a - b) / se if se > 0 else float("inf") if a > b else 0.0
            print(f"{name:<10} {seed:>6} {b:>15.3f} +- {m['heldout_se_before']:.3f} "
                  f"{a:>7.3f} +- {m['heldout_se_after']:.3f} {z:>10.1f} "
                  f"{int(m['heldout_prompts_after']):>8}")
            ok &= (z > 2) if name == "rl-math" else (z <= 2)
            splits.append(f"{name} seed {seed}: {len(steps)} steps; per step {time_split(steps)}")
    print("time split (generate includes the rewards):")
    for line in splits:
        print(f"  {line}")
    print("goal: rl-math rises beyond 2 standard errors, the control does not:",
          "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
