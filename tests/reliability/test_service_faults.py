"""Faults of the services around a run: the Prefect server restarts, or the MLflow server goes
away, while a stage trains (the trials are in tests/support/service_faults.py; benchmarks/faults.py runs
more of them). After the MLflow outage, every stage run's metrics in MLflow equal its metrics.jsonl
and artifact.json: every key, each step of each key's history, each value bit for bit, none
doubled."""
from __future__ import annotations

import pytest

from tests.support.service_faults import mlflow_outage_trial, prefect_restart_trial

pytestmark = pytest.mark.slow


def test_prefect_server_restart_mid_stage_loses_nothing(tmp_path):
    trial = prefect_restart_trial(tmp_path)
    assert trial.ok, trial.line()


def test_mlflow_down_for_part_of_a_run_training_goes_on_and_nothing_is_dropped(prefect_server, tmp_path):
    trial = mlflow_outage_trial(tmp_path, prefect_server)
    assert trial.ok, trial.line()
