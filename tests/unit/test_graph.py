"""`forge plan --graph`: layout of the real pipelines, colours by state, failure records."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from flows import runner
from flows.failures import FAILURE_FILE, clear_failure, last_failure, write_failure
from flows.graph import BOX_H, BOX_W, STATE_COLOURS, draw_dag, fmt_tokens, layout
from stages.base import Artifact, write_artifact
from tests.support.helpers import ROOT


def plan(store, *overrides, only=None):
    return runner.prepare(["pipeline=granite-4.1-tiny", f"store={store}", *overrides], only)


def make_complete(node):
    node.out_dir.mkdir(parents=True, exist_ok=True)
    write_artifact(node.out_dir, Artifact(kind=node.kind, stage=node.name, key=node.key))


def make_checkpoint(node, name="iter_0000050"):
    (node.out_dir / "checkpoints" / name).mkdir(parents=True)
    (node.out_dir / "checkpoints" / name / "done").touch()


def fail(node, code=1):
    write_failure(node.out_dir, node.name, node.key, code, ["Traceback", "KeyError: 'text'"],
                  node.out_dir / "worker.log")


@pytest.mark.parametrize("pipeline", ["granite-4.1-tiny", "granite-4.1"])
def test_every_edge_points_right_and_no_boxes_overlap(pipeline, tmp_path):
    prep = runner.prepare([f"pipeline={pipeline}", f"store={tmp_path}"])
    lay = layout(prep.steps)
    dag_edges = {(p, n) for n, node in prep.dag.nodes.items() for p in node.parents}
    assert lay.edges == dag_edges                       # every edge drawn, none invented
    assert len(lay.direct) + sum(len(b.children) for b in lay.buses) == len(dag_edges)
    for p, c in dag_edges:
        assert lay.boxes[c].col > lay.boxes[p].col, (p, c)
    for p, c in lay.direct:                             # straight arrows only to the next column
        assert lay.boxes[c].col == lay.boxes[p].col + 1
    boxes = list(lay.boxes.values())
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert abs(a.x - b.x) >= BOX_W or abs(a.y - b.y) >= BOX_H, (a.name, b.name)
    # the model's lineage reads as one line; every evaluation hangs below the model it scores
    spine = ["data", "tokenizer", "tokenize", "pretrain-1", "pretrain-4", "extend-1", "merge-3",
             "sft", "rl-chat", "eval-final"]
    assert {lay.boxes[n].row for n in spine} == {0}
    assert all(b.row == -1 for b in boxes if b.name.startswith("eval-") and b.name != "eval-final")
    # a bus runs vertically out of its parent and into its children: nothing may be in the way
    # (or, where no lane route is clear, through the gaps: the chat evaluations' second parent)
    arcs = {(b.source, c) for b in lay.buses if b.side == "arc" for c in b.children}
    assert arcs <= {("merge-3", "eval-chat-before"), ("curate", "eval-chat-after")}, arcs
    for bus in lay.buses:
        if bus.side == "arc":
            continue
        for name in (bus.source, *bus.children):
            me = lay.boxes[name]
            in_way = [o.name for o in boxes if o.col == me.col and
                      (o.row > me.row if bus.side == "above" else o.row < me.row)]
            assert not in_way, (bus.source, name, in_way)
    # the 20 columns fold into two bands, so the picture is not a 30-inch strip
    assert max(b.band for b in boxes) == 1 and lay.per_band == 10


def test_colours_follow_each_stage_state_and_failures_show(tmp_path):
    store = tmp_path / "store"
    nodes = plan(store).dag.nodes
    for name in ("data", "tokenizer", "tokenize", "pretrain-1"):
        make_complete(nodes[name])
    make_checkpoint(nodes["pretrain-2"])                # unfinished: resumes
    make_checkpoint(nodes["pretrain-3"])
    fail(nodes["pretrain-3"])                           # failed, will resume from its checkpoint
    fail(nodes["eval-pretrain"], code=137)              # failed before any checkpoint
    fail(nodes["data"])                                 # stale: data completed since
    prep = plan(store, only="pretrain-.*|eval-pretrain|extend-1")
    png = tmp_path / "dag.png"
    lay = draw_dag(prep.steps, png, "mixed")

    expected = {"data": "cached", "tokenizer": "cached", "tokenize": "cached",
                "pretrain-1": "cached", "pretrain-2": "resume", "pretrain-3": "failed",
                "pretrain-4": "run", "eval-pretrain": "failed", "extend-1": "run",
                "merge-1": "skip", "eval-final": "skip"}
    for name, state in expected.items():
        assert lay.boxes[name].state == state, name
        assert lay.colours[name] == STATE_COLOURS[state], name
    assert lay.boxes["pretrain-3"].note == "exit 1 · resumes iter_0000050"
    assert lay.boxes["eval-pretrain"].note == "exit 137 · reruns from scratch"
    assert lay.boxes["pretrain-2"].note == "from iter_0000050"
    assert lay.boxes["data"].note == "not selected"     # complete, outside --only: still cached

    # the picture itself: a real PNG, with two failed boxes' worth of the failed colour
    import matplotlib.image
    img = matplotlib.image.imread(png)[..., :3]
    assert png.stat().st_size > 30_000 and img.shape[1] > 1000 and img.shape[1] < 2.8 * img.shape[0]

    def pixels(state):
        rgb = np.array([int(STATE_COLOURS[state][i:i + 2], 16) / 255 for i in (1, 3, 5)])
        return int((np.abs(img - rgb).max(axis=-1) < 1 / 255).sum())
    box = BOX_W * BOX_H * 110 ** 2                      # pixels of one box at the saved dpi
    assert 1.4 * box < pixels("failed") < 2.2 * box
    assert 0.7 * box < pixels("resume") < 1.2 * box


def test_fresh_store_is_all_run_or_blocked_and_no_failed_colour(tmp_path, monkeypatch):
    from tests.support.kinds import mark_rl_unbuilt
    mark_rl_unbuilt(monkeypatch)   # every kind is built today: one marked unbuilt shows "blocked"
    lay = draw_dag(plan(tmp_path).steps, tmp_path / "dag.png")
    states = {b.state for b in lay.boxes.values()}
    assert states == {"run", "blocked"}
    assert lay.boxes["pretrain-1"].label == "pretrain · 1.2M tok"
    assert lay.boxes["rl-math"].note == "not built yet" and lay.boxes["eval-final"].note == "parent blocked"


def test_last_failure_counts_only_this_key_without_artifact(tmp_path):
    node = plan(tmp_path).dag.nodes["pretrain-2"]
    assert last_failure(node) is None
    fail(node, code=3)
    rec = last_failure(node)
    assert rec["stage"] == "pretrain-2" and rec["exit_code"] == 3 and rec["key"] == node.key
    assert rec["tail"][-1] == "KeyError: 'text'" and rec["log_path"].endswith("worker.log")
    assert not list(node.out_dir.glob(".*tmp"))        # written atomically, nothing left over
    other = json.loads((node.out_dir / FAILURE_FILE).read_text()) | {"key": "0" * 64}
    (node.out_dir / FAILURE_FILE).write_text(json.dumps(other))
    assert last_failure(node) is None                  # a record of another key
    fail(node)
    (node.out_dir / FAILURE_FILE).write_text('{"stage": "pretrain-2", "ke')
    assert last_failure(node) is None                  # unreadable
    fail(node)
    make_complete(node)
    assert last_failure(node) is None                  # completed since
    clear_failure(node.out_dir)
    assert not (node.out_dir / FAILURE_FILE).exists()
    clear_failure(node.out_dir)                        # nothing to clear is fine


def test_token_labels():
    assert [fmt_tokens(n) for n in (1.2e6, 3e5, 1e13, 5e11, 2048, 512)] == \
        ["1.2M tok", "300k tok", "10T tok", "500B tok", "2.05k tok", "512 tok"]


def test_cli_plan_draws_the_graph(tmp_path):
    png = tmp_path / "plan.png"
    out = subprocess.run([sys.executable, "-m", "flows.cli", "plan", "pipeline=granite-4.1-tiny",
                          f"store={tmp_path / 'store'}", "--graph", str(png)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"graph of 29 stages written to {png}" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 30_000
    assert not (tmp_path / "store").exists()           # planning writes nothing into the store
