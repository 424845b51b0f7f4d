"""The GPU check's own machinery, on CPU (not marked gpu: CI runs these): the worker spec the GPU
tests write validates, benchmarks/mfu.py's exit status, the report plugin and summary table of
run_all.sh, the wheel folder's size limit, and run_all.sh refusing a machine without a GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu import fetch_wheels, summary
from tests.gpu.worker_runs import REPO, worker_spec

TINY_MFU = ["--device", "cpu", "--model", "tiny", "--seq", "32", "--batch", "2", "--micro-batch",
            "1", "--steps", "2", "--warmup", "1"]


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def test_gpu_worker_spec_is_one_the_worker_accepts(tokenized, tmp_path):
    """The spec the bf16 and FP8 worker tests write gets past ParallelSpec (device cuda with
    the default accelerator, cpu, is refused) and the pretrain config."""
    from stages.worker import load_spec
    kind, config, inputs, out_dir, ctx = load_spec(
        worker_spec(tokenized, tmp_path / "run", {"dtype": "bf16", "fp8": "delayed"}, steps=3))
    assert kind.name == "pretrain" and out_dir == tmp_path / "run"
    assert (ctx.cluster.device, ctx.cluster.world_size) == ("cuda", 1)
    assert (config.precision.dtype, config.precision.fp8, config.steps) == ("bf16", "delayed", 3)
    assert inputs["tokenize"].artifact.extra["vocab_size"] == config.model.vocab_size


@pytest.mark.parametrize("recipe, code", [("bf16", 1), ("fp32", 0)])
def test_mfu_exits_nonzero_when_every_row_failed(tmp_path, recipe, code):
    """bf16 fails on CPU (Megatron's linear backward restores CUDA autocast only): the only row
    fails, and the exit says so after the table and the JSON; an fp32 row that ran exits 0."""
    out = tmp_path / "mfu.json"
    done = subprocess.run([sys.executable, "benchmarks/mfu.py", *TINY_MFU, "--recipes", recipe,
                           "--json", str(out)], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["recipe"] for r in rows] == [recipe]
    if code:
        assert rows[0]["failed"] and "mfu.py: bf16 failed" in done.stderr
    else:
        assert rows[0]["tokens_per_s"] > 0 and json.loads(out.read_text())["failure"] == ""


def test_mfu_failure_verdicts():
    ran = {"recipe": "bf16", "tokens_per_s": 1.0}
    skipped = {"recipe": "mxfp8", "skipped": "not on this GPU"}
    failed = {"recipe": "delayed", "skipped": "FAILED: RuntimeError: x", "failed": True}
    spec = importlib.util.spec_from_file_location("mfu", REPO / "benchmarks" / "mfu.py")
    mfu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mfu)
    assert mfu.failure([ran, skipped]) == ""
    assert mfu.failure([ran, failed]).startswith("delayed failed")
    assert mfu.failure([skipped]).startswith("no precision was measured")


DEMO = '''
import pytest

@pytest.mark.needs("forge_no_such_package")
def test_needs_a_package_that_is_absent():
    pass

def test_passes(figure):
    figure("42 tok/s")

def test_fails():
    assert 1 == 2
'''


def run_demo(tmp_path: Path, *select: str) -> tuple[Path, int]:
    """pytest with tests/gpu/conftest.py as a plugin over three demo tests; its report file."""
    (tmp_path / "test_demo.py").write_text(DEMO)
    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.jsonl"
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.gpu.conftest", "-q",
                           "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_demo.py"), *select],
                          cwd=REPO, env=env(FORGE_GPU_REPORT=str(report)), capture_output=True,
                          text=True, timeout=120)
    return report, done.returncode


def test_summary_never_counts_a_missing_package_as_passed(tmp_path, capsys):
    report, rc = run_demo(tmp_path)
    assert rc == 1
    rows = {check.split("::")[-1]: (status, figure) for check, status, figure in
            summary.summarise([], report, rc, None, None)}
    assert rows == {"test_needs_a_package_that_is_absent": ("not installed", "forge_no_such_package"),
                    "test_passes": ("passed", "42 tok/s"),
                    "test_fails": ("failed", "call: assert 1 == 2")}
    assert summary.main(["--report", str(report), "--pytest-rc", str(rc)]) == 1
    table = capsys.readouterr().out
    assert "1 passed, 1 failed, 1 not installed" in table and table.endswith("exit 1\n")
    # without the failing test: 0; with nothing but the missing package: nothing ran, 1
    report, rc = run_demo(tmp_path, "-k", "not fails")
    assert rc == 0 and summary.main(["--report", str(report), "--pytest-rc", "0"]) == 0
    report, rc = run_demo(tmp_path, "-k", "needs")
    assert summary.main(["--report", str(report), "--pytest-rc", str(rc)]) == 1


def test_summary_fails_on_a_cut_short_run_or_a_failed_step(tmp_path):
    report = tmp_path / "tests.jsonl"
    report.write_text(json.dumps({"test": "tests/gpu/test_x.py::test_y", "when": "setup",
                                  "outcome": "passed", "seconds": 0.1, "figures": []}) + "\n")
    rows = summary.summarise(["install megatron_core-0.16.1|ran|2.5 MiB in 1.0 s"], report, 124,
                             tmp_path / "missing-mfu.json", 124)
    assert [(c, s) for c, s, _ in rows] == [
        ("install megatron_core-0.16.1", "ran"), ("test_x.py::test_y", "failed"),
        ("pytest -m gpu tests/gpu", "failed"), ("benchmarks/mfu.py", "failed")]
    assert "timed out" in rows[2][2] and summary.verdict(rows) == 1
    assert summary.verdict([("machine", "failed", "no CUDA device")]) == 1


def test_wheel_folder_over_the_limit_is_refused(tmp_path, capsys):
    (tmp_path / "a.whl").write_bytes(b"x" * 2**20)
    assert fetch_wheels.size_problem(tmp_path, limit_mib=60) == ""
    with open(tmp_path / "b.whl", "wb") as fh:  # sparse: 60 MiB more, nothing written
        fh.truncate(60 * 2**20)
    assert "61.00 MiB, over the 60 MiB" in fetch_wheels.size_problem(tmp_path, limit_mib=60)
    assert f"{tmp_path}: 2 files, 61.00 MiB (limit 60 MiB)" in capsys.readouterr().out


def test_run_all_refuses_a_machine_without_a_gpu(tmp_path):
    pytest.importorskip("megatron.core")
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bash tests/gpu/run_all.sh is the real run")
    done = subprocess.run(["bash", "tests/gpu/run_all.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env=env(OUT=str(tmp_path / "out"), PYTHON=sys.executable,
                                  FORGE_GPU_WHEELS=str(tmp_path / "no-wheels"),
                                  FORGE_GPU_SITE=str(tmp_path / "site")))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^machine +failed +no CUDA device visible to torch", done.stdout, re.M)
    assert (tmp_path / "out" / "summary.txt").read_text().endswith("exit 1\n")
