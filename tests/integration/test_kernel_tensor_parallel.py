"""Vocab-parallel token log-probs on 2 CPU ranks (gloo, torch.multiprocessing spawn): each rank
holds half of the output weight's rows; logp, entropy, d hidden (full, all-reduced) and d weight
(each rank its own rows) equal the single-process reference on the whole weight, and so does the
fused DAPO loss with its gradient. Tolerance atol = rtol = 1e-5 (fp32; only the reduction order
differs)."""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

T, H, V, WORLD = 45, 16, 100, 2
TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (T,), generator=g)
    targets[:4] = torch.tensor([0, V // 2 - 1, V // 2, V - 1])   # both sides of the split
    up = torch.randn(2, T, generator=g)
    old = torch.randn(T, generator=g) * 0.3 - 4
    adv = torch.randn(T, generator=g)
    mask = (torch.rand(T, generator=g) > 0.25).float()
    return hidden, weight, targets, up, old, adv, mask


def _rank(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        from forge_kernels.dapo import dapo_loss, fused_dapo_loss
        from forge_kernels.logprobs import token_logprobs, token_logprobs_reference
        hidden, weight, targets, up, old, adv, mask = _inputs()
        rows = slice(rank * V // WORLD, (rank + 1) * V // WORLD)

        h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ref_logp, ref_ent = token_logprobs_reference(h_ref, w_ref, targets, temperature=0.9)
        g_h_ref, g_w_ref = torch.autograd.grad((ref_logp * up[0]).sum() + (ref_ent * up[1]).sum(),
                                               [h_ref, w_ref], retain_graph=True)

        h, w = hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_()
        logp, ent = token_logprobs(h, w, targets, temperature=0.9, chunk_size=8,
                                   vocab_start=rows.start, tp_group=dist.group.WORLD)
        g_h, g_w = torch.autograd.grad((logp * up[0]).sum() + (ent * up[1]).sum(), [h, w])
        torch.testing.assert_close(logp, ref_logp.detach(), **TOL)
        torch.testing.assert_close(ent, ref_ent.detach(), **TOL)
        torch.testing.assert_close(g_h, g_h_ref, **TOL)           # full d hidden on every rank
        torch.testing.assert_close(g_w, g_w_ref[rows], **TOL)     # this rank's rows only

        ref_loss, _ = dapo_loss(ref_logp, old, adv, mask, mask.sum())
        g_h_ref, g_w_ref = torch.autograd.grad(ref_loss, [h_ref, w_ref])
        loss, stats = fused_dapo_loss(h, w, targets, old, adv, mask, mask.sum(), temperature=0.9,
                                      chunk_size=8, vocab_start=rows.start,
                                      tp_group=dist.group.WORLD)
        g_h, g_w = torch.autograd.grad(loss, [h, w])
        torch.testing.assert_close(loss, ref_loss, **TOL)
        torch.testing.assert_close(g_h, g_h_ref, **TOL)
        torch.testing.assert_close(g_w, g_w_ref[rows], **TOL)
    finally:
        dist.destroy_process_group()


def test_two_rank_vocab_split_equals_single_process(tmp_path):
    # a rank that fails raises here (ProcessRaisedException with its traceback)
    mp.spawn(_rank, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
