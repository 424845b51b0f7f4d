"""Fault injection: many trials per fault against real training workers; goal: every trial recovered,
nothing lost.

Each trial (``tests/support/faults.py``, which the CI test ``tests/reliability/test_faults.py`` runs a few
of) starts the real stage worker on a tiny phase (40 steps of 8x64 tokens, a checkpoint every 5),
injects one fault at a moment drawn from a seeded RNG (printed), runs the stage again, and
compares with an uninterrupted reference run. Two launches of the same stage at once, a Prefect
server restart and an MLflow outage go through the real CLI and real servers
(``tests/support/service_faults.py``). Prints one line per trial, then a table:

- recovered: the rerun equals the reference bit for bit (weights, AdamW moments, every loss);
- data lost: the rerun resumed from an older checkpoint than the newest complete one, loaded a
  damaged one, or a stage's output went missing;
- as specified: the fault's own promise held (SIGTERM: exit 143 after a checkpoint of the step;
  damage: a REJECTED line with the reason; a full disk: a loud failure, nothing half-written; two
  launches: one worker per stage);
- steps redone: steps trained twice because of the fault (a kill loses up to one checkpoint
  interval, a SIGTERM nothing).

    python benchmarks/faults.py [--trials 20] [--other-trials 4] [--launch-trials 1]
                                [--service-trials 2] [--seed 0]
                                [--only kill,term,...] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
from tests.support.faults import Lab, Trial, can_mount_tmpfs  # noqa: E402
from tests.support.helpers import SMALL, start_prefect_server  # noqa: E402
from tests.support.service_faults import mlflow_outage_trial, prefect_restart_trial  # noqa: E402

FAULTS = {  # key: (row name, how many trials: "trials" | "other" | "launch")
    "kill": ("SIGKILL of the worker (half inside a save)", "trials"),
    "term": ("SIGTERM to the worker", "other"),
    "term_one_rank": ("SIGTERM to one rank of two (DP=2)", "other"),
    "term_orchestrator": ("SIGTERM to the orchestrator", "other"),
    "damage": ("damaged newest checkpoint", "other"),
    "disk_tmpfs": ("disk full (tmpfs, ENOSPC)", "other"),
    "disk_rlimit": ("file-size limit (RLIMIT_FSIZE, EFBIG)", "other"),
    "launches": ("two launches of one stage at once", "launch"),
    "prefect_restart": ("Prefect server restarted mid-stage", "service"),
    "mlflow_down": ("MLflow server down mid-run", "service"),
}
DAMAGE = ("flip", "truncate", "delete", "done")


def two_launches(work: Path, url: str, index: int) -> Trial:
    """`forge run` twice at once on one store: each stage must run once, both runs complete."""
    t0, trial = time.time(), Trial("two launches")
    store = work / f"launch-{index}"
    env = dict(os.environ, FORGE_STORE=str(store), PREFECT_API_URL=url, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "flows.cli", "run", *SMALL, "--only",
           "data|tokenizer|tokenize|pretrain-1"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    codes = [p.returncode for p in procs]
    stages = ("data", "tokenizer", "tokenize", "pretrain-1")
    launches, missing = {}, []
    for stage in stages:
        dirs = list(store.glob(f"{stage}-*"))
        launches[stage] = sum((d / "worker.log").read_text().count("--- ") for d in dirs
                              if (d / "worker.log").exists())
        if len(dirs) != 1 or not (dirs[0] / "artifact.json").exists():
            missing.append(stage)
    results = [json.loads(p.read_text())["stages"] for p in (store / "runs").glob("*.result.json")]
    trial.detail = f"exits {codes}, launches per stage {launches}"
    if missing:
        trial.lose(f"no output for {missing}")
    if codes != [0, 0]:
        trial.miss("a launch failed: " + " | ".join(o[-800:] for o in outs))
    elif set(launches.values()) != {1}:
        trial.miss("a stage ran twice")
    keys = [{n: r["key"] for n, r in rec.items()} for rec in results]
    trial.recovered = len(results) == 2 and keys[0] == keys[1] and not missing
    trial.seconds = time.time() - t0
    return trial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="SIGKILL trials (default 20)")
    ap.add_argument("--other-trials", type=int, default=4, help="trials of each other worker fault")
    ap.add_argument("--launch-trials", type=int, default=1,
                    help="concurrent-launch trials (each runs the small pipeline's first stages)")
    ap.add_argument("--service-trials", type=int, default=2,
                    help="trials of each service fault (Prefect restart, MLflow outage)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault moments")
    ap.add_argument("--only", default=",".join(FAULTS), help=f"comma list of {', '.join(FAULTS)}")
    ap.add_argument("--keep", type=Path, help="work in DIR and keep it (default: a temp dir)")
    args = ap.parse_args()
    only = [f for f in args.only.split(",") if f]
    unknown = set(only) - set(FAULTS)
    if unknown:
        ap.error(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    counts = {"trials": args.trials, "other": args.other_trials, "launch": args.launch_trials,
              "service": args.service_trials}
    work = args.keep or Path(tempfile.mkdtemp(prefix="forge-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    rows: dict[str, list[Trial]] = {}
    server = None
    try:
        lab = Lab(work / "lab", seed=args.seed)
        tmpfs = can_mount_tmpfs(work / "probe")
        for key in only:
            name, kind = FAULTS[key]
            n = counts[kind]
            if key == "disk_tmpfs" and not tmpfs:
                print(f"{name}: skipped, this process may not mount a tmpfs", flush=True)
                continue
            if key in ("launches", "mlflow_down") and n and server is None:
                (work / "prefect").mkdir(exist_ok=True)
                server, url = start_prefect_server(work / "prefect")
            for i in range(n):
                if key == "kill":
                    trial = lab.kill(in_save=i % 2 == 0)
                elif key == "damage":
                    trial = lab.damage((DAMAGE[i % len(DAMAGE)],))
                elif key.startswith("disk_"):
                    trial = lab.disk_full(key.split("_")[1])
                elif key == "launches":
                    trial = two_launches(work, url, i)
                elif key == "prefect_restart":
                    trial = prefect_restart_trial(work / f"prefect-restart-{i}")
                elif key == "mlflow_down":
                    trial = mlflow_outage_trial(work / f"mlflow-down-{i}", url)
                else:
                    trial = getattr(lab, key)()
                print(f"  {i + 1:2d}. {trial.line()}", flush=True)
                rows.setdefault(name, []).append(trial)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print("\n| fault | trials | recovered | data lost | as specified | steps redone (max) | s/trial |")
    print("|---|---|---|---|---|---|---|")
    for name, trials in rows.items():
        n = len(trials)
        print(f"| {name} | {n} | {sum(t.recovered for t in trials)}/{n} | "
              f"{sum(bool(t.lost) for t in trials)} | {sum(not t.unmet for t in trials)}/{n} | "
              f"{max(t.redone for t in trials)} | {sum(t.seconds for t in trials) / n:.0f} |")
    kills = rows.get(FAULTS["kill"][0], [])
    if kills:
        inside = sum("inside a save" in t.detail for t in kills)
        print(f"\nSIGKILL moments inside a checkpoint write: {inside} of {len(kills)}")
    bad = [t for trials in rows.values() for t in trials if not t.ok]
    print(f"total {time.time() - t_start:.0f}s (seed {args.seed}); "
          + ("goal met: every trial recovered, nothing lost" if not bad else
             f"GOAL MISSED in {len(bad)} trial(s)"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
