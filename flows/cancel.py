"""``forge cancel RUN_ID``: stop a run's work, with or without its orchestrator.

A live orchestrator gets SIGTERM and does the rest itself (its workers checkpoint; the run is
recorded cancelled). Without one (killed, or its host gone) the run's Slurm jobs, which outlive
it, are asked here to checkpoint and stop (``flows/slurm.py`` ``request_stop``).
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

from flows.runs import alive, write_status
from flows.slurm import ENDED, job_info, read_jobs, request_stop


def cancel_run(run: Any, say: Callable[[str], None] = print, wait_s: float = 600) -> int:
    """Cancel a run (a flows/runs.py RunRecord): a live orchestrator gets SIGTERM (it stops its
    jobs and records the run cancelled); without one, each stage's live Slurm job is stopped
    here (checkpoint, then CANCELLED) and the run recorded cancelled. Waits up to ``wait_s`` for
    the jobs to end; 0 when all did."""
    pid = run.status.get("pid")
    orchestrator = run.status.get("status") == "running" and alive(pid)
    live_jobs = []
    for node in run.dag().nodes.values():
        jobs = read_jobs(node.out_dir)
        if jobs and "state" not in jobs[-1]:
            info = job_info(jobs[-1]["job_id"])
            if info is not None and info["state"] not in ENDED:
                live_jobs.append((node.out_dir, jobs[-1]["job_id"]))
    if orchestrator:
        os.kill(int(pid), signal.SIGTERM)
        say(f"forge cancel: sent SIGTERM to the orchestrator of run {run.run_id} (pid {pid}); it "
            "stops its jobs and records the run as cancelled")
    else:
        for out_dir, job_id in live_jobs:
            request_stop(out_dir, job_id)
            say(f"forge cancel: Slurm job {job_id} ({out_dir.name}) asked to checkpoint and stop")
        if run.status.get("status") not in ("completed", "failed"):
            write_status(run.path, "cancelled", by="forge cancel")
    deadline = time.monotonic() + wait_s
    left = live_jobs
    while left and time.monotonic() < deadline:
        time.sleep(1.0)
        left = [(d, j) for d, j in left if (job_info(j) or {"state": "UNKNOWN"})["state"] not in ENDED]
    for out_dir, job_id in live_jobs:
        info = job_info(job_id) or {"state": "UNKNOWN"}
        say(f"  Slurm job {job_id} ({out_dir.name}): {info['state']}")
    if orchestrator:
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
    if not live_jobs and not orchestrator:
        say(f"forge cancel: run {run.run_id} has no live orchestrator and no live Slurm job")
    return 1 if left else 0
