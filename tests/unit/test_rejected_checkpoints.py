"""A checkpoint that failed its checksums is moved aside to ``checkpoints/rejected-iter_...`` and
keeps its ``done`` file. `forge plan`, `status`, `runs` and `--graph` must name the checkpoint a
rerun really resumes from (the newest ``iter_*`` with a ``done``), never the rejected one."""
from __future__ import annotations

import json

from flows import cli, runner
from flows.graph import layout
from flows.runs import find_run, format_run
from stages.layout import newest_checkpoint, rejected_name


def plan(store, only=None):
    return runner.prepare(["pipeline=granite-4.1-tiny", f"store={store}"], only)


def checkpoint(out_dir, name):
    path = out_dir / "checkpoints" / name
    path.mkdir(parents=True)
    (path / "done").write_text("{}")
    return path


def damaged_store(store):
    """pretrain-1 with a good iter_0000005 and a newer checkpoint moved aside as damaged."""
    node = plan(store).dag.nodes["pretrain-1"]
    checkpoint(node.out_dir, "iter_0000005")
    bad = checkpoint(node.out_dir, "iter_0000010")
    bad.rename(bad.with_name(rejected_name(bad, 1764800000)))
    checkpoint(node.out_dir, ".tmp-iter_0000015")   # a save in progress is not one either
    return node


def test_the_layout_skips_rejected_and_unfinished_saves(tmp_path):
    node = damaged_store(tmp_path)
    assert sorted(p.name for p in (node.out_dir / "checkpoints").iterdir()) == [
        ".tmp-iter_0000015", "iter_0000005", "rejected-iter_0000010-1764800000"]
    assert newest_checkpoint(node.out_dir).name == "iter_0000005"


def test_plan_status_and_graph_name_the_checkpoint_a_rerun_resumes_from(tmp_path, capsys):
    damaged_store(tmp_path)
    steps = {s.name: s for s in plan(tmp_path).steps}
    assert steps["pretrain-1"].action == "resume"
    assert steps["pretrain-1"].why == "unfinished; resumes from checkpoints/iter_0000005"

    assert cli.main(["status", "pipeline=granite-4.1-tiny", f"store={tmp_path}"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "pretrain-1 " in x)
    assert "unfinished (checkpoints/iter_0000005)" in line and "rejected" not in line

    boxes = layout(plan(tmp_path).steps).boxes
    assert "iter_0000005" in boxes["pretrain-1"].note and "rejected" not in boxes["pretrain-1"].note


def test_runs_names_the_checkpoint_a_rerun_resumes_from(tmp_path):
    damaged_store(tmp_path)
    prep = plan(tmp_path, only="pretrain-1")
    run_file, _ = runner.write_run_file(prep)
    text = format_run(find_run(tmp_path, run_file.stem))
    line = next(x for x in text.splitlines() if x.strip().startswith("pretrain-1"))
    assert "resumes from checkpoints/iter_0000005" in line, text
    assert json.loads(run_file.read_text())["resolved"]["store"] == str(tmp_path.resolve())
