"""The minimal shim that lets Megatron-core train on a CPU (gloo), applied only when the device is CPU.

Megatron-core 0.16 has a few CUDA call sites with no flag to turn them off (docs/platform-notes.md):

- RoPE ``get_emb`` moves ``inv_freq`` to ``torch.cuda.current_device()``;
- ``GlobalMemoryBuffer.get_tensor`` allocates on ``torch.cuda.current_device()``;
- the dist-checkpoint saver asks for ``current_device()`` and calls ``torch.cuda.synchronize()``;
- ``model_parallel_cuda_manual_seed`` needs ``torch.cuda.get_rng_state``.

``apply_cpu_shim()`` points ``torch.cuda.current_device`` at the CPU and makes
``torch.cuda.synchronize`` a no-op; ``init_cpu_rng_tracker()`` creates Megatron's RNG tracker
without touching CUDA (the inference tracker: its ``fork()`` is a no-op context). That tracker is
only consulted for dropout and GPU-side init; our models run with dropout 0 and initialise on the
CPU from the default torch generator, so nothing is lost.

Both are idempotent. Never apply the shim in a process that uses a GPU.

Pipeline parallelism meets two more CUDA call sites: the schedules count tokens in a
``torch.zeros(..., device="cuda")`` and the tied output layer of the last stage is moved with
``weight.data.cuda()`` before its first all-reduce. ``cuda_calls_on_cpu()`` (entered around the
model build and each schedule call) sends both to the CPU. Megatron's p2p path
(``batch_isend_irecv`` when ``batch_p2p_comm``, else paired ``isend``/``irecv``) runs over gloo as is:
its buffers are allocated on ``current_device()``, which the shim points at the CPU.

``local_process_group()`` gives code outside a torchrun worker (tests, converters) the world of one
that Megatron's dataset builder and dist_checkpointing ask for (an in-process store, no port).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

_APPLIED = False


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _no_sync(device=None) -> None:  # noqa: ARG001 - same signature as torch.cuda.synchronize
    return None


def apply_cpu_shim() -> None:
    """Redirect the CUDA call sites Megatron-core hits to the CPU (once; safe to call again)."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_shim: a GPU is visible; the CPU shim must not be applied on a "
                           "CUDA run (set cluster.device=cuda)")
    torch.cuda.current_device = _cpu_device
    torch.cuda.synchronize = _no_sync
    _APPLIED = True


def init_cpu_rng_tracker() -> None:
    """Megatron's RNG tracker without CUDA RNG calls (replaces model_parallel_cuda_manual_seed)."""
    from megatron.core.tensor_parallel import random as mrandom
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


@contextlib.contextmanager
def cuda_calls_on_cpu():
    """Inside: ``torch.zeros(..., device="cuda")`` and ``Tensor.cuda()`` land on the CPU (the two
    calls Megatron's pipeline schedule and tied output layer make); a no-op context where the shim
    is not applied, i.e. on a GPU run. Two functions are swapped for the duration, not a torch
    function mode: a mode would dispatch every op of the step through Python (measured: up to
    ~1.5x slower steps on the tiny model)."""
    if not _APPLIED:
        yield
        return
    zeros, to_cuda = torch.zeros, torch.Tensor.cuda

    def cpu_zeros(*args, **kwargs):
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cuda":
            kwargs["device"] = "cpu"
        return zeros(*args, **kwargs)

    torch.zeros, torch.Tensor.cuda = cpu_zeros, lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.zeros, torch.Tensor.cuda = zeros, to_cuda


def is_applied() -> bool:
    return _APPLIED


@contextlib.contextmanager
def local_process_group():
    """Run inside the current process group, or a temporary gloo world of one if there is none."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def megatron_world():
    """Megatron's model-parallel state (TP=1) in a world of one, for work outside a training
    worker (evaluation); inside a worker that set it up already, its state is used as it is."""
    import torch
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        yield
        return
    if not torch.cuda.is_available():
        apply_cpu_shim()
    with local_process_group():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            if not torch.cuda.is_available():
                init_cpu_rng_tracker()
            else:
                from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
                model_parallel_cuda_manual_seed(0)
            yield
        finally:
            ps.destroy_model_parallel()
