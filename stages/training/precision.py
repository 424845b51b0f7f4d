"""Precision checks of the training kinds: what cannot train where, said before any compute."""
from __future__ import annotations

from typing import Any

from stages.schema import ConfigError
from stages.specs import PrecisionSpec


def check_precision(precision: PrecisionSpec, cluster: Any, where: str) -> None:
    """Static check (also valid when planning a GPU cluster from a laptop)."""
    if precision.dtype == "bf16" and cluster.device == "cpu":
        # Megatron's linear backward re-enters only CUDA autocast: bf16 on CPU fails mid-step
        raise ConfigError(f"{where}.dtype: bf16 does not train on CPU (Megatron-core's backward "
                          f"restores only CUDA autocast); set {where}.dtype=fp32 here, bf16 on GPUs")
    if precision.fp8 != "none" and cluster.device != "cuda":
        raise ConfigError(f"{where}.fp8: FP8 ({precision.fp8}) needs a GPU with Transformer Engine, but "
                          f"cluster.device is {cluster.device!r}; set {where}.fp8=none or use a GPU "
                          "cluster config (cluster=gpu-node)")


def require_fp8_runtime(precision: PrecisionSpec, where: str) -> None:
    """Before a run: FP8 needs a visible GPU and an importable Transformer Engine."""
    if precision.fp8 == "none":
        return
    import torch
    if not torch.cuda.is_available():
        raise ConfigError(f"{where}.fp8: FP8 ({precision.fp8}) asked for, but no GPU is visible on this "
                          f"machine; set {where}.fp8=none or run on a GPU node")
    try:
        import transformer_engine  # noqa: F401
    except Exception as e:  # ImportError, or OSError from missing CUDA libraries
        raise ConfigError(f"{where}.fp8: Transformer Engine cannot be imported ({e}); install the "
                          "GPU extra (pip install 'granite-forge[gpu]') or set fp8=none") from e
