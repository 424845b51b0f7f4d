"""An exported Granite checkpoint serves in vLLM with the greedy tokens plain transformers gives.

Run on the accelerator machine, in the stage-worker environment that has vLLM (it cannot share an
environment with Prefect 3.9): ``pytest -m gpu tests/gpu/test_vllm_export.py``. Skipped where
there is no CUDA device; reported as "not installed" where vLLM is absent.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from stages.specs import ModelSpec

pytestmark = [pytest.mark.gpu, pytest.mark.needs("vllm"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# head dim 64 and widths that vLLM's attention and GEMM kernels accept
SPEC = ModelSpec(hidden_size=256, num_layers=2, num_attention_heads=4, num_query_groups=2, kv_channels=64,
                 ffn_hidden_size=512, vocab_size=1024, max_position_embeddings=512, rope_theta=40000.0)


def export(tmp_path: Path) -> Path:
    """A random HF Granite model, through Megatron and back (the path a pipeline export takes)."""
    from transformers import GraniteForCausalLM

    from stages.models.convert import granite_config, hf_to_megatron, megatron_to_hf
    torch.manual_seed(0)
    GraniteForCausalLM(granite_config(SPEC)).save_pretrained(str(tmp_path / "src"))
    hf_to_megatron(tmp_path / "src", tmp_path / "ckpt")
    return megatron_to_hf(tmp_path / "ckpt", dataclasses.replace(SPEC), tmp_path / "hf")


def test_vllm_greedy_tokens_equal_transformers(tmp_path):
    import vllm  # installed (the marker says so): an import error fails the test
    from transformers import AutoModelForCausalLM
    hf_dir = export(tmp_path)
    prompts = [[5, 17, 300, 42, 9, 77, 128, 3] * 8, list(range(100, 164))]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).cuda().eval()
    want = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]).cuda(), max_new_tokens=8, do_sample=False)
            want.append(out[0, len(p):].tolist())
    llm = vllm.LLM(model=str(hf_dir), dtype="float32", skip_tokenizer_init=True,
                   gpu_memory_utilization=0.2, enforce_eager=True)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=8)
    got = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params)]
    assert [list(g) for g in got] == want
