"""One pretraining phase on Megatron-core: ``train_phase(config, inputs, out_dir, ctx) -> Artifact``.

Build order (one function, ``train_phase``): distributed + model-parallel state (gloo on CPU, NCCL
on GPU; a world of one when not under torchrun; TP x PP x CP x DP) -> threads and seeds -> model
(``model.py``; with PP this rank's pipeline stage) -> AdamW (+ Megatron DDP when DP x CP > 1; on
GPU with ``distributed_optimizer``, DDP then Megatron's distributed optimizer) -> start state ->
data (``mixture.py``) -> steps -> final checkpoint -> held-out loss -> artifact.

Start state, in order of precedence:
1. a complete checkpoint of this very stage in ``out_dir`` (``checkpoint.latest_complete``): resume
   model, optimizer, step, tokens, data position and RNG; the result equals an uninterrupted run
   bit for bit (deterministic data order, fp32 state saved exactly, same kernels);
2. the parent phase's final checkpoint (``from``): weights, AdamW moments and step counter, and
   the total token count (for the power schedule); the step counter, the schedule and the data
   (this phase's own mixture, from sample 0) start fresh. A context extension
   (``carries_optimizer = False``) takes the weights and token count only;
3. a seeded random init (``config.seed``).

A step (``step.train_step``): the global batch is samples ``[step * gbs, (step + 1) * gbs)`` of
the phase's blend; DP rank r takes its contiguous slice, in micro-batches of ``micro_batch_size``
(gradient accumulation; with PP through Megatron's 1F1B schedule, ``step.py``); the loss is the
token mean over the global batch; gradients are all-reduced by Megatron's DDP, clipped by the
global norm (TP- and PP-aware), and AdamW steps with
``schedules.lr_at(...)``. Checkpoints: ``checkpoint.py``, every ``checkpoint_interval`` steps and
at the end, and after the step in which a SIGTERM or SIGINT came (``preemption.py``: then the
worker exits 143 / 130 and a rerun resumes there).
Rank 0 appends every step's loss to ``metrics.jsonl`` and prints a progress line every
``log_interval`` steps. ``OMP_WAIT_POLICY`` is read when OpenMP loads: this module sets it to
PASSIVE before torch is imported (FACTS.md: spinning threads are 2-6x slower on 2 cores).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (no-op if loaded)

import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from stages.base import Artifact, DamagedInput, RunContext, StageInput  # noqa: E402
from stages.schema import to_dict  # noqa: E402
from stages.layout import output_prefixes, rejected_name  # noqa: E402
from stages.training import checkpoint as ckpt  # noqa: E402
from stages.training.model import build_model, causal_mask, padded_vocab_size  # noqa: E402
from stages.training.preemption import Preempted, StopSignals  # noqa: E402
from stages.training.schedules import lr_at  # noqa: E402
from stages.training.step import (Env, heldout_losses, make_distributed_optimizer,  # noqa: E402
                                  make_optimizer, train_step)

# Megatron's import-time notices about optional GPU packages say nothing useful in a CPU worker log.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
warnings.filterwarnings("ignore", message=r"full scope is deprecated")
warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS")
warnings.filterwarnings("ignore", category=FutureWarning,  # ShardedTensor/load_state_dict notices
                        module=r"(megatron\.core\.dist_checkpointing|torch\.distributed\.checkpoint)")


def setup(cluster, seed: int) -> Env:
    """Process group + Megatron model-parallel state + threads + seeds."""
    from megatron.core import parallel_state as ps
    device = cluster.device
    if device == "cpu":
        from stages.training.cpu_shim import apply_cpu_shim
        apply_cpu_shim()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "gloo" if device == "cpu" else "nccl"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        dist.init_process_group(backend)
    else:  # a plain process: a world of one, in-process store (no port to pick)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if world != cluster.world_size:
        raise RuntimeError(f"the worker runs with {world} processes but the cluster config asks for "
                           f"{cluster.world_size} (tensor_parallel={cluster.tensor_parallel} x "
                           f"pipeline_parallel={cluster.pipeline_parallel} x "
                           f"context_parallel={cluster.context_parallel} x "
                           f"data_parallel={cluster.data_parallel}); launch it with "
                           f"torchrun --nproc_per_node={cluster.world_size}")
    ps.initialize_model_parallel(tensor_model_parallel_size=cluster.tensor_parallel,
                                 pipeline_model_parallel_size=cluster.pipeline_parallel,
                                 context_parallel_size=cluster.context_parallel)
    threads = cluster.threads_per_worker
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU init draws from here: the same weights for every TP size
    if device == "cpu":
        from stages.training.cpu_shim import init_cpu_rng_tracker
        init_cpu_rng_tracker()
    else:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(seed)
    return Env(device=device, rank=dist.get_rank(), world=world, tp=cluster.tensor_parallel,
               dp=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
               pp=cluster.pipeline_parallel, cp=cluster.context_parallel)


def teardown() -> None:
    """Destroy Megatron's model-parallel groups and the default process group."""
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def keep_metrics_upto(out_dir: Path, step: int) -> None:
    """Drop metrics lines past ``step`` (written by a run that died before its next checkpoint)."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a half-written last line
    path.write_text("".join(line + "\n" for line in kept))


def loss_summary(out_dir: Path, steps: int) -> dict[str, float]:
    """Mean loss of the first and the last ~5% of the phase's steps, from metrics.jsonl."""
    losses = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[row["step"]] = row["loss"]
    n = max(1, round(0.05 * steps))
    first = [losses[s] for s in range(1, n + 1) if s in losses]
    last = [losses[s] for s in range(steps - n + 1, steps + 1) if s in losses]
    out = {"loss_first": float(np.mean(first))} if first else {}
    return out | ({"loss_last": float(np.mean(last))} if last else {})


def start_state(config, inputs, out_dir: Path, model, optimizer, env: Env, stage: str):
    """Resume this stage, or continue the parent phase, or start fresh (see the module docstring)."""
    found = [None, ""]  # (checkpoint to resume from, what is wrong with the parent's checkpoint)
    if env.rank == 0:  # rank 0 decides, so every rank loads the same one
        found[0] = newest_checkpoint(out_dir, stage)
        if found[0] is None and config.from_ is not None:
            try:
                inputs[config.from_].checkpoint()   # checksums, before anything loads it
            except DamagedInput as e:
                found[1] = str(e)
    dist.broadcast_object_list(found, src=0)
    layout = dict(world_size=env.world, tensor_parallel=env.tp, data_parallel=env.dp)
    if found[0] is not None:
        state = ckpt.load_checkpoint(Path(found[0]), model, optimizer, restore_rng=True)
        state = dataclasses.replace(state, **layout)
        say(env, f"[{stage}] resuming from {found[0]} (step {state.step})")
    elif config.from_ is not None:
        parent = inputs[config.from_].path("checkpoint")
        if found[1]:
            raise DamagedInput(f"[{stage}] {found[1]}")
        carry = config.carries_optimizer  # an extension starts fresh AdamW moments
        prev = ckpt.load_checkpoint(parent, model, optimizer if carry else None)
        state = ckpt.TrainState(tokens_total=prev.tokens_total,
                                optimizer_steps=prev.optimizer_steps if carry else 0, **layout)
        say(env, f"[{stage}] continuing from {config.from_} ({parent}, {prev.tokens_total} tokens"
                 f"{'' if carry else ', weights only'})")
    else:
        state = ckpt.TrainState(**layout)
    if env.rank == 0:
        keep_metrics_upto(out_dir, state.step)
    return state


def newest_checkpoint(out_dir: Path, stage: str) -> Path | None:
    """The newest complete checkpoint of ``out_dir`` (checksums verified), or None; rank 0 only.

    Each newer directory passed over is named in the log with the reason. One that claimed to be
    complete (it has ``done``) but fails the check is moved aside to ``rejected-iter_XXXXXXX-<time>``
    and kept for inspection: never loaded, never counted by pruning."""
    def reject(path: Path, why: str) -> None:
        if not (path / ckpt.DONE).exists():  # a save that was cut short: the next save replaces it
            print(f"[{stage}] skipping {path}: {why}", flush=True)
            return
        aside = path.with_name(rejected_name(path, int(time.time())))
        path.rename(aside)
        print(f"[{stage}] REJECTED checkpoint {path}: {why}; moved to {aside.name}", flush=True)

    return ckpt.latest_complete(out_dir, verify=True, on_reject=reject)


def say(env: Env, text: str) -> None:
    """Print on rank 0 only, flushed (the orchestrator streams worker output line by line)."""
    if env.rank == 0:
        print(text, flush=True)


def phase_data(config, inputs: dict[str, StageInput], out_dir: Path, document_mask: bool = False):
    """The phase's blend, its EOD id, and the held-out prefixes the data stage offers."""
    from stages.training.mixture import build_blended_dataset
    data = inputs[config.data]
    extra = data.artifact.extra
    if extra.get("vocab_size", 0) > config.run_model.vocab_size:
        raise RuntimeError(f"the tokenizer's vocabulary ({extra['vocab_size']}) is larger than "
                           f"model.vocab_size ({config.run_model.vocab_size})")
    used = {s: w for s, w in config.mixture.items() if w > 0}
    prefixes = {s: [str(data.path(k)) for k in output_prefixes(data.artifact.outputs, f"tokens/{s}")]
                for s in used}
    dataset = build_blended_dataset(prefixes, used, config.seq_length,
                                    config.steps * config.global_batch_size, config.seed,
                                    int(extra["eod_id"]), out_dir / "data_cache",
                                    document_mask=document_mask, loss_weights=config.loss_weights)
    heldout = {k.split("/", 1)[1]: str(data.path(k)) for k in sorted(data.artifact.outputs)
               if k.startswith("heldout/")}
    return dataset, int(extra["eod_id"]), heldout


def model_outputs(checkpoint: str, data: StageInput, out_dir: Path) -> dict[str, str]:
    """The checkpoint, and the tokenizer kept beside it: an exported or merged model needs it."""
    import shutil
    if "tokenizer" not in data.artifact.outputs:
        return {"checkpoint": checkpoint}
    shutil.copyfile(data.path("tokenizer"), out_dir / "tokenizer.json")
    return {"checkpoint": checkpoint, "tokenizer": "tokenizer.json"}


def save(out_dir: Path, model, optimizer, state, config, env: Env, stage: str,
         loop_state: dict | None = None) -> Path:
    """Checkpoint (collective) and say how long it took, or why it failed and what to do."""
    t0 = time.time()
    try:
        path = ckpt.save_checkpoint(out_dir, model, optimizer, state, keep=config.keep_checkpoints,
                                    loop_state=loop_state)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException
        raise RuntimeError(save_failure(out_dir, stage, state.step, e)) from e
    say(env, f"[{stage}] saved {path.name} ({time.time() - t0:.1f}s)")
    return path


def save_failure(out_dir: Path, stage: str, step: int, error: Exception) -> str:
    """The message of a failed save: the cause, the space left, the checkpoint a rerun resumes from.

    A full disk (ENOSPC) or a file-size limit (EFBIG, ``ulimit -f``) surfaces through
    dist_checkpointing's writer processes, sometimes as torch's bare "unexpected pos": the free
    space and the limit, measured here, say which."""
    import resource
    import shutil
    root = out_dir / ckpt.CHECKPOINTS
    cause = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    free = shutil.disk_usage(root if root.is_dir() else out_dir).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    newest = ckpt.latest_complete(out_dir, verify=False)
    return (f"[{stage}] checkpoint {ckpt.iter_name(step)} was NOT saved ({cause[-1].strip()}); "
            f"{free / 2**20:.1f} MiB free on {root}"
            + ("" if limit == resource.RLIM_INFINITY else f", file-size limit {limit} bytes")
            + "; nothing of it was kept. "
            + (f"The newest complete checkpoint is {newest.name}: " if newest else
               "There is no complete checkpoint yet: ")
            + "free space (or fix the cause) and run the stage again to resume.")


def data_parallel(model, sharded: bool):
    """Megatron's DDP: gradients in fp32 buffers, all-reduced over DP (reduce-scattered to each
    rank's shard for the distributed optimizer, which then all-gathers the updated weights)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    return DistributedDataParallel(model.config, DistributedDataParallelConfig(
        overlap_grad_reduce=False, use_distributed_optimizer=sharded, grad_reduce_in_fp32=True),
        model)


def train_phase(config, inputs: dict[str, StageInput], out_dir: Path, ctx: RunContext) -> Artifact:
    """Train one phase (see the module docstring); every rank calls it, rank 0's artifact counts."""
    from stages.training.precision import require_fp8_runtime
    t_start = time.time()
    out_dir = Path(out_dir)
    require_fp8_runtime(config.precision, f"stages.{ctx.stage}.precision")  # before any compute
    ckpt.prewarm_writer()  # overlaps the set-up below
    stop = StopSignals().install()  # SIGTERM/SIGINT: finish the step, checkpoint, exit (preemption.py)
    try:
        env = setup(ctx.cluster, config.seed)
        return _train(config, inputs, out_dir, ctx, env, t_start, stop)
    finally:
        stop.uninstall()
        teardown()
        # The worker exits next: spare the interpreter's final garbage collection over Megatron's
        # imports (~1.2 s per stage on this CPU). Objects stay freed by reference counting.
        gc.freeze()


def _train(config, inputs, out_dir: Path, ctx: RunContext, env: Env, t_start: float,
           stop: StopSignals) -> Artifact:
    stage, steps, gbs, seq = ctx.stage, config.steps, config.global_batch_size, config.seq_length
    if gbs % env.dp:
        raise RuntimeError(f"global_batch_size {gbs} is not divisible by data_parallel={env.dp}")
    local = gbs // env.dp
    mbs = config.micro_batch_size or local
    if local % mbs:
        raise RuntimeError(f"micro_batch_size {mbs} does not divide the per-rank batch {local}")
    cluster = ctx.cluster   # the stage's layout; recompute and the distributed optimizer: GPU only
    model = build_model(config.run_model, config.precision, device=env.device, tensor_parallel=env.tp,
                        recompute=cluster.recompute, pipeline_parallel=env.pp,
                        context_parallel=env.cp)
    # Megatron's distributed optimizer lives on DDP's buffers, so DDP comes first, then the start
    # state loads into both; with one DP rank there is nothing to shard: plain AdamW.
    sharded = cluster.distributed_optimizer and env.dp * env.cp > 1
    ddp = data_parallel(model, sharded) if sharded else None
    optimizer = make_distributed_optimizer(ddp, config) if sharded else make_optimizer(model, config)
    state = start_state(config, inputs, out_dir, model, optimizer, env, stage)
    if ddp is None and env.dp * env.cp > 1:  # CP ranks sum partial gradients, as DP ranks do
        ddp = data_parallel(model, False)
    net = ddp or model
    document_mask = config.document_mask
    if document_mask and env.device != "cpu":  # validation refuses it: never train under a false key
        raise RuntimeError(f"[{stage}] document_mask is built for the CPU backend only (on "
                           f"{env.device} it needs THD packing); set document_mask=false")
    dataset, eod_id, heldout = phase_data(config, inputs, out_dir, document_mask)
    mask = causal_mask(seq, env.device)
    startup_s = time.time() - t_start
    say(env, f"[{stage}] start-up {startup_s:.1f}s; {steps} steps of {gbs}x{seq} tokens, "
             f"TP={env.tp} DP={env.dp}{f' PP={env.pp}' if env.pp > 1 else ''}"
             f"{f' CP={env.cp}' if env.cp > 1 else ''}, "
             f"from step {state.step}")

    net.train()
    resumed_at_end = state.step == steps
    train_time, train_tokens, time_log, tok_log = 0.0, 0, 0.0, 0
    while state.step < steps:
        t0 = time.time()
        lr = lr_at(config.schedule, state.step, steps, state.tokens_total)
        first = state.consumed_samples + env.dp_rank * local
        loss, norm = train_step(net, ddp, optimizer, dataset, range(first, first + local), mbs, lr,
                                mask, config, env)
        if not math.isfinite(loss):
            raise FloatingPointError(f"[{stage}] loss is {loss} at step {state.step + 1}")
        state.step += 1
        state.consumed_samples += gbs
        state.tokens_phase += gbs * seq
        state.tokens_total += gbs * seq
        state.optimizer_steps += 1
        dt = time.time() - t0
        train_time, train_tokens = train_time + dt, train_tokens + gbs * seq
        if env.rank == 0:
            ctx.metric(out_dir, state.step, loss=loss, lr=lr, tokens=state.tokens_total,
                       grad_norm=norm, tokens_per_s=gbs * seq / dt)
        if state.step % max(1, config.log_interval) == 0 or state.step == steps:
            rate = (train_tokens - tok_log) / max(train_time - time_log, 1e-9)  # saves excluded
            say(env, f"[{stage}] step {state.step}/{steps} loss {loss:.3f} lr {lr:.1e} "
                     f"tok/s {rate:.0f} eta {(steps - state.step) * gbs * seq / rate:.0f}s")
            time_log, tok_log = train_time, train_tokens
        if signum := stop.agreed(env.device):  # every rank stops after the same step
            path = save(out_dir, model, optimizer, state, config, env, stage)
            raise Preempted(signum, state.step, f"{ckpt.CHECKPOINTS}/{path.name}")
        if state.step < steps and config.checkpoint_interval and \
                state.step % config.checkpoint_interval == 0:
            save(out_dir, model, optimizer, state, config, env, stage)

    final = out_dir / ckpt.CHECKPOINTS / ckpt.iter_name(steps)  # loaded already if resumed_at_end
    if not resumed_at_end:
        final = save(out_dir, model, optimizer, state, config, env, stage)
    t0 = time.time()
    metrics = heldout_losses(model, heldout, eod_id, config, env, out_dir, mask) if heldout else {}
    if heldout:
        say(env, f"[{stage}] held-out loss {metrics.get('heldout_loss', float('nan')):.3f} "
                 f"({time.time() - t0:.1f}s)")
    if env.rank == 0:
        metrics.update(loss_summary(out_dir, steps))
    metrics.update(tokens_per_s=train_tokens / train_time if train_time else 0.0, steps=float(steps),
                   tokens_total=float(state.tokens_total), startup_s=startup_s)
    extra = {"model": to_dict(config.run_model), "tokens_total": state.tokens_total,
             "tokens_phase": state.tokens_phase, "world_size": env.world,
             "tensor_parallel": env.tp, "pipeline_parallel": env.pp, "context_parallel": env.cp,
             "data_parallel": env.dp,
             "padded_vocab_size": padded_vocab_size(config.run_model.vocab_size),
             "parent": config.from_, "seq_length": seq}
    return Artifact(kind=ctx.kind or "pretrain", stage=stage, key=ctx.key,
                    outputs=model_outputs(f"{ckpt.CHECKPOINTS}/{final.name}", inputs[config.data], out_dir),
                    metrics=metrics, extra=extra)
