"""The Triton path of forge_kernels.logprobs on CUDA: the two chunk kernels equal the plain-torch
chunk ops, and token_logprobs(impl="triton") equals the naive reference (values, entropy, and
gradients wrt hidden and weight under random upstream gradients), in fp32 and bf16; then peak
memory and time against the naive version at vocab 100,352 x 8,192 tokens (printed as figures).

Tolerances: chunk kernels vs torch atol 1e-5 (same fp32 math, other summation order);
token_logprobs fp32 values/entropy atol 1e-4 rtol 1e-4, gradients atol 1e-4 rtol 1e-3 (V = 32,000
terms per row and T = 1,000 per weight-gradient entry, summed in other orders; TF32 is off for fp32
matmuls, torch's default); bf16 values atol 1e-3, gradients atol = rtol = 2e-2 (both sides round to
bf16 at the end). Not yet run on a GPU: written and reviewed on a CPU-only machine.
"""
from __future__ import annotations

import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.needs("triton"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from forge_kernels import logprobs, triton_logprobs  # noqa: E402
from forge_kernels.logprobs import token_logprobs, token_logprobs_reference  # noqa: E402


def _inputs(T, H, V, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(T, H, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device="cuda", generator=g) * H ** -0.5 * 3).to(dtype)
    targets = torch.randint(0, V, (T,), device="cuda", generator=g)
    upstream = torch.randn(2, T, device="cuda", generator=g)
    return hidden, weight.requires_grad_(), targets, upstream


def _value_and_grads(fn, hidden, weight, targets, upstream, **kw):
    logp, ent = fn(hidden, weight, targets, **kw)
    loss = (logp * upstream[0]).sum() + (ent * upstream[1]).sum()
    g_h, g_w = torch.autograd.grad(loss, [hidden, weight])
    return logp.detach(), ent.detach(), g_h, g_w


def test_chunk_kernels_equal_torch_chunk_ops():
    g = torch.Generator(device="cuda").manual_seed(1)
    c, V = 70, 5000                                      # V not a multiple of the 2048 tile
    z = torch.randn(c, V, device="cuda", generator=g) * 4
    target = torch.randint(0, V, (c,), device="cuda", generator=g)
    target[::3] = -1                                    # owned by another TP rank
    got = triton_logprobs.chunk_stats_triton(z.clone(), target)
    want = logprobs.chunk_stats_torch(z.clone(), target)
    for name, a, b in zip(("m", "s", "e", "z_y"), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    m, s, e, _ = want
    lse, ent = m + s.log(), s.log() - e / s
    g_logp, g_ent = torch.randn(2, c, device="cuda", generator=g)
    for k in (g_ent, None):
        a = triton_logprobs.chunk_grad_triton(z.clone(), target, lse, ent, g_logp, k, 0.7)
        b = logprobs.chunk_grad_torch(z.clone(), target, lse, ent, g_logp, k, 0.7)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, tol_value, tol_grad", [
    (torch.float32, dict(atol=1e-4, rtol=1e-4), dict(atol=1e-4, rtol=1e-3)),
    (torch.bfloat16, dict(atol=1e-3, rtol=1e-3), dict(atol=2e-2, rtol=2e-2)),
])
def test_triton_token_logprobs_equal_reference(dtype, tol_value, tol_grad):
    hidden, weight, targets, up = _inputs(1000, 512, 32_000, dtype)
    got = _value_and_grads(token_logprobs, hidden, weight, targets, up, temperature=0.8,
                           chunk_size=256, impl="triton")
    want = _value_and_grads(token_logprobs_reference, hidden, weight, targets, up, temperature=0.8)
    for name, a, b, tol in zip(("logp", "entropy", "d hidden", "d weight"), got, want,
                               (tol_value, tol_value, tol_grad, tol_grad)):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


def _measure(run, *args):
    """(peak bytes above the inputs, median seconds of 3) for forward + backward."""
    run(*args)                                          # warm-up: Triton compile, cuBLAS plans
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run(*args)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return torch.cuda.max_memory_allocated() - base, sorted(times)[1]


def test_memory_and_time_against_naive(figure):
    T, H, V = 8192, 1024, 100_352
    hidden, weight, targets, _ = _inputs(T, H, V, torch.float32)

    def naive(h, w, t):                                 # the reference without its entropy
        logp = torch.log_softmax(h @ w.T, dim=-1).gather(1, t[:, None])
        g = torch.autograd.grad(logp.sum(), [h, w])
        del g

    def fused(impl):
        def run(h, w, t):
            logp, _ = token_logprobs(h, w, t, chunk_size=1024, with_entropy=False, impl=impl)
            g = torch.autograd.grad(logp.sum(), [h, w])
            del g
        return run

    results = {"naive": _measure(naive, hidden, weight, targets)}
    for impl in ("torch", "triton"):
        results[f"fused-{impl}"] = _measure(fused(impl), hidden, weight, targets)
    base_mem, base_time = results["naive"]
    for name, (mem, sec) in results.items():
        figure(f"logprobs {name} T={T} V={V} H={H}: peak {mem / 1e9:.2f} GB "
               f"({mem / base_mem:.3f}x naive), {sec * 1e3:.1f} ms ({sec / base_time:.2f}x naive)")
    assert results["fused-triton"][0] <= 0.25 * base_mem
