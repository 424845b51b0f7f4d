"""Run records name their store absolutely, and a moved store still resolves: `forge runs` and
`forge resume` typed in another directory (or after `mv` of the store) find the finished stages
instead of planning everything again in a new ./forge-store."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.support.helpers import ROOT, SMALL


def forge(*args, cwd, store=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("FORGE_STORE", None)
    if store is not None:
        env["FORGE_STORE"] = str(store)
    out = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"forge {args[0]} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_runs_and_resume_from_another_directory_and_a_moved_store(tmp_path):
    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir(), other.mkdir()
    forge("run", *SMALL, "--only", "data", cwd=first)        # the default store: ./forge-store
    store = first / "forge-store"
    run_id = next((store / "runs").glob("*.status.json")).name.split(".")[0]

    listing = forge("runs", "--store", str(store), cwd=other)
    assert "1/1 complete" in listing, listing
    out = forge("resume", run_id, "--store", str(store), cwd=other)
    assert "nothing to resume: every stage of that run is complete" in out, out
    assert not (other / "forge-store").exists()               # nothing planned anew in the cwd

    moved = tmp_path / "moved-store"
    shutil.move(str(store), moved)
    assert "1/1 complete" in forge("runs", cwd=other, store=moved)
    out = forge("resume", run_id, cwd=other, store=moved)
    assert "nothing to resume" in out and f"data-" in out, out
    assert str(moved) in out and str(store) not in out, out   # the plan's store is the moved one
