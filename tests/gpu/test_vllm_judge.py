"""The curation judge served by vLLM on a GPU (the worker image's path): `serve_model` starts
`vllm serve` over an export, and with `structured_output: true` vLLM's guided decoding makes even a
random model's verdicts parse (the JSON schema of the rubric). Reported as "not installed" where
vLLM is absent: ``pytest -m gpu tests/gpu/test_vllm_judge.py``."""
from __future__ import annotations

import pytest
import torch

from stages.data.judge import JudgeSpec, VerdictCache, judge_all
from stages.data.judge_server import serve_model
from stages.schema import from_dict
from tests.support.tiny_models import tiny_granite

pytestmark = [pytest.mark.gpu, pytest.mark.needs("vllm"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_vllm_serves_the_judge_and_structured_verdicts_parse(tmp_path):
    hf = tiny_granite(tmp_path / "hf", hidden=256, heads=4)
    spec = from_dict(JudgeSpec, {"serve": "model", "structured_output": True, "max_tokens": 64,
                                 "rubric": {"correct": {"question": "Is it right?", "threshold": 3}}},
                     "judge")
    samples = [(f"s{i}", [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{2 * i}."}]) for i in range(4)]
    with serve_model(hf, tmp_path / "vllm.log", device="cuda", startup_timeout_s=600) as url, \
            VerdictCache(tmp_path / "v.sqlite") as cache:
        got = judge_all(samples, spec, url, cache)
    assert len(got) == 4 and not any(v.unparsable for v in got.values()), got
    assert all(1 <= v.scores["correct"] <= 5 for v in got.values())
