"""Stages as Slurm batch jobs, against a real single-node Slurm started by the tests
(tests/support/slurm_cluster.py: munged, slurmctld, slurmd on localhost, 2 CPUs).

The tiny pipeline's pretrain-1 runs as `forge run ... cluster=cpu cluster.launcher=slurm` with the
venv's Python on the node; its parents (data, tokenizer, tokenize) are made once, locally (the
launcher is not an identity field: the same keys). One Prefect server serves every forge run.

- re-attach: forge is SIGKILLed while its job trains; `forge resume` follows the same job to the
  end: one job in slurm-jobs.json, one artifact, "re-attached" in worker.log;
- chain: under a one-minute time limit the stage completes as >= 2 jobs, each but the last
  stopped by its deadline watch after a checkpoint, and ends bit-identical (weights, AdamW moments,
  RNG, curve) to one uninterrupted worker run beside it;
- failure: a job whose worker cannot start ends FAILED; failure.json names the job, FAILED and
  the exit code;
- cancel: `forge cancel RUN_ID` stops the live orchestrator, whose job checkpoints and ends
  CANCELLED (sacct); nothing is left in squeue, the run is cancelled, and `forge resume` continues
  from that checkpoint in a second job;
- cancel without an orchestrator: forge is SIGKILLed, `forge cancel RUN_ID` stops its job itself
  (a checkpoint, then CANCELLED) and records the run cancelled;
- adoption: forge is SIGKILLed between `sbatch --hold` and writing the job into slurm-jobs.json
  (an `sbatch` first on PATH kills its caller once the real one has answered); `forge resume`
  finds the held job by its script, records it as adopted, releases it and completes with it:
  one job, never a second.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.helpers import ROOT, SMALL, forge, start_prefect_server, worker_cmd, worker_env
from tests.support.slurm_cluster import slurm_cluster, why_not

pytestmark = pytest.mark.skipif(bool(why_not()), reason=why_not() or "ok")

TINY = ["pipeline=granite-4.1-tiny", *SMALL]
STEP_TOKENS = 16 * 128   # the tiny phases' global batch x sequence length
SLURM = ["cluster=cpu", "cluster.launcher=slurm", f"cluster.slurm.python={sys.executable}",
         "cluster.slurm.poll_s=1"]


@pytest.fixture(scope="module")
def slurm():
    with slurm_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect")
    server, url = start_prefect_server(home)
    try:
        yield {"PREFECT_API_URL": url}
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def store(tmp_path_factory, env, slurm):
    """A store whose data, tokenizer and tokenize stages are complete (made locally)."""
    store = tmp_path_factory.mktemp("store")
    store.chmod(0o755)
    forge("run", *TINY, "cluster=cpu", "--only", "tokenize", store=store, env=env)
    return store


def pretrain(steps: int, *extra: str) -> list[str]:
    return ["run", *TINY, *SLURM, f"stages.pretrain-1.tokens={steps * STEP_TOKENS}", *extra,
            "--only", "pretrain-1"]


def start(args: list[str], store: Path, env: dict) -> subprocess.Popen:
    """forge in the background, its output in a file (a pipe nobody reads would fill up)."""
    full = dict(os.environ, FORGE_STORE=str(store), OMP_NUM_THREADS="1", **env)
    log = open(store / f"forge-{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=full,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """Wait for forge; its output."""
    proc.wait(timeout=timeout)
    proc.log.seek(0)
    return proc.log.read()


def stage_dir(store: Path, tokens: int) -> Path:
    """The pretrain-1 dir whose spec asks for ``tokens`` (each test has its own key)."""
    for spec in store.glob("pretrain-1-*/spec.json"):
        if json.loads(spec.read_text())["config"]["tokens"] == tokens:
            return spec.parent
    raise LookupError(tokens)


def wait_for(what, timeout: float = 120, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while True:
        with_value = what()
        if with_value:
            return with_value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"forge ended ({proc.returncode}) first:\n{finish(proc, 1)[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what.__doc__ or what}"
        time.sleep(0.2)


def jobs(out: Path) -> list[dict]:
    return json.loads((out / "slurm-jobs.json").read_text())["jobs"]


def run_id(out: str) -> str:
    return next(line.split()[2] for line in out.splitlines() if line.startswith("run id "))


def first_checkpoint_running(store: Path, tokens: int):
    """The stage dir once its job runs and has written a checkpoint."""
    try:
        out = stage_dir(store, tokens)
    except LookupError:
        return None
    if (out / "slurm-jobs.json").exists() and list(out.glob("checkpoints/iter_*/done")):
        return out
    return None


def test_a_restarted_orchestrator_reattaches_to_its_running_job(store, env, slurm):
    steps = 200
    proc = start(pretrain(steps, "stages.pretrain-1.checkpoint_interval=20"), store, env)
    out = wait_for(lambda: first_checkpoint_running(store, steps * STEP_TOKENS), proc=proc)
    proc.kill()   # SIGKILL: no chance to stop the job
    text = finish(proc, 30)
    job = jobs(out)[0]["job_id"]
    assert slurm.queue() == f"{job} RUNNING"   # the job outlives its orchestrator

    done = forge("resume", run_id(text), store=store, env=env)
    assert f"re-attached to Slurm job {job}" in done.stdout + done.stderr
    record = jobs(out)
    assert [(j["job_id"], j["state"], j["exit_code"]) for j in record] == [(job, "COMPLETED", "0:0")]
    assert (out / "artifact.json").exists()
    assert [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            ] == list(range(1, steps + 1))   # each step trained once
    assert "re-attached to Slurm job" in (out / "worker.log").read_text()
    assert slurm.queue() == ""


def test_a_stage_longer_than_the_time_limit_runs_as_a_chain_of_jobs(store, env, slurm, tmp_path):
    # sized so that even a fast machine (20 steps/s) cannot finish in one job's 30 s
    steps = 900
    proc = start(pretrain(steps, "stages.pretrain-1.checkpoint_interval=100",
                          "cluster.slurm.time=00:01:00", "cluster.slurm.signal_lead_s=30"), store, env)
    out = wait_for(lambda: _stage(store, steps * STEP_TOKENS), proc=proc)
    # the reference: the same spec, one uninterrupted worker in a dir of its own, meanwhile
    ref = tmp_path / out.name
    ref.mkdir()
    spec = json.loads((out / "spec.json").read_text())
    (ref / "spec.json").write_text(json.dumps(dict(spec, out_dir=str(ref))))
    reference = subprocess.run(worker_cmd(ref / "spec.json"), cwd=ROOT, env=worker_env(),
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    text = finish(proc, 400)
    assert proc.returncode == 0, text[-4000:]
    record = jobs(out)
    assert len(record) >= 2, record
    assert [j["state"] for j in record][-1] == "COMPLETED"
    assert all(j["stopped_by"] == "time limit" for j in record[:-1]), record
    assert "submitting the next job" in (out / "worker.log").read_text()
    from tests.support.final_state import differences, final_state
    assert differences(final_state(out), final_state(ref)) == []


def _stage(store: Path, tokens: int) -> Path | None:
    try:
        return stage_dir(store, tokens)
    except LookupError:
        return None


def test_a_failed_job_leaves_its_id_state_and_exit_code_in_failure_json(store, env, slurm):
    done = forge(*pretrain(10, "cluster.slurm.python=/bin/false"), store=store, env=env,
                 check=False)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    out = stage_dir(store, 10 * STEP_TOKENS)
    job = jobs(out)[-1]
    assert (job["state"], job["exit_code"]) == ("FAILED", "1:0")
    failure = json.loads((out / "failure.json").read_text())
    assert failure["exit_code"] == 1
    assert f"Slurm job {job['job_id']} FAILED, exit code 1:0" in "\n".join(failure["tail"])


def test_cancel_stops_the_job_at_a_checkpoint_and_resume_continues(store, env, slurm):
    steps = 160
    proc = start(pretrain(steps, "stages.pretrain-1.checkpoint_interval=20"), store, env)
    out = wait_for(lambda: first_checkpoint_running(store, steps * STEP_TOKENS), proc=proc)
    rid = next(p.stem for p in (store / "runs").glob("*.json")
               if not p.name.endswith((".status.json", ".result.json"))
               and json.loads((p.with_suffix(".status.json")).read_text()).get("pid") == proc.pid)
    cancelled = forge("cancel", rid, store=store, env=env)
    text = finish(proc, 120)
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    job = jobs(out)[0]
    assert (job["state"], job["stopped_by"]) == ("CANCELLED", "forge SIGTERM"), (job, cancelled.stdout)
    acct = slurm.run("sacct", "-c", "-j", job["job_id"], "-n", "-P", "-o", "JobID,State")
    assert acct.strip().split("|")[1].startswith("CANCELLED"), acct
    assert slurm.queue() == ""
    status = json.loads((store / "runs" / f"{rid}.status.json").read_text())
    assert status["status"] == "cancelled"
    stopped_at = job["checkpoint_at_end"]
    assert stopped_at and "stopped by SIGTERM after step" in (out / "worker.log").read_text()

    forge("resume", rid, store=store, env=env)
    record = jobs(out)
    assert [j["state"] for j in record] == ["CANCELLED", "COMPLETED"]
    assert record[1]["checkpoint_at_submit"] == stopped_at
    assert (out / "artifact.json").exists()
    shown = forge("runs", rid, store=store, env=env).stdout
    assert f"complete; Slurm jobs {record[0]['job_id']} CANCELLED, {record[1]['job_id']} COMPLETED" \
        in shown, shown


def test_cancel_without_an_orchestrator_stops_the_jobs_itself(store, env, slurm):
    """forge is gone (SIGKILL): `forge cancel` stops the run's job at a checkpoint (CANCELLED)
    and records the run cancelled."""
    steps = 150
    proc = start(pretrain(steps, "stages.pretrain-1.checkpoint_interval=10"), store, env)
    out = wait_for(lambda: first_checkpoint_running(store, steps * STEP_TOKENS), proc=proc)
    proc.kill()
    rid = run_id(finish(proc, 30))
    done = forge("cancel", rid, store=store, env=env)
    job = jobs(out)[0]["job_id"]
    assert f"Slurm job {job} (" in done.stdout and "asked to checkpoint and stop" in done.stdout
    assert f"Slurm job {job} ({out.name}): CANCELLED" in done.stdout
    assert slurm.queue() == ""
    assert "stopped by SIGTERM after step" in (out / f"slurm-{job}.out").read_text()
    status = json.loads((store / "runs" / f"{rid}.status.json").read_text())
    assert status["status"] == "cancelled"


def test_a_held_job_that_forge_did_not_record_is_adopted_not_submitted_again(store, env, slurm,
                                                                             tmp_path):
    import shutil
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "sbatch").write_text(
        "#!/bin/sh\n"
        f"out=$({shutil.which('sbatch')} \"$@\") || exit $?\n"
        "kill -9 $PPID   # forge dies before it can record the job\n"
        "sleep 5\n"
        "echo \"$out\"\n")
    (shim / "sbatch").chmod(0o755)
    steps = 20
    crashing = dict(env, PATH=f"{shim}:{os.environ['PATH']}")
    proc = start(pretrain(steps), store, crashing)
    text = finish(proc, 120)
    assert proc.returncode == -signal.SIGKILL, text[-3000:]
    out = stage_dir(store, steps * STEP_TOKENS)
    assert not (out / "slurm-jobs.json").exists() or jobs(out) == []
    held = slurm.queue()
    assert held.endswith(" PENDING"), held    # held: it never ran unrecorded
    job = held.split()[0]

    done = forge("resume", run_id(text), store=store, env=env)
    assert f"re-attached to Slurm job {job}" in done.stdout + done.stderr
    record = jobs(out)
    assert [(j["job_id"], j.get("adopted"), j["state"]) for j in record] == [(job, True, "COMPLETED")]
    assert [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            ] == list(range(1, steps + 1))
    assert slurm.queue() == ""
