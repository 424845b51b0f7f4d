"""Fully cached rerun of the tiny pipeline vs a bare Prefect flow with as many no-op tasks.

Both run as fresh processes, side by side in this one script, each timed from process start to
exit, in two Prefect modes: local (no PREFECT_API_URL: forge starts its own server, the bare flow
Prefect's ephemeral one) and against a running `prefect server` on 127.0.0.1. Goal: forge / bare
<= 1.5 in each mode.

    python benchmarks/cached_rerun.py [--store DIR] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support.helpers import ONLY_BUILT, SMALL, start_prefect_server  # noqa: E402

BARE_FLOW = textwrap.dedent("""
    import sys
    from prefect import flow, task

    @task
    def noop(i: int) -> int:
        return i

    @flow(name="bare")
    def bare(n: int) -> None:
        for i in range(n):
            noop(i)

    bare(int(sys.argv[1]))
""")


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="a store the small tiny pipeline already ran in "
                    "(default: build one first, ~2 min)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="forge-bench-"))
    store = args.store or work / "store"
    base = dict(os.environ, FORGE_STORE=str(store), OMP_NUM_THREADS="1",
                PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    base.pop("PREFECT_API_URL", None)
    forge_cmd = [sys.executable, "-m", "flows.cli", "run", *SMALL, "--only", ONLY_BUILT]
    if args.store is None:
        print("building the small tiny pipeline once ...", flush=True)
        timed(forge_cmd, dict(base, PREFECT_HOME=str(work / "build-home")))
    n_tasks = 7
    bare_file = work / "bare_flow.py"
    bare_file.write_text(BARE_FLOW)
    bare_cmd = [sys.executable, str(bare_file), str(n_tasks)]

    rows = []
    for mode in ("local", "server"):
        server = None
        env_f, env_b = dict(base), dict(base)
        if mode == "server":
            (work / "server-home").mkdir()
            server, url = start_prefect_server(work / "server-home")
            env_f["PREFECT_API_URL"] = env_b["PREFECT_API_URL"] = url
        f_times, b_times = [], []
        for i in range(args.repeats):
            if mode == "local":  # fresh Prefect home each time: the cost a new shell pays
                env_f["PREFECT_HOME"] = str(work / f"f-home-{i}")
                env_b["PREFECT_HOME"] = str(work / f"b-home-{i}")
            f_times.append(timed(forge_cmd, env_f))
            b_times.append(timed(bare_cmd, env_b))
        if server is not None:
            server.terminate()
        f, b = statistics.median(f_times), statistics.median(b_times)
        rows.append((mode, f, b, f / b))
    print(f"\nfully cached rerun of {n_tasks} stages vs bare Prefect flow of {n_tasks} no-op tasks "
          f"(median of {args.repeats}, seconds, process start to exit)")
    print(f"{'prefect mode':<14}{'forge cached':>14}{'bare flow':>12}{'ratio':>8}   goal <= 1.5")
    for mode, f, b, r in rows:
        print(f"{mode:<14}{f:>14.1f}{b:>12.1f}{r:>8.2f}")


if __name__ == "__main__":
    main()
