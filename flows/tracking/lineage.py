"""MLflow lineage: one parent run per pipeline run, one child run per executed stage.

A child run carries the stage's resolved config as params, its identity key, parent keys and the
git commit as tags, its training curve as metrics, every data source it read as a dataset input
(with digest), the parent stages' models as model inputs, and its own checkpoint as a LoggedModel
output, by reference (URI + manifest; weights are never uploaded). A stage served from cache is
recorded on the parent run with a link to the run that produced it (a run that executes nothing
records nothing: ``flows/tracking/sync.needs_tracking``). Everything is read from the
stage's output dir (artifact.json, metrics.jsonl), so MLflow is a view, not the truth.
A model stage's LoggedModel is also registered as a model version (flows/tracking/registry.py). A sqlite
store keeps its artifacts in ``<store>/mlartifacts``, which `forge ui` (flows/tracking/ui.py) serves.
"""
from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from flows.tracking.registry import register
from flows.tracking.tags import TAG_CONFIG_DIGEST, TAG_KEY, TAG_KIND, TAG_PIPELINE, TAG_STAGE
from stages.base import Artifact

__all__ = ["Lineage", "MetricsTail", "TAG_KEY", "lineage_for"]

ARTIFACTS = "mlartifacts"   # <store>/mlartifacts, beside <store>/mlflow.db


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for servers)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):].split("?")[0]).resolve()
    return None


def artifact_root(uri: str) -> Path | None:
    """Where a sqlite tracking store keeps run artifacts: beside its database file (MLflow's own
    default is ./mlruns of whatever directory the pipeline was started from). None for servers."""
    db = sqlite_file(uri)
    return db.parent / ARTIFACTS if db is not None else None


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, (list, tuple)) and any(isinstance(v, (dict, list)) for v in data):
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
    return out


def _dataset_name(d: dict) -> str:
    split = d.get("split", "train")
    return f"{d['stage']}/{d['name']}" + ("" if split == "train" else f" ({split})")


@functools.lru_cache(maxsize=None)
def lineage_for(uri: str, experiment: str) -> "Lineage":
    """One client per tracking store and process (opening a sqlite store costs ~0.5 s)."""
    return Lineage(uri, experiment)


class Lineage:
    def __init__(self, uri: str, experiment: str):
        import mlflow
        from mlflow import MlflowClient
        mlflow.set_tracking_uri(uri)
        self.uri = uri
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        root = artifact_root(uri)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=root.as_uri() if root else None)

    # -- pipeline ---------------------------------------------------------------------------
    def start_pipeline(self, name: str, resolved: dict, overrides: list[str], flow_run_id: str) -> str:
        from mlflow.entities import Param, RunTag
        run = self.client.create_run(self.experiment_id, run_name=f"{name} {time.strftime('%H:%M:%S')}",
                                     tags={TAG_PIPELINE: name, "forge.role": "pipeline",
                                           "forge.prefect_flow_run": flow_run_id,
                                           "mlflow.source.git.commit": git_commit()})
        rid = run.info.run_id
        self.client.log_batch(rid, params=[Param("overrides", json.dumps(overrides)[:6000])],
                              tags=[RunTag("forge.overrides", " ".join(overrides))])
        self.client.log_dict(rid, resolved, "resolved_config.json")
        return rid

    def end_pipeline(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def log_loss_plot(self, run_id: str, nodes: Iterable[Any], title: str,
                      warn: Callable[[str], None] = print) -> str | None:
        """One plot of the training loss across all phases on the pipeline's run; None if no
        training stage has metrics yet. Never raises: the curves stay in each metrics.jsonl, and a
        picture that could not be drawn or sent must not fail a pipeline that trained."""
        from flows.tracking.loss_plot import LOSS_PLOT, draw_loss, read_curves
        try:
            curves = read_curves(nodes)
            if not curves:
                return None
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / LOSS_PLOT
                draw_loss(curves, path, title)
                self.client.log_artifact(run_id, str(path))
            return LOSS_PLOT
        except Exception as e:  # noqa: BLE001 - MLflow down, disk full, a plotting bug
            warn(f"loss plot not logged to MLflow run {run_id}: {type(e).__name__}: {e}")
            return None

    def producer(self, key: str) -> tuple[str | None, str | None]:
        """(run id, model id) of the run that produced the stage with this key, if any."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{TAG_KEY}` = '{key}' and "
                                       "attributes.status = 'FINISHED'", max_results=1,
                                       order_by=["attributes.start_time ASC"])
        models = self.client.search_logged_models([self.experiment_id],
                                                  filter_string=f"tags.`{TAG_KEY}` = '{key}'",
                                                  max_results=1)
        return (runs[0].info.run_id if runs else None), (models[0].model_id if models else None)

    def record_cached(self, parent_run: str, stage: str, key: str,
                      known_run: str | None = None) -> str | None:
        """Link the pipeline run to the run that made a cached stage (``known_run``: noted on
        disk when it was recorded, so MLflow need not be searched)."""
        if known_run is not None:
            self.client.set_tag(parent_run, f"forge.cached.{stage}", known_run)
            return known_run
        run_id, model_id = self.producer(key)
        if run_id is None:   # recorded at the end of this run, from disk (flows/tracking/sync.py)
            return None
        self.client.set_tag(parent_run, f"forge.cached.{stage}", run_id)
        if run_id and model_id:  # made before the registry existed: registered now, once
            register(self.client, self.uri, run_id, model_id)
        return run_id

    # -- stages -----------------------------------------------------------------------------
    def start_stage(self, parent_run: str, pipeline: str, node: Any, config: dict,
                    parent_keys: dict[str, str]) -> str:
        """Open the stage's child run before its worker starts (metrics stream in meanwhile)."""
        from mlflow.entities import Param
        tags = {TAG_KEY: node.key, TAG_STAGE: node.name,
                TAG_KIND: node.kind, TAG_PIPELINE: pipeline, "forge.out_dir": str(node.out_dir),
                "forge.parent_keys": json.dumps(parent_keys), "mlflow.source.git.commit": git_commit(),
                TAG_CONFIG_DIGEST: config_digest(config)}
        if parent_run:  # none when MLflow was down as the pipeline started
            tags["mlflow.parentRunId"] = parent_run
        run = self.client.create_run(self.experiment_id, run_name=node.name, tags=tags)
        rid = run.info.run_id
        params = [Param(k[:250], v[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(rid, params=params[i:i + 100])
        return rid

    def fail_stage(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "FAILED")

    def finish_stage(self, rid: str, node: Any, config: dict, artifact: Artifact,
                     parent_keys: dict[str, str], upstream: dict[str, Artifact]) -> str:
        """Final metrics, what the stage read, what it made (a LoggedModel by reference)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput, LoggedModelOutput
        from mlflow.entities import RunTag

        self._log_metrics(rid, artifact.metrics)
        datasets = [DatasetInput(Dataset(name=_dataset_name(d),
                                         digest=str(d["digest"])[:36], source_type="local",
                                         source=json.dumps({"uri": Path(d["path"]).as_uri()})),
                                 [InputTag("mlflow.data.context", d.get("split", "train"))])
                    for d in node.kind_cls.datasets_read(node.config, artifact, upstream)]
        models = []
        for p, pkey in parent_keys.items():
            _, model_id = self.producer(pkey)
            if model_id is not None:
                models.append(LoggedModelInput(model_id))
        if datasets or models:
            self.client.log_inputs(rid, datasets=datasets or None, models=models or None)

        if node.kind_cls.makes_model and "checkpoint" in artifact.outputs:
            ckpt = node.out_dir / artifact.outputs["checkpoint"]
            model = self.client.create_logged_model(
                self.experiment_id, name=node.name, source_run_id=rid, model_type="megatron-dist-checkpoint",
                tags={TAG_KEY: node.key, TAG_STAGE: node.name, "forge.uri": ckpt.as_uri()},
                params={k[:250]: v[:6000] for k, v in list(flatten(config).items())[:100]})
            self.client.log_model_artifact(model.model_id, str(self._manifest(node, ckpt, artifact)))
            self.client.finalize_logged_model(model.model_id, "READY")
            self.client.log_outputs(rid, [LoggedModelOutput(model.model_id, int(artifact.metrics.get("steps", 0)))])
            register(self.client, self.uri, rid, model.model_id)  # never raises
        for rel in artifact.outputs.values():  # plots people would rather look at than read,
            path = node.out_dir / rel           # and reports (report/...: curation's)
            if (rel.endswith(".png") or rel.startswith("report/")) and path.is_file():
                folder = str(Path(rel).parent) if rel.startswith("report/") else None
                self.client.log_artifact(rid, str(path), folder)
        self.client.log_batch(rid, tags=[RunTag("forge.artifact", str(node.out_dir / "artifact.json"))])
        self.client.set_terminated(rid, "FINISHED")
        return rid

    def _log_metrics(self, rid: str, final: dict[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(rid, metrics=[Metric(k.replace("/", "."), float(v), now, 0)
                                            for k, v in final.items()])

    @staticmethod
    def _manifest(node: Any, ckpt: Path, artifact: Artifact) -> Path:
        files = sorted(p for p in ckpt.rglob("*") if p.is_file())
        manifest = {"uri": ckpt.as_uri(), "format": "megatron.core.dist_checkpointing",
                    "stage": node.name, "key": node.key,
                    "files": {str(p.relative_to(ckpt)): p.stat().st_size for p in files},
                    "bytes": sum(p.stat().st_size for p in files), "metrics": artifact.metrics}
        out = node.out_dir / "model_manifest.json"
        out.write_text(json.dumps(manifest, indent=2))
        return out


class MetricsTail:
    """Follows a worker's metrics.jsonl and sends new steps to its MLflow run while it trains.

    Lines are on disk first; a step is sent once (a resumed worker rewrites the steps after its
    checkpoint, bit-identical, and those are not sent again).
    """

    def __init__(self, lineage: Lineage, run_id: str, path: Path, every: float = 5.0,
                 warn: Callable[[str], None] | None = None):
        self.lineage, self.run_id, self.path, self.every = lineage, run_id, path, every
        self.warn, self.failing = warn, False
        self.last_step = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-tail", daemon=True)

    def __enter__(self) -> "MetricsTail":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def poll(self, raise_errors: bool = False) -> None:
        """Send the lines not sent yet. If MLflow fails, they stay unsent and the next poll (or
        the end-of-run sync, flows/tracking/sync.py) sends them: nothing is dropped."""
        try:
            self._send()
            self.failing = False
        except Exception as e:  # noqa: BLE001 - MLflow down: training goes on
            if raise_errors:
                raise
            if not self.failing and self.warn:   # once per outage
                self.warn(f"MLflow: sending metrics failed ({type(e).__name__}); training goes on, "
                          "and they are sent from metrics.jsonl when MLflow answers again")
            self.failing = True

    def _send(self) -> None:
        from mlflow.entities import Metric
        if not self.path.exists():
            return
        metrics, last = [], self.last_step
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            step = int(rec.get("step", -1))
            if step <= self.last_step:
                continue
            ts = int(rec.get("time", time.time()) * 1000)
            metrics += [Metric(k, float(v), ts, step) for k, v in rec.items()
                        if k not in ("step", "time") and isinstance(v, (int, float))]
            last = max(last, step)
        for i in range(0, len(metrics), 1000):
            self.lineage.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self.last_step = last   # only once every batch is in
