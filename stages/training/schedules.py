"""Learning-rate schedules of the recipe, as one pure function of the step.

``lr_at(schedule, step, total_steps, tokens_seen_total)`` gives the LR of optimizer step ``step``
(0-based, counted inside the phase) of a phase of ``total_steps`` steps; ``tokens_seen_total`` is
the number of tokens trained *before* this step, over all phases including the parents (only the
power schedule reads it). No state: a resumed run recomputes the same LR.

Shared pieces:

- Warm-up: for ``step < warmup_steps`` the LR is ``target(step) * (step + 1) / warmup_steps``
  (the first step is not wasted at LR 0; the last warm-up step reaches the full value).
- Decays run linearly in the step from an *anchor* step, where the LR is the value before the
  decay, to their end value at the last step (``total_steps - 1``): with ``progress =
  (step - anchor) / (total_steps - 1 - anchor)`` clamped to [0, 1].

Kinds:

- ``constant``: ``lr`` after warm-up.
- ``linear``: warm-up, then ``lr * (1 - progress)``; anchor = ``warmup_steps - 1``, so the last
  step has LR 0 (Granite phase 4).
- ``exponential``: warm-up, then ``max(min_lr, lr * gamma ** progress)``, same anchor; the last
  step has ``max(min_lr, lr * gamma)`` (Granite phase 3).
- ``wsd``: warm-up, stable at ``lr``, then the final ``D = round(decay_fraction * total_steps)``
  steps decay linearly to ``min_lr`` (anchor = ``total_steps - 1 - D``, the last stable step).
  Where the warm-up runs into the decay window, the decay starts from the warm-up's value at the
  anchor.
- ``power`` (IBM Power Scheduler, Shen et al. 2024): ``p(n) = min(lr, power_a * n ** power_b)``
  with ``n = tokens_seen_total`` (``p(0) = lr``), times the warm-up factor during warm-up. In
  the final ``D`` steps (as for wsd) the LR is ``min_lr + (p(n) - min_lr) * (1 - progress)``: the
  power curve scaled by a linear ramp that reaches ``min_lr`` at the last step (the paper decays
  exponentially-ish to 0; this linear ramp is what we do, and ``decay_fraction: 0`` turns it off).
  Because ``n`` counts the parents' tokens, a phase that continues with the power schedule picks
  up where the previous one left the curve.
"""
from __future__ import annotations

from stages.specs import ScheduleSpec


def _progress(step: int, anchor: int, last: int) -> float:
    if last <= anchor:
        return 1.0
    return min(1.0, max(0.0, (step - anchor) / (last - anchor)))


def power_lr(schedule: ScheduleSpec, tokens_seen_total: int) -> float:
    """The Power Scheduler's curve ``min(lr, a * n**b)`` (``lr`` at n = 0)."""
    if tokens_seen_total <= 0:
        return schedule.lr
    return min(schedule.lr, schedule.power_a * float(tokens_seen_total) ** schedule.power_b)


def decay_steps(schedule: ScheduleSpec, total_steps: int) -> int:
    """Steps of the final decay window of wsd/power schedules."""
    return int(round(schedule.decay_fraction * total_steps))


def lr_at(schedule: ScheduleSpec, step: int, total_steps: int, tokens_seen_total: int = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of a ``total_steps``-step phase."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} is outside the phase (0..{total_steps - 1})")
    kind, last = schedule.kind, total_steps - 1
    warm = schedule.warmup_steps
    warm_factor = (step + 1) / warm if step < warm else 1.0

    if kind == "constant":
        return schedule.lr * warm_factor
    if kind == "linear":
        if step < warm:
            return schedule.lr * warm_factor
        return schedule.lr * (1.0 - _progress(step, warm - 1, last))
    if kind == "exponential":
        if step < warm:
            return schedule.lr * warm_factor
        p = _progress(step, warm - 1, last)
        return max(schedule.min_lr, schedule.lr * schedule.gamma ** p)
    if kind in ("wsd", "power"):
        peak = schedule.lr if kind == "wsd" else power_lr(schedule, tokens_seen_total)
        d = decay_steps(schedule, total_steps)
        anchor = last - d
        if d == 0 or step <= anchor:
            return peak * warm_factor
        # a warm-up still running at the anchor is cut short: the decay starts from its value there
        start = peak * min(1.0, (anchor + 1) / warm) if warm else peak
        p = _progress(step, anchor, last)
        return schedule.min_lr + (start - schedule.min_lr) * (1.0 - p)
    raise ValueError(f"unknown schedule kind {kind!r}")
