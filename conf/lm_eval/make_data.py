"""Writes the data of the shipped lm-evaluation-harness tasks (``data/*.jsonl``) from the tiny chat
corpus's held-out arithmetic questions (``stages.data.chat_corpus.eval_prompts``): questions that no
training sample of the embedded chat corpus asks (``is_eval_question``), in its phrasing.

- ``tiny_arith.jsonl``: one row per question, ``{"id", "question", "answer", "choices", "label"}``;
  ``answer`` is the number, ``choices`` four answer sentences in the corpus's style ("23 + 45 =
  68.", "7 times 8 is 56."), the right one at ``label`` and three wrong ones (the result off by one
  or by ten, in a seeded order). ``tiny_arith_mc`` scores the choices; ``tiny_arith_gen`` asks for
  a completion and compares its last number with ``answer``.

Run from the repository root: ``python conf/lm_eval/make_data.py``; the output is byte-identical
on every machine (a test regenerates it and compares).
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUESTIONS = 64
SEED = 0
_QUESTION = re.compile(r"What is (\d+) (\+|-|times) (\d+)\?")


def sentence(a: int, op: str, b: int, result: int) -> str:
    """The corpus's answer sentence (``chat_corpus._arith``) with ``result`` as the number."""
    return f"{a} times {b} is {result}." if op == "times" else f"{a} {op} {b} = {result}."


def rows() -> list[dict]:
    from stages.data.chat_corpus import eval_prompts
    out = []
    for p in eval_prompts(SEED, QUESTIONS):
        a, op, b = _QUESTION.fullmatch(p["prompt"]).groups()
        a, b, right = int(a), int(b), int(p["answer"])
        wrong = [w for w in (right + 1, right - 1, right + 10, right - 10) if w >= 0][:3]
        r = random.Random(f"tiny_arith/{p['id']}")
        results = [right, *wrong]
        r.shuffle(results)
        out.append({"id": p["id"], "question": p["prompt"], "answer": p["answer"],
                    "choices": [sentence(a, op, b, x) for x in results],
                    "label": results.index(right)})
    return out


def render() -> str:
    return "".join(json.dumps(row) + "\n" for row in rows())


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    (HERE / "data" / "tiny_arith.jsonl").write_text(render())
