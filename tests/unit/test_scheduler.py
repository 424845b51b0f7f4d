"""The ready-set decisions of flows/scheduler.py: which stages start next, given what is done,
running and failed, the limit of stages at once and the device budget."""
from __future__ import annotations

import os

import pytest

from flows.scheduler import (Schedule, descendants_of, next_to_start, ready, schedule_for,
                             why_not_run)

# The tiny pipeline's shape after pretraining: an evaluation beside each extension, a merge
# needing both its parents.
PARENTS = {"pretrain": (), "eval-pretrain": ("pretrain",), "extend-1": ("pretrain",),
           "eval-extend-1": ("extend-1",), "merge-1": ("extend-1", "pretrain"),
           "eval-merge-1": ("merge-1",)}
ORDER = tuple(PARENTS)


def plan(max_stages: int = 1, budget: int | None = None, **devices: int) -> Schedule:
    need = {n: 1 for n in ORDER}
    need.update({k.replace("_", "-"): v for k, v in devices.items()})
    return Schedule(ORDER, PARENTS, need, max_stages, budget)


def test_a_stage_is_ready_once_every_parent_in_the_run_is_done():
    s = plan()
    assert ready(s, done=[], started=[]) == ["pretrain"]
    assert ready(s, done=["pretrain"], started=["pretrain"]) == ["eval-pretrain", "extend-1"]
    # merge-1 waits for both parents; a parent outside the run (not in PARENTS) is never waited for
    assert "merge-1" not in ready(s, done=["pretrain"], started=["pretrain", "extend-1"])
    assert ready(Schedule(("b",), {"b": ()}, {"b": 1}), done=[], started=[]) == ["b"]


def test_limit_one_runs_the_plan_order_one_after_another():
    s = plan(max_stages=1)
    assert next_to_start(s, done=["pretrain"], running=[]) == ["eval-pretrain"]
    assert next_to_start(s, done=["pretrain"], running=["eval-pretrain"]) == []
    assert next_to_start(s, done=["pretrain", "eval-pretrain"], running=[]) == ["extend-1"]


def test_limit_two_starts_the_evaluation_beside_the_next_training_stage():
    s = plan(max_stages=2)
    assert next_to_start(s, done=["pretrain"], running=[]) == ["eval-pretrain", "extend-1"]
    assert next_to_start(s, done=["pretrain"], running=["extend-1"]) == ["eval-pretrain"]
    # with both running, nothing; when extend-1 ends, its evaluation and merge-1 compete for one slot
    assert next_to_start(s, done=["pretrain"], running=["eval-pretrain", "extend-1"]) == []
    assert next_to_start(s, done=["pretrain", "extend-1"], running=["eval-pretrain"]) == \
        ["eval-extend-1"]
    assert next_to_start(s, done=["pretrain", "extend-1", "eval-pretrain"], running=[]) == \
        ["eval-extend-1", "merge-1"]


def test_the_device_budget_holds_a_stage_that_does_not_fit_in_its_place():
    # 8 devices: a training stage of 8 cannot start beside an evaluation of 1 ...
    s = plan(max_stages=4, budget=8, extend_1=8, merge_1=1)
    assert next_to_start(s, done=["pretrain"], running=[]) == ["eval-pretrain"]
    # ... and nothing after it in plan order passes it while it waits (no starving training)
    s = plan(max_stages=4, budget=8, eval_pretrain=4, extend_1=8)
    assert next_to_start(s, done=["pretrain"], running=["eval-pretrain"]) == []
    assert next_to_start(s, done=["pretrain", "eval-pretrain"], running=[]) == ["extend-1"]
    # two that fit together start together
    s = plan(max_stages=4, budget=8, eval_pretrain=2, extend_1=6)
    assert next_to_start(s, done=["pretrain"], running=[]) == ["eval-pretrain", "extend-1"]


def test_a_stage_larger_than_the_budget_runs_alone_rather_never():
    s = plan(max_stages=4, budget=4, extend_1=16)
    assert next_to_start(s, done=["pretrain", "eval-pretrain"], running=[]) == ["extend-1"]
    assert next_to_start(s, done=["pretrain"], running=["eval-pretrain"]) == []
    # no budget (slurm, kubernetes: the cluster's scheduler queues): only the stage limit counts
    s = plan(max_stages=2, budget=None, eval_pretrain=64, extend_1=64)
    assert next_to_start(s, done=["pretrain"], running=[]) == ["eval-pretrain", "extend-1"]


def test_cached_stages_take_no_devices():
    s = plan(max_stages=3, budget=1, eval_pretrain=0, extend_1=1)
    assert next_to_start(s, done=["pretrain"], running=[]) == ["eval-pretrain", "extend-1"]


def test_after_a_failure_or_a_signal_nothing_new_starts():
    s = plan(max_stages=2)
    # extend-1 failed while eval-pretrain runs: eval-pretrain finishes, nothing else starts
    assert next_to_start(s, done=["pretrain"], running=["eval-pretrain"], finished=["extend-1"],
                         halted=True) == []
    # a failed stage is never started again, nor anything below it, even unhalted
    assert next_to_start(s, done=["pretrain", "eval-pretrain"], running=[],
                         finished=["extend-1"]) == []
    assert descendants_of(s, "extend-1") == {"extend-1", "eval-extend-1", "merge-1", "eval-merge-1"}
    assert why_not_run(s, "merge-1", "extend-1") == "upstream stage extend-1 failed"
    assert why_not_run(s, "eval-pretrain", "extend-1") == \
        "stage extend-1 failed; after a failure the run starts no new stage"


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_stages must be >= 1"):
        Schedule(ORDER, PARENTS, {}, 0)
    with pytest.raises(ValueError, match="device_budget must be >= 1 or None"):
        Schedule(ORDER, PARENTS, {}, 1, 0)


def test_the_schedule_of_a_real_plan_follows_the_cluster_settings(tmp_path):
    """The tiny pipeline's plan: skipped stages are out, a training stage takes its layout's
    world size, an evaluation 1, and the limits are the cluster's (the CPU cluster: one stage at
    a time; the device budget under torchrun is this machine's cores per worker on CPU, its GPUs
    on cuda; none under Kubernetes unless set)."""
    from flows import config
    from flows.dag import build
    from flows.plan import make_plan
    dag = build(config.load([f"store={tmp_path}", "cluster=cpu-dp2",
                             "cluster.max_parallel_stages=3"]))
    steps = make_plan(dag, only="eval-pretrain|extend-1")
    s = schedule_for(steps, dag.pipeline.cluster)
    assert s.order[-2:] == ("eval-pretrain", "extend-1") and "eval-extend-1" not in s.order
    assert s.devices["pretrain-4"] == 2 and s.devices["eval-pretrain"] == 1
    assert set(s.parents["eval-pretrain"]) == {"pretrain-4", "tokenize"} and s.parents["data"] == ()
    assert (s.max_stages, s.device_budget) == (3, os.cpu_count())   # one thread per worker
    cpu = config.load([f"store={tmp_path}"]).cluster
    assert (cpu.max_parallel_stages, cpu.device_budget) == (1, os.cpu_count())
    gpu = config.load([f"store={tmp_path}", "cluster=gpu-node"]).cluster
    assert gpu.device_budget == gpu.gpus_per_node == 8
    pinned = config.load([f"store={tmp_path}", "cluster=k8s", "cluster.max_parallel_devices=32"])
    assert pinned.cluster.device_budget == 32
    assert config.load([f"store={tmp_path}", "cluster=k8s"]).cluster.device_budget is None
