"""The trainer side of RL: token log-probs of rollouts under the Megatron policy, and the updates.

- ``RolloutBatch``: the completions a step trains on, flat: each sequence is prompt + completion
  ids, with the completion's behaviour log-probs (from the engine), its advantage and its loss
  weight (0 for a completion cut at the cap under overlong filtering).
- ``response_logprobs``: one forward of the decoder (Megatron's ``GPTModel`` with its output layer
  bypassed, so the [tokens x vocab] logits are never made), then the fused, chunked kernel
  (``forge_kernels``) on the hidden states of the positions that predict completion tokens, over
  the real vocabulary (TP padding rows dropped, as the engine has none) at the rollout
  temperature, with Granite's ``logits_scaling``. Sequences of a micro-batch are right-padded;
  causal attention keeps padding out of every real position.
- ``update``: one rollout batch -> ``updates_per_batch`` AdamW steps. The batch is cut into
  minibatches in order; each minibatch into contiguous DP slices, each slice into micro-batches of
  ``micro_batch_size`` sequences. The loss of a micro-batch is its part of the DAPO token sum over
  the minibatch's response-token count (known on every rank: each holds the whole batch), scaled by
  the DP size because Megatron's DDP averages the ranks' gradients; so the gradient is the token
  mean of the whole minibatch whatever the DP size or micro-batch split.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from forge_kernels.dapo import fused_dapo_loss
from forge_kernels.logprobs import token_logprobs
from stages.training.model import autocast, causal_mask
from stages.training.step import Env, begin_step, dp_sum, finish_step


# the kernel's sums over response tokens -> the per-token means / fractions logged each step
STAT_NAMES = {"clip_low": "clip_fraction/low", "clip_high": "clip_fraction/high",
              "dual_clipped": "clip_fraction/dual", "is_truncated": "is_weight/truncated_fraction",
              "entropy": "entropy", "kl": "kl", "ratio": "ratio/mean", "pg_loss": "pg_loss",
              "mismatch_abs": "logprob_mismatch/mean_abs"}   # |trainer - engine| per token


@dataclasses.dataclass
class RolloutBatch:
    tokens: list[list[int]]           # prompt + completion ids
    prompt_len: list[int]
    behaviour: list[list[float]]      # behaviour log-prob of each completion token
    advantage: list[float]            # per completion
    weight: list[float]               # loss weight per completion (0: filtered out)

    def __len__(self) -> int:
        return len(self.tokens)

    def response_tokens(self, idx) -> int:
        """Loss-carrying completion tokens of sequences ``idx``."""
        return int(sum(len(self.tokens[i]) - self.prompt_len[i] for i in idx if self.weight[i] > 0))


@contextlib.contextmanager
def hidden_states_only(model):
    """GPTModel returns the decoder's output (after its final norm) instead of logits."""
    inner = getattr(model, "module", model)
    inner.post_process = False
    try:
        yield
    finally:
        inner.post_process = True


def output_weight(model, vocab_size: int) -> torch.Tensor:
    """The output projection's rows of real token ids (TP=1: the TP padding rows dropped)."""
    inner = getattr(model, "module", model)
    w = inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights \
        else inner.output_layer.weight
    return w[:vocab_size]


def _micro(batch: RolloutBatch, idx: list[int], device: str):
    """Right-padded ids [b, L] and, flat over the completion tokens of ``idx`` in order: the row
    and position of the hidden state that predicts each, its target id, behaviour log-prob,
    advantage and weight."""
    length = max(len(batch.tokens[i]) for i in idx)
    ids = torch.zeros(len(idx), length, dtype=torch.long)
    rows, pos, targets, beh, adv, wts = [], [], [], [], [], []
    for r, i in enumerate(idx):
        seq, p = batch.tokens[i], batch.prompt_len[i]
        ids[r, :len(seq)] = torch.tensor(seq)
        n = len(seq) - p
        rows += [r] * n
        pos += range(p - 1, len(seq) - 1)
        targets += seq[p:]
        beh += batch.behaviour[i]
        adv += [batch.advantage[i]] * n
        wts += [batch.weight[i]] * n
    f32 = dict(dtype=torch.float32, device=device)
    return (ids.to(device), torch.tensor(rows, device=device), torch.tensor(pos, device=device),
            torch.tensor(targets, device=device), torch.tensor(beh, **f32),
            torch.tensor(adv, **f32), torch.tensor(wts, **f32))


def _hidden(net, model, ids: torch.Tensor, spec, precision, device: str) -> torch.Tensor:
    b, s = ids.shape
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    with hidden_states_only(model), autocast(precision, device):
        h = net(ids, position_ids, causal_mask(s, device))      # [s, b, h]
    return h.transpose(0, 1).float() / spec.logits_scaling       # Granite: logits / scaling


def response_logprobs(net, model, batch: RolloutBatch, idx: list[int], spec, config,
                      device: str) -> torch.Tensor:
    """Flat log-probs (no grad) of the completion tokens of sequences ``idx``, in order."""
    out = []
    mbs = config.micro_batch_size or len(idx)
    with torch.no_grad():
        for k in range(0, len(idx), mbs):
            ids, rows, pos, targets, *_ = _micro(batch, idx[k:k + mbs], device)
            h = _hidden(net, model, ids, spec, config.precision, device)[rows, pos]
            logp, _ = token_logprobs(h, output_weight(model, spec.vocab_size), targets,
                                     temperature=config.temperature, with_entropy=False)
            out.append(logp)
    return torch.cat(out) if out else torch.zeros(0)


def minibatches(n: int, updates: int) -> list[list[int]]:
    """``updates`` contiguous, near-equal slices of range(n) (the first ones one longer)."""
    size, extra = divmod(n, updates)
    out, start = [], 0
    for u in range(updates):
        end = start + size + (1 if u < extra else 0)
        out.append(list(range(start, end)))
        start = end
    return [m for m in out if m]


def dp_slice(idx: list[int], env: Env) -> list[int]:
    """This DP rank's contiguous share of ``idx``."""
    size = math.ceil(len(idx) / env.dp)
    return idx[env.dp_rank * size:(env.dp_rank + 1) * size]


def update(net, model, ddp, optimizer, batch: RolloutBatch, spec, config, env: Env, lr: float,
           ref=None) -> dict[str, float]:
    """``config.updates_per_batch`` AdamW steps on ``batch``; the step's training statistics."""
    weight_of = lambda m: output_weight(m, spec.vocab_size)  # noqa: E731
    parts = minibatches(len(batch), config.updates_per_batch)
    plan = [dp_slice(m, env) for m in parts]            # this rank's share of each minibatch
    totals = [batch.response_tokens(m) for m in parts]  # each minibatch's loss tokens, all ranks
    old = [response_logprobs(net, model, batch, mine, spec, config, env.device) if mine else None
           for mine in plan]  # the weights that generated the batch, before its first update
    refs = [response_logprobs(ref, ref, batch, mine, spec, config, env.device) if mine and ref
            else None for mine in plan]
    sums: dict[str, float] = {}
    for mine, old_lp in zip(plan, old):   # engine vs trainer log-probs of the same tokens
        if mine:
            beh = torch.tensor([x for i in mine if batch.weight[i] > 0 for x in batch.behaviour[i]])
            kept = torch.tensor([batch.weight[i] > 0 for i in mine
                                 for _ in batch.behaviour[i]], dtype=torch.bool)
            diff = (old_lp.cpu()[kept] - beh).abs()
            sums["mismatch_abs"] = sums.get("mismatch_abs", 0.0) + float(diff.sum())
    norms, losses = [], []
    mbs = config.micro_batch_size
    for mine, total, old_lp, ref_lp in zip(plan, totals, old, refs):
        begin_step(ddp, optimizer, lr)
        loss_sum = 0.0
        offset = 0
        for k in range(0, len(mine), mbs or max(1, len(mine))):
            part = mine[k:k + (mbs or len(mine))]
            ids, rows, pos, targets, beh, adv, wts = _micro(batch, part, env.device)
            n = targets.numel()
            h = _hidden(net, model, ids, spec, config.precision, env.device)[rows, pos]
            loss, stats = fused_dapo_loss(
                h, weight_of(model), targets, old_lp[offset:offset + n], adv, wts,
                max(total, 1) / env.dp, temperature=config.temperature,
                eps_low=config.eps_low, eps_high=config.eps_high, dual_clip=config.dual_clip,
                behaviour_logp=beh if config.is_cap is not None else None, is_cap=config.is_cap,
                ref_logp=None if ref_lp is None else ref_lp[offset:offset + n],
                kl_coef=config.kl_coef)
            loss.backward()
            offset += n
            loss_sum += float(loss.detach()) / env.dp
            for key, v in stats.items():
                sums[key] = sums.get(key, 0.0) + float(v)
        norms.append(finish_step(ddp, optimizer, config))
        losses.append(dp_sum([loss_sum], env)[0])
    keys = sorted(sums)
    summed = dict(zip(keys, dp_sum([sums[k] for k in keys], env)))
    tokens = max(summed.get("tokens", 0.0), 1.0)
    out = {"loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms),
           "trained_tokens": summed.get("tokens", 0.0)}
    for key, value in summed.items():
        if key in STAT_NAMES:
            out[STAT_NAMES[key]] = value / tokens   # fractions and means over response tokens
    return out
