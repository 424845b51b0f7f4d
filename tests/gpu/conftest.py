"""GPU tests: a test marked ``needs("transformer_engine")`` (or "vllm") is skipped as
"not installed: ..." where that package is absent, which tests/gpu/summary.py reports as such
(never as passed); ``figure`` records a test's figure for the summary table; with
``FORGE_GPU_REPORT=path`` every test phase's outcome is appended there as one JSON line (written
as it happens, so a run cut short by a timeout still reports what finished).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

NOT_INSTALLED = "not installed: "

# tests/gpu/run_all.sh runs from a bare checkout (PYTHONPATH = repository root), without the
# editable install that maps kernels/ to the name forge_kernels: map it here when it is missing.
if importlib.util.find_spec("forge_kernels") is None:
    import sys
    import types
    _pkg = types.ModuleType("forge_kernels")
    _pkg.__path__ = [str(Path(__file__).resolve().parents[2] / "kernels")]
    sys.modules["forge_kernels"] = _pkg


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(module): skipped as 'not installed' where the "
                                       "module is absent (Transformer Engine, vLLM)")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        module = mark.args[0]
        # absent only: an installed package that fails to import fails its tests instead
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{NOT_INSTALLED}{module}")


def _write(row: dict) -> None:
    path = os.environ.get("FORGE_GPU_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def pytest_runtest_logreport(report):
    row = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
           "seconds": round(report.duration, 1),
           "figures": [v for k, v in report.user_properties if k == "figure"]}
    if report.skipped and isinstance(report.longrepr, tuple):
        row["reason"] = report.longrepr[2].removeprefix("Skipped: ")
    elif report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        row["reason"] = crash.message if crash else str(report.longrepr).splitlines()[-1]
    _write(row)


def pytest_collectreport(report):
    if report.failed:  # an import error in a test file: its tests never ran
        _write({"test": report.nodeid, "when": "collect", "outcome": "failed",
                "reason": str(report.longrepr).strip().splitlines()[-1], "figures": []})


@pytest.fixture
def figure(record_property):
    """figure("...") puts a figure into the summary table (and the log)."""
    def record(text: str) -> None:
        print(f"[figure] {text}", flush=True)
        record_property("figure", text)
    return record


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory) -> Path:
    from tests.gpu.worker_runs import write_tokenized
    return write_tokenized(tmp_path_factory.mktemp("data") / "tokenize")
