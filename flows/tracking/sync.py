"""Lineage that survives MLflow being down: training goes on, MLflow catches up from disk.

Everything a stage's MLflow run holds is also in its output dir (``stage.json``: config and parent
keys; ``metrics.jsonl``; ``artifact.json``), so MLflow is a view that can be rebuilt. During a run
every MLflow call is guarded (``guarded``): a failure is a warning, never a failed stage. At the end
of each pipeline run (and, for cached stages, on every later run) ``sync_stage`` records any
complete stage whose key has no finished MLflow run: it reuses the run left open by the outage (or
opens one), sends every metric line (MLflow drops exact duplicates, so a line sent before the
outage is not doubled), then the inputs, the logged model and its registry version.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from flows.tracking.lineage import Lineage, MetricsTail, TAG_KEY, lineage_for, sqlite_file
from flows.plan import complete
from stages.base import read_artifact
from stages.layout import LINEAGE_FILE, STAGE_RECORD

Warn = Callable[[str], None]


def guarded(warn: Warn, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args)``, or None with a warning if MLflow fails: lineage never fails a stage."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - connection refused, timeouts, 5xx, a locked sqlite
        warn(f"MLflow: {what} failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
             "training goes on, and this is recorded from disk when MLflow answers again")
        return None


def connect(uri: str, experiment: str, warn: Warn) -> Lineage | None:
    return guarded(warn, f"connecting to {uri}", lineage_for, uri, experiment)


def noted_run(node: Any, uri: str) -> str | None:
    """The MLflow run that holds this stage's lineage in tracking store ``uri``, as noted on disk
    when it was recorded (None: not noted, another store, or a sqlite store that is gone)."""
    try:
        note = json.loads((node.out_dir / LINEAGE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or note.get("uri") != uri or note.get("key") != node.key:
        return None
    db = sqlite_file(uri)
    if db is not None and not db.exists():   # the store was deleted: MLflow holds nothing
        return None
    return note.get("run_id")


def note_recorded(node: Any, uri: str, run_id: str) -> None:
    tmp = node.out_dir / f".{LINEAGE_FILE}.tmp"
    tmp.write_text(json.dumps({"uri": uri, "key": node.key, "run_id": run_id}))
    tmp.replace(node.out_dir / LINEAGE_FILE)


def pending(dag: Any, names: list[str]) -> list[str]:
    """Complete stages among ``names`` whose lineage MLflow may not hold yet (no note on disk)."""
    uri = dag.pipeline.tracking_uri
    return [n for n in names if complete(dag.nodes[n]) and noted_run(dag.nodes[n], uri) is None]


def needs_tracking(dag: Any, steps: list[Any]) -> bool:
    """A run that executes nothing, of stages whose lineage MLflow holds, has nothing to record:
    it does not import MLflow or open its store (most of a fully cached rerun's time)."""
    return (any(s.executes for s in steps)
            or bool(pending(dag, [s.name for s in steps if s.action == "cached"])))


def open_run(lineage: Lineage, key: str) -> str | None:
    """A run of this key left RUNNING (MLflow went away before the stage finished), if any."""
    runs = lineage.client.search_runs([lineage.experiment_id], f"tags.`{TAG_KEY}` = '{key}' and "
                                      "attributes.status = 'RUNNING'", max_results=1,
                                      order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def sync_stage(lineage: Lineage, parent_run: str | None, pipeline: str, node: Any, dag: Any) -> str | None:
    """Make MLflow hold this complete stage; return its run id (None: not complete on disk)."""
    run_id = noted_run(node, lineage.uri) or lineage.producer(node.key)[0]
    if run_id is not None:
        note_recorded(node, lineage.uri, run_id)
        return run_id
    if not complete(node):
        return None
    record = json.loads((node.out_dir / STAGE_RECORD).read_text())
    config, parent_keys = record["config"], record["parent_keys"]
    rid = open_run(lineage, node.key)
    if rid is None:
        rid = lineage.start_stage(parent_run or "", pipeline, node, config, parent_keys)
    MetricsTail(lineage, rid, node.out_dir / "metrics.jsonl").poll(raise_errors=True)
    upstream = {p: read_artifact(dag.nodes[p].out_dir) for p in node.parents}
    lineage.finish_stage(rid, node, config, read_artifact(node.out_dir), parent_keys, upstream)
    note_recorded(node, lineage.uri, rid)
    return rid


def sync_pipeline(dag: Any, names: list[str], parent_run: str | None, spec: dict, flow_run_id: str,
                  warn: Warn) -> tuple[str | None, list[str]]:
    """Catch MLflow up on this run's stages; returns (parent run, stages still pending)."""
    todo = pending(dag, names)
    if not todo:
        return parent_run, []
    lineage = connect(dag.pipeline.tracking_uri, dag.pipeline.tracking.experiment, warn)
    if lineage is None:
        return parent_run, todo
    if parent_run is None:
        parent_run = guarded(warn, "opening the pipeline run", lineage.start_pipeline,
                             dag.pipeline.name, spec["resolved"], spec["overrides"], flow_run_id)
    left = []
    for name in todo:
        if guarded(warn, f"recording {name}", sync_stage, lineage, parent_run, dag.pipeline.name,
                   dag.nodes[name], dag) is None:
            left.append(name)
    return parent_run, left
