"""SIGKILL in the middle of a phase, then `forge resume RUN_ID` (or the stage's retry policy), resumes
bit-exactly: the final checkpoint's weights, AdamW moments, train state and RNG state and every
line of metrics.jsonl equal an uninterrupted run's (``tests/support/final_state.py``). Two launches
at once train each stage once: the second waits on the stage lock until the first is done."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.helpers import ROOT, SMALL, executed, forge, last_result
from tests.support.final_state import FinalState, differences, final_state

pytestmark = pytest.mark.slow
UP_TO_P1 = "data|tokenizer|tokenize|pretrain-1"
LONGER = SMALL + ["stages.pretrain-1.tokens=81920"]   # 40 steps, checkpoints every 5


def pretrain_1(store: Path) -> FinalState:
    return final_state(Path(last_result(store)["stages"]["pretrain-1"]["out_dir"]))


@pytest.fixture(scope="module")
def reference(prefect_server, tmp_path_factory) -> FinalState:
    """The final checkpoint (tensors, train state, RNG) and the curve of an uninterrupted run."""
    store = tmp_path_factory.mktemp("reference")
    forge("run", *LONGER, "--only", UP_TO_P1, store=store)
    ref = pretrain_1(store)
    # what the comparison rests on: the whole phase, every step once, a full state to compare
    assert [r["step"] for r in ref.curve] == list(range(1, 41)), ref.curve
    assert ref.train_state["step"] == ref.train_state["optimizer_steps"] == 40, ref.train_state
    assert ref.train_state["consumed_samples"] > 0 and ref.train_state["tokens_phase"] > 0
    assert list(ref.rng) == ["rank_00000.pt"] and ref.rng["rank_00000.pt"].keys() >= {
        "python", "numpy", "torch"}
    return ref


def assert_bit_exact(reference: FinalState, store: Path) -> None:
    diffs = differences(pretrain_1(store), reference)
    assert not diffs, "\n".join(diffs)


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


class Stamped:
    """A process's output, line by line, each with the time it arrived here (a reader thread)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []   # lines: (time.time() on arrival, line)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def finish(self, timeout: float) -> str:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._thread.join(30)
        return "\n".join(line for _, line in self.lines)

    def first(self, text: str, after: float = 0.0) -> float | None:
        """When the first line containing ``text`` arrived, ``after`` or later (None: none did)."""
        return next((t for t, line in self.lines if t >= after and text in line), None)


STAGES = ("data", "tokenizer", "tokenize", "pretrain-1")


def test_two_launches_at_once_train_each_stage_once(prefect_server, tmp_path):
    store = tmp_path / "store"
    env = dict(os.environ, FORGE_STORE=str(store), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "flows.cli", "run", *SMALL, "--only", UP_TO_P1]
    launches = [Stamped(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)) for _ in range(2)]
    outs = [launch.finish(timeout=600) for launch in launches]
    assert [launch.proc.returncode for launch in launches] == [0, 0], "\n".join(o[-2000:] for o in outs)
    dirs = {}
    for stage in STAGES:
        (dirs[stage],) = store.glob(f"{stage}-*")
        launched = (dirs[stage] / "worker.log").read_text().count("--- ")
        assert launched == 1, (stage, launched)
    results = [p for p in (store / "runs").glob("*.result.json")]
    assert len(results) == 2
    recs = [json.loads(p.read_text())["stages"] for p in results]
    assert {n: r["key"] for n, r in recs[0].items()} == {n: r["key"] for n, r in recs[1].items()}
    assert sum(len(executed({"stages": r})) for r in recs) == 4   # each stage ran in one of them

    # The stage lock at work: a launch that found a stage taken said so, waited, and went on only
    # once the other launch had finished it (its artifact.json written): it never started it.
    waits = []
    for i, launch in enumerate(launches):
        other = launches[1 - i]
        for stage in STAGES:
            waited = launch.first(f"waiting: another forge run is working on {dirs[stage].name}")
            if waited is None:
                continue
            went_on = launch.first(f"{stage}: cached (artifact.json", after=waited)  # in the lock
            done = (dirs[stage] / "artifact.json").stat().st_mtime
            assert other.first(f"{stage}: starting ") is not None, (stage, outs[1 - i][-3000:])
            assert launch.first(f"{stage}: starting ") is None, (stage, outs[i][-3000:])
            assert went_on is not None, (stage, outs[i][-3000:])
            assert went_on >= done, f"launch {i} went on with {stage} {done - went_on:.3f}s early"
            waits.append(f"launch {i} waited on {stage} {went_on - waited:.1f}s "
                         f"({done - waited:+.1f}s till its artifact)")
    print("; ".join(waits))
    assert waits, "neither launch waited on a stage lock:\n" + "\n".join(o[-3000:] for o in outs)
