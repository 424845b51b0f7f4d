"""A new stage kind plans and runs through the real flow (Prefect, worker process, MLflow) without
a change to flows/: tests/support/kinds.py defines it and registers it, nothing else."""
from __future__ import annotations

import os

import pytest

from flows import runner
from flows.config import typed
from flows.dag import build
from stages import KINDS
from stages.schema import ConfigError
from tests.support.kinds import Echo


def pipeline(store, **first):
    stages = {"first": {"kind": "echo", "text": "ab", "repeat": 2, **first},
              "second": {"kind": "echo", "text": "c", "after": ["first"]}}
    return build(typed({"pipeline_name": "plugin", "store": str(store), "stages": stages}))


def test_a_registered_kind_plans_and_runs_through_the_flow(tmp_path, prefect_server):
    assert KINDS["echo"] is Echo
    prep = runner.prepare_dag(pipeline(tmp_path))
    assert [(s.name, s.action, s.tokens) for s in prep.steps] == [("first", "run", 4),
                                                                  ("second", "run", 1)]
    assert prep.compute == {}   # the kind plans no compute: no row in `forge plan`

    result = runner.execute(prep, say=lambda line: None)
    assert {n for n, r in result["stages"].items() if r["executed"]} == {"first", "second"}
    first, second = (prep.dag.nodes[n].out_dir for n in ("first", "second"))
    text, pid = (second / "echo.txt").read_text().split(" pid=")
    assert text == "ababc"                       # read its parent's output through its inputs
    assert int(pid) != os.getpid()               # in a worker process of its own
    assert (first / "metrics.jsonl").exists() and (first / "artifact.json").exists()

    again = runner.prepare_dag(pipeline(tmp_path))
    assert [s.action for s in again.steps] == ["cached", "cached"]
    changed = runner.prepare_dag(pipeline(tmp_path, note="a setting"))   # not identity
    assert [s.action for s in changed.steps] == ["cached", "cached"]
    changed = runner.prepare_dag(pipeline(tmp_path, repeat=3))
    assert [s.action for s in changed.steps] == ["run", "run"]


def test_its_checks_and_preflight_run_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"stages.first.repeat: must be >= 1, got 0"):
        pipeline(tmp_path, repeat=0)
    prep = runner.prepare_dag(pipeline(tmp_path, text="needs-a-gpu"))
    with pytest.raises(ConfigError, match=r"stages.first.text: this machine cannot echo that"):
        runner.execute(prep, say=lambda line: None)
    assert not any(tmp_path.iterdir())           # nothing written: no run record, no output dir


def test_a_run_builds_and_plans_once_and_asks_mlflow_once_per_cached_stage(tmp_path, prefect_server,
                                                                          monkeypatch):
    """The flow and its tasks reuse the DAG and plan `forge run` made (they rebuilt it N+2 times,
    each reading every artifact.json); a fully cached rerun looks nothing up in MLflow (the
    end-of-run sync asked again about every stage; the stages' lineage notes say MLflow has it),
    and a rerun that runs one stage links the cached one from its note, without a search."""
    import flows.pipeline
    import flows.runs
    from flows.tracking.lineage import Lineage
    runner.execute(runner.prepare_dag(pipeline(tmp_path)), say=lambda line: None)

    calls = {"build": 0, "plan": 0, "producer": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(flows.runs, "build", counting("build", flows.runs.build))
    monkeypatch.setattr(flows.pipeline, "make_plan", counting("plan", flows.pipeline.make_plan))
    monkeypatch.setattr(Lineage, "producer", counting("producer", Lineage.producer))
    prep = runner.prepare_dag(pipeline(tmp_path))
    result = runner.execute(prep, say=lambda line: None)
    assert not any(r["executed"] for r in result["stages"].values())
    assert calls == {"build": 0, "plan": 0, "producer": 0}, calls   # noted on disk: no lookup
    assert result["parent_run"] is None                               # and no empty MLflow run

    prep = runner.prepare_dag(pipeline(tmp_path), rerun=("second",))
    result = runner.execute(prep, say=lambda line: None)
    assert [n for n, r in result["stages"].items() if r["executed"]] == ["second"]
    # one search: second's run looks up its parent's logged model; cached `first` is linked from
    # its note (a search each before)
    assert calls["producer"] == 1 and result["parent_run"] is not None
    from mlflow import MlflowClient
    tags = MlflowClient(prep.dag.pipeline.tracking_uri).get_run(result["parent_run"]).data.tags
    assert tags["forge.cached.first"] == result["stages"]["first"]["mlflow_run"]


def task_run_states(name: str) -> list[str]:
    """The states of the Prefect task runs called ``name``, oldest first."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    async def read() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC)
            return [r.state.name for r in runs]
    return asyncio.run(read())


def test_prefects_cache_is_per_output_folder_and_artifact_json_is_the_truth(tmp_path, prefect_server):
    """Stores that share Prefect's result storage (one server, one PREFECT_HOME) do not serve each
    other's stages: the same stage in a second store runs without a cache hit. And a cache record
    whose artifact.json is gone is not trusted: the stage runs again."""
    name = f"probe-{tmp_path.name}"   # task runs of this test alone
    stages = {name: {"kind": "echo", "text": "probe"}}

    def run(store):
        dag = build(typed({"pipeline_name": "plugin", "store": str(store), "stages": stages}))
        return runner.execute(runner.prepare_dag(dag), say=lambda line: None), dag.nodes[name]

    (first, node_a), (second, node_b) = run(tmp_path / "a"), run(tmp_path / "b")
    assert node_a.key == node_b.key and node_a.out_dir != node_b.out_dir
    assert first["stages"][name]["executed"] and second["stages"][name]["executed"]
    assert task_run_states(name) == ["Completed", "Completed"]   # store b: no hit on a's record

    (node_b.out_dir / "artifact.json").unlink()     # Prefect still holds b's cache record
    third, _ = run(tmp_path / "b")
    assert third["stages"][name]["executed"]
    assert (node_b.out_dir / "artifact.json").exists()
    assert task_run_states(name) == ["Completed", "Completed", "Cached", "Completed"]
