"""Triton kernels for the per-chunk work of ``forge_kernels.logprobs`` on CUDA.

``token_logprobs`` computes each chunk's scaled logits z = hidden[chunk] @ weight.T / tau with a
cuBLAS matmul (fp32), then calls two kernels instead of several torch ops over the [c, V_local]
block (each torch op reads and writes the whole block; a kernel reads it once or twice):

- ``chunk_stats_triton(z, local_target) -> (m, s, e, z_y)``: one program per row; pass 1 takes the
  row max m over BLOCK_V tiles, pass 2 sums s = sum exp(z - m) and e = sum exp(z - m) (z - m);
  z_y = z[target] where this rank owns the target (local_target >= 0), else 0. z is read-only.
- ``chunk_grad_triton(z, local_target, lse, ent, g_logp, g_ent, scale) -> dz``: one program per
  (row, BLOCK_V tile); writes, in place of z,
      dz_j = scale * (g (1[j = y] - p_j) - k p_j (log p_j + H)),   log p_j = z_j - lse
  (the k term only when g_ent is given).

The formulas are those of logprobs.py's docstring; these kernels only fuse the elementwise and
reduction passes. Importing this module never needs CUDA or Triton: the kernels are compiled on
first use. ``available()`` says whether they can run here; every entry point raises RuntimeError
(naming the fix: impl="torch") where they cannot. Use them through
``forge_kernels.logprobs.token_logprobs(..., impl="triton" or "auto")``; this module imports nothing
of logprobs.py (no import cycle).
"""
from __future__ import annotations

import functools
import importlib.util

BLOCK_V_STATS = 2048
BLOCK_V_GRAD = 2048


def available() -> bool:
    """True when Triton is importable and a CUDA device is visible."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch
    return torch.cuda.is_available()


def require() -> None:
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("forge_kernels.triton_logprobs needs Triton, which is not installed; "
                           "use token_logprobs(..., impl='torch')")
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("forge_kernels.triton_logprobs needs a CUDA device and none is visible; "
                           "use token_logprobs(..., impl='torch')")


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def stats_kernel(z_ptr, tgt_ptr, m_ptr, s_ptr, e_ptr, zy_ptr, V, stride_row,
                     BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_row
        offs = tl.arange(0, BLOCK_V)
        run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            z = tl.load(base + cols, mask=cols < V, other=float("-inf"))
            run_max = tl.maximum(run_max, z)
        m = tl.max(run_max, axis=0)
        acc_s = tl.zeros([BLOCK_V], dtype=tl.float32)
        acc_e = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            inside = cols < V
            d = tl.load(base + cols, mask=inside, other=float("-inf")) - m
            ex = tl.exp(d)                                  # 0 outside the row
            acc_s += ex
            acc_e += tl.where(inside, ex * d, 0.0)          # -inf * 0 would be nan
        t = tl.load(tgt_ptr + row)
        z_y = tl.load(base + tl.maximum(t, 0))
        z_y = tl.where(t >= 0, z_y, 0.0)
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, tl.sum(acc_s, axis=0))
        tl.store(e_ptr + row, tl.sum(acc_e, axis=0))
        tl.store(zy_ptr + row, z_y)

    @triton.jit
    def grad_kernel(z_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, V, stride_row, scale,
                    HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        inside = cols < V
        base = z_ptr + row * stride_row
        z = tl.load(base + cols, mask=inside, other=0.0)
        g = tl.load(glogp_ptr + row)
        logp = z - tl.load(lse_ptr + row)
        p = tl.exp(logp)
        if HAS_ENT:
            coef = g + tl.load(gent_ptr + row) * (logp + tl.load(ent_ptr + row))
        else:
            coef = g + tl.zeros([BLOCK_V], dtype=tl.float32)
        dz = -p * coef
        t = tl.load(tgt_ptr + row)
        dz = tl.where(cols == t, dz + g, dz)
        tl.store(base + cols, dz * scale, mask=inside)

    return stats_kernel, grad_kernel


def _check_block(z):
    import torch
    if not (z.is_cuda and z.dtype == torch.float32 and z.dim() == 2 and z.stride(1) == 1):
        raise ValueError(f"z: want a CUDA fp32 [c, V] tensor with unit column stride, got "
                         f"{z.dtype} {tuple(z.shape)} on {z.device}")


def chunk_stats_triton(z, local_target):
    """(m, s, e, z_y) per row of z [c, V_local] (see the module docstring); z is not modified."""
    require()
    import torch
    _check_block(z)
    stats_kernel, _ = _kernels()
    c, V = z.shape
    out = torch.empty((4, c), dtype=torch.float32, device=z.device)
    if c:
        stats_kernel[(c,)](z, local_target.contiguous(), out[0], out[1], out[2], out[3], V,
                           z.stride(0), BLOCK_V=BLOCK_V_STATS, num_warps=8)
    return out[0], out[1], out[2], out[3]


def chunk_grad_triton(z, local_target, lse, ent, g_logp, g_ent, scale):
    """dL/d(hidden @ weight.T) of one chunk, written into z and returned (module docstring)."""
    require()
    import triton
    _check_block(z)
    _, grad_kernel = _kernels()
    c, V = z.shape
    g_logp = g_logp.float().contiguous()                # autograd may hand an expanded view
    has_ent = g_ent is not None
    g_ent = g_ent.float().contiguous() if has_ent else g_logp
    if c:
        grid = (c, triton.cdiv(V, BLOCK_V_GRAD))
        grad_kernel[grid](z, local_target.contiguous(), lse.contiguous(), ent.contiguous(), g_logp,
                          g_ent, V, z.stride(0), float(scale), HAS_ENT=has_ent,
                          BLOCK_V=BLOCK_V_GRAD, num_warps=8)
    return z

