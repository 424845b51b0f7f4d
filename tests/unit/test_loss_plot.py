"""The loss across all phases: read from each training stage's metrics.jsonl, drawn as one plot,
logged on the pipeline's parent MLflow run."""
from __future__ import annotations

import json

import pytest

from flows import runner
from flows.tracking.loss_plot import LOSS_PLOT, draw_loss, read_curves, running_mean, x_values

# steps per phase as written by the workers below; extend-3 never ran
STEPS = {"pretrain-1": 30, "pretrain-2": 12, "pretrain-3": 12, "pretrain-4": 6,
         "extend-1": 20, "extend-2": 15}
BATCH = 2048   # tokens per step


@pytest.fixture
def store(tmp_path):
    """A store whose training stages wrote metrics.jsonl as the training loop does."""
    dag = runner.prepare(["pipeline=granite-4.1-tiny", f"store={tmp_path / 'store'}"]).dag
    tokens = 0
    for name, node in dag.nodes.items():   # DAG order: the token count carries on
        if name not in STEPS:
            continue
        node.out_dir.mkdir(parents=True)
        lines = []
        for step in range(1, STEPS[name] + 1):
            tokens += BATCH
            lines.append({"step": step, "time": 1.0 * step, "loss": 5.0 / (1 + tokens / 1e4),
                          "lr": 1e-3, "tokens": tokens, "grad_norm": 0.5, "tokens_per_s": 1e4})
        if name == "pretrain-2":   # a worker killed after its checkpoint at step 5 wrote 6-7
            lines = lines[:7] + lines[5:]        # once, and the resumed worker again
        text = "".join(json.dumps(r) + "\n" for r in lines)
        if name == "extend-2":
            text += '{"step": 16, "time": 16.0, "lo'   # a line being written right now
        (node.out_dir / "metrics.jsonl").write_text(text)
    ev = dag.nodes["eval-pretrain"].out_dir    # not a training stage: left out
    ev.mkdir(parents=True)
    (ev / "metrics.jsonl").write_text(json.dumps({"step": 1, "time": 0, "loss": 9.0}) + "\n")
    return dag


def test_curves_are_read_per_training_stage_in_dag_order(store):
    curves = read_curves(store.nodes.values())
    assert [c.stage for c in curves] == list(STEPS)
    for c in curves:
        assert c.steps == list(range(1, STEPS[c.stage] + 1)), c.stage   # each step once
        assert len(c.loss) == len(c.tokens) == STEPS[c.stage]
    axis, xs = x_values(curves)
    assert axis == "tokens"
    flat = [x for phase in xs for x in phase]
    assert flat == sorted(flat) and flat[0] == BATCH and len(set(flat)) == len(flat)


def test_one_line_per_phase_and_a_marked_boundary_where_each_phase_starts(store, tmp_path):
    curves = read_curves(store.nodes.values())
    png = tmp_path / LOSS_PLOT
    fig = draw_loss(curves, png, "tiny")
    ax = fig.axes[0]
    raw = {line.get_gid(): line for line in ax.lines if line.get_gid() in STEPS}
    assert list(raw) == list(STEPS)
    for name, line in raw.items():
        assert len(line.get_xdata()) == STEPS[name]
        assert list(line.get_ydata()) == next(c.loss for c in curves if c.stage == name)
    means = [line for line in ax.lines if str(line.get_gid()).endswith("(mean)")]
    assert len(means) == len(STEPS)
    starts = [c.tokens[0] for c in curves]
    boundaries = sorted(line.get_xdata()[0] for line in ax.lines if line.get_gid() is None)
    assert boundaries == starts[1:]                     # one dashed line per phase change
    labels = {t.get_text().strip(): t.get_position()[0] for t in ax.texts}
    assert labels == dict(zip(STEPS, starts))           # each phase named where it starts
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000


def test_without_token_counts_phases_are_laid_end_to_end_in_steps(store):
    node = store.nodes["pretrain-3"]
    rows = [json.loads(line) for line in (node.out_dir / "metrics.jsonl").read_text().splitlines()]
    (node.out_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "tokens"}) + "\n" for r in rows))
    axis, xs = x_values(read_curves(store.nodes.values()))
    assert axis == "steps"
    assert [x[0] for x in xs] == [1, 31, 43, 55, 61, 81]
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_parent_run_gets_the_plot_and_a_failing_mlflow_only_warns(store, tmp_path):
    from mlflow import MlflowClient

    from flows.tracking.lineage import Lineage
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    lineage = Lineage(uri, "t")
    run = lineage.start_pipeline("granite-4.1-tiny", {}, [], "flow-run")
    nodes = list(store.nodes.values())
    assert lineage.log_loss_plot(run, nodes, "tiny") == LOSS_PLOT
    assert [a.path for a in lineage.client.list_artifacts(run) if a.path.endswith(".png")] == [LOSS_PLOT]
    got = lineage.client.download_artifacts(run, LOSS_PLOT, str(tmp_path))
    assert open(got, "rb").read(4) == b"\x89PNG"

    warnings: list[str] = []
    assert lineage.log_loss_plot("no-such-run", nodes, "tiny", warnings.append) is None
    assert len(warnings) == 1 and "loss plot not logged" in warnings[0]

    bare = runner.prepare(["pipeline=granite-4.1-tiny", f"store={tmp_path / 'empty'}"]).dag
    other = lineage.start_pipeline("granite-4.1-tiny", {}, [], "flow-run-2")
    assert lineage.log_loss_plot(other, bare.nodes.values(), "tiny", warnings.append) is None
    assert LOSS_PLOT not in [a.path for a in lineage.client.list_artifacts(other)]
    assert len(warnings) == 1                           # nothing trained yet: quietly nothing
