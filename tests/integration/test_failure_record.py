"""A worker that fails leaves failure.json (the graph shows the stage as failed); the attempt that
completes the stage leaves none."""
from __future__ import annotations

import json

import pytest

from tests.support.helpers import SMALL, forge

pytestmark = pytest.mark.slow


def test_failed_worker_is_recorded_until_the_stage_completes(prefect_server, tmp_path):
    store = tmp_path / "store"
    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"body": "no text column"}\n' * 50)   # valid JSON, fails in the worker
    source = f"stages.data.sources.extra={{builder:json,data_files:[{extra}]}}"
    out = forge("run", *SMALL, source, "--only", "data", store=store, check=False)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    (data_dir,) = store.glob("data-*")
    rec = json.loads((data_dir / "failure.json").read_text())
    log = data_dir / "worker.log"
    assert rec["stage"] == "data" and data_dir.name == f"data-{rec['key'][:12]}"
    assert rec["exit_code"] != 0 and rec["log_path"] == str(log)
    assert rec["tail"] and rec["tail"][-1] in log.read_text()
    assert not (data_dir / "artifact.json").exists()

    png = tmp_path / "dag.png"
    out = forge("plan", *SMALL, source, "--graph", str(png), store=store)
    assert "(last attempt failed: data)" in out.stdout and png.stat().st_size > 30_000

    extra.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(100)))
    forge("run", *SMALL, source, "--only", "data", store=store)   # same key: the path is its identity
    assert (data_dir / "artifact.json").exists()
    assert not (data_dir / "failure.json").exists()
    out = forge("plan", *SMALL, source, "--graph", str(png), store=store)
    assert "last attempt failed" not in out.stdout
