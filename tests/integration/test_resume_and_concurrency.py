"""SIGKILL in the middle of a phase resumes bit-exactly; two launches at once train each stage once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, SMALL, executed, forge, last_result

pytestmark = pytest.mark.slow
UP_TO_P1 = "data|tokenizer|tokenize|pretrain-1"
LONGER = SMALL + ["stages.pretrain-1.tokens=81920"]   # 40 steps, checkpoints every 5


def final_state(store: Path) -> dict:
    from stages.training.checkpoint import load_tensors
    rec = last_result(store)["stages"]["pretrain-1"]
    return load_tensors(Path(rec["out_dir"]) / rec["outputs"]["checkpoint"])


def test_sigkill_mid_phase_then_rerun_resumes_bit_exact(prefect_server, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    forge("run", *LONGER, "--only", UP_TO_P1, store=reference)

    env = dict(os.environ, FORGE_STORE=str(killed), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *LONGER, "--only", UP_TO_P1],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    pid_file = None
    while time.time() < deadline:   # wait for a complete mid-phase checkpoint
        dirs = list(killed.glob("pretrain-1-*/checkpoints/*/done"))
        if dirs and not list(killed.glob("pretrain-1-*/artifact.json")):
            pid_file = next(killed.glob("pretrain-1-*/worker.pid"))
            break
        time.sleep(0.2)
    assert pid_file is not None, "no mid-phase checkpoint appeared"
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output[-3000:]
    assert "pretrain-1 failed" in output
    assert not list(killed.glob("pretrain-1-*/artifact.json"))

    out = forge("run", *LONGER, "--only", UP_TO_P1, store=killed)
    assert "resume" in out.stdout
    assert executed(last_result(killed)) == {"pretrain-1"}
    log = next(killed.glob("pretrain-1-*/worker.log")).read_text()
    assert "resuming from" in log
    ref, got = final_state(reference), final_state(killed)
    assert ref.keys() == got.keys() and ref
    import torch
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_two_launches_at_once_train_each_stage_once(prefect_server, tmp_path):
    store = tmp_path / "store"
    env = dict(os.environ, FORGE_STORE=str(store), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "flows.cli", "run", *SMALL, "--only", UP_TO_P1]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    for stage in ("data", "tokenizer", "tokenize", "pretrain-1"):
        (out_dir,) = store.glob(f"{stage}-*")
        launches = (out_dir / "worker.log").read_text().count("--- ")
        assert launches == 1, (stage, launches)
    results = [p for p in (store / "runs").glob("*.result.json")]
    assert len(results) == 2
    import json
    recs = [json.loads(p.read_text())["stages"] for p in results]
    assert {n: r["key"] for n, r in recs[0].items()} == {n: r["key"] for n, r in recs[1].items()}
    assert sum(len(executed({"stages": r})) for r in recs) == 4   # each stage ran in one of them
