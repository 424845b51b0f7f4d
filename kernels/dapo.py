"""The DAPO / GRPO policy loss, one small named function per term, and a fused entry point.

All tensors are flat [T] over one micro-batch's response tokens (advantages already broadcast to
every token of their sequence); ``mask`` is float 0/1. Per token, with A the advantage:

    r      = exp(logp - old_logp)                                   policy_ratio
    pg     = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)         clipped_surrogate (decoupled clip)
    pg     = min(pg, -c A)  where A < 0, if dual_clip c > 1          (bounds the loss of a huge r)
    w      = min(exp(old_logp - behaviour_logp), is_cap), detached   truncated_is_weight
             (w = 1 without behaviour_logp; is_cap None = no truncation)
    kl     = exp(ref - logp) - (ref - logp) - 1                      k3_kl (only when kl_coef > 0)
    loss_t = w pg + kl_coef kl

    loss   = sum_t mask_t loss_t / total_tokens                      token_mean

``total_tokens`` is the number of mask-1 tokens of the WHOLE minibatch, over every micro-batch and
every data-parallel rank (the caller all-reduces it). Summing the returned losses over micro-batches
(gradient accumulation) and DP ranks (gradient all-reduce with SUM, not mean) then gives the token
mean of the global minibatch, and the gradient does not depend on the DP size or micro-batch split.

Gradient wrt logp (what the tests derive by hand): d pg / d logp = -A r where the unclipped branch
is the active one (r A <= clip(r) A), 0 where the clip is active (r < 1 - eps_low with A < 0, or
r > 1 + eps_high with A > 0) or the dual clip is active; the IS weight is a constant.

Masked positions never reach exp(): their log-ratios are zeroed first, so a pad token's garbage
log-prob cannot turn the loss or gradient into inf/nan.

Stats are SUMS over mask-1 tokens (all-reduce them, then divide by the token count):
clip_low (r < 1 - eps_low and A < 0), clip_high (r > 1 + eps_high and A > 0), dual_clipped,
is_truncated (exp(old - beh) > is_cap), kl, ratio, pg_loss, tokens; ``fused_dapo_loss`` adds
entropy. The names of the terms follow verl's core_algos; the code is ours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LossStats:
    """Sums over mask-1 tokens (0-dim fp32 tensors, detached), ready to all-reduce."""
    clip_low: Tensor
    clip_high: Tensor
    dual_clipped: Tensor
    is_truncated: Tensor
    kl: Tensor
    ratio: Tensor
    pg_loss: Tensor
    tokens: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        return dict(self.__dict__)


def check_loss_args(eps_low: float, eps_high: float, dual_clip: float | None = None,
                    is_cap: float | None = None, kl_coef: float = 0.0) -> None:
    """ValueError naming the argument for an out-of-range loss hyper-parameter."""
    for name, eps in (("eps_low", eps_low), ("eps_high", eps_high)):
        if not (isinstance(eps, (int, float)) and 0 < eps < 1):
            raise ValueError(f"{name}: want 0 < {name} < 1 (DAPO: eps_low 0.2, eps_high 0.28), got {eps!r}")
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and dual_clip > 1):
        raise ValueError(f"dual_clip: want a float > 1 (e.g. 3.0) or None, got {dual_clip!r}")
    if is_cap is not None and not (isinstance(is_cap, (int, float)) and is_cap >= 1):
        raise ValueError(f"is_cap: want a float >= 1 (e.g. 2.0) or None, got {is_cap!r}")
    if not (isinstance(kl_coef, (int, float)) and kl_coef >= 0 and math.isfinite(kl_coef)):
        raise ValueError(f"kl_coef: want a float >= 0, got {kl_coef!r}")


def policy_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """r = exp(logp - old_logp)."""
    return torch.exp(logp - old_logp)


def clipped_surrogate(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float,
                      dual_clip: float | None = None) -> Tensor:
    """Per-token LOSS -min(r A, clip(r, 1-eps_low, 1+eps_high) A), then min(., -c A) where A < 0."""
    pg = torch.maximum(-ratio * adv, -ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)
    return pg


def truncated_is_weight(old_logp: Tensor, behaviour_logp: Tensor, cap: float | None) -> Tensor:
    """min(exp(old_logp - behaviour_logp), cap), detached: trainer/engine mismatch correction."""
    w = torch.exp((old_logp - behaviour_logp).detach())
    return w if cap is None else w.clamp(max=cap)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_mean(values: Tensor, mask: Tensor, total_tokens) -> Tensor:
    """(values * mask).sum() / total_tokens: the global-batch token mean's share of this part."""
    return (values * mask).sum() / total_tokens


def _check_tensors(logp, named: dict) -> None:
    if logp.dim() != 1:
        raise ValueError(f"logp: want a flat [T] tensor, got shape {tuple(logp.shape)}")
    for name, t in named.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name}: want shape {tuple(logp.shape)} like logp, got {tuple(t.shape)}")


def dapo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, total_tokens, *,
              eps_low: float = 0.2, eps_high: float = 0.28, dual_clip: float | None = None,
              behaviour_logp: Tensor | None = None, is_cap: float | None = None,
              ref_logp: Tensor | None = None, kl_coef: float = 0.0
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """(sum_t mask_t loss_t / total_tokens, stats sums); see the module docstring."""
    check_loss_args(eps_low, eps_high, dual_clip, is_cap, kl_coef)
    _check_tensors(logp, {"old_logp": old_logp, "advantages": advantages, "mask": mask,
                          "behaviour_logp": behaviour_logp, "ref_logp": ref_logp})
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("ref_logp: kl_coef > 0 needs the reference policy's log-probs")
    if isinstance(total_tokens, (int, float)) and not total_tokens > 0:
        raise ValueError(f"total_tokens: want the minibatch's mask-1 token count (> 0), got {total_tokens}")
    keep = mask != 0
    mask = mask.to(torch.float32)
    adv = advantages.to(torch.float32)
    logp = logp.float()
    old = old_logp.float()
    log_ratio = torch.where(keep, logp - old, 0.0)      # pads never reach exp()
    ratio = torch.exp(log_ratio)
    pg = clipped_surrogate(ratio, adv, eps_low, eps_high, dual_clip)
    loss_t = pg
    is_trunc = torch.zeros_like(mask)
    if behaviour_logp is not None:
        old_minus_beh = torch.where(keep, old - behaviour_logp.float(), 0.0)
        w = truncated_is_weight(old_minus_beh, torch.zeros_like(old_minus_beh), is_cap)
        loss_t = w * pg
        if is_cap is not None:
            is_trunc = (old_minus_beh.detach().exp() > is_cap).float()
    kl = torch.zeros_like(mask)
    if kl_coef > 0:
        kl = k3_kl(torch.where(keep, logp, 0.0), torch.where(keep, ref_logp.float(), 0.0))
        loss_t = loss_t + kl_coef * kl
    loss = token_mean(loss_t, mask, total_tokens)
    with torch.no_grad():
        r = ratio.detach()
        stats = LossStats(
            clip_low=((r < 1 - eps_low) & (adv < 0)).float().mul(mask).sum(),
            clip_high=((r > 1 + eps_high) & (adv > 0)).float().mul(mask).sum(),
            dual_clipped=(((adv < 0) & (clipped_surrogate(r, adv, eps_low, eps_high) > -dual_clip * adv))
                          .float().mul(mask).sum() if dual_clip is not None else mask.new_zeros(())),
            is_truncated=is_trunc.mul(mask).sum(),
            kl=kl.detach().mul(mask).sum(),
            ratio=r.mul(mask).sum(),
            pg_loss=pg.detach().mul(mask).sum(),
            tokens=mask.sum())
    return loss, stats.as_dict()


def fused_dapo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, old_logp: Tensor,
                    advantages: Tensor, mask: Tensor, total_tokens, *, temperature: float = 1.0,
                    chunk_size: int = 1024, vocab_start: int = 0, tp_group=None, impl: str = "auto",
                    **dapo_kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """token_logprobs (chunked; the [T, V] log-softmax is never materialised) then dapo_loss;
    stats also hold ``entropy``, the sum over mask-1 tokens."""
    from forge_kernels.logprobs import token_logprobs
    check_loss_args(dapo_kwargs.get("eps_low", 0.2), dapo_kwargs.get("eps_high", 0.28),
                    dapo_kwargs.get("dual_clip"), dapo_kwargs.get("is_cap"),
                    dapo_kwargs.get("kl_coef", 0.0))      # fail before the expensive part
    logp, entropy = token_logprobs(hidden, weight, targets, temperature=temperature,
                                   chunk_size=chunk_size, vocab_start=vocab_start,
                                   tp_group=tp_group, with_entropy=True, impl=impl)
    loss, stats = dapo_loss(logp, old_logp, advantages, mask, total_tokens, **dapo_kwargs)
    stats["entropy"] = (entropy.detach() * (mask != 0)).sum()
    return loss, stats
