"""What every reward shares: the ``Score`` it returns, the guard that turns a reward's exception
into a score of 0 with the reason, and ``per_item`` (a per-completion reward as a batch reward).
The registry and the contract are in ``rewards.py``."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Score:
    value: float     # the reward, in [0, 1]
    reason: str      # why: what was compared, which check failed, or what went wrong
    passed: bool     # the verifiable check held (for pass rates)


RewardFn = Callable[[str, dict], Score]   # (completion text, prompt row) -> Score


@dataclass(frozen=True)
class RewardOptions:
    timeout_s: float = 5.0   # one completion's time limit (math verifier call, sandbox wall time)
    workers: int = 2         # completions scored at once (processes / sandboxes / judge requests)
    judge: Any = None        # chat: a JudgeEndpoint or a callable (completion, row) -> Score


BatchReward = Callable[[list[str], list[dict], RewardOptions], list[Score]]


def failed(reason: str) -> Score:
    return Score(0.0, reason, False)


def guarded(fn: RewardFn, completion: str, row: dict) -> Score:
    """``fn(completion, row)``, or 0.0 with the exception as the reason when it raises."""
    try:
        score = fn(completion, row)
    except Exception as e:  # a reward's failure is a score of 0, never the stage's crash
        return failed(f"reward raised {type(e).__name__}: {e}")
    if not isinstance(score, Score):
        return failed(f"reward returned {type(score).__name__}, not a Score")
    return score


def per_item(fn: RewardFn, threads: bool = False) -> BatchReward:
    """A batch reward scoring each completion with ``fn``, guarded; in ``workers`` threads if
    ``threads`` (for rewards that wait on processes or servers)."""
    def batch(completions: list[str], rows: list[dict], opts: RewardOptions) -> list[Score]:
        if not threads or opts.workers == 1 or len(completions) < 2:
            return [guarded(fn, c, r) for c, r in zip(completions, rows)]
        with ThreadPoolExecutor(min(opts.workers, len(completions)), thread_name_prefix="reward") as pool:
            return list(pool.map(lambda cr: guarded(fn, *cr), zip(completions, rows)))
    return batch
