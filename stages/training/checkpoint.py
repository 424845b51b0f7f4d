"""Training checkpoints: Megatron ``dist_checkpointing`` (reshardable) + train state + RNG, atomic.

Layout of ``<out_dir>/checkpoints/iter_XXXXXXX/`` (XXXXXXX = optimizer steps done in the phase):

- the ``torch_dist`` files of one sharded state dict: ``model`` (``model.sharded_state_dict()``)
  and ``optimizer.state.{exp_avg,exp_avg_sq}.<param key>`` for torch AdamW, sharded like their
  parameters (``megatron.core.dist_checkpointing.optimizer`` helpers), so weights *and* moments
  reshard between TP sizes;
- ``state.json``: ``TrainState`` (phase step, tokens of the phase and in total, consumed samples,
  AdamW's step counter, the parallel layout);
- ``loop_state.json`` (optional): a loop's own resumable state beyond ``TrainState``, as JSON
  (the RL loop's prompt position and dynamic-sampling counters), read back by ``read_loop_state``;
- ``rng/rank_XXXXX.pt``: python, numpy and torch (and cuda) RNG states of each rank;
- ``done`` (JSON), written last: ``{"files": {path: {"size", "xxh3_128", "rank"}}, "state"}``,
  the size and xxh3-128 of every other file and the rank that wrote and hashed it; older
  checkpoints name ``sha256`` instead of ``xxh3_128`` (each entry names its algorithm: both verify).

The manifest is built by every rank at once (``stages/training/manifest.py``).

A save writes into ``checkpoints/.tmp-iter_XXXXXXX``, renames it into place, then writes
``done`` atomically (tmp file + rename). A directory without a valid ``done`` is never
taken as complete (``latest_complete``) and is removed by the next save; a save that fails (a full
disk: ENOSPC, EFBIG) removes what it wrote before it raises. Pruning keeps the newest ``keep``
complete checkpoints (so the final one, the newest, always stays).

``problem`` says why a directory is not a checkpoint to load: no or unreadable ``done``, a listed
file missing, of another size or (``verify``) another digest, a file ``done`` does not list;
the digests are checked by a pool of threads.
``latest_complete`` reports every newer directory it passes over (``on_reject``), so a resume
never loads a damaged checkpoint, and never skips one without saying why.

Every function that touches tensors is collective: all ranks call it. dist_checkpointing starts a
``spawn`` multiprocessing manager, so scripts that save need an ``if __name__ == "__main__"`` guard.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from stages.layout import CHECKPOINTS, DONE, ITER, STATE, TMP, checkpoint_dirs, iter_name, problem
from stages.training.manifest import gather_manifest, rank as _rank, write_atomic as _write_atomic
from stages.training.manifest import write_done

__all__ = ["CHECKPOINTS", "DONE", "STATE", "iter_name", "problem", "write_done"]
MOMENTS = ("exp_avg", "exp_avg_sq")
LOOP_STATE = "loop_state.json"


@dataclasses.dataclass
class TrainState:
    step: int = 0               # optimizer steps done in this phase
    tokens_phase: int = 0       # tokens trained in this phase
    tokens_total: int = 0       # tokens trained over all phases, parents included
    consumed_samples: int = 0   # samples of this phase's mixture already read
    optimizer_steps: int = 0    # AdamW's own step counter (bias correction), over all phases
    world_size: int = 1
    tensor_parallel: int = 1
    data_parallel: int = 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- completeness
def is_complete(ckpt: Path, verify: bool = True) -> bool:
    """True if ``done`` is valid and every file it lists is there (with its digest if verify)."""
    return not problem(ckpt, verify)


def complete_checkpoints(out_dir: Path, verify: bool = False) -> list[Path]:
    """Complete checkpoints of ``out_dir``, oldest first."""
    return [p for p in checkpoint_dirs(out_dir) if is_complete(p, verify)]


def latest_complete(out_dir: Path, verify: bool = True,
                    on_reject: Callable[[Path, str], None] | None = None) -> Path | None:
    """The newest complete checkpoint under ``out_dir/checkpoints`` (checksums verified), or None.

    ``on_reject(path, why)`` hears of each newer ``iter_*`` directory passed over, newest first."""
    for p in reversed(checkpoint_dirs(out_dir)):
        why = problem(p, verify)
        if not why:
            return p
        if on_reject is not None:
            on_reject(p, why)
    return None


def read_state(ckpt: Path) -> TrainState:
    return TrainState(**json.loads((Path(ckpt) / STATE).read_text()))


# ---------------------------------------------------------------- sharded state
def read_loop_state(ckpt: Path) -> dict | None:
    """The ``loop_state`` saved with ``ckpt`` (None when the loop saved none)."""
    path = Path(ckpt) / LOOP_STATE
    return json.loads(path.read_text()) if path.exists() else None


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _sharded_state(model, optimizer: torch.optim.Optimizer | None, *, for_load: bool) -> dict:
    """{"model": ..., "optimizer": {moment: {index: ShardedTensor}}} for save or load.

    Layout-independent keys: each moment takes its parameter's sharded key, and under pipeline
    parallelism Megatron keys a stage's layers by their global index (its layer offset) and the
    last stage's tied output copy as a replica of the embedding, so checkpoints reshard between
    PP sizes as between TP sizes (tests/integration/test_pipeline_parallel.py)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
    )
    model_sd = model.sharded_state_dict()
    out = {"model": model_sd}
    if optimizer is None:
        return out
    if hasattr(optimizer, "sharded_state_dict"):  # Megatron's distributed optimizer (GPU): its own
        # per-parameter format, keyed optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.<param key>
        out["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=for_load)
        return out
    params = _optimizer_params(optimizer)
    id_map = get_param_id_to_sharded_param_map(model_sd, params)
    if len(id_map) != len(params):
        raise RuntimeError(f"{len(params) - len(id_map)} optimizer parameters are not in the model's "
                           "sharded state dict")
    moments: dict = {m: {} for m in MOMENTS}
    for i, p in enumerate(params):
        state = optimizer.state.get(p, {})
        for m in MOMENTS:
            if m in state and not for_load:
                ten = state[m]
            else:  # a fresh optimizer (or a load): a buffer of the right shape to load into
                ten = torch.zeros_like(p, memory_format=torch.contiguous_format)
            moments[m][i] = make_sharded_optimizer_tensor(id_map[i], ten, f"optimizer.state.{m}")
    out["optimizer"] = moments
    return out


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- save / load
_PREWARM: threading.Thread | None = None
_WARM_QUEUE: list = []
_WARM_READY = threading.Event()


def prewarm_writer() -> None:
    """Start dist_checkpointing's writer-results manager in the background, early.

    Its first use costs ~1.5 s on the critical path: Megatron starts a ``spawn`` multiprocessing
    manager whose process must import torch.distributed.checkpoint to unpickle the first write
    results. Started here (without importing Megatron, which would wait on the main thread's
    import), that work overlaps the model and data set-up on the otherwise idle core; the first
    save hands the warm queue to Megatron (``_use_warm_queue``). Unlike Megatron's own, this
    manager process exits when the worker dies (even by SIGKILL) instead of lingering (and keeping
    the worker's output open). Best effort: it goes through a private Megatron global, so any
    failure leaves the first save to pay.
    """
    global _PREWARM

    def warm():
        try:
            _WARM_QUEUE.extend(_start_manager())
        except Exception:  # e.g. an import racing the main thread's: the first save retries
            pass
        finally:
            _WARM_READY.set()
        threading.Event().wait()  # this thread stays: the manager's parent-death signal follows it

    if _PREWARM is None:
        _PREWARM = threading.Thread(target=warm, name="ckpt-prewarm", daemon=True)
        _PREWARM.start()


def _start_manager() -> list:
    """[queue, manager]: what Megatron would create, but a manager that dies with this process."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.storage import WriteResult
    manager = SyncManager(ctx=mp.get_context("spawn"))
    lasting = threading.current_thread() in (threading.main_thread(), _PREWARM)
    manager.start(_exit_with_parent, (os.getpid(), lasting))
    queue = manager.Queue()
    queue.put({0: [WriteResult(MetadataIndex("warm"), 0, _StorageInfo("warm", 0, 0))]})
    queue.get()
    return [queue, manager]


def _exit_with_parent(parent: int, deathsig: bool) -> None:
    """Initializer of the manager process: exit once the process that started it is gone.

    The kernel's parent-death signal (Linux; it follows the thread that started the manager: used
    when that thread lasts), and a thread that watches the parent as well. It ignores
    SIGTERM and SIGINT: sent to the worker's whole process group (a scheduler, the orchestrator),
    they would end it in the middle of the checkpoint the worker writes on them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if deathsig and os.uname().sysname == "Linux":
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _use_warm_queue() -> None:
    if _PREWARM is not None:
        _WARM_READY.wait()
    if not _WARM_QUEUE:  # no prewarm, or it failed: still not Megatron's manager, which would
        try:             # outlive a killed worker and keep its output open
            _WARM_QUEUE.extend(_start_manager())
        except Exception:
            pass
    if _WARM_QUEUE:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
        if getattr(filesystem_async, "_results_queue", "missing") is None:
            filesystem_async._results_queue = _WARM_QUEUE[0]


_FORKED_BY: list[int] = []


def _writers_die_with_worker() -> None:
    """Make every process this worker forks die with it (Linux ``PR_SET_PDEATHSIG``). Idempotent.

    dist_checkpointing writes from forked processes that then wait on queues shared with the
    worker. A worker killed in the middle of a save (SIGKILL, the OOM killer) left a writer blocked
    for good on a lock the dead worker held (2 of 6 kills inside a save, measured): a stray process
    that keeps the worker's stdout open, so whoever reads it (the orchestrator) never sees its end.
    """
    if _FORKED_BY or not hasattr(os, "register_at_fork") or not os.uname().sysname == "Linux":
        return
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    _FORKED_BY.append(os.getpid())

    def in_child() -> None:
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG: SIGKILL when the parent dies
        if os.getppid() != _FORKED_BY[0]:  # the parent died before that
            os._exit(1)

    os.register_at_fork(before=lambda: _FORKED_BY.__setitem__(0, os.getpid()),
                        after_in_child=in_child)


def _save_strategy():
    """torch_dist with the writes spread over the data-parallel replicas (Megatron's fully
    parallel save), or None (the default: the first replica of each shard writes it all). The
    replicas hold the same shards; without it rank 0 would write, and hash, every DP replica's."""
    from megatron.core import parallel_state as ps
    if not ps.model_parallel_is_initialized() or ps.get_data_parallel_world_size() == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper)
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(),
                                            ps.get_data_parallel_group(with_context_parallel=True))


def save_checkpoint(out_dir: Path, model, optimizer: torch.optim.Optimizer, state: TrainState,
                    keep: int = 2, loop_state: dict | None = None) -> Path:
    """Save atomically to ``out_dir/checkpoints/iter_<state.step>``; prune to ``keep``. Collective.
    ``loop_state`` (rank 0's, JSON-able) is saved beside the train state, under the same ``done``."""
    from megatron.core import dist_checkpointing
    root = Path(out_dir) / CHECKPOINTS
    final = root / iter_name(state.step)
    tmp = root / f"{TMP}{final.name}"
    rank = _rank()
    _use_warm_queue()
    _writers_die_with_worker()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        dist_checkpointing.save(_sharded_state(model, optimizer, for_load=False), str(tmp),
                                sharded_strategy=_save_strategy())
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
        hashed = gather_manifest(tmp)  # every rank its own files, at once; rank 0 gathers them
        if rank == 0:
            _write_atomic(tmp / STATE, json.dumps(dataclasses.asdict(state), indent=1))
            if loop_state is not None:
                _write_atomic(tmp / LOOP_STATE, json.dumps(loop_state, indent=1, sort_keys=True))
            if final.exists():  # an earlier, incomplete save of the same step
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_done(final, state, hashed)
    except BaseException:
        if rank == 0:  # a failed save (a full disk) leaves nothing behind to take space
            for p in (tmp, final):
                shutil.rmtree(p, ignore_errors=True)
        raise
    if rank == 0:
        prune(out_dir, keep)
    _barrier()
    return final


def prune(out_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` (>= 1) complete checkpoints; drop incomplete and temporary ones."""
    root = Path(out_dir) / CHECKPOINTS
    complete = complete_checkpoints(out_dir, verify=False)
    keep_set = set(complete[-max(1, keep):])
    for p in root.iterdir():
        if p.is_dir() and p not in keep_set and p.name.startswith((ITER, TMP)):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(ckpt: Path, model, optimizer: torch.optim.Optimizer | None,
                    restore_rng: bool = False) -> TrainState:
    """Load weights (and AdamW moments + step counter when ``optimizer``) from ``ckpt``. Collective.

    Works across TP/DP layouts (dist_checkpointing reshards). ``restore_rng`` restores this rank's
    RNG state when the checkpoint was written by a world of the same size (a resume).
    """
    from megatron.core import dist_checkpointing
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    loaded = dist_checkpointing.load(_sharded_state(model, optimizer, for_load=True), str(ckpt))
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"checkpoint {ckpt} lacks model tensors: {missing[:5]}")
    if optimizer is not None and hasattr(optimizer, "sharded_state_dict"):
        optimizer.load_state_dict(loaded["optimizer"])   # Megatron's optimizer: moments and step
    elif optimizer is not None:
        step = torch.tensor(float(state.optimizer_steps), dtype=torch.float32)
        for i, p in enumerate(_optimizer_params(optimizer)):
            optimizer.state[p] = {"step": step.clone(),
                                  **{m: loaded["optimizer"][m][i].to(p.device) for m in MOMENTS}}
    rng = ckpt / "rng" / f"rank_{_rank():05d}.pt"
    same_layout = state.world_size == (dist.get_world_size() if dist.is_initialized() else 1)
    if restore_rng and same_layout and rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


def load_tensors(ckpt: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every full tensor of a checkpoint whose key starts with ``prefix`` (e.g. "optimizer."), by
    sharded key; model weights have no prefix. Runs outside a worker too (a world of one)."""
    from megatron.core import dist_checkpointing

    from stages.training.cpu_shim import local_process_group
    with local_process_group():
        tensors = dist_checkpointing.load_plain_tensors(str(ckpt))
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}
