"""Independent stages run side by side (issue 13, item 3), through the real flow: Prefect task runs
on the flow's thread pool (a real Prefect server), a worker process per stage, MLflow lineage from
the stage threads.

The stages: two evaluations of one model (the SMALL tiny pipeline's pretrain-1, cut to 5 steps;
its data, tokenizer and tokenize stages and itself are built once for the module). They are
independent, take a few seconds each, and are deterministic, so:

1. With ``cluster.max_parallel_stages=2`` their [start, end] intervals (from the flow's result)
   overlap; with the limit at 1 (the CPU default) they do not; both runs give the same keys, the
   same artifacts (outputs and metrics) and the same records, in the flow's result and in MLflow
   (each stage's child run: its params, metrics and key tag).
2. A stage that fails while another runs: the running one finishes (artifact.json written after
   the failure), the one waiting for a slot never starts, and the run fails naming the first
   failure. The failing stage is the plugin kind of tests/support/kinds.py (a fan-out whose part
   fails on a switch file), so this test runs the flow in-process.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows import runner
from tests.support import kinds  # noqa: F401 - registers the fanout kind the failure test uses
from tests.support.helpers import SMALL

pytestmark = pytest.mark.slow

MODEL = [*SMALL, "stages.pretrain-1.tokens=10240"]   # 5 steps
EVAL = "kind:evaluate,from:pretrain-1,data:tokenize,heldout_length:128,samples:4"
TWO_EVALS = [*MODEL, "stages.eval-pretrain.from=pretrain-1", "stages.eval-pretrain.samples=4",
             f"+stages.eval-b={{{EVAL},lengths:[128]}}"]
BOTH = "eval-pretrain|eval-b"


def run(store: Path, overrides: list[str], only: str, rerun: tuple[str, ...] = ()) -> dict:
    prep = runner.prepare([f"store={store}", *overrides], only, rerun)
    return runner.execute(prep, say=lambda line: None)


@pytest.fixture(scope="module")
def store(prefect_server, tmp_path_factory) -> Path:
    """A store whose pretrain-1 (and its data stages) is complete."""
    store = tmp_path_factory.mktemp("parallel")
    run(store, MODEL, "pretrain-1")
    return store


def interval(result: dict, stage: str) -> tuple[float, float]:
    rec = result["stages"][stage]
    assert rec["executed"] and rec["started"] and rec["ended"], rec
    return rec["started"], rec["ended"]


def overlap(result: dict) -> float:
    """Seconds the two evaluations ran at the same time (negative: the gap between them)."""
    (a0, a1), (b0, b1) = interval(result, "eval-pretrain"), interval(result, "eval-b")
    return min(a1, b1) - max(a0, b0)


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("_s")}   # eval_s: its wall time


def comparable(rec: dict) -> dict:
    """A stage's record or artifact less what differs between any two runs of it: times, MLflow
    run ids."""
    out = {k: v for k, v in rec.items()
           if k not in ("started", "ended", "seconds", "mlflow_run", "created_at")}
    return dict(out, metrics=untimed(rec["metrics"]))


def mlflow_view(result: dict) -> dict:
    """What each stage's MLflow child run holds: params, metrics, key tag, parent run."""
    from mlflow import MlflowClient
    client = MlflowClient(result["tracking_uri"])
    view = {}
    for name, rec in result["stages"].items():
        run = client.get_run(rec["mlflow_run"])
        view[name] = {"params": run.data.params, "metrics": untimed(run.data.metrics),
                      "key": run.data.tags["forge.key"], "status": run.info.status,
                      "parent": run.data.tags["mlflow.parentRunId"] == result["parent_run"]}
    return view


def test_limit_two_runs_the_evaluations_side_by_side_with_the_serial_results(store):
    parallel = run(store, [*TWO_EVALS, "cluster.max_parallel_stages=2"], BOTH)
    first = {n: Path(r["out_dir"]) for n, r in parallel["stages"].items()}
    artifacts = {n: json.loads((d / "artifact.json").read_text()) for n, d in first.items()}
    # the limit is a setting: the serial run has the same keys, so --rerun makes it compute again
    serial = run(store, [*TWO_EVALS, "cluster.max_parallel_stages=1"], BOTH,
                 ("eval-pretrain", "eval-b"))

    print(f"limit 2: overlap {overlap(parallel):.2f} s; limit 1: {overlap(serial):.2f} s "
          f"(negative: the gap between them)")
    assert overlap(parallel) > 0, parallel["stages"]
    assert overlap(serial) <= 0, serial["stages"]
    assert list(parallel["stages"]) == list(serial["stages"]) == ["eval-pretrain", "eval-b"]
    assert {n: comparable(r) for n, r in parallel["stages"].items()} == \
        {n: comparable(r) for n, r in serial["stages"].items()}
    for name, out_dir in first.items():   # --rerun kept the parallel run's output aside
        assert comparable(json.loads((out_dir / "artifact.json").read_text())) == \
            comparable(artifacts[name])
        assert [p for p in out_dir.parent.glob(f"{out_dir.name}.replaced-*")], name
    assert artifacts["eval-pretrain"]["metrics"]["heldout_loss"] == \
        artifacts["eval-b"]["metrics"]["heldout_loss"]   # one model, one held-out set
    view = mlflow_view(parallel)
    assert view == mlflow_view(serial)
    assert all(v["status"] == "FINISHED" and v["parent"] for v in view.values()), view
    assert view["eval-pretrain"]["metrics"] != view["eval-b"]["metrics"]   # 2 lengths against 1


def test_a_failure_lets_the_running_stage_finish_and_starts_nothing_new(store, tmp_path):
    switch = tmp_path / "fail.txt"
    switch.write_text("part-0")
    overrides = [*TWO_EVALS, "cluster.max_parallel_stages=2",
                 f"+stages.boom={{kind:fanout,parts:1,fail_if:'{switch}'}}",
                 f"+stages.eval-c={{{EVAL},lengths:[128],samples:3}}"]
    only = "eval-pretrain|boom|eval-c"   # in plan order: eval-pretrain and boom start together
    prep = runner.prepare([f"store={store}", *overrides], only, ("eval-pretrain",))
    assert [s.name for s in prep.steps if s.action != "skip"] == ["eval-pretrain", "boom", "eval-c"]
    out = {s.name: s.node.out_dir for s in prep.steps}
    with pytest.raises(runner.PipelineFailed, match="part-0 was told to fail"):
        runner.execute(prep, say=lambda line: None)

    failure = json.loads((out["boom"] / "failure.json").read_text())
    after = (out["eval-pretrain"] / "artifact.json").stat().st_mtime - failure["time"]
    print(f"eval-pretrain wrote artifact.json {after:.2f} s after boom's failure.json")
    assert failure["stage"] == "boom", failure
    assert after > 0   # it was running when boom failed, ran on, and finished
    assert not out["eval-c"].exists()                                  # never started
