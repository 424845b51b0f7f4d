"""The GRPO/DAPO terms that live outside the loss: group advantages, overlong shaping and
filtering, and dynamic sampling (which groups of a rollout batch are trained on).

Per prompt the engine samples G completions (a *group*). Each completion has a verifier reward
r_raw, a length (tokens generated) and a finish reason (``"stop"``, or ``"length"`` when it hit
the ``max_new_tokens`` cap). For one group, in this order:

1. Overlong shaping (DAPO soft overlong punishment), when ``overlong_buffer > 0``:
   ``r = r_raw + overlong_penalty(length, max_new_tokens, overlong_buffer)`` where, with
   ``L = max_new_tokens`` and ``B = overlong_buffer``::

       penalty = 0                    if length <= L - B
               = ((L - B) - length)/B if L - B < length <= L     (-1/B at L - B + 1, ..., -1 at L)
               = -1                   if length > L              (not reachable under a hard cap)

   and ``penalty = 0`` whatever the length when ``B == 0`` (shaping off). ``make_group`` does it.
2. Dynamic sampling judges the SHAPED rewards: a group whose shaped rewards are all equal
   (``max - min <= tol``, tol 0 by default) has zero advantage everywhere, gives no gradient, and is
   dropped (``BatchFiller.offer``). Shaping can therefore keep a group whose raw rewards are all
   equal (same reward, different lengths inside the buffer) or drop one whose raw rewards differ
   (a raw 1 inside the buffer at penalty -1 equals a raw 0 outside it).
3. GRPO advantages from the shaped rewards, per group (``group_advantages``)::

       A_i = (r_i - mean(r)) / (std(r) + eps)     normalise=True  (eps = 1e-6)
       A_i =  r_i - mean(r)                       normalise=False (mean-centred only, Dr. GRPO)

   ``std`` is the SAMPLE standard deviation (Bessel's correction, divisor G - 1: ``torch.std``'s
   default, as TRL's GRPOTrainer and verl compute it). For G = 2 with rewards (0, 1) that gives
   A = (-0.7071, +0.7071); the population std would give (-1, +1). G >= 2 is required.
   Every token of completion i gets A_i (an outcome reward).
4. Overlong filtering, when ``overlong_filter=True``: every token of a completion whose finish is
   ``"length"`` gets loss mask 0 (it leaves the numerator AND the denominator of the token-mean
   loss). The completion still counts in its group's mean and std in step 3: filtering hides its
   gradient, not its reward. Padding tokens (t >= length) get mask 0 in any case.

``BatchFiller`` holds the dynamic-sampling state of a step: the loop offers each generation
round's groups, calls ``round_done``, and stops when the filler is ``full`` (``target_groups``
kept) or ``exhausted`` (``1 + max_extra_rounds`` rounds used); ``take`` returns the first
``target_groups`` kept groups (groups kept beyond the target are discarded and counted as
``surplus``, never trained on) or, when exhausted first, every kept group (possibly fewer, possibly
none). With ``dynamic_sampling=False`` no group is dropped and a step has exactly one round (the
config switch, without a second code path in the loop). Its state (``to_state``, a JSON-able
dict) holds the step in progress and the stage's cumulative counters, so a checkpoint written
mid-step resumes identically.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISHES = (FINISH_STOP, FINISH_LENGTH)


def group_advantages(rewards, *, normalise: bool = True, eps: float = 1e-6):
    """``rewards`` [groups, G] -> advantages [groups, G] (float32): ``(r - mean_g) / (std_g + eps)``
    with the sample std (divisor G - 1), or ``r - mean_g`` when ``normalise=False``."""
    import torch

    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.dim() != 2:
        raise ValueError(f"rewards: expected a [groups, G] tensor, got shape {tuple(r.shape)}")
    if r.shape[1] < 2:
        raise ValueError(f"rewards: a group needs G >= 2 completions for GRPO, got G={r.shape[1]}")
    if not torch.isfinite(r).all():
        raise ValueError("rewards: hold a NaN or an infinity; a reward must be a finite number")
    if eps < 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    centred = r - r.mean(dim=1, keepdim=True)
    if not normalise:
        return centred
    return centred / (r.std(dim=1, keepdim=True, unbiased=True) + eps)


def overlong_penalty(length: int, max_new_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment in [-1, 0] (formula in the module docstring)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if not 0 <= buffer <= max_new_tokens:
        raise ValueError(f"buffer: must be in [0, max_new_tokens={max_new_tokens}], got {buffer}")
    if length < 0:
        raise ValueError(f"length: must be >= 0, got {length}")
    if buffer == 0:
        return 0.0
    expected = max_new_tokens - buffer
    if length <= expected:
        return 0.0
    if length <= max_new_tokens:
        return (expected - length) / buffer
    return -1.0


def all_equal(rewards: Sequence[float], tol: float = 0.0) -> bool:
    """Whether every reward is within ``tol`` of every other (``max - min <= tol``); an empty or
    one-element group is all-equal."""
    if tol < 0:
        raise ValueError(f"tol: must be >= 0, got {tol}")
    return not rewards or max(rewards) - min(rewards) <= tol


@dataclasses.dataclass
class Group:
    """The G completions of one prompt. ``rewards`` are the shaped rewards (what dynamic sampling
    and the advantages read); ``raw_rewards`` the verifier's (pass rates, metrics). ``payload`` is
    the loop's (token ids, texts, behaviour log-probs, reasons); it must be JSON-able for a
    mid-step ``BatchFiller.to_state``."""
    prompt_row: int
    rewards: list[float]
    raw_rewards: list[float]
    lengths: list[int]
    finishes: list[str]
    payload: Any = None

    def __post_init__(self) -> None:
        g = len(self.rewards)
        for name in ("raw_rewards", "lengths", "finishes"):
            if len(getattr(self, name)) != g:
                raise ValueError(f"Group.{name}: has {len(getattr(self, name))} entries for "
                                 f"{g} rewards; give one per completion")
        bad = [f for f in self.finishes if f not in FINISHES]
        if bad:
            raise ValueError(f"Group.finishes: {bad[0]!r} is not one of {FINISHES}")

    @property
    def size(self) -> int:
        return len(self.rewards)


def make_group(prompt_row: int, raw_rewards: Sequence[float], lengths: Sequence[int],
               finishes: Sequence[str], *, max_new_tokens: int, overlong_buffer: int,
               payload: Any = None) -> Group:
    """A group with its shaped rewards: ``r = r_raw + overlong_penalty(length, ...)`` (step 1)."""
    raw = [float(r) for r in raw_rewards]
    if not all(math.isfinite(r) for r in raw):
        raise ValueError(f"raw_rewards: prompt row {prompt_row} has a non-finite reward {raw}")
    shaped = [r + overlong_penalty(int(n), max_new_tokens, overlong_buffer)
              for r, n in zip(raw, lengths)]
    return Group(prompt_row, shaped, raw, [int(n) for n in lengths], list(finishes), payload)


@dataclasses.dataclass
class TrainTargets:
    """What the loss needs from the kept groups, completions in group-major order (group 0's G
    completions, then group 1's, ...): N = groups * G rows."""
    advantages: Any       # [N] float32, one per completion (broadcast over its tokens)
    token_mask: Any       # [N, T] float32: 1 on trained tokens, 0 on padding and filtered ones
    rewards: Any          # [N] float32 shaped rewards
    filtered: int         # completions masked by overlong filtering


def train_targets(groups: Sequence[Group], *, normalise: bool = True, overlong_filter: bool = True,
                  eps: float = 1e-6, max_len: int | None = None) -> TrainTargets:
    """Advantages (step 3) and per-token loss masks (step 4) of the kept groups. ``max_len`` is the
    padded width T (default: the longest completion)."""
    import torch

    if not groups:
        raise ValueError("groups: is empty; there is nothing to train on this step")
    sizes = {g.size for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"groups: every group needs the same G, got sizes {sorted(sizes)}")
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
    advantages = group_advantages(rewards, normalise=normalise, eps=eps).reshape(-1)
    lengths = torch.tensor([n for g in groups for n in g.lengths], dtype=torch.long)
    width = int(lengths.max()) if max_len is None else max_len
    if int(lengths.max()) > width:
        raise ValueError(f"max_len: {width} is shorter than the longest completion "
                         f"({int(lengths.max())} tokens)")
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    capped = torch.tensor([f == FINISH_LENGTH for g in groups for f in g.finishes])
    filtered = 0
    if overlong_filter:
        mask[capped] = 0.0
        filtered = int(capped.sum())
    return TrainTargets(advantages, mask, rewards.reshape(-1), filtered)


@dataclasses.dataclass
class BatchFiller:
    """Dynamic sampling for one step at a time (see the module docstring). Counters: ``seen`` /
    ``dropped`` (all-equal) / ``kept`` this step, ``rounds`` this step; ``total_*`` over the stage;
    ``surplus``: kept groups discarded by ``take`` beyond the target. With
    ``dynamic_sampling=False`` nothing is dropped and a step has one round."""
    target_groups: int
    max_extra_rounds: int
    tol: float = 0.0
    dynamic_sampling: bool = True   # False: keep every group, one round per step
    rounds: int = 0
    seen: int = 0
    dropped: int = 0
    held: list = dataclasses.field(default_factory=list)
    total_seen: int = 0
    total_dropped: int = 0
    total_surplus: int = 0
    steps: int = 0
    last_step: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target_groups < 1:
            raise ValueError(f"target_groups: must be >= 1, got {self.target_groups}")
        if self.max_extra_rounds < 0:
            raise ValueError(f"max_extra_rounds: must be >= 0, got {self.max_extra_rounds}")
        if self.tol < 0:
            raise ValueError(f"tol: must be >= 0, got {self.tol}")

    def offer(self, groups: Sequence[Group]) -> None:
        """Drop the all-equal groups (on shaped rewards), keep the rest in order."""
        if self.exhausted:
            raise RuntimeError("BatchFiller.offer: every round of this step is used "
                               f"(1 + max_extra_rounds = {1 + self.max_extra_rounds}); call take()")
        for group in groups:
            self.seen += 1
            self.total_seen += 1
            if self.dynamic_sampling and all_equal(group.rewards, self.tol):
                self.dropped += 1
                self.total_dropped += 1
            else:
                self.held.append(group)

    def round_done(self) -> None:
        """One generation round of this step is over."""
        self.rounds += 1

    @property
    def full(self) -> bool:
        return len(self.held) >= self.target_groups

    @property
    def exhausted(self) -> bool:
        """No more generation rounds are allowed this step."""
        return self.rounds >= (1 + self.max_extra_rounds if self.dynamic_sampling else 1)

    def take(self) -> list[Group]:
        """The step's groups (the first ``target_groups`` kept; fewer when exhausted first); ends
        the step: its counters go to ``last_step`` and reset."""
        batch, extra = self.held[:self.target_groups], self.held[self.target_groups:]
        self.total_surplus += len(extra)
        self.last_step = {"groups_seen": self.seen, "groups_dropped": self.dropped,
                          "groups_kept": len(batch), "groups_surplus": len(extra),
                          "rounds": self.rounds,
                          "dropped_fraction": self.dropped / self.seen if self.seen else 0.0}
        self.steps += 1
        self.held, self.rounds, self.seen, self.dropped = [], 0, 0, 0
        return batch

    def metrics(self) -> dict[str, float]:
        """The last step's counters and the stage's dropped fraction, for logging."""
        out = {f"dynamic_sampling/{k}": float(v) for k, v in self.last_step.items()}
        out["dynamic_sampling/dropped_fraction_total"] = (
            self.total_dropped / self.total_seen if self.total_seen else 0.0)
        return out

    def to_state(self) -> dict:
        """A JSON-able dict; held groups go in it (their payloads must be JSON-able)."""
        state = dataclasses.asdict(self)
        state["held"] = [dataclasses.asdict(g) for g in self.held]
        try:
            json.dumps(state)
        except TypeError as e:
            raise TypeError(f"BatchFiller.to_state: a held group's payload is not JSON-able ({e}); "
                            "checkpoint between steps (after take()) or keep payloads to lists, "
                            "numbers and strings") from None
        return state

    @classmethod
    def from_state(cls, d: dict) -> "BatchFiller":
        d = dict(d)
        held = [Group(**g) for g in d.pop("held", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"BatchFiller.from_state: unknown keys {unknown}; the state is not a "
                             "BatchFiller's")
        return cls(held=held, **d)
