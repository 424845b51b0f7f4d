"""The registry's edges that need no pipeline: where artifacts go, and MLflow being unreachable."""
from __future__ import annotations

from flows.tracking.lineage import artifact_root
from flows.tracking.registry import model_name, register
from flows.tracking.ui import free_port


def test_a_sqlite_store_keeps_its_artifacts_beside_its_database(tmp_path):
    assert artifact_root(f"sqlite:///{tmp_path / 'mlflow.db'}") == tmp_path / "mlartifacts"
    assert artifact_root("http://127.0.0.1:5000") is None  # a server has its own


def test_registered_model_names_are_pipeline_dot_stage():
    assert model_name("granite-4.1-tiny", "merge-3") == "granite-4.1-tiny.merge-3"


def test_an_unreachable_mlflow_does_not_fail_the_stage(monkeypatch):
    """Registering is a view: it warns and returns None, as the loss plot does."""
    from mlflow import MlflowClient
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    warnings: list[str] = []
    assert register(MlflowClient(uri), uri, "0" * 32, "m-0", warnings.append) is None
    assert len(warnings) == 1 and "not registered" in warnings[0]
