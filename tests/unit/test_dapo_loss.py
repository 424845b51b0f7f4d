"""forge_kernels.dapo: the DAPO loss term by term against numbers worked out by hand (written here
as literals), its gradient wrt logp against the hand-derived one (zero where a clip is active), the
token mean over an uneven batch, and invariance of loss and gradient to the micro-batch split.

eps_low = 0.2, eps_high = 0.28 throughout unless a test says otherwise, so clip(r) is in [0.8, 1.28].
Tolerance: atol 1e-6 on fp32 values of order 1 (the literals are exact to more digits).
"""
from __future__ import annotations

import math

import pytest
import torch

from forge_kernels.dapo import (clipped_surrogate, dapo_loss, fused_dapo_loss, k3_kl, policy_ratio,
                                token_mean, truncated_is_weight)
from forge_kernels.logprobs import token_logprobs_reference

TOL = dict(atol=1e-6, rtol=1e-6)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def _logp_for_ratios(*ratios):
    """logp with old_logp = 0, so that r = exp(logp) equals the given ratios."""
    return torch.tensor([math.log(r) for r in ratios], dtype=torch.float32).requires_grad_()


def test_clip_low_high_and_inside():
    # tokens: (r, A) = inside (1.1, 2) | clip-high active (1.5, +1) | r above the clip but A < 0
    # (1.5, -1) | clip-low active (0.5, -1) | r below the clip but A > 0 (0.5, +1)
    logp = _logp_for_ratios(1.1, 1.5, 1.5, 0.5, 0.5)
    old, adv, mask = torch.zeros(5), t(2, 1, -1, -1, 1), torch.ones(5)
    # per token: -min(rA, clip(r)A) = -2.2 | -min(1.5, 1.28) = -1.28 | -min(-1.5, -1.28) = 1.5
    #            | -min(-0.5, -0.8) = 0.8 | -min(0.5, 0.8) = -0.5
    pg = clipped_surrogate(policy_ratio(logp, old), adv, 0.2, 0.28)
    torch.testing.assert_close(pg, t(-2.2, -1.28, 1.5, 0.8, -0.5), **TOL)
    loss, stats = dapo_loss(logp, old, adv, mask, total_tokens=5)
    torch.testing.assert_close(loss, torch.tensor(-0.336), **TOL)          # -1.68 / 5
    assert stats["clip_high"].item() == 1 and stats["clip_low"].item() == 1
    assert stats["tokens"].item() == 5 and stats["dual_clipped"].item() == 0
    torch.testing.assert_close(stats["ratio"], torch.tensor(5.1), **TOL)
    torch.testing.assert_close(stats["pg_loss"], torch.tensor(-1.68), **TOL)
    # d loss / d logp_t = -A r / 5 on the unclipped branch, 0 where a clip is active
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, t(-0.44, 0.0, 0.3, 0.0, -0.1), **TOL)


def test_token_mean_over_uneven_batch_with_pads():
    # sequence 1: 3 tokens, A = +1; sequence 2: 7 tokens, A = -0.5; r = 1 everywhere, so the
    # per-token loss is -A: three -1.0 and seven +0.5. Two pad tokens carry garbage.
    logp = torch.zeros(12, requires_grad=True)
    old = torch.zeros(12)
    old[10:] = -1e4                                     # pad: exp(1e4) would be inf
    adv = t(*[1.0] * 3, *[-0.5] * 7, 5.0, 5.0)
    mask = t(*[1.0] * 10, 0, 0)
    loss, stats = dapo_loss(logp, old, adv, mask, total_tokens=10)
    # token mean (-3 + 3.5) / 10 = 0.05; a sequence mean would be (-1 + 0.5) / 2 = -0.25
    torch.testing.assert_close(loss, torch.tensor(0.05), **TOL)
    assert stats["tokens"].item() == 10
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, t(*[-0.1] * 3, *[0.05] * 7, 0.0, 0.0), **TOL)
    torch.testing.assert_close(token_mean(t(1, 2, 3), t(1, 0, 1), 4), torch.tensor(1.0), **TOL)


def test_truncated_importance_weight_above_and_below_cap():
    # exp(old - beh) = 3 (above cap 2 -> 2) and 0.5 (below -> 0.5); r = 1, A = 1: pg = -1
    old = torch.zeros(2)
    beh = t(-math.log(3.0), -math.log(0.5))
    torch.testing.assert_close(truncated_is_weight(old, beh, 2.0), t(2.0, 0.5), **TOL)
    logp = torch.zeros(2, requires_grad=True)
    loss, stats = dapo_loss(logp, old, t(1, 1), torch.ones(2), 2, behaviour_logp=beh, is_cap=2.0)
    torch.testing.assert_close(loss, torch.tensor(-1.25), **TOL)            # (-2 - 0.5) / 2
    assert stats["is_truncated"].item() == 1
    (grad,) = torch.autograd.grad(loss, logp)                               # w * (-A r) / 2
    torch.testing.assert_close(grad, t(-1.0, -0.25), **TOL)
    assert not truncated_is_weight(old.requires_grad_(), beh, 2.0).requires_grad


def test_dual_clip_bounds_negative_advantage_loss():
    # (r, A) = (5, -1): -min(-5, -1.28) = 5 -> dual clip c=3 -> 3 (gradient 0)
    #          (2, -1): 2 < 3, unchanged, gradient -A r = 2
    #          (5, +1): clip-high, -1.28, dual clip not applied to A > 0
    logp = _logp_for_ratios(5.0, 2.0, 5.0)
    adv = t(-1, -1, 1)
    loss, stats = dapo_loss(logp, torch.zeros(3), adv, torch.ones(3), 3, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor(1.24), **TOL)             # (3 + 2 - 1.28) / 3
    assert stats["dual_clipped"].item() == 1 and stats["clip_high"].item() == 1
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, t(0.0, 2.0 / 3, 0.0), **TOL)
    no_dual, _ = dapo_loss(logp, torch.zeros(3), adv, torch.ones(3), 3)
    torch.testing.assert_close(no_dual, torch.tensor(1.9066667), **TOL)     # (5 + 2 - 1.28) / 3


def test_k3_kl_term():
    # p = 0.5, ref = 0.25: 0.5 + ln 2 - 1 = 0.1931472;  p = 0.25, ref = 0.5: 2 - ln 2 - 1 = 0.3068528
    logp = t(math.log(0.5), math.log(0.25)).requires_grad_()
    ref = t(math.log(0.25), math.log(0.5))
    torch.testing.assert_close(k3_kl(logp, ref), t(0.1931472, 0.3068528), **TOL)
    # A = 0 and r = 1: pg = 0, so the loss is kl_coef * mean(kl) = 0.1 * 0.5 / 2
    loss, stats = dapo_loss(logp, logp.detach(), torch.zeros(2), torch.ones(2), 2,
                            ref_logp=ref, kl_coef=0.1)
    torch.testing.assert_close(loss, torch.tensor(0.025), **TOL)
    torch.testing.assert_close(stats["kl"], torch.tensor(0.5), **TOL)
    # d kl / d logp = 1 - exp(ref - logp) = 0.5 and -1; times 0.1 / 2
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, t(0.025, -0.05), **TOL)


def test_micro_batch_split_gives_same_loss_and_gradient():
    g = torch.Generator().manual_seed(3)
    T = 40
    logp = (torch.randn(T, generator=g) * 0.3 - 2).requires_grad_()
    old = logp.detach() + torch.randn(T, generator=g) * 0.3   # ratios in both clip regions
    adv = torch.randn(T, generator=g)
    mask = (torch.rand(T, generator=g) > 0.2).float()
    beh = old + torch.randn(T, generator=g) * 0.2
    kw = dict(dual_clip=3.0, behaviour_logp=beh, is_cap=1.5)
    total = mask.sum()                                  # the whole minibatch's token count
    whole, stats = dapo_loss(logp, old, adv, mask, total, **kw)
    (g_whole,) = torch.autograd.grad(whole, logp)
    parts = [slice(0, 7), slice(7, 19), slice(19, 22), slice(22, 40)]   # 4 uneven micro-batches
    summed = sum(dapo_loss(logp[s], old[s], adv[s], mask[s], total, dual_clip=3.0,
                           behaviour_logp=beh[s], is_cap=1.5)[0] for s in parts)
    (g_parts,) = torch.autograd.grad(summed, logp)
    torch.testing.assert_close(summed, whole, **TOL)
    torch.testing.assert_close(g_parts, g_whole, **TOL)
    assert stats["clip_low"] > 0 and stats["clip_high"] > 0 and stats["is_truncated"] > 0


def test_fused_dapo_loss_equals_reference_logprobs_then_loss():
    g = torch.Generator().manual_seed(5)
    T, H, V = 29, 16, 70
    hidden = torch.randn(T, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g)
    old = torch.randn(T, generator=g) * 0.2 - 4
    adv, mask = torch.randn(T, generator=g), (torch.rand(T, generator=g) > 0.3).float()
    fused, stats = fused_dapo_loss(hidden, weight, targets, old, adv, mask, 25.0,
                                   temperature=0.8, chunk_size=6, dual_clip=2.5)
    g_fused = torch.autograd.grad(fused, [hidden, weight])
    logp, ent = token_logprobs_reference(hidden, weight, targets, temperature=0.8)
    ref, ref_stats = dapo_loss(logp, old, adv, mask, 25.0, dual_clip=2.5)
    g_ref = torch.autograd.grad(ref, [hidden, weight])
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["entropy"], (ent.detach() * mask).sum(), atol=1e-4, rtol=1e-5)
    assert stats["clip_low"] == ref_stats["clip_low"] and stats["tokens"] == mask.sum()


@pytest.mark.parametrize("kwargs, field", [
    (dict(eps_low=0.0), "eps_low"), (dict(eps_low=1.0), "eps_low"),
    (dict(eps_high=-0.1), "eps_high"), (dict(eps_high=1.5), "eps_high"),
    (dict(dual_clip=1.0), "dual_clip"), (dict(is_cap=0.9), "is_cap"),
    (dict(kl_coef=-1.0), "kl_coef"), (dict(kl_coef=0.1), "ref_logp"),
])
def test_bad_hyper_parameters_raise_naming_the_argument(kwargs, field):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=field):
        dapo_loss(x, x, x, torch.ones(3), 3, **kwargs)


def test_bad_shapes_and_token_count_raise():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="advantages"):
        dapo_loss(x, x, torch.zeros(4), torch.ones(3), 3)
    with pytest.raises(ValueError, match="logp"):
        dapo_loss(torch.zeros(1, 3), x, x, torch.ones(3), 3)
    with pytest.raises(ValueError, match="total_tokens"):
        dapo_loss(x, x, x, torch.ones(3), 0)
