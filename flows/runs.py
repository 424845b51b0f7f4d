"""Pipeline runs, as recorded in the store: list them, show each stage's state, resume one.

Every `forge run` writes ``<store>/runs/<RUN_ID>.json`` before Prefect starts: the overrides, the
``--only`` selection and the whole resolved config. ``<RUN_ID>.status.json`` follows the run
(running -> completed / failed / cancelled). A stage's state comes from its output dir
(``artifact.json``, ``failure.json``, checkpoints), never from Prefect's database, so the list is
right after Prefect's database is lost. `forge resume RUN_ID` re-runs a run from its stored resolved
config (not from today's conf/): finished stages are cached, unfinished ones resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

from flows.config import typed
from flows.dag import Dag, build
from flows.failures import last_failure
from flows.plan import complete, make_plan, newest_checkpoint
from stages.layout import SLURM_JOBS
from stages.schema import ConfigError

RUNS = "runs"


def runs_dir(store: Path) -> Path:
    return Path(store) / RUNS


def default_store() -> Path:
    """The store `forge run` uses without overrides (conf/config.yaml: $FORGE_STORE or ./forge-store)."""
    return Path(os.environ.get("FORGE_STORE") or "forge-store").expanduser().resolve()


def write_status(run_file: Path, status: str, **extra) -> None:
    path = run_file.with_suffix(".status.json")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"status": status, "time": time.time(), "pid": os.getpid(), **extra},
                              indent=2, default=str))
    tmp.replace(path)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    run_id: str
    path: Path
    spec: dict
    status: dict

    @property
    def state(self) -> str:
        state = self.status.get("status", "unknown")
        if state == "running" and not alive(self.status.get("pid")):
            return "died"       # the orchestrator was killed before it could say so
        return state

    @property
    def started(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.path.stat().st_mtime))

    def dag(self) -> Dag:
        return run_dag(self.path, self.spec)


def run_dag(run_file: Path, spec: dict) -> Dag:
    """The DAG of a stored run, in the store that holds its run file: the store may have moved
    since, and ``forge resume`` may be typed in any directory."""
    store = Path(run_file).resolve().parent.parent
    resolved = dict(spec["resolved"], store=str(store))
    return build(typed(resolved, tuple(spec.get("overrides", ()))))


def alive(pid) -> bool:
    """Whether process ``pid`` lives (a zombie does not: it has exited, unreaped)."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    return True


def list_runs(store: Path) -> list[RunRecord]:
    """Newest first."""
    out = []
    for path in runs_dir(store).glob("*.json"):
        if path.name.endswith((".result.json", ".status.json")):
            continue
        try:
            spec = json.loads(path.read_text())
        except ValueError:
            continue
        status_file = path.with_suffix(".status.json")
        try:
            status = json.loads(status_file.read_text())
        except (OSError, ValueError):
            status = {"status": "completed" if path.with_suffix(".result.json").exists()
                      else "unknown"}
        out.append(RunRecord(path.stem, path, spec, status))
    return sorted(out, key=lambda r: r.path.stat().st_mtime, reverse=True)


def find_run(store: Path, run_id: str) -> RunRecord:
    runs = list_runs(store)
    hits = [r for r in runs if r.run_id == run_id] or [r for r in runs if r.run_id.startswith(run_id)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        known = ", ".join(r.run_id for r in runs[:5]) or "none"
        raise ConfigError(f"RUN_ID {run_id!r}: no such run in {runs_dir(store)} (newest: {known}); "
                          "list them with `forge runs`, or pass --store")
    raise ConfigError(f"RUN_ID {run_id!r}: matches {len(hits)} runs "
                      f"({', '.join(r.run_id for r in hits)}); give more of it")


def stage_states(run: RunRecord) -> dict[str, str]:
    """The state, now, of each stage that run selected."""
    dag = run.dag()
    steps = make_plan(dag, run.spec.get("only"))
    # what the run selected: its --only matches and all their ancestors (complete ones included,
    # which a plan made now would leave out)
    picked = {s.name for s in steps if s.action != "skip"}
    for name in list(picked):
        picked |= set(dag.ancestors(name))
    states = {}
    for step in steps:
        if step.name not in picked:
            continue
        node = step.node
        if complete(node):
            states[step.name] = "complete"
        elif (fail := last_failure(node)) is not None:
            ck = newest_checkpoint(node)
            states[step.name] = (f"failed (exit {fail.get('exit_code')})"
                                 + (f", resumes from checkpoints/{ck}" if ck else ""))
        elif (ck := newest_checkpoint(node)) is not None:
            states[step.name] = f"unfinished, resumes from checkpoints/{ck}"
        elif step.action == "blocked":
            states[step.name] = "blocked"
        else:
            states[step.name] = "not run"
    return states


def format_runs(runs: list[RunRecord], limit: int = 20) -> str:
    if not runs:
        return "  no runs yet"
    lines = [f"  {'RUN_ID':<24} {'started':<16} {'state':<10} {'stages':<22} pipeline / overrides"]
    for run in runs[:limit]:
        states = stage_states(run)
        done = sum(s == "complete" for s in states.values())
        bad = [n for n, s in states.items() if s.startswith(("failed", "unfinished"))]
        summary = f"{done}/{len(states)} complete" + (f", {bad[0]} {states[bad[0]].split(',')[0]}"
                                                      if bad else "")
        overrides = " ".join(run.spec.get("overrides", []))
        name = run.spec.get("resolved", {}).get("pipeline_name", "?")
        lines.append(f"  {run.run_id:<24} {run.started:<16} {run.state:<10} {summary:<22} "
                     f"{name} {overrides[:60]}")
    return "\n".join(lines)


def format_run(run: RunRecord) -> str:
    st = run.status
    head = [f"run {run.run_id}: {run.state}, started {run.started}",
            f"  pipeline {run.spec.get('resolved', {}).get('pipeline_name', '?')}; "
            f"overrides: {' '.join(run.spec.get('overrides', [])) or '(none)'}; "
            f"--only {run.spec.get('only') or '(all)'}"]
    if run.spec.get("resumes"):
        head.append(f"  resumes run {run.spec['resumes']}")
    if st.get("error"):
        head.append("  error: " + str(st["error"]).splitlines()[0])
    states = stage_states(run)
    width = max(map(len, states), default=5)
    nodes = run.dag().nodes
    return "\n".join(head + [f"  {n:<{width}}  {s}{_slurm_jobs(nodes[n].out_dir)}"
                             for n, s in states.items()])


def _slurm_jobs(out_dir: Path) -> str:
    """'; Slurm jobs 8 CANCELLED, 10 COMPLETED' for a stage run as batch jobs, else ''."""
    try:
        jobs = json.loads((Path(out_dir) / SLURM_JOBS).read_text())["jobs"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return "; Slurm jobs " + ", ".join(f"{j['job_id']} {j.get('state', 'not ended')}" for j in jobs)
