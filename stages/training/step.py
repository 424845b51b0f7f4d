"""The math of one step, shared by training and evaluation: micro-batches, loss, DP/TP reductions.

- ``run_micro_batches``: forward (and backward) over a rank's samples in micro-batches; the loss is
  the token mean over the rank's batch (gradient accumulation divides by the rank's token count).
- ``train_step``: set the LR, zero the grads (and Megatron DDP's buffers), accumulate, all-reduce
  over DP (DDP: mean over ranks into ``param.main_grad``), clip by the global norm, AdamW step.
  With Megatron's distributed optimizer (GPU, ``make_distributed_optimizer``) DDP reduce-scatters
  instead, and the optimizer clips, steps its shard of the fp32 state and all-gathers the weights.
- ``grad_norm``: L2 norm over all gradients, TP shards and PP stages summed once (TP-duplicated
  parameters such as norms counted on TP rank 0 only, the last stage's tied copy of the embedding
  not at all), so it equals the TP=1 PP=1 norm.
- Pipeline parallelism (``env.pp`` > 1): the micro-batches go through Megatron-core's schedule
  (``get_forward_backward_func``: 1F1B, forward-only for evaluation); every stage reads the same
  samples itself (the first needs the tokens, the last the labels and loss mask), only the last
  computes the loss, and its sum is all-reduced over the pipeline group so every rank logs the
  PP=1 value. The loss each micro-batch backpropagates is the same ``summed / scale`` as at PP=1
  (``calculate_per_token_loss`` on: the schedule neither divides by tokens nor by micro-batches).
  With tied embeddings the first stage's embedding and the last stage's output copy get the sum
  of both gradients (``sync_tied_embedding_grads``, over Megatron's embedding group), before the
  norm and the step, so the copies stay equal.
- ``heldout_losses``: the token-mean loss of each held-out source (up to HELDOUT_SAMPLES samples).

Context parallelism (``env.cp`` > 1, GPU only: Transformer Engine's ring attention): each rank
keeps its 2 of 2 x CP chunks of every sequence (``context_parallel_part``); loss sums and token
counts add up over the DP x CP ranks (``dp_sum``) and DDP averages gradients over them, so the
step is the CP=1 step. Not run on GPUs here yet (tests/gpu/test_context_parallel.py).

Every function is collective over the ranks that share its reductions.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from stages.training.model import token_losses

HELDOUT_SAMPLES = 64  # per source, at most


@dataclasses.dataclass
class Env:
    """Where this process stands: device, global rank/world, TP size, DP size and DP rank."""
    device: str
    rank: int
    world: int
    tp: int
    dp: int
    dp_rank: int
    pp: int = 1
    cp: int = 1


def make_optimizer(model, config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms), in model-parameter order."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.schedule.lr, betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.adam_eps)


def make_distributed_optimizer(ddp, config):
    """Megatron's distributed optimizer over ``ddp`` (built with ``use_distributed_optimizer``):
    the same AdamW (decoupled weight decay, none on norms, global-norm clip) with its moments
    sharded over the data-parallel x context-parallel ranks. GPU only: Megatron allocates on CUDA
    (the cluster refuses it on CPU). Not run on a GPU here yet: untested."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    return get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=config.schedule.lr, weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, adam_eps=config.adam_eps,
        clip_grad=config.grad_clip, bf16=False, fp16=False, params_dtype=torch.float32,
        use_distributed_optimizer=True), [ddp])


def is_megatron_optimizer(optimizer) -> bool:
    """Megatron's optimizers step, clip and checkpoint themselves (``sharded_state_dict``)."""
    return hasattr(optimizer, "sharded_state_dict")


def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the gradients (TP shards and PP stages summed, TP-duplicated parameters
    and the last stage's tied embedding copy, Megatron's ``shared``, counted once)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    sq = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p) \
                and not getattr(p, "shared", False):
            sq += p.grad.detach().float().pow(2).sum()
    if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(sq, group=ps.get_model_parallel_group())  # TP x PP
    return sq.sqrt()


def sync_tied_embedding_grads(params) -> None:
    """PP with tied embeddings: the first stage's embedding and the last stage's output copy each
    hold part of the tied weight's gradient; all-reduce them (Megatron's embedding group) so both
    get the whole and step alike. DDP's ``main_grad`` (after its DP mean) or ``grad``."""
    from megatron.core import parallel_state as ps
    if ps.get_pipeline_model_parallel_world_size() == 1 or not ps.is_rank_in_embedding_group():
        return
    for p in params:
        if getattr(p, "shared_embedding", False):
            grad = p.main_grad if hasattr(p, "main_grad") else p.grad
            if grad is None:  # unused this step: a zero contribution, the collective still runs
                grad = p.grad = torch.zeros_like(p)
            dist.all_reduce(grad, group=ps.get_embedding_group())


def run_micro_batches(model, dataset, indices, mbs: int, mask, config, env: Env, train: bool):
    """Forward (and backward when ``train``) over ``indices``; returns (sum of losses, tokens).

    The backward pass scales by the global batch's loss-token count over the DP (x CP) size, so
    that after DDP averages the ranks the gradient is the token mean of the global batch, whatever
    each rank's share of loss tokens (SFT's assistant masks and loss weights make them uneven).
    With PP the micro-batches go through Megatron's schedule (``pipeline_micro_batches``)."""
    from stages.training.mixture import batch
    total_loss = 0.0
    chunks = [indices[i:i + mbs] for i in range(0, len(indices), mbs)]
    masks = [batch(dataset, c) for c in chunks]
    if env.cp > 1:  # this rank's part of every sequence (its tokens, labels and loss mask)
        masks = [context_parallel_part(m) for m in masks]
    denom = max(1.0, float(sum(m[2].sum() for m in masks)))
    # DDP averages over the DP x CP ranks: scale so that the mean is the global batch's token mean
    reduced = env.dp * env.cp
    scale = max(1.0, dp_sum([denom], env)[0]) / reduced if train and reduced > 1 else denom
    if env.pp > 1:
        return pipeline_micro_batches(model, masks, mask, config, env, train, scale), denom
    for tokens, labels, loss_mask, doc_mask in masks:
        tokens, labels, loss_mask = (t.to(env.device) for t in (tokens, labels, loss_mask))
        attn = mask if doc_mask is None else doc_mask.to(env.device)  # per-document masks win
        with torch.set_grad_enabled(train):
            losses = token_losses(model, tokens, labels, attn, config.precision, env.device)
            summed = (losses * loss_mask).sum()
        if train:
            (summed / scale).backward()
        total_loss += float(summed.detach())
    return total_loss, denom


def pipeline_micro_batches(model, micro: list, mask, config, env: Env, train: bool,
                           scale: float) -> float:
    """``micro`` through Megatron's pipeline schedule (1F1B; forward-only when not ``train``);
    returns the sum of the micro-batches' token losses, on every pipeline rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from stages.training.cpu_shim import cuda_calls_on_cpu

    def forward_step(data_iterator, net):
        tokens, labels, loss_mask, doc_mask = next(data_iterator)
        tokens, labels, loss_mask = (t.to(env.device) for t in (tokens, labels, loss_mask))
        attn = mask if doc_mask is None else doc_mask.to(env.device)
        out = token_losses(net, tokens, labels, attn, config.precision, env.device)

        def loss_func(losses):  # last stage only: [b, s] token losses
            summed = (losses * loss_mask).sum()
            tokens_unused = torch.zeros((), dtype=torch.int, device=losses.device)  # we scale
            return summed / scale, tokens_unused, {"sum": summed.detach()}
        return out, loss_func

    schedule = get_forward_backward_func()
    model_config = model.config
    total = torch.zeros((), dtype=torch.float64, device=env.device)
    # the schedule's p2p buffers have one shape: run each run of equal-sized micro-batches alone
    # (training batches are always equal; an evaluation's last one may be short)
    groups: list[list] = []
    for m in micro:
        if groups and groups[-1][0][0].shape == m[0].shape:
            groups[-1].append(m)
        else:
            groups.append([m])
    saved = model_config.calculate_per_token_loss
    model_config.calculate_per_token_loss = True  # no division by tokens or micro-batches
    try:
        for group in groups:
            b, s = group[0][0].shape
            with torch.set_grad_enabled(train), cuda_calls_on_cpu():
                out = schedule(forward_step_func=forward_step, data_iterator=iter(group),
                               model=[model], num_microbatches=len(group), seq_length=s,
                               micro_batch_size=b, forward_only=not train)
            for d in out if ps.is_pipeline_last_stage() else []:
                total += d["sum"].double()
    finally:
        model_config.calculate_per_token_loss = saved
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total)


def context_parallel_part(micro: tuple) -> tuple:
    """This CP rank's part of a micro-batch (tokens, labels, loss mask; no document mask on GPU):
    chunks ``r`` and ``2 CP - 1 - r`` of 2 x CP along the sequence, Megatron's load-balanced split
    for causal attention (``get_batch_on_this_cp_rank``; RoPE positions are sliced the same way
    inside Megatron's rotary embedding)."""
    from megatron.core.utils import get_batch_on_this_cp_rank
    tokens, labels, loss_mask, doc_mask = micro
    if doc_mask is not None:
        raise RuntimeError("document masks are built for the CPU backend only; context "
                           "parallelism runs on GPUs: set document_mask=false")
    part = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "loss_mask": loss_mask})
    return part["tokens"], part["labels"], part["loss_mask"], None


def dp_sum(values: list[float], env: Env) -> list[float]:
    """Element-wise sum over the data-parallel x context-parallel ranks (CP ranks hold parts of
    the same sequences, so their sums add up to the sequences')."""
    from megatron.core import parallel_state as ps
    if env.dp * env.cp == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)  # NCCL wants cuda tensors
    dist.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
    return t.tolist()


def heldout_losses(model, heldout: dict[str, str], eod_id: int, config, env: Env, out_dir: Path,
                   mask) -> dict[str, float]:
    """``heldout_loss/<source>`` for each held-out prefix, and their plain mean ``heldout_loss``
    (unweighted, so phases with different mixtures compare on the same footing)."""
    from stages.training.mixture import build_heldout_dataset
    out = {}
    model.eval()
    for src, prefix in heldout.items():
        ds = build_heldout_dataset(prefix, config.seq_length, config.seed, eod_id, out_dir / "data_cache")
        n = min(len(ds), HELDOUT_SAMPLES)
        mine = list(range(env.dp_rank, n, env.dp))
        mbs = config.micro_batch_size or max(1, config.global_batch_size // env.dp)
        loss, toks = run_micro_batches(model, ds, mine, mbs, mask, config, env, train=False) \
            if mine else (0.0, 0.0)
        loss, toks = dp_sum([loss, toks], env)
        if toks > 0:
            out[f"heldout_loss/{src}"] = loss / toks
    model.train()
    if out:
        out["heldout_loss"] = float(np.mean(list(out.values())))
    return out


def train_step(net, ddp, optimizer, dataset, indices, mbs: int, lr: float, mask, config,
               env: Env) -> tuple[float, float]:
    """One optimizer step on this rank's ``indices``; returns (global mean loss, grad norm)."""
    begin_step(ddp, optimizer, lr)
    loss_sum, toks = run_micro_batches(net, dataset, list(indices), mbs, mask, config, env, train=True)
    norm = finish_step(ddp, optimizer, config)
    loss_sum, toks = dp_sum([loss_sum, toks], env)
    return loss_sum / toks, norm


def begin_step(ddp, optimizer, lr: float) -> None:
    """Set the LR and zero the gradients (and Megatron DDP's buffers) before accumulating."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    if ddp is not None:
        ddp.zero_grad_buffer()
    optimizer.zero_grad(set_to_none=True)


def finish_step(ddp, optimizer, config) -> float:
    """All-reduce the accumulated gradients over DP, clip by the global norm, step; the norm."""
    if ddp is not None:
        ddp.finish_grad_sync()  # all-reduce (mean over DP) into param.main_grad
    sync_tied_embedding_grads(list(ddp.parameters()) if ddp is not None else
                              [p for g in optimizer.param_groups for p in g["params"]])
    if is_megatron_optimizer(optimizer):  # clip + step its shard + all-gather the weights
        _, norm, _ = optimizer.step()     # norm is None when clipping is off (grad_clip 0)
        return float("nan") if norm is None else float(norm)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if ddp is not None:
        for p in params:
            p.grad = p.main_grad
    norm = float(grad_norm(params))
    if config.grad_clip > 0 and norm > config.grad_clip:
        coef = config.grad_clip / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    optimizer.step()
    return norm
