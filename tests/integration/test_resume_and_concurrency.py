"""SIGKILL in the middle of a phase, then `forge resume RUN_ID`, resumes bit-exactly; two launches at
once train each stage once."""
from __future__ import annotations

import os
import re
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


@pytest.fixture(scope="module")
def reference(prefect_server, tmp_path_factory) -> dict:
    """The final weights and moments of an uninterrupted run."""
    store = tmp_path_factory.mktemp("reference")
    forge("run", *LONGER, "--only", UP_TO_P1, store=store)
    return final_state(store)


def assert_bit_exact(reference: dict, store: Path) -> None:
    import torch
    got = final_state(store)
    assert reference.keys() == got.keys() and reference
    for name in reference:
        assert torch.equal(reference[name], got[name]), name


def run_and_kill_worker_once(store: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`forge run`, SIGKILL of the pretrain-1 worker after its first mid-phase checkpoint."""
    env = dict(os.environ, FORGE_STORE=str(store), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *LONGER, *overrides,
                             "--only", UP_TO_P1], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    pid_file = None
    while time.time() < deadline:   # wait for a complete mid-phase checkpoint
        dirs = list(store.glob("pretrain-1-*/checkpoints/*/done"))
        if dirs and not list(store.glob("pretrain-1-*/artifact.json")):
            pid_file = next(store.glob("pretrain-1-*/worker.pid"))
            break
        time.sleep(0.2)
    assert pid_file is not None, "no mid-phase checkpoint appeared"
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    output, _ = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")


def test_sigkill_mid_phase_then_resume_by_run_id_is_bit_exact(reference, tmp_path):
    killed = tmp_path / "killed"
    out = run_and_kill_worker_once(killed)
    assert out.returncode == 1, out.stdout[-3000:]
    assert "pretrain-1 failed" in out.stdout
    assert not list(killed.glob("pretrain-1-*/artifact.json"))

    run_id = re.search(r"run id (\S+)", out.stdout).group(1)
    listed = forge("runs", store=killed).stdout
    assert re.search(rf"{run_id} .* failed +3/4 complete, pretrain-1 failed \(exit -?\d+\)", listed), listed
    shown = forge("runs", run_id[:15], store=killed).stdout
    assert re.search(r"pretrain-1 +failed \(exit -?\d+\), resumes from checkpoints/iter_", shown), shown

    # `forge resume` reads the run's stored config, not conf/: a conf dir that is gone changes nothing
    out = forge("resume", run_id, store=killed, env={"FORGE_CONF_DIR": str(tmp_path / "no-conf")})
    assert f"resuming run {run_id}" in out.stdout and "resume" in out.stdout
    assert executed(last_result(killed)) == {"pretrain-1"}
    listed = forge("runs", store=killed).stdout
    assert re.search(r"completed +4/4 complete", listed), listed
    log = next(killed.glob("pretrain-1-*/worker.log")).read_text()
    assert "resuming from" in log
    assert_bit_exact(reference, killed)


def test_a_killed_worker_is_retried_per_the_stage_policy_and_resumes(reference, tmp_path):
    store = tmp_path / "retried"
    out = run_and_kill_worker_once(store, "stages.pretrain-1.retry={retries: 1, delay_s: 0}")
    assert out.returncode == 0, out.stdout[-3000:]
    # the failure is reported with the stage, the exit code and the worker log's tail, then retried
    assert re.search(r"stage pretrain-1 failed: worker exited with code -?\d+; last lines of", out.stdout)
    assert "pretrain-1: attempt 2, resuming what the failed one left" in out.stdout
    log = next(store.glob("pretrain-1-*/worker.log")).read_text()
    assert log.count("--- ") == 2 and "resuming from" in log
    assert not list(store.glob("pretrain-1-*/failure.json"))
    assert_bit_exact(reference, store)


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
