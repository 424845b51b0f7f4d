"""Shapes of the LR schedules (stages/training/schedules.py): warm-up, plateaus, decays, floors."""
from __future__ import annotations

import math

import pytest

from stages.training.schedules import decay_steps, lr_at, power_lr
from stages.specs import ScheduleSpec


def curve(spec: ScheduleSpec, total: int, tokens_per_step: int = 0, tokens_before: int = 0):
    return [lr_at(spec, s, total, tokens_before + s * tokens_per_step) for s in range(total)]


def test_constant_with_warmup():
    lrs = curve(ScheduleSpec(kind="constant", lr=1e-3, warmup_steps=4), 10)
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:] == [1e-3] * 6


def test_warmup_never_starts_at_zero():
    for kind in ("constant", "linear", "exponential", "wsd", "power"):
        spec = ScheduleSpec(kind=kind, lr=1e-3, warmup_steps=10, decay_fraction=0.2)
        assert lr_at(spec, 0, 100, 0) == pytest.approx(1e-4)


def test_linear_decays_to_zero_at_last_step():
    lrs = curve(ScheduleSpec(kind="linear", lr=1e-3, warmup_steps=2), 12)
    assert lrs[1] == pytest.approx(1e-3)  # end of warm-up = the anchor
    assert lrs[-1] == 0.0
    tail = lrs[1:]
    steps = [a - b for a, b in zip(tail, tail[1:])]
    assert all(d == pytest.approx(1e-4) for d in steps)  # a straight line


def test_linear_without_warmup():
    lrs = curve(ScheduleSpec(kind="linear", lr=1.0), 4)
    assert lrs == pytest.approx([0.75, 0.5, 0.25, 0.0])


def test_exponential_reaches_lr_times_gamma_and_respects_floor():
    spec = ScheduleSpec(kind="exponential", lr=1.0, gamma=0.01, warmup_steps=1)
    lrs = curve(spec, 11)
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(0.01)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert all(r == pytest.approx(0.01 ** 0.1) for r in ratios)  # geometric
    floored = curve(ScheduleSpec(kind="exponential", lr=1.0, gamma=0.01, min_lr=0.1), 11)
    assert min(floored) == pytest.approx(0.1) and floored[-1] == pytest.approx(0.1)


def test_wsd_stable_then_linear_decay_to_min():
    spec = ScheduleSpec(kind="wsd", lr=1.0, min_lr=0.1, warmup_steps=2, decay_fraction=0.3)
    lrs = curve(spec, 10)
    assert decay_steps(spec, 10) == 3
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2:7] == [1.0] * 5  # stable through the anchor (step 6)
    assert lrs[7:] == pytest.approx([0.7, 0.4, 0.1])  # linear to min_lr at the last step


def test_wsd_without_decay_is_constant():
    lrs = curve(ScheduleSpec(kind="wsd", lr=1.0, decay_fraction=0.0), 5)
    assert lrs == [1.0] * 5


def test_decay_window_cuts_a_long_warmup_without_jump():
    spec = ScheduleSpec(kind="wsd", lr=1.0, warmup_steps=8, decay_fraction=0.5)
    lrs = curve(spec, 10)
    assert lrs[4] == pytest.approx(5 / 8)  # the anchor, still warming up
    assert lrs[5] < lrs[4] and lrs[-1] == 0.0


def test_power_curve_caps_at_lr_and_falls_as_a_power_of_tokens():
    spec = ScheduleSpec(kind="power", lr=0.02, power_a=4.0, power_b=-0.51)
    assert power_lr(spec, 0) == 0.02
    assert power_lr(spec, 1000) == 0.02  # 4 * 1000**-0.51 > lr: capped
    n = 10**6
    assert power_lr(spec, n) == pytest.approx(4.0 * n ** -0.51)
    # doubling the tokens multiplies the LR by 2**b
    assert power_lr(spec, 2 * n) / power_lr(spec, n) == pytest.approx(2 ** -0.51)


def test_power_counts_parent_tokens():
    spec = ScheduleSpec(kind="power", lr=1.0, power_a=4.0, power_b=-0.51)
    fresh = lr_at(spec, 0, 10, tokens_seen_total=0)
    continued = lr_at(spec, 0, 10, tokens_seen_total=10**7)  # phase 2 after a 10M-token phase 1
    assert fresh == 1.0
    assert continued == pytest.approx(4.0 * 1e7 ** -0.51)


def test_power_decay_window_ends_at_min_lr():
    spec = ScheduleSpec(kind="power", lr=1.0, power_a=4.0, power_b=-0.51, min_lr=1e-4,
                        warmup_steps=5, decay_fraction=0.2)
    lrs = curve(spec, 50, tokens_per_step=10_000)
    assert lrs[-1] == pytest.approx(1e-4)
    body = lrs[5:40]
    assert all(b <= a for a, b in zip(body, body[1:]))  # the power curve only falls
    assert lrs[39] == pytest.approx(power_lr(spec, 39 * 10_000))
    tail = lrs[39:]
    assert all(b < a for a, b in zip(tail, tail[1:]))


@pytest.mark.parametrize("kind", ["constant", "linear", "exponential", "wsd", "power"])
def test_single_step_phase_and_bounds(kind):
    spec = ScheduleSpec(kind=kind, lr=1e-3, min_lr=1e-5, decay_fraction=0.5)
    lr = lr_at(spec, 0, 1, 0)
    assert math.isfinite(lr) and 0.0 <= lr <= 1e-3
    with pytest.raises(ValueError):
        lr_at(spec, 1, 1, 0)
    with pytest.raises(ValueError):
        lr_at(spec, 0, 0, 0)


@pytest.mark.parametrize("kind", ["constant", "linear", "exponential", "wsd", "power"])
def test_never_above_peak_never_negative(kind):
    spec = ScheduleSpec(kind=kind, lr=3e-3, min_lr=3e-4, warmup_steps=7, decay_fraction=0.25)
    for lr in curve(spec, 97, tokens_per_step=4096):
        assert 0.0 <= lr <= 3e-3
