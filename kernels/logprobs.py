"""Token log-probs and entropy from hidden states and the output weight, chunked and fused.

For T response tokens with final hidden states ``hidden`` [T, H], the output (LM-head) weight
``weight`` [V_local, H] holding the rows of global token ids [vocab_start, vocab_start + V_local),
targets ``y`` [T] (global ids) and a sampling temperature tau:

    z_t      = hidden_t @ weight.T / tau                     (fp32, this rank's V_local columns)
    lse_t    = log sum_j exp(z_tj)                           (j over the WHOLE vocabulary, all ranks)
    logp_t   = z_t,y_t - lse_t                                -> returned, fp32 [T]
    H_t      = -sum_j p_tj log p_tj,  p_tj = exp(z_tj - lse_t) -> returned, fp32 [T]

Evaluated chunk by chunk over the tokens, so at most a [chunk_size, V_local] block of logits (and
one temporary of that size) exists at a time; the [T, V] log-softmax is never materialised.
Per chunk and row, the statistics kept are (shift m = the row's local max):

    m = max_j z_j,   s = sum_j exp(z_j - m),   e = sum_j exp(z_j - m) (z_j - m),   z_y (0 if not owned)

Ranks of a tensor-parallel group combine them with one MAX and one SUM all-reduce of [T] vectors
(M = global max, a_r = exp(m_r - M)):  S = sum_r a_r s_r,  E = sum_r a_r (e_r + (m_r - M) s_r), so

    lse = M + log S,     H = log S - E / S,     logp = z_y - lse.

Backward (a custom ``torch.autograd.Function``) recomputes each chunk's logits and forms, with
upstream gradients g (for logp) and k (for entropy), in place in the logits buffer:

    dL/dz_j = g (1[j = y] - p_j) - k p_j (log p_j + H)

then dL/dhidden = dz @ weight / tau (all-reduced SUM over the TP group, so every rank holds the full
gradient, like Megatron's vocab-parallel cross-entropy) and dL/dweight = dz.T @ hidden / tau (each
rank its own rows). The entropy is differentiable (the formula above); the RL loss only logs it.

With Megatron, pass the hidden states that would enter the output layer (not through
``copy_to_tensor_model_parallel_region``, whose backward would all-reduce d hidden a second time);
with sequence parallelism, all-gather them with ``gather_from_sequence_parallel_region(h,
tensor_parallel_output_grad=False)`` (backward: split, no reduction) for the same reason.
Deterministic on CPU and CUDA (no atomics; fixed chunk and reduction order).

Memory: besides the chunk buffers, an fp32 copy of ``weight`` when it is not fp32 already (math is
in fp32 whatever the input dtype) and the fp32 weight gradient accumulator [V_local, H].

``impl="auto"`` uses the Triton kernels of ``forge_kernels.triton_logprobs`` for the per-chunk
reductions and the logits gradient when ``hidden`` is on CUDA and Triton imports; "torch" forces the
plain-torch chunk code; "triton" demands the kernels (RuntimeError where they cannot run). The
matmuls are torch's (cuBLAS) in every case.

``token_logprobs_reference`` is the naive version the tests compare against: full fp32 logits,
``log_softmax``, gather, entropy = -(p * logp).sum(-1).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

IMPLS = ("auto", "torch", "triton")


# ------------------------------------------------------------------ per-chunk ops (plain torch)
def chunk_stats_torch(z: Tensor, local_target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(m, s, e, z_y) of one chunk of scaled logits z [c, V_local]; local_target [c] is the column
    of the target, -1 where another rank owns it. Overwrites z (it becomes z - m)."""
    owned = local_target >= 0
    z_y = z.gather(1, local_target.clamp(min=0)[:, None])[:, 0] * owned
    m = z.max(dim=1).values
    z.sub_(m[:, None])
    ex = z.exp()
    s = ex.sum(dim=1)
    e = ex.mul_(z).sum(dim=1)
    return m, s, e, z_y


def chunk_grad_torch(z: Tensor, local_target: Tensor, lse: Tensor, ent: Tensor, g_logp: Tensor,
                     g_ent: Tensor | None, scale: float) -> Tensor:
    """dL/d(hidden @ weight.T) of one chunk, written into z [c, V_local] (scaled logits), returned.
    ``scale`` = 1 / tau (the chain rule through the temperature)."""
    logp = z.sub_(lse[:, None])                        # log p, in place
    p = logp.exp()
    if g_ent is None:
        coef = logp.fill_(0).add_(g_logp[:, None])
    else:                                              # g + k (log p + H)
        coef = logp.add_(ent[:, None]).mul_(g_ent[:, None]).add_(g_logp[:, None])
    dz = coef.mul_(p).neg_()
    del p
    owned = local_target >= 0
    rows = torch.nonzero(owned)[:, 0]
    dz[rows, local_target[rows]] += g_logp[rows]
    return dz.mul_(scale)


# ------------------------------------------------------------------ the autograd function
def _combine(m, s, e, z_y, owned, tp_group):
    """Stats of every rank -> (lse, entropy, logp, owners per token)."""
    m_glob = m.clone()
    if tp_group is not None:
        torch.distributed.all_reduce(m_glob, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    a = torch.exp(m - m_glob)
    sums = torch.stack([a * s, a * (e + (m - m_glob) * s), z_y, owned.to(s.dtype)])
    if tp_group is not None:
        torch.distributed.all_reduce(sums, group=tp_group)
    big_s, big_e, z_y, owners = sums
    log_s = big_s.log()
    return m_glob + log_s, log_s - big_e / big_s, z_y - (m_glob + log_s), owners


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, vocab_start, tp_group,
                with_entropy, ops):
        stats_fn, grad_fn = ops
        w32 = weight.float()
        local_target = targets - vocab_start
        local_target = torch.where((local_target >= 0) & (local_target < weight.shape[0]),
                                   local_target, -1)
        scale = 1.0 / temperature
        T = hidden.shape[0]
        parts = []
        with torch.no_grad():
            for lo in range(0, T, chunk_size):
                hi = min(lo + chunk_size, T)
                z = torch.matmul(hidden[lo:hi].float(), w32.T).mul_(scale)
                parts.append(stats_fn(z, local_target[lo:hi]))
                del z
            m, s, e, z_y = (torch.cat(p) for p in zip(*parts)) if parts else \
                (hidden.new_zeros(0, dtype=torch.float32),) * 4
            lse, ent, logp, owners = _combine(m, s, e, z_y, local_target >= 0, tp_group)
        if T and not bool((owners == 1).all()):
            bad = targets[owners != 1][:5].tolist()
            raise ValueError(f"targets: ids {bad} are outside the vocabulary [vocab_start, "
                             f"vocab_start + V_local) of every rank; pass global token ids")
        ctx.save_for_backward(hidden, weight, local_target, lse, ent)
        ctx.cfg = (scale, chunk_size, tp_group, ops)
        ctx.set_materialize_grads(False)               # an unused output's grad arrives as None
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, local_target, lse, ent = ctx.saved_tensors
        scale, chunk_size, tp_group, (_, grad_fn) = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w32 = weight.float()
        T = hidden.shape[0]
        if g_logp is None:
            g_logp = lse.new_zeros(T)
        g_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        g_w = torch.zeros(w32.shape, dtype=torch.float32, device=w32.device) if need_w else None
        for lo in range(0, T, chunk_size):
            hi = min(lo + chunk_size, T)
            h32 = hidden[lo:hi].float()
            z = torch.matmul(h32, w32.T).mul_(scale)
            dz = grad_fn(z, local_target[lo:hi], lse[lo:hi], ent[lo:hi], g_logp[lo:hi],
                         None if g_ent is None else g_ent[lo:hi], scale)
            if need_h:
                torch.matmul(dz, w32, out=g_h[lo:hi])
            if need_w:
                g_w.addmm_(dz.T, h32)
            del z, dz
        if need_h and tp_group is not None:
            torch.distributed.all_reduce(g_h, group=tp_group)
        return (None if g_h is None else g_h.to(hidden.dtype),
                None if g_w is None else g_w.to(weight.dtype),
                None, None, None, None, None, None, None)


def _check(hidden, weight, targets, temperature, chunk_size, vocab_start, impl):
    if not isinstance(hidden, Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden: want a float tensor [T, H], got {getattr(hidden, 'shape', hidden)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point() \
            or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: want a float tensor [V_local, H={hidden.shape[1]}], "
                         f"got {getattr(weight, 'shape', weight)}")
    if not isinstance(targets, Tensor) or targets.dtype != torch.int64 \
            or targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets: want int64 [T={hidden.shape[0]}] global token ids, got "
                         f"{getattr(targets, 'dtype', type(targets))} {getattr(targets, 'shape', '')}")
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError(f"hidden, weight, targets: all on one device, got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: want a float > 0, got {temperature!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: want an int >= 1, got {chunk_size!r}")
    if not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start: want an int >= 0 (first global id of weight's rows), "
                         f"got {vocab_start!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl: want one of {IMPLS}, got {impl!r}")


def _ops(impl: str, device: torch.device):
    if impl == "torch":
        return chunk_stats_torch, chunk_grad_torch
    from forge_kernels import triton_logprobs
    if impl == "auto" and not (device.type == "cuda" and triton_logprobs.available()):
        return chunk_stats_torch, chunk_grad_torch
    triton_logprobs.require()
    if device.type != "cuda":
        raise RuntimeError(f"impl='triton' needs CUDA tensors, got {device}; use impl='torch'")
    return triton_logprobs.chunk_stats_triton, triton_logprobs.chunk_grad_triton


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, temperature: float = 1.0,
                   chunk_size: int = 1024, vocab_start: int = 0, tp_group=None,
                   with_entropy: bool = True, impl: str = "auto") -> tuple[Tensor, Tensor | None]:
    """logp [T] fp32 of ``targets`` under softmax(hidden @ weight.T / temperature) over the whole
    (all TP ranks') vocabulary, and its entropy [T] fp32 (None when ``with_entropy`` is False).
    Both differentiable wrt hidden and weight. See the module docstring for the exact math."""
    _check(hidden, weight, targets, temperature, chunk_size, vocab_start, impl)
    ops = _ops(impl, hidden.device)
    logp, ent = _TokenLogprobs.apply(hidden, weight, targets, float(temperature), chunk_size,
                                     vocab_start, tp_group, with_entropy, ops)
    return logp, (ent if with_entropy else None)


def token_logprobs_reference(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                             temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The naive version: full fp32 logits [T, V], log_softmax, gather; entropy = -(p*logp).sum."""
    logits = hidden.float() @ weight.float().T / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, targets[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
