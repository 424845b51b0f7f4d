"""The math of one step, shared by training and evaluation: micro-batches, loss, DP/TP reductions.

- ``run_micro_batches``: forward (and backward) over a rank's samples in micro-batches; the loss is
  the token mean over the rank's batch (gradient accumulation divides by the rank's token count).
- ``train_step``: set the LR, zero the grads (and Megatron DDP's buffers), accumulate, all-reduce
  over DP (DDP: mean over ranks into ``param.main_grad``), clip by the global norm, AdamW step.
  With Megatron's distributed optimizer (GPU, ``make_distributed_optimizer``) DDP reduce-scatters
  instead, and the optimizer clips, steps its shard of the fp32 state and all-gathers the weights.
- ``grad_norm``: L2 norm over all gradients, TP shards summed once (TP-duplicated parameters such
  as norms counted on TP rank 0 only), so it equals the TP=1 norm.
- ``heldout_losses``: the token-mean loss of each held-out source (up to HELDOUT_SAMPLES samples).

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
    """Global L2 norm of the gradients (TP shards summed, TP-duplicated parameters counted once)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    sq = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
            sq += p.grad.detach().float().pow(2).sum()
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
    return sq.sqrt()


def run_micro_batches(model, dataset, indices, mbs: int, mask, config, env: Env, train: bool):
    """Forward (and backward when ``train``) over ``indices``; returns (sum of losses, tokens).

    The backward pass scales by the global batch's loss-token count over the DP size, so that
    after DDP averages the ranks the gradient is the token mean of the global batch, whatever
    each rank's share of loss tokens (SFT's assistant masks and loss weights make them uneven)."""
    from stages.training.mixture import batch
    total_loss = 0.0
    chunks = [indices[i:i + mbs] for i in range(0, len(indices), mbs)]
    masks = [batch(dataset, c) for c in chunks]
    denom = max(1.0, float(sum(m[2].sum() for m in masks)))
    scale = max(1.0, dp_sum([denom], env)[0]) / env.dp if train and env.dp > 1 else denom
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


def dp_sum(values: list[float], env: Env) -> list[float]:
    """Element-wise sum over the data-parallel ranks."""
    from megatron.core import parallel_state as ps
    if env.dp == 1:
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
