"""GRPO advantages, DAPO overlong shaping and filtering, and dynamic sampling (BatchFiller):
hand-computed values, and exactly the all-equal groups dropped."""
from __future__ import annotations

import json

import pytest
import torch

from stages.rl.advantages import (BatchFiller, Group, all_equal, group_advantages, make_group,
                                  overlong_penalty, train_targets)


def grp(row: int, rewards, *, lengths=None, finishes=None, payload=None) -> Group:
    """A group without shaping (buffer 0): shaped rewards == raw rewards."""
    lengths = lengths or [5] * len(rewards)
    finishes = finishes or ["stop"] * len(rewards)
    return make_group(row, rewards, lengths, finishes, max_new_tokens=20, overlong_buffer=0,
                      payload=payload)


# ------------------------------------------------------------------ group advantages
def test_group_advantages_hand_computed_with_the_sample_std():
    # group 0: mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    #          (the population std would be 0.433 and give 1.732 for the first)
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 4.0, 6.0, 4.0]]))
    # group 1: mean 4, sample std sqrt((4 + 0 + 4 + 0) / 3) = 1.63299
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5],
                             [-2 / 1.6329932, 0.0, 2 / 1.6329932, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-5)
    assert adv.dtype == torch.float32


def test_group_advantages_mean_centred_only():
    adv = group_advantages([[1.0, 0.0, 0.0, 0.0]], normalise=False)
    assert torch.equal(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25]]))


def test_a_single_non_equal_pair_gets_plus_minus_one_over_root_two():
    adv = group_advantages([[0.0, 1.0]])
    assert torch.allclose(adv, torch.tensor([[-0.7071068, 0.7071068]]), atol=1e-5)


def test_an_all_equal_group_gets_zero_advantages_and_is_all_equal():
    adv = group_advantages([[3.0, 3.0, 3.0, 3.0], [0.0, 1.0, 0.0, 1.0]])
    assert torch.equal(adv[0], torch.zeros(4))
    assert all_equal([3.0, 3.0, 3.0, 3.0]) and not all_equal([0.0, 1.0, 0.0, 1.0])
    assert all_equal([0.5, 0.5000001], tol=1e-6) and not all_equal([0.5, 0.5000001])


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"rewards: expected a \[groups, G\]"):
        group_advantages(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))


# ------------------------------------------------------------------ overlong shaping
def test_overlong_penalty_at_the_boundaries():
    L, B = 20, 4
    assert overlong_penalty(0, L, B) == 0.0
    assert overlong_penalty(L - B, L, B) == 0.0             # last length without a penalty
    assert overlong_penalty(L - B + 1, L, B) == -0.25       # first one inside the buffer: -1/B
    assert overlong_penalty(L - 1, L, B) == -0.75
    assert overlong_penalty(L, L, B) == -1.0                # at the cap
    assert overlong_penalty(L + 1, L, B) == -1.0            # beyond it (not under a hard cap)
    assert overlong_penalty(L, L, 0) == 0.0                 # buffer 0: shaping off
    assert overlong_penalty(10 * L, L, 0) == 0.0
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(5, L, L + 1)


def test_shaping_adds_the_penalty_to_the_raw_reward():
    g = make_group(7, [1.0, 1.0, 0.0], [10, 18, 20], ["stop", "stop", "length"],
                   max_new_tokens=20, overlong_buffer=4)
    assert g.raw_rewards == [1.0, 1.0, 0.0]
    assert g.rewards == [1.0, 0.5, -1.0]      # 18: (16 - 18) / 4; 20: -1


def test_shaping_can_keep_an_all_equal_group_and_drop_a_non_equal_one():
    # same raw reward, different lengths inside the buffer: kept after shaping
    kept = make_group(0, [1.0, 1.0], [10, 18], ["stop", "stop"], max_new_tokens=20,
                      overlong_buffer=4)
    # raw 1 at the cap (penalty -1) equals raw 0 well under it: dropped after shaping
    dropped = make_group(1, [1.0, 0.0], [20, 5], ["length", "stop"], max_new_tokens=20,
                         overlong_buffer=4)
    assert all_equal(kept.raw_rewards) and not all_equal(dropped.raw_rewards)
    filler = BatchFiller(target_groups=2, max_extra_rounds=0)
    filler.offer([kept, dropped])
    filler.round_done()
    assert [g.prompt_row for g in filler.take()] == [0]
    # the advantages are the shaped rewards' (1, 0.5): +-0.7071
    targets = train_targets([kept])
    assert torch.allclose(targets.advantages, torch.tensor([0.7071068, -0.7071068]), atol=1e-5)
    assert torch.equal(targets.rewards, torch.tensor([1.0, 0.5]))


# ------------------------------------------------------------------ overlong filtering
def test_overlong_filtering_masks_exactly_the_length_capped_completions():
    groups = [grp(0, [1.0, 0.0, 0.0], lengths=[3, 6, 2], finishes=["stop", "length", "stop"]),
              grp(1, [0.0, 1.0, 1.0], lengths=[6, 1, 6], finishes=["length", "stop", "length"])]
    t = train_targets(groups, overlong_filter=True)
    assert t.token_mask.shape == (6, 6)
    assert t.filtered == 3
    assert t.token_mask.sum(dim=1).tolist() == [3.0, 0.0, 2.0, 0.0, 1.0, 0.0]
    assert t.token_mask[0].tolist() == [1, 1, 1, 0, 0, 0]    # padding past the length is 0
    off = train_targets(groups, overlong_filter=False, max_len=8)
    assert off.token_mask.shape == (6, 8) and off.filtered == 0
    assert off.token_mask.sum(dim=1).tolist() == [3.0, 6.0, 2.0, 6.0, 1.0, 6.0]
    # filtering hides the gradient, not the reward: the advantages are the same either way
    assert torch.equal(t.advantages, off.advantages)
    assert torch.allclose(t.advantages[:3], torch.tensor([2 / 1.7320508, -1 / 1.7320508,
                                                          -1 / 1.7320508]), atol=1e-5)


def test_train_targets_refuses_mixed_group_sizes_and_short_max_len():
    with pytest.raises(ValueError, match="same G"):
        train_targets([grp(0, [1.0, 0.0]), grp(1, [1.0, 0.0, 0.0])])
    with pytest.raises(ValueError, match="max_len"):
        train_targets([grp(0, [1.0, 0.0], lengths=[4, 9])], max_len=5)
    with pytest.raises(ValueError, match="Group.lengths"):
        Group(0, [1.0, 0.0], [1.0, 0.0], [3], ["stop", "stop"])
    with pytest.raises(ValueError, match="Group.finishes"):
        Group(0, [1.0], [1.0], [3], ["eos"])


# ------------------------------------------------------------------ dynamic sampling
REWARDS = {0: [1, 1, 1], 1: [0, 1, 0], 2: [0, 0, 0], 3: [1, 0, 1],
           4: [0.5, 0.5, 0.5], 5: [1, 0, 0], 6: [0, 1, 1], 7: [1, 1, 0]}


def test_batch_filler_drops_exactly_the_all_equal_groups_and_stops_at_the_target():
    filler = BatchFiller(target_groups=3, max_extra_rounds=2)
    filler.offer([grp(i, REWARDS[i]) for i in range(4)])
    filler.round_done()
    assert [g.prompt_row for g in filler.held] == [1, 3]
    assert not filler.full and not filler.exhausted
    filler.offer([grp(i, REWARDS[i]) for i in range(4, 7)])
    filler.round_done()
    assert filler.full and not filler.exhausted
    batch = filler.take()
    assert [g.prompt_row for g in batch] == [1, 3, 5]   # 6 was kept beyond the target: surplus
    assert filler.last_step == {"groups_seen": 7, "groups_dropped": 3, "groups_kept": 3,
                                "groups_surplus": 1, "rounds": 2, "dropped_fraction": 3 / 7}
    m = filler.metrics()
    assert m["dynamic_sampling/dropped_fraction"] == 3 / 7
    # the next step starts empty; the stage's counters go on
    assert filler.held == [] and filler.rounds == 0
    filler.offer([grp(0, REWARDS[0]), grp(7, REWARDS[7])])
    filler.round_done()
    assert (filler.total_seen, filler.total_dropped, filler.total_surplus) == (9, 4, 1)


def test_batch_filler_is_exhausted_after_max_extra_rounds_plus_one():
    filler = BatchFiller(target_groups=2, max_extra_rounds=1)
    filler.offer([grp(0, REWARDS[0]), grp(2, REWARDS[2])])
    filler.round_done()
    assert not filler.exhausted
    filler.offer([grp(3, REWARDS[3]), grp(4, REWARDS[4])])
    filler.round_done()
    assert filler.exhausted and not filler.full
    with pytest.raises(RuntimeError, match="take"):
        filler.offer([grp(5, REWARDS[5])])
    assert [g.prompt_row for g in filler.take()] == [3]   # what it has, fewer than the target
    assert filler.last_step["groups_kept"] == 1 and filler.last_step["rounds"] == 2
    # a step with no kept group at all
    filler.offer([grp(0, REWARDS[0])])
    filler.round_done()
    filler.offer([grp(2, REWARDS[2])])
    filler.round_done()
    assert filler.take() == [] and filler.last_step["dropped_fraction"] == 1.0


def test_batch_filler_state_round_trips_mid_step_and_continues_identically():
    def run_rest(f: BatchFiller) -> tuple[list, dict]:
        f.offer([grp(i, REWARDS[i], payload={"tokens": [[i, 1], [i, 2], [i, 3]]})
                 for i in range(4, 8)])
        f.round_done()
        taken = [(g.prompt_row, g.rewards, g.payload) for g in f.take()]
        return taken, f.to_state()

    filler = BatchFiller(target_groups=3, max_extra_rounds=2)
    filler.offer([grp(i, REWARDS[i], payload={"tokens": [[i, 0]]}) for i in range(4)])
    filler.round_done()
    state = json.loads(json.dumps(filler.to_state()))    # what a checkpoint holds
    restored = BatchFiller.from_state(state)
    assert restored.to_state() == filler.to_state()
    resumed, uninterrupted = run_rest(restored), run_rest(filler)
    assert resumed == uninterrupted
    assert [row for row, _, _ in resumed[0]] == [1, 3, 5]  # the held groups came back first
    assert resumed[0][0][2] == {"tokens": [[1, 0]]}
    assert resumed[1]["total_seen"] == 8 and resumed[1]["total_dropped"] == 3


def test_batch_filler_state_refuses_a_payload_that_json_cannot_hold():
    filler = BatchFiller(target_groups=2, max_extra_rounds=0)
    filler.offer([grp(1, REWARDS[1], payload=torch.zeros(2))])
    with pytest.raises(TypeError, match="payload is not JSON-able"):
        filler.to_state()
    filler.round_done()
    filler.take()
    json.dumps(filler.to_state())                          # between steps it always can
    with pytest.raises(ValueError, match="unknown keys"):
        BatchFiller.from_state({**filler.to_state(), "extra": 1})


def test_without_dynamic_sampling_every_group_is_kept_in_one_round():
    filler = BatchFiller(target_groups=3, max_extra_rounds=2, dynamic_sampling=False)
    filler.offer([grp(i, REWARDS[i]) for i in range(4)])
    filler.round_done()
    assert filler.full and filler.exhausted
    assert [g.prompt_row for g in filler.take()] == [0, 1, 2]
    assert filler.last_step["groups_dropped"] == 0 and filler.last_step["groups_surplus"] == 1
    filler.offer([grp(4, REWARDS[4])])
    filler.round_done()
    assert filler.exhausted and [g.prompt_row for g in filler.take()] == [4]
