"""forge_kernels.logprobs: the chunked, fused token log-probs + entropy equal the naive reference
(values, entropy, and gradients wrt hidden and weight under random upstream gradients for both
outputs), never allocate a [T, V] tensor, and reject bad arguments by name.

Tolerances: fp32 inputs atol = rtol = 1e-5 (both sides compute in fp32; only the summation order
differs). bf16 inputs: values/entropy atol 1e-4 (same fp32 math on the same bf16 numbers),
gradients atol = rtol = 2e-2 (both are rounded to bf16 at the end, 1 bf16 ulp = 2^-8 relative).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from forge_kernels import triton_logprobs
from forge_kernels.logprobs import token_logprobs, token_logprobs_reference

F32 = dict(atol=1e-5, rtol=1e-5)


def _inputs(T, H, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g)
    upstream = torch.randn(2, T, generator=g)
    return hidden, weight, targets, upstream


def _value_and_grads(fn, hidden, weight, targets, upstream, **kw):
    logp, ent = fn(hidden, weight, targets, **kw)
    loss = (logp * upstream[0]).sum() + (ent * upstream[1]).sum()
    g_h, g_w = torch.autograd.grad(loss, [hidden, weight])
    return logp.detach(), ent.detach(), g_h, g_w


@pytest.mark.parametrize("T, chunk_size, temperature", [
    (37, 8, 0.7),      # T not divisible by the chunk
    (37, 1, 1.0),      # one token per chunk
    (37, 100, 1.3),    # one chunk larger than T
    (64, 16, 1.0),
])
def test_fused_equals_reference_fp32(T, chunk_size, temperature):
    hidden, weight, targets, up = _inputs(T, 24, 131)
    got = _value_and_grads(token_logprobs, hidden, weight, targets, up,
                           temperature=temperature, chunk_size=chunk_size)
    want = _value_and_grads(token_logprobs_reference, hidden, weight, targets, up,
                            temperature=temperature)
    for name, a, b in zip(("logp", "entropy", "d hidden", "d weight"), got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **F32, msg=lambda m: f"{name}: {m}")
    assert (got[0] <= 0).all() and (got[1] >= 0).all()


def test_without_entropy_returns_none_and_logp_grads_match():
    hidden, weight, targets, up = _inputs(20, 8, 40)
    logp, ent = token_logprobs(hidden, weight, targets, chunk_size=7, with_entropy=False)
    assert ent is None
    g = torch.autograd.grad((logp * up[0]).sum(), [hidden, weight])
    ref, _ = token_logprobs_reference(hidden, weight, targets)
    want = torch.autograd.grad((ref * up[0]).sum(), [hidden, weight])
    for a, b in zip(g, want):
        torch.testing.assert_close(a, b, **F32)


def test_bf16_inputs_match_reference_and_keep_dtypes():
    hidden, weight, targets, up = _inputs(33, 32, 97, dtype=torch.bfloat16)
    got = _value_and_grads(token_logprobs, hidden, weight, targets, up, chunk_size=10,
                           temperature=0.9)
    want = _value_and_grads(token_logprobs_reference, hidden, weight, targets, up, temperature=0.9)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2], want[2], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[3], want[3], atol=2e-2, rtol=2e-2)


def test_vocab_start_maps_global_ids_to_rows():
    hidden, weight, targets, up = _inputs(12, 8, 30)
    logp, ent = token_logprobs(hidden, weight, targets + 1000, vocab_start=1000, chunk_size=5)
    ref_logp, ref_ent = token_logprobs_reference(hidden, weight, targets)
    torch.testing.assert_close(logp, ref_logp, **F32)
    torch.testing.assert_close(ent, ref_ent, **F32)
    with pytest.raises(ValueError, match="targets"):   # ids 0..29 lie below this rank's rows
        token_logprobs(hidden, weight, targets, vocab_start=1000)


def test_target_outside_vocabulary_raises():
    hidden, weight, targets, _ = _inputs(6, 4, 10)
    targets[3] = 10
    with pytest.raises(ValueError, match=r"targets: ids \[10\]"):
        token_logprobs(hidden, weight, targets)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op returns (forward and backward run through it)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_fused_never_allocates_tokens_by_vocab():
    T, H, V, chunk = 256, 8, 20_000, 16
    hidden, weight, targets, up = _inputs(T, H, V)
    full = T * V * 4                                    # one fp32 [T, V] block: 20 MB
    bound = max(chunk * V, V * H) * 4                   # one chunk of logits, or the fp32 weight
    with _LargestAllocation() as fused:
        _value_and_grads(token_logprobs, hidden, weight, targets, up, chunk_size=chunk)
    with _LargestAllocation() as naive:                 # the monitor sees [T, V] when it exists
        _value_and_grads(token_logprobs_reference, hidden, weight, targets, up)
    assert naive.largest >= full
    assert fused.largest <= bound < full / 10, (fused.largest, bound)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(vocab_start=-1), "vocab_start"),
    (dict(impl="cuda"), "impl"),
])
def test_bad_keyword_arguments_raise(kwargs, field):
    hidden, weight, targets, _ = _inputs(4, 4, 10)
    with pytest.raises(ValueError, match=field):
        token_logprobs(hidden, weight, targets, **kwargs)


def test_bad_tensors_raise():
    hidden, weight, targets, _ = _inputs(4, 4, 10)
    with pytest.raises(ValueError, match="hidden"):
        token_logprobs(hidden[0], weight, targets)
    with pytest.raises(ValueError, match="weight"):
        token_logprobs(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets.int())
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets[:3])


def test_triton_module_imports_on_cpu_and_refuses_clearly():
    assert triton_logprobs.available() is False          # no CUDA / Triton on the CI machine
    hidden, weight, targets, _ = _inputs(4, 4, 10)
    with pytest.raises(RuntimeError, match="impl='torch'"):
        token_logprobs(hidden, weight, targets, impl="triton")
    with pytest.raises(RuntimeError, match="impl='torch'"):
        triton_logprobs.chunk_stats_triton(torch.zeros(2, 10), torch.zeros(2, dtype=torch.int64))
    logp, _ = token_logprobs(hidden, weight, targets, impl="auto")   # auto falls back to torch
    torch.testing.assert_close(logp, token_logprobs_reference(hidden, weight, targets)[0], **F32)
