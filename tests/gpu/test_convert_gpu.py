"""Megatron <-> Hugging Face conversion with both models on a GPU (tests/unit/test_convert.py is
the CPU version, skipped where a GPU is visible).

A random-init Megatron model (local layer spec, fp32, norms random too so that a dropped or
swapped norm shows) is saved by ``save_checkpoint`` in an NCCL world of one, as a worker saves.
Then: ``megatron_to_hf`` -> ``GraniteForCausalLM`` on the GPU gives Megatron's logits;
``hf_to_megatron`` -> the checkpoint loads into a fresh GPU model with the same weights, bit for
bit (padding rows zeroed), and the same logits.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# vocabulary 1000 pads to 1024 inside Megatron: the padding is exercised
MODEL = dict(hidden_size=128, num_layers=2, num_attention_heads=4, num_query_groups=2,
             kv_channels=32, ffn_hidden_size=352, vocab_size=1000, max_position_embeddings=256)
SEQ, SEED = 128, 1234
# fp32 both sides (TF32 off), different kernels (HF's SDPA vs Megatron's unfused attention): a
# mapping error moves logits by O(1)
TOLERANCE = 1e-3


@pytest.fixture
def gpu_world():
    """The process group and model-parallel state of a worker on one GPU."""
    from stages.training import measure
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    env = measure.start("cuda", SEED)
    try:
        yield env
    finally:
        measure.finish()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def megatron_model(spec):
    from stages.specs import PrecisionSpec
    from stages.training.model import build_model
    return build_model(spec, PrecisionSpec(), device="cuda", use_te=False).eval()


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    b, s = tokens.shape
    with torch.no_grad():  # no mask: on GPU Megatron builds the causal one
        return model(tokens, torch.arange(s, device=tokens.device).expand(b, s), None).float()


def test_conversion_round_trip_keeps_the_logits_on_gpu(gpu_world, tmp_path, figure):
    from transformers import AutoModelForCausalLM

    from stages.models.convert import hf_to_megatron, megatron_to_hf
    from stages.specs import ModelSpec
    from stages.training.checkpoint import TrainState, is_complete, load_checkpoint, save_checkpoint
    spec = ModelSpec(**MODEL)
    v = spec.vocab_size
    model = megatron_model(spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    ckpt = save_checkpoint(tmp_path / "megatron", model, None, TrainState())
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, v, (2, SEQ), generator=gen).cuda()
    ref = megatron_logits(model, tokens)[..., :v]

    hf_dir = megatron_to_hf(ckpt, spec, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()
    assert type(hf).__name__ == "GraniteForCausalLM"
    with torch.no_grad():
        out = hf(input_ids=tokens).logits.float()
    assert out.shape == ref.shape
    diff = (out - ref).abs().max().item()
    assert diff < TOLERANCE, f"HF logits differ from Megatron's by up to {diff:.3g}"

    assert hf_to_megatron(hf_dir, tmp_path / "back") == spec
    assert is_complete(tmp_path / "back")
    back = megatron_model(spec)
    load_checkpoint(tmp_path / "back", back, None)
    before, after = model.state_dict(), back.state_dict()
    for key, t in before.items():
        if not torch.is_tensor(t) or key.endswith("_extra_state"):
            continue
        if "word_embeddings" in key or "output_layer" in key:  # padding rows come back as zeros
            assert torch.equal(after[key][:v], t[:v]) and not after[key][v:].any(), key
        else:
            assert torch.equal(after[key], t), key
    # same weights, same kernels: equal up to GPU kernel nondeterminism (none expected)
    again = (megatron_logits(back, tokens)[..., :v] - ref).abs().max().item()
    assert again <= 1e-6, f"the round-tripped checkpoint's logits differ by up to {again:.3g}"
    figure(f"max |HF - Megatron logit| {diff:.2g} (fp32, seq {SEQ}); round trip: weights "
           f"bit-identical, logits within {again:.2g}")
