"""The chat reward: the curation judge (``stages/data/judge.py``) scores (prompt, completion).

The conversation ``[{user: row["prompt"]}, {assistant: completion}]`` goes to the judge exactly as
curation sends one (``judge_messages`` through ``_Asker``: the same prompt, client, retries and
back-off), and the reply is parsed as strictly (``parse_verdict``). The reward is

    value = mean over the rubric's criteria c of (score_c - min_score_c) / (max_score_c - min_score_c)

in [0, 1]; ``passed`` is the verdict's (every score reaches its threshold). An unparsable verdict,
a refused request or an unreachable judge scores 0.0 with the reason, for that completion only
(the judge being down for the whole batch gives every completion 0.0 and the same reason).
At most ``spec.concurrency`` requests (and no more than ``workers``) are in flight at once.
No verdict cache: every completion of an RL run is new.

``JudgeEndpoint(spec, url)`` is what the RL stage passes as ``score_batch(..., judge=)``: a
``JudgeSpec`` and the base URL of the server (``http://host:port``, with or without ``/v1``; the
stage resolves ``spec.endpoint`` or the URL of the judge it serves). A callable
``(completion, row) -> Score`` is also accepted (a judge of one's own).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from stages.data.judge import JudgeError, JudgeSpec, _Asker, parse_verdict, review_text
from stages.data.verdicts import Verdict
from stages.rl.reward_types import Score, failed, guarded


@dataclass(frozen=True)
class JudgeEndpoint:
    spec: JudgeSpec
    url: str


def verdict_score(verdict: Verdict, spec: JudgeSpec) -> Score:
    if verdict.unparsable:
        return failed(f"unparsable verdict: {verdict.reason}")
    parts = [(verdict.scores[n] - c.min_score) / (c.max_score - c.min_score)
             for n, c in spec.rubric.items()]
    passed = all(verdict.scores[n] >= c.threshold for n, c in spec.rubric.items())
    scores = ", ".join(f"{n}={verdict.scores[n]}" for n in spec.rubric)
    return Score(sum(parts) / len(parts), f"judge: {scores}; {verdict.reason}".strip("; "), passed)


def conversation(completion: str, row: dict) -> list[dict[str, str]]:
    return [{"role": "user", "content": str(row["prompt"])},
            {"role": "assistant", "content": completion}]


def score_chat(completions: list[str], rows: list[dict], judge: JudgeEndpoint | Callable,
               workers: int = 2) -> list[Score]:
    if isinstance(judge, JudgeEndpoint):
        spec = judge.spec
        try:
            asker = _Asker(spec, judge.url)
            model = asker.model()
        except JudgeError as e:
            return [failed(f"judge unavailable: {e}")] * len(completions)

        def ask(completion: str, row: dict) -> Score:
            messages = conversation(completion, row)
            digest = hashlib.sha256(review_text(messages).encode()).hexdigest()
            try:
                reply = asker.ask(model, digest, messages)
            except JudgeError as e:
                return failed(f"judge: {e}")
            verdict = reply if isinstance(reply, Verdict) else parse_verdict(reply, spec)
            return verdict_score(verdict, spec)
        fn, threads = ask, min(spec.concurrency, workers)
    elif callable(judge):
        fn, threads = judge, workers
    else:
        raise TypeError(f"judge: expected a JudgeEndpoint(spec, url) or a callable "
                        f"(completion, row) -> Score, got {type(judge).__name__}")
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="chat-reward") as pool:
        return list(pool.map(lambda cr: guarded(fn, *cr), zip(completions, rows)))
