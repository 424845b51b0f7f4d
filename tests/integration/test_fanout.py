"""A fanned-out stage (``StageKind.parts``: curation's shards) runs each part as a worker and a
Prefect task run of its own; a failed part fails the stage and keeps the parts already done; the
rerun runs only the parts not done, then the gather. Through the real flow, with no change to
flows/ for the kind (tests/support/kinds.py)."""
from __future__ import annotations

import asyncio
import json

import pytest

from flows import runner
from flows.config import typed
from flows.dag import build
from stages.layout import FAILURE_FILE, part_record
from tests.support.kinds import Fanout, FanoutTogether  # noqa: F401  (registers the kinds)


def pipeline(store, fail_if):
    stages = {"fan": {"kind": "fanout", "parts": 3, "fail_if": str(fail_if)}}
    return build(typed({"pipeline_name": "fanout", "store": str(store), "stages": stages}))


async def _task_runs(url: str) -> dict[str, list[str]]:
    from prefect.client.orchestration import PrefectClient
    async with PrefectClient(url) as client:
        runs: dict[str, list[str]] = {}
        for r in await client.read_task_runs():
            runs.setdefault(r.name, []).append(r.state.type.value)
        return runs


def test_a_failed_part_keeps_the_done_ones_and_the_rerun_runs_only_the_rest(tmp_path,
                                                                             prefect_server):
    store, switch = tmp_path / "store", tmp_path / "fail-these"
    switch.write_text("part-1")
    prep = runner.prepare_dag(pipeline(store, switch))
    out = prep.dag.nodes["fan"].out_dir
    with pytest.raises(runner.PipelineFailed, match="part-1 was told to fail"):
        runner.execute(prep, say=lambda line: None)
    executions = store / "executions.log"
    assert executions.read_text().split() == ["part-0", "part-1"]   # part-2 never started
    assert part_record(out, "part-0") == {"part": "part-0", "pid": part_record(out, "part-0")["pid"]}
    assert part_record(out, "part-1") is None and not (out / "artifact.json").exists()
    failure = json.loads((out / FAILURE_FILE).read_text())
    assert failure["log_path"].endswith("parts/part-1/worker.log")
    assert any("part-1 was told to fail" in line for line in failure["tail"])
    again = runner.prepare_dag(pipeline(store, switch))
    assert (again.steps[0].action, again.steps[0].why) == (
        "resume", "unfinished; 1 of 3 parts done (part-0): the rest run")

    switch.write_text("")
    result = runner.execute(runner.prepare_dag(pipeline(store, switch)), say=lambda line: None)
    assert result["stages"]["fan"]["executed"]
    assert executions.read_text().split() == ["part-0", "part-1", "part-1", "part-2"]
    assert (out / "joined.txt").read_text() == "part-0,part-1,part-2"
    pids = {part_record(out, p)["pid"] for p in ("part-0", "part-1", "part-2")}
    assert len(pids) == 3                                            # a worker process each

    runs = asyncio.run(_task_runs(prefect_server))
    assert runs["fan/part-0"] == ["COMPLETED", "COMPLETED"]          # run, then cached on disk
    assert sorted(runs["fan/part-1"]) == ["COMPLETED", "FAILED"]
    assert runs["fan/part-2"] == ["COMPLETED"]


def test_independent_parts_run_at_once_up_to_the_limit_and_gather_in_order(tmp_path,
                                                                           prefect_server):
    """tokenize's shards are independent (``parts_together``): they run as task runs side by
    side, ``cluster.max_parallel_stages`` at a time under torchrun (each is a job of its own on a
    cluster); the gather reads them in order. Limit 2, three parts: two overlap, the third waits."""
    store = tmp_path / "store"
    stages = {"fan": {"kind": "fanout-together", "parts": 3}}
    config = {"pipeline_name": "fanout", "store": str(store), "stages": stages,
              "cluster": {"max_parallel_stages": 2}}
    prep = runner.prepare_dag(build(typed(config)))
    runner.execute(prep, say=lambda line: None)
    out = prep.dag.nodes["fan"].out_dir
    assert (out / "joined.txt").read_text() == "part-0,part-1,part-2"
    spans = {p: (part_record(out, p)["started"], part_record(out, p)["ended"])
             for p in ("part-0", "part-1", "part-2")}
    first, second, third = spans["part-0"], spans["part-1"], spans["part-2"]
    assert min(first[1], second[1]) > max(first[0], second[0])          # the first two overlap
    assert third[0] >= max(first[1], second[1])                         # the third waited
