"""Faults a training stage must survive, injected into real worker processes (issue 4, item 6).

The machinery and the judgement live in ``tests/support/faults.py`` (shared with ``benchmarks/faults.py``,
which runs many more trials and prints a table). Each test runs one or two trials on a tiny phase
(40 steps, a checkpoint every 5) at moments drawn from a seeded RNG, printed with the verdict:

- SIGKILL of the worker, once inside a checkpoint write, once anywhere: the rerun resumes from
  the newest complete checkpoint and ends bit-identical to an uninterrupted run: weights, AdamW
  moments, the train state (steps, consumed samples, tokens, AdamW's step counter), every rank's
  RNG state, and every line of metrics.jsonl (``tests/support/final_state.py``; every trial that
  reruns is judged so);
- SIGTERM to the worker's process group: it finishes the step, checkpoints it, exits 143, and the
  rerun starts at that very step; to one rank of a DP=2 world only: both ranks stop after the same
  step; to an orchestrator in ``flows.launch.run_worker``: passed on, nothing left running;
- damaged newest checkpoints (a flipped bit, a truncated or deleted file, a torn or wrong ``done``):
  each REJECTED in the log with the reason, moved aside, never loaded;
- a disk that fills up (a tmpfs where this process may mount one; RLIMIT_FSIZE everywhere): the save
  fails with a "NOT saved" error, leaves nothing half-written, and a rerun resumes bit-exact;
- a damaged parent checkpoint: the next phase refuses to start from it, saying which and what to do.

Two launches of the same stage at once (the stage lock) are tested in
tests/integration/test_resume_and_concurrency.py.
"""
from __future__ import annotations

import os
import shutil
import signal

import pytest

from tests.support.faults import STAGE, Lab, can_mount_tmpfs, worker
from tests.integration.test_pretrain_worker import write_spec


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    return Lab(tmp_path_factory.mktemp("faults"), seed=4)


def check(trial) -> None:
    print(trial.line())
    assert trial.ok, trial.line()


@pytest.mark.parametrize("in_save", [True, False], ids=["inside-a-save", "anywhere"])
def test_sigkill_then_rerun_resumes_bit_exact(lab, in_save):
    check(lab.kill(in_save=in_save))


def test_sigterm_checkpoints_the_step_and_exits_143(lab):
    check(lab.term())


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(lab):
    check(lab.term_one_rank())


def test_orchestrator_passes_sigterm_on_to_the_worker(lab):
    check(lab.term_orchestrator())


@pytest.mark.parametrize("kinds", [("flip", "truncate"), ("done", "delete")], ids="+".join)
def test_damaged_checkpoints_are_rejected_with_the_reason(lab, kinds):
    check(lab.damage(kinds))


@pytest.mark.parametrize("method", ["tmpfs", "rlimit"])
def test_full_disk_fails_the_save_cleanly_and_a_rerun_resumes(lab, method, tmp_path):
    if method == "tmpfs" and not can_mount_tmpfs(tmp_path / "probe"):
        pytest.skip("this process may not mount a tmpfs (needs root with CAP_SYS_ADMIN); "
                    "the rlimit case covers the same path")
    check(lab.disk_full(method))


def test_damaged_parent_checkpoint_is_refused_with_the_fix(lab):
    parent = lab.root / "parent"
    shutil.copytree(lab.reference, parent, ignore=shutil.ignore_patterns("data_cache"))
    shard = sorted((parent / "checkpoints" / "iter_0000040").glob("*.distcp"))[0]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 3] ^= 0x10
    shard.write_bytes(bytes(blob))
    config = dict(lab.reference_config, tokens=8 * 8 * 64)
    config["from"] = STAGE
    spec = write_spec(lab.root / "child", "pretrain-b", config,
                      {"tokenize": lab.data, STAGE: parent})
    run = worker(spec)
    assert run.finish() != 0
    assert f"the checkpoint of parent stage {STAGE} is damaged" in run.log, run.log[-2000:]
    assert f"{shard.name} fails its xxh3_128 check; run {STAGE} again" in run.log
    assert "forge run --rerun pretrain-a" in run.log


def test_sigint_and_sigterm_are_recorded_and_then_ignored_until_exit():
    from stages.training.preemption import Preempted, StopSignals
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals().install()
    try:
        assert stop.agreed() == 0
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: recorded
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal counts
        assert stop.agreed() == signal.SIGINT
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # stopping: nothing cuts it short
        assert Preempted(signal.SIGINT, 7, "checkpoints/iter_0000007").exit_code == 130
        assert Preempted(signal.SIGTERM, 7, "x").exit_code == 143
    finally:
        stop.uninstall()
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGINT, signal.default_int_handler)
