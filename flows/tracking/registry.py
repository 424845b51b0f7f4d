"""Model registry: each model stage's checkpoint is a version of the registered model
``<pipeline>.<stage>`` (e.g. ``granite-4.1-tiny.pretrain-4``), and ``forge promote`` names one.

A version is registered from the stage's LoggedModel (``create_model_version(model_id=...)``) when
the stage finishes, and carries its lineage as tags, copied from the run that produced it:

    forge.key              the stage's identity key: one version per key, ever (a cached stage, a
                           forced rerun or a second pipeline with the same stage finds it)
    forge.parent_keys      the parent stages' keys; forge.parent_versions their versions (name/N)
    forge.datasets         {dataset: digest} of what the stage read
    forge.git_commit, forge.config_digest (sha256 of the stage's resolved config),
    forge.source_run, forge.model_id, forge.uri (the checkpoint, by reference)

The registry is a view like the rest of MLflow: registering never fails a pipeline run (a warning
says what was not recorded), and a stage cached from a store that predates the registry is
registered when it is next seen.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from flows.tracking.tags import TAG_CONFIG_DIGEST, TAG_KEY, TAG_KIND, TAG_PIPELINE, TAG_STAGE

TAG_MODEL_VERSIONS = "mlflow.modelVersions"  # read by the UI's logged-model page


class NotRegistered(LookupError):
    """The stage has no registered version with its current key (never run, or run elsewhere)."""


def model_name(pipeline: str, stage: str) -> str:
    return f"{pipeline}.{stage}"  # MLflow forbids '/' and ':' in names


def version_for_key(client: Any, key: str, name: str | None = None) -> Any | None:
    """The version registered for ``key``; the one under ``name`` first if there are several."""
    found = list(client.search_model_versions(f"tags.`{TAG_KEY}` = '{key}'"))
    found.sort(key=lambda v: (v.name != name, int(v.version)))
    return found[0] if found else None


def register(client: Any, uri: str, run_id: str, model_id: str,
             warn: Callable[[str], None] = print) -> Any | None:
    """Register ``model_id`` (made by ``run_id``) unless its key has a version; never raises."""
    try:
        return _register(client, uri, run_id, model_id)
    except Exception as e:  # noqa: BLE001 - MLflow down or refusing: the checkpoint is on disk
        warn(f"model version not registered for run {run_id} (model {model_id}): "
             f"{type(e).__name__}: {str(e)[:500]}")
        return None


def _register(client: Any, uri: str, run_id: str, model_id: str) -> Any:
    import mlflow
    from mlflow.exceptions import MlflowException

    run = client.get_run(run_id)  # whole: search results leave out dataset inputs
    tags = run.data.tags
    key, stage, pipeline = tags[TAG_KEY], tags[TAG_STAGE], tags[TAG_PIPELINE]
    name = model_name(pipeline, stage)
    existing = version_for_key(client, key, name)
    if existing is not None:
        return existing
    try:
        client.create_registered_model(name, tags={TAG_PIPELINE: pipeline, TAG_STAGE: stage,
                                                   TAG_KIND: tags.get(TAG_KIND, "?")},
                                       description=f"Stage {stage} of pipeline {pipeline}: one "
                                       "version per stage key (granite-forge).")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    parent_keys = json.loads(tags.get("forge.parent_keys", "{}"))
    parent_versions = {}
    for parent, pkey in parent_keys.items():
        v = version_for_key(client, pkey)
        if v is not None:
            parent_versions[parent] = f"{v.name}/{v.version}"
    datasets = {d.dataset.name: d.dataset.digest
                for d in (run.inputs.dataset_inputs if run.inputs else [])}
    model = client.get_logged_model(model_id)
    vtags = {TAG_KEY: key, TAG_STAGE: stage, "forge.parent_keys": json.dumps(parent_keys),
             "forge.parent_versions": json.dumps(parent_versions),
             "forge.datasets": json.dumps(datasets),
             "forge.git_commit": tags.get("mlflow.source.git.commit", "unknown"),
             "forge.config_digest": tags.get(TAG_CONFIG_DIGEST, "unknown"),
             "forge.source_run": run_id, "forge.model_id": model_id,
             "forge.uri": model.tags.get("forge.uri", "")}
    # The sqlite registry resolves a models:/ source through the *global* tracking URI.
    mlflow.set_tracking_uri(uri)
    version = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, tags=vtags, model_id=model_id,
        description=f"{stage} key {key[:12]} from run {run_id}", await_creation_for=0)
    # As mlflow.register_model does: the logged model lists the versions made from it.
    linked = json.loads(model.tags.get(TAG_MODEL_VERSIONS, "[]"))
    linked.append({"name": name, "version": version.version})
    client.set_logged_model_tags(model_id, {TAG_MODEL_VERSIONS: json.dumps(linked)})
    return version


def promote(client: Any, pipeline: str, stage: str, key: str, alias: str) -> Any:
    """Point ``alias`` at the version registered for the stage's current key."""
    name = model_name(pipeline, stage)
    version = version_for_key(client, key, name)
    if version is None:
        raise NotRegistered(f"stage {stage}: no registered model version has its current key "
                            f"{key[:12]} (the stage was never run with this config, or its "
                            f"MLflow store is elsewhere); run it first: forge run ... --only "
                            f"'{stage}'")
    client.set_registered_model_alias(version.name, alias, version.version)
    return version
