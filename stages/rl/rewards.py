"""The rewards registry: every RL task's reward, each returning a ``Score`` (value, reason, passed).

``score_batch(task, completions, rows, timeout_s=, workers=, judge=)`` scores a batch with the
task's reward (``REWARDS[task]``). Rows are dicts with at least ``prompt`` and ``answer`` (the
reference, may be ''); a task reads its own fields (below). The contract: a reward that raises or
times out scores 0.0 with the reason, per completion; ``score_batch`` never raises for a
completion's sake (it raises only for the caller's own mistakes: an unknown task, rows and
completions of different lengths, chat without a judge).

The rewards (each in [0, 1]; ``passed`` is the verifiable check, for pass rates):

- ``math`` (``reward_math.py``): the completion's final answer (the last ``\\boxed{...}``, else
  the text after the last "answer is", else the last number) against ``answer``, equal by
  math-verify (so ``68`` = ``68.0`` = ``\\frac{136}{2}``), run in worker processes with a per-call
  time-out (``timeout_s``); 1.0 equal, 0.0 otherwise.
- ``code`` (``reward_code.py``): the completion's Python (its first fenced block, else all of it)
  then the row's ``tests`` (assert statements), run in the sandbox (``sandbox.py``) with a wall
  time-out of ``timeout_s``; 1.0 when it exits 0.
- ``instruction_following`` (``reward_if.py``): the fraction of the row's ``constraints`` met
  (``[{"kind": K, "value": V}, ...]``, IFEval-style); passed when all are.
- ``format`` (here): 1.0 when the stripped completion matches the row's ``format`` regex in full
  (``re.fullmatch``, flags none), default ``DEFAULT_FORMAT``: one line that contains '=' and ends
  with '.' (what a tiny model's "3 + 4 = 7." looks like).
- ``chat`` (``reward_chat.py``): the curation judge's verdict on (prompt, completion), the mean
  over its criteria of ``(score - min_score) / (max_score - min_score)``; ``judge`` is a
  ``JudgeEndpoint(spec, url)`` or a callable ``(completion, row) -> Score``.

``per_item(fn)`` (``reward_types.py``, with ``Score`` and ``guarded``) turns a ``RewardFn``
(completion, row) -> Score into a batch reward that scores one completion at a time, each
guarded; a new task is a new entry of ``REWARDS``.
"""
from __future__ import annotations

import re
from typing import Any

from stages.rl.reward_chat import JudgeEndpoint, score_chat
from stages.rl.reward_code import code_reward_fn
from stages.rl.reward_if import constraints_reward
from stages.rl.reward_math import score_math
from stages.rl.reward_types import (BatchReward, RewardFn, RewardOptions, Score, failed, guarded,
                                    per_item)

__all__ = ["REWARDS", "JudgeEndpoint", "BatchReward", "RewardFn", "RewardOptions", "Score",
           "failed", "guarded", "per_item", "score_batch", "format_reward"]


# ---- format ----

DEFAULT_FORMAT = r"[^\n]*=[^\n]*\."


def format_reward(completion: str, row: dict) -> Score:
    pattern = row.get("format") or DEFAULT_FORMAT
    if re.fullmatch(pattern, completion.strip()):
        return Score(1.0, f"matches the format /{pattern}/", True)
    return Score(0.0, f"does not match the format /{pattern}/", False)


# ---- the registry ----

def _math(completions: list[str], rows: list[dict], opts: RewardOptions) -> list[Score]:
    return score_math(completions, rows, timeout_s=opts.timeout_s, workers=opts.workers)


def _code(completions: list[str], rows: list[dict], opts: RewardOptions) -> list[Score]:
    return per_item(code_reward_fn(opts.timeout_s), threads=True)(completions, rows, opts)


def _instruction_following(completions: list[str], rows: list[dict], opts: RewardOptions) -> list[Score]:
    return per_item(constraints_reward)(completions, rows, opts)


def _chat(completions: list[str], rows: list[dict], opts: RewardOptions) -> list[Score]:
    return score_chat(completions, rows, opts.judge, workers=opts.workers)


REWARDS: dict[str, BatchReward] = {
    "math": _math,
    "code": _code,
    "instruction_following": _instruction_following,
    "format": per_item(format_reward),
    "chat": _chat,
}


def score_batch(task: str, completions: list[str], rows: list[dict], *, timeout_s: float = 5.0,
                workers: int = 2, judge: Any = None) -> list[Score]:
    """One ``Score`` per completion (``rows[i]`` is the prompt row of ``completions[i]``)."""
    if task not in REWARDS:
        raise ValueError(f"task: unknown reward {task!r}; the registry has {sorted(REWARDS)}")
    if len(completions) != len(rows):
        raise ValueError(f"rows: {len(rows)} rows for {len(completions)} completions; give one "
                         "prompt row per completion")
    if task == "chat" and judge is None:
        raise ValueError("judge: the chat reward needs a judge: JudgeEndpoint(spec, url) or a "
                         "callable (completion, row) -> Score")
    if timeout_s <= 0 or workers < 1:
        raise ValueError(f"timeout_s must be > 0 and workers >= 1, got {timeout_s}, {workers}")
    if not completions:
        return []
    try:
        scores = REWARDS[task](list(completions), list(rows), RewardOptions(timeout_s, workers, judge))
    except Exception as e:  # the whole batch failed (say, the judge is down): every score is 0
        return [failed(f"{task} reward raised {type(e).__name__}: {e}")] * len(completions)
    if len(scores) != len(completions):
        return [failed(f"{task} reward returned {len(scores)} scores for {len(completions)} "
                       "completions")] * len(completions)
    return scores
