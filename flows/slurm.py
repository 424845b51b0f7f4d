"""A stage on Slurm is a batch job that outlives the orchestrator (``cluster.launcher: slurm``).

- Submit: the batch script (``flows/launchers.py`` ``slurm_script``: ``#SBATCH`` lines, ``srun``
  of one ``torchrun`` per node) is written into the stage's output dir and submitted held
  (``sbatch --parsable --hold``); the job id goes into ``slurm-jobs.json`` (written atomically), and
  only then is the job released. An orchestrator that dies between the two leaves a held job that
  the next start adopts (found by its script's path), never a job nobody knows about.
- Follow: ``scontrol show job`` every ``slurm.poll_s`` seconds (``sacct``, then ``sacct -c`` for
  a job that ``scontrol`` has forgotten: no slurmdbd is required), the job's output file
  ``slurm-<id>.out`` read every second into ``worker.log`` and the ``log`` callback with the same
  filter and ``--- time command`` header as a local worker (``flows/launch.py``).
- Re-attach: when the stage starts and its record's last job is still queued or running, forge
  follows that job ("re-attached to Slurm job N") instead of submitting another, so a restarted
  orchestrator never trains a stage twice. worker.log then repeats the job's output from its start.
- Stop: while a job is followed it is a live worker (``flows/live_workers.py``). ``stop(signum)``
  leaves ``slurm-<id>.cancel`` beside the output and sends the signal to the job's steps
  (``scancel --signal``): the worker finishes its step, checkpoints and exits, and the batch script,
  seeing the file, cancels its own job (state CANCELLED); ``kill()`` is a plain ``scancel``. A
  signal or an error in this process stops the job and waits for it (at most ``signal_lead_s``,
  the time a save is sized for; a second signal kills it). ``forge cancel RUN_ID`` does the same
  for a run whose orchestrator is gone (``flows/cancel.py``).
- Failure: a job that ends other than COMPLETED with exit 0 (FAILED, NODE_FAIL, OUT_OF_MEMORY, ...)
  raises ``StageFailed`` whose tail (failure.json) names the job id, state, exit code and Slurm's
  reason, after the end of the job's output.
- Chains: a stage longer than ``slurm.time`` runs as a chain of jobs. Each job's script watches its
  own end time and SIGTERMs the worker's steps ``signal_lead_s`` before it (printing
  ``DEADLINE_MARK``); the worker checkpoints and exits. A job that ended so (or TIMEOUT, or
  PREEMPTED) with a newer checkpoint than the stage had when it was submitted is followed by the
  next job, which resumes from it; without progress the stage fails with the reason. ``max_jobs``
  ends a runaway chain. Every job stays in the record.

Why a watch in the script and not ``sbatch --signal=TERM@lead``: slurmctld sends that signal from
its periodic time-limit check (every 30 s in 22.05, when ``warn_time + 30 s`` reaches the end), so
it comes up to 30 s early, and a job killed at the limit is found on the same 30 s tick. For a
600 s lead on a 48 h job that is noise; with the one-minute limit of the tests the worker could be
stopped before it trained a step. The end time is Slurm's own (``squeue -o %e``, which follows a
changed limit), re-read after every wait of at most 60 s, so the stop lands within a second of
``end - lead``. Slurm's TIMEOUT at the limit stays the backstop.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from flows.launchers import (CANCEL_SUFFIX, DEADLINE_MARK, SLURM_SCRIPT, StageFailed, WorkerLog,
                             check_available, prepare, slurm_command, slurm_output)
from flows.live_workers import live
from stages.layout import SLURM_JOBS, WORKER_LOG, newest_checkpoint

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE", "UNKNOWN"}
LIMITED = {"TIMEOUT", "PREEMPTED"}   # Slurm ended the job at its limit or for another job
READ_S = 1.0                         # the job's output is read this often


# --- the record: <out_dir>/slurm-jobs.json ----------------------------------------------------

def read_jobs(out_dir: Path) -> list[dict]:
    try:
        return list(json.loads((Path(out_dir) / SLURM_JOBS).read_text())["jobs"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def write_jobs(out_dir: Path, jobs: list[dict]) -> None:
    path = Path(out_dir) / SLURM_JOBS
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"jobs": jobs}, indent=2))
    tmp.replace(path)


# --- Slurm's word on a job --------------------------------------------------------------------

def slurm(*args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
    return out


def job_info(job_id: str) -> dict | None:
    """{state, exit_code ("N:S"), reason, command} of a job; None when Slurm does not know it."""
    shown = slurm("scontrol", "show", "job", "-o", str(job_id))
    if shown.returncode == 0 and "JobState=" in shown.stdout:
        fields = dict(re.findall(r"(\w+)=(\S*)", shown.stdout))
        return {"state": fields.get("JobState", "UNKNOWN"), "exit_code": fields.get("ExitCode", ""),
                "reason": fields.get("Reason", ""), "command": fields.get("Command", "")}
    # forgotten by slurmctld (MinJobAge): the accounting database, else the job completion log
    for extra in ([], ["-c"]):
        acct = slurm("sacct", *extra, "-j", str(job_id), "-X", "-n", "-P",
                     "-o", "JobID,State,ExitCode" + ("" if extra else ",Reason"))
        rows = [r.split("|") for r in acct.stdout.splitlines()
                if acct.returncode == 0 and r.split("|")[0] == str(job_id)]
        if rows:
            row = rows[-1] + [""] * 4
            return {"state": row[1].split()[0] if row[1] else "UNKNOWN", "exit_code": row[2],
                    "reason": row[3], "command": ""}
    return None


def exit_status(exit_code: str) -> int:
    """The shell's number for Slurm's "code:signal" (a job killed by signal S: 128 + S)."""
    code, _, sig = (exit_code or "0:0").partition(":")
    code_i, sig_i = int(code or 0), int(sig or 0)
    return code_i or (128 + sig_i if sig_i else 0)


def verdict(job: dict, progressed: bool, jobs: int, max_jobs: int) -> tuple[str, str]:
    """What follows a job that ended: ("done" | "next" | "stopped" | "failed", why)."""
    state, code = job.get("state", "UNKNOWN"), job.get("exit_code", "")
    head = f"Slurm job {job['job_id']} {state}, exit code {code or '?'}"
    if job.get("reason") and job["reason"] != "None":
        head += f", reason {job['reason']}"
    if state == "COMPLETED" and exit_status(code) == 0:
        return "done", head
    if job.get("stopped_by", "").startswith("forge"):
        return "stopped", f"{head}: stopped by {job['stopped_by']}"
    if state in LIMITED or job.get("stopped_by") == "time limit":
        if not progressed:
            return "failed", (f"{head}: stopped at its time limit without a new checkpoint; raise "
                              "cluster.slurm.time or lower cluster.slurm.signal_lead_s (one step "
                              "and one save must fit in the limit minus the lead)")
        if jobs >= max_jobs:
            return "failed", (f"{head}: the stage has taken {jobs} jobs, cluster.slurm.max_jobs; "
                              "raise it (or slurm.time) to let the chain go on")
        return "next", f"{head} at its time limit after a new checkpoint"
    return "failed", head


# --- one job as a live worker -----------------------------------------------------------------

class SlurmJob:
    """A followed batch job, registered in flows/live_workers.py while it is followed."""

    def __init__(self, name: str, job_id: str, out_dir: Path):
        self.name, self.job_id, self.out_dir = name, str(job_id), Path(out_dir)
        self.stopped = 0

    def stop(self, signum: int) -> None:
        self.stopped = self.stopped or signum
        request_stop(self.out_dir, self.job_id, signum)

    def kill(self) -> None:
        slurm("scancel", self.job_id)


def cancel_file(out_dir: Path, job_id: str) -> Path:
    return slurm_output(out_dir, job_id).with_suffix(CANCEL_SUFFIX)


def request_stop(out_dir: Path, job_id: str, signum: int = signal.SIGTERM) -> None:
    """Ask a job's worker to checkpoint and exit; the job then cancels itself (its script sees the
    cancel file). A job that has not started is cancelled at once."""
    name = signal.Signals(signum).name
    cancel_file(out_dir, job_id).write_text(json.dumps({"signal": name, "time": time.time(),
                                                        "pid": os.getpid()}))
    info = job_info(job_id)
    if info is None or info["state"] in ENDED:
        return
    # the worker's steps (N.0, N.1, ...; not N.batch, which scancel --signal skips)
    steps = slurm("squeue", "-h", "-s", "-j", job_id, "-o", "%i").stdout.split()
    if not any(re.fullmatch(rf"{job_id}\.\d+", step) for step in steps) or slurm(
            "scancel", f"--signal={name.removeprefix('SIG')}", job_id).returncode != 0:
        slurm("scancel", job_id)   # no worker running yet: nothing to checkpoint


class _Output:
    """A job's output file, read from where the last read stopped; whole lines only."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, ""
        self.deadline_hit = False

    def lines(self, final: bool = False) -> list[str]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return []
        self.offset += len(data)
        text = self.partial + data.decode(errors="replace")
        lines = text.split("\n")
        self.partial = "" if final else lines.pop()
        lines = [line for line in lines if line or not final]
        self.deadline_hit = self.deadline_hit or any(DEADLINE_MARK in line for line in lines)
        return lines


def _follow(job_id: str, output: _Output, show: Callable[[str], None], poll_s: float,
            until: float | None = None) -> dict | None:
    """Stream the job's output until Slurm says it ended (its info), or None at ``until``."""
    next_look, last_state = 0.0, ""
    while True:
        for line in output.lines():
            show(line)
        now = time.monotonic()
        if now >= next_look:
            info = job_info(job_id) or {"state": "UNKNOWN", "exit_code": "", "reason":
                                        "Slurm no longer knows the job", "command": ""}
            if info["state"] in ENDED:
                for line in output.lines(final=True):
                    show(line)
                return info
            if info["state"] != last_state and info["state"] != "RUNNING":
                why = f" ({info['reason']})" if info["reason"] not in ("", "None") else ""
                show(f"[forge] Slurm job {job_id} {info['state']}{why}")
            last_state = info["state"]
            next_look = now + poll_s
        if until is not None and now >= until:
            return None
        time.sleep(min(READ_S, poll_s))


def _live(out_dir: Path, jobs: list[dict], script: Path) -> dict | None:
    """The stage's job still queued or running, if any: the record's last one, or one whose
    record a crash prevented (same script). Jobs that ended unseen get their final state."""
    for job in jobs:
        if "state" not in job:
            info = job_info(job["job_id"])
            if info is not None and info["state"] not in ENDED:
                return job
            _finish(out_dir, jobs, job, info or {"state": "UNKNOWN"}, None)
    queued = slurm("squeue", "-h", "-o", "%i|%o", "--name", f"forge-{out_dir.name}")
    known = {j["job_id"] for j in jobs}
    for row in queued.stdout.splitlines():
        job_id, _, command = row.partition("|")
        if command == str(script) and job_id not in known:
            job = {"job_id": job_id, "submitted": time.time(), "adopted": True,
                   "checkpoint_at_submit": _checkpoint(out_dir)}
            jobs.append(job)
            write_jobs(out_dir, jobs)
            return job
    return None


def _checkpoint(out_dir: Path) -> str | None:
    ck = newest_checkpoint(out_dir)
    return ck.name if ck else None


def _finish(out_dir: Path, jobs: list[dict], job: dict, info: dict, output: _Output | None) -> None:
    """Write a job's end into the record: state, exit code, reason, and who stopped it."""
    if output is None:   # ended while nobody followed it: read what it printed
        output = _Output(slurm_output(out_dir, job["job_id"]))
        output.lines(final=True)
    stopped_by = ""
    with contextlib.suppress(OSError, ValueError):
        stopped_by = "forge " + json.loads(cancel_file(out_dir, job["job_id"]).read_text())["signal"]
    if not stopped_by and output.deadline_hit:
        stopped_by = "time limit"
    job.update(state=info.get("state", "UNKNOWN"), exit_code=info.get("exit_code", ""),
               reason=info.get("reason", ""), ended=time.time(), stopped_by=stopped_by,
               checkpoint_at_end=_checkpoint(out_dir))
    write_jobs(out_dir, jobs)


def _submit(out_dir: Path, jobs: list[dict], cmd: list[str], env: dict) -> dict:
    """sbatch --hold, record, release: no moment when a job runs that the record lacks."""
    done = subprocess.run([cmd[0], "--hold", *cmd[1:]], capture_output=True, text=True, env=env,
                          timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"sbatch exited {done.returncode}: {done.stderr.strip()}")
    job = {"job_id": done.stdout.strip().split(";")[0], "submitted": time.time(),
           "checkpoint_at_submit": _checkpoint(out_dir)}
    jobs.append(job)
    write_jobs(out_dir, jobs)
    slurm("scontrol", "release", job["job_id"], check=True)
    return job


def run_job(stage: str, launcher: str, cluster: Any, spec: dict, out_dir: Path,
            log: Callable[[str], None], env: dict[str, str],
            stop_requested: Callable[[], int | None] = lambda: None) -> int:
    """Run one stage as Slurm batch jobs (re-attaching to a live one) until it completes (0), or
    until forge stopped it (the signal; the job checkpointed and ended CANCELLED); raise
    StageFailed with the job's state and output tail otherwise. ``env``: sbatch's environment
    (the job inherits it); ``stop_requested``: a stop asked for between two jobs of a chain
    (flows/launch.py)."""
    check_available(cluster)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path, log_path = out_dir / "spec.json", out_dir / WORKER_LOG
    script = out_dir / SLURM_SCRIPT
    s = cluster.slurm
    jobs = read_jobs(out_dir)
    job = _live(out_dir, jobs, script)
    with open(log_path, "a") as logfile:
        sink = WorkerLog(logfile, log)
        show, header, tail = sink.show, sink.header, sink.tail

        if job is not None:
            header(f"re-attached to Slurm job {job['job_id']} ({script})")
            show(f"[forge] {stage}: re-attached to Slurm job {job['job_id']}; not submitting "
                 "another")
            info = job_info(job["job_id"])
            if info and info["state"] == "PENDING" and "Held" in info["reason"]:
                slurm("scontrol", "release", job["job_id"])
        while True:
            if job is None:
                spec_path.write_text(json.dumps(spec, indent=2, default=str))
                prepare(launcher, cluster, spec_path)
                job = _submit(out_dir, jobs, slurm_command(launcher, cluster, spec_path), env)
                header(f"sbatch --parsable {script} -> Slurm job {job['job_id']}")
                show(f"[forge] {stage}: submitted Slurm job {job['job_id']} "
                     f"(output {slurm_output(out_dir, job['job_id'])})")
            output = _Output(slurm_output(out_dir, job["job_id"]))
            handle = SlurmJob(stage, job["job_id"], out_dir)
            with live(handle):
                if signum := stop_requested():   # asked while it was being submitted
                    handle.stop(signum)
                try:
                    info = _follow(job["job_id"], output, show, s.poll_s)
                except BaseException:
                    # this process is going away: the job checkpoints and stops, not trains on
                    _stop_and_wait(handle, output, show, s.poll_s, s.signal_lead_s)
                    _finish(out_dir, jobs, job, job_info(job["job_id"]) or {}, output)
                    raise
            _finish(out_dir, jobs, job, info, output)
            progressed = job["checkpoint_at_end"] not in (None, job.get("checkpoint_at_submit"))
            what, why = verdict(job, progressed, len(jobs), s.max_jobs)
            if what == "done":
                return 0
            if what == "stopped" and handle.stopped:
                show(f"[forge] {stage}: {why}; the stage resumes from its newest checkpoint when "
                     "it runs again")
                return handle.stopped
            if what == "next" and (signum := stop_requested()):
                return signum   # a stop came while no job was followed: submit nothing new
            if what == "next":
                show(f"[forge] {stage}: {why}; submitting the next job, which resumes from "
                     f"checkpoints/{job['checkpoint_at_end']}")
                job = None
                continue
            lines = [*tail, f"[forge] {why}; output: {slurm_output(out_dir, job['job_id'])}"]
            code = exit_status(job.get("exit_code", "")) or 1
            raise StageFailed(stage, code, lines, log_path)


def _stop_and_wait(handle: SlurmJob, output: _Output, show: Callable[[str], None], poll_s: float,
                   wait_s: float) -> None:
    """Stop the job (unless the registry already asked it) and follow it to its end; kill it
    after ``wait_s`` or on a second signal."""
    try:
        if not handle.stopped:
            handle.stop(signal.SIGTERM)
        if _follow(handle.job_id, output, show, min(poll_s, 2.0),
                   until=time.monotonic() + wait_s) is None:
            show(f"[forge] Slurm job {handle.job_id} still running {wait_s:g} s after the stop; "
                 "scancel")
            handle.kill()
    except BaseException:
        handle.kill()
        raise
