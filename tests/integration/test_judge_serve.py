"""The served judge end to end: ``serve_model`` runs the real ``transformers serve`` over a tiny
Granite folder built here (random weights, a BPE tokenizer with the chat role tokens and the chat
template), ``judge_all`` gets a verdict for every sample from it, and no process of the server is
left afterwards. A random model's replies are almost surely unparsable: the test asserts the counts
add up and the policy was applied, never the quality."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from stages.data.judge import JudgeSpec, VerdictCache, judge_all
from stages.data.judge_server import JudgeServerError, judge_endpoint, serve_model
from stages.schema import from_dict
from tests.support.tiny_models import tiny_granite


def processes_naming(text: str) -> dict[int, int]:
    """pid -> process group of every live process whose command line contains ``text``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in cmdline:
                found[int(entry.name)] = os.getpgid(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return found


def test_transformers_serve_judges_and_leaves_nothing(tmp_path):
    hf_dir = tiny_granite(tmp_path / "judge-model")
    spec = from_dict(JudgeSpec, {"serve": "sft", "max_tokens": 24, "concurrency": 2, "rubric": {
        "helpful": {"question": "Does the assistant help?", "threshold": 3}}}, "judge")
    data = [(f"d{i}", [{"role": "user", "content": f"What is {i} + {i}?"},
                       {"role": "assistant", "content": str(2 * i)}]) for i in range(3)]
    t0 = time.perf_counter()
    with judge_endpoint(spec, hf_dir, tmp_path) as url:
        startup = time.perf_counter() - t0
        print(f"transformers serve up in {startup:.1f} s")
        server = processes_naming(str(hf_dir))
        assert server, "no server process names the model folder"
        assert os.getpgid(os.getpid()) not in server.values()  # a process group of its own
        with VerdictCache(tmp_path / "verdicts.sqlite") as cache:
            got = judge_all(data, spec, url, cache)
            assert len(cache) == 3
    assert sorted(got) == ["d0", "d1", "d2"]
    parsed = [v for v in got.values() if not v.unparsable]
    unparsable = [v for v in got.values() if v.unparsable]
    assert len(parsed) + len(unparsable) == 3
    assert all(v.passed is False and v.scores is None for v in unparsable)  # on_unparsable: reject
    assert all(v.passed == (v.scores["helpful"] >= 3) for v in parsed)
    assert processes_naming(str(hf_dir)) == {}
    for pgid in set(server.values()):
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
    log = (tmp_path / "judge-server.log").read_text()
    assert "transformers.cli.transformers serve" in log


def test_a_server_that_dies_while_starting_raises_with_its_log(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(JudgeServerError, match=r"exited with code \d+ while starting(.|\n)*no-such"):
        with serve_model(broken, tmp_path / "server.log"):
            pass
    assert processes_naming(str(broken)) == {}
    with pytest.raises(JudgeServerError, match="not a Hugging Face model folder"):
        with serve_model(tmp_path, tmp_path / "server.log"):
            pass
