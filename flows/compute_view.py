"""The compute side of `forge plan`: per training stage, what it costs and whether it fits.

The arithmetic lives in ``stages/training/compute.py``; each kind plans its own stages
(``StageKind.compute_plan``, with the stage's own layout over the cluster's); this module prints
the table.
A stage that does not fit stops `forge run` before any compute (``check_fits``).
"""
from __future__ import annotations

from flows.dag import Dag
from flows.plan import Step
from stages.schema import ConfigError
from stages.training.compute import GIB, StagePlan, human


def compute_plans(dag: Dag) -> dict[str, StagePlan]:
    """Each stage's plan, from its kind (``StageKind.compute_plan``; None: nothing to plan)."""
    cluster = dag.pipeline.cluster
    plans = {name: node.kind_cls.compute_plan(name, node.config, cluster)
             for name, node in dag.nodes.items()}
    return {name: plan for name, plan in plans.items() if plan is not None}


def format_compute(plans: dict[str, StagePlan]) -> str:
    if not plans:
        return "  (no training stages)"
    first = next(iter(plans.values()))
    unit = "core" if first.accelerator == "cpu" else "GPU"
    head = (f"  {'stage':<12} {'params':>7} {'tokens':>7} {'FLOPs':>8} {unit + '-hours':>10} "
            f"{'wall':>8} {'devs':>4}  {'layout':<16} {'savers':<16} {'mbs':>3}  "
            f"{'per device: weights+grads+optim+acts':<44}"
            f" {'fits':<4}")
    lines = [head]
    for p in plans.values():
        m = p.memory
        size, scale = ("GiB", GIB) if m.total >= GIB / 10 else ("MiB", 1024 ** 2)
        mem = (f"{m.weights / scale:.1f}+{m.grads / scale:.1f}+{m.optimizer / scale:.1f}+"
               f"{m.activations / scale:.1f} = {m.total / scale:.1f} {size} of "
               f"{p.usable_bytes / GIB:.0f} GiB")
        lines.append(f"  {p.stage:<12} {human(p.params):>7} {human(p.tokens):>7} "
                     f"{p.flops:>8.2g} {p.gpu_hours:>10.3g} {_duration(p.wall_hours):>8} {p.layout.world:>4}  "
                     f"{p.layout.describe():<16} {p.layout.savers():<16} "
                     f"{p.layout.micro_batch:>3}  {mem:<44} "
                     f"{'yes' if p.fits else 'NO'}")
    peak = "dense peak per device"
    lines.append(f"  {unit}-hours at MFU {first.mfu:g} of the {first.accelerator} {peak} "
                 f"({first.peak_tflops:g} TFLOP/s{', FP8 where a stage uses it' if unit == 'GPU' else ''}); "
                 "wall = hours / devices of the stage's layout")
    lines.append("  memory: fp32 master weights + fp32 grads + AdamW moments, 16 B/param as the "
                 "training loop runs them, 8 + 8/(DP x CP) with dist-opt (Megatron's distributed "
                 "optimizer); activations per the stage's recompute (rc-full: layer inputs only, "
                 "FLOPs column without the rerun, hours with it); usable = 90% of the device")
    piped = [p for p in plans.values() if p.layout.pp > 1]
    if piped:
        lines.append("  pipeline bubble (1F1B: (PP - 1) / (micro-batches + PP - 1) of each step idle, "
                     "counted in the hours): " + ", ".join(
                         f"{p.stage} {p.bubble:.0%} ({p.layout.micro_batches} micro-batches)"
                         for p in piped))
    return "\n".join(lines)


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.0f}m"
    if hours < 48:
        return f"{hours:.1f}h"
    if hours < 24 * 365:
        return f"{hours / 24:.0f}d"
    return f"{hours / 24 / 365:.1f}y"


def misfits(plans: dict[str, StagePlan], steps: list[Step] | None = None) -> list[StagePlan]:
    """Stages that do not fit; with ``steps``, only those the run would execute."""
    runs = None if steps is None else {s.name for s in steps if s.executes}
    return [p for p in plans.values() if not p.fits and (runs is None or p.stage in runs)]


def check_fits(plans: dict[str, StagePlan], steps: list[Step]) -> None:
    bad = misfits(plans, steps)
    if bad:
        raise ConfigError("\n".join(p.refusal() for p in bad))
