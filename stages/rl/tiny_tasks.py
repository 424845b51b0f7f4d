"""Verifiable RL prompts a tiny (~0.2M-parameter) chat model can learn, one generator per reward.

Row ``i`` of generator ``kind`` is drawn from ``random.Random(f"rl-{kind}/{seed}/{i}")``: the rows
are byte-identical on every machine, and the first n rows do not depend on how many are asked.
Prompts may repeat (``prompts.split_heldout`` holds out whole prompt texts). Every row is
``{"id": "<kind>-<i:05d>", "prompt", "answer", ...}``; the prompts follow the phrasing of the chat
corpus the tiny model was SFT'd on (``stages/data/chat_corpus.py``).

- ``arithmetic`` (reward ``math``): ``"What is a + b?"``, ``answer`` ``str(a + b)``, a and b
  uniform in ``operands`` = [lo, hi] (``PromptSource.operands``, default ``ARITHMETIC_OPERANDS``
  = [0, 19]: 400 questions, 350 or so once the chat evaluation's are left out, enough to hold out
  200 whole questions and train on the rest; single digits give only 100, too few for a
  200-prompt held-out set that is never trained on). A question the curate stage keeps for the
  chat evaluation (``chat_corpus.is_eval_question``) is never drawn, so an evaluation after RL
  stays clean. [10, 99] is the SFT corpus's own range (8100 questions). The SFT'd model answers
  in the form ``"a + b = c."``; the reward reads the final number, so RL must teach it c.
- ``code`` (reward ``code``): one-line assignments, e.g. ``"Write x = the sum of 3 and 4."`` with
  ``tests`` ``"assert x == 7"`` (a string of Python run after the completion) and ``answer`` a
  reference solution (``"x = 3 + 4"``) that passes them.
- ``format`` (reward ``instruction_following``): a chat-corpus question plus one or two checkable
  instructions, ``constraints`` a list of ``{"kind": K, "value": V}`` with K one of
  ``CONSTRAINT_KINDS``: ``max_words`` / ``min_words`` / ``number_of_sentences`` (V an int),
  ``must_include`` / ``must_not_include`` (V a word, matched case-insensitively as a word),
  ``ends_with`` / ``starts_with`` (V a string, compared after stripping whitespace),
  ``all_lowercase`` / ``no_commas`` (V ``None``). ``answer`` is "".
- ``chat`` (reward ``chat``, the judge): open questions in the corpus's style (capitals,
  opposites, repeating a word, the next number); ``answer`` is the corpus's reply, for a judge
  that reads a reference.

Measured base rates (the ci11 SFT model: 58 SFT steps, 8 samples at temperature 1 per prompt):
arithmetic 2/320 with operands [0, 9], 0/320 with [0, 19] and with [10, 99] (it copies no operand:
"What is 3 + 4?" -> "90 + 30 = 34."); "What number comes after n?" 1/480; code 0/240 (it has
never seen code: it answers in chat sentences); format (``reward_if.check``) 206/480
completions meet all their constraints and 34 of 60 groups are mixed on that (kept by dynamic
sampling); per kind ends_with 46/72, max_words 56/104, min_words 43/112, number_of_sentences
71/72, must_not_include 29/32, no_commas 30/72, starts_with 8/24, must_include 7/72,
all_lowercase 2/48. So format has a learning signal from this model; arithmetic and code need a
better-SFT'd model first.
"""
from __future__ import annotations

import random

from stages.data.chat_corpus import CAPITALS, COUNT_WORDS, OPPOSITES, WORDS, is_eval_question

ARITHMETIC_OPERANDS = (0, 19)
MAX_DRAWS = 10_000  # redraws of a question before a range is declared all-evaluation
CONSTRAINT_KINDS = ("max_words", "min_words", "must_include", "must_not_include", "ends_with",
                    "starts_with", "all_lowercase", "no_commas", "number_of_sentences")
KINDS = ("arithmetic", "code", "format", "chat")

CODE_NAMES = ("x", "y", "z", "n", "total", "result")
CODE_OPS = (("the sum of {a} and {b}", "{a} + {b}", lambda a, b: a + b),
            ("the product of {a} and {b}", "{a} * {b}", lambda a, b: a * b),
            ("{a} minus {b}", "{a} - {b}", lambda a, b: a - b))


def generate(kind: str, count: int, seed: int, *,
             operands: tuple[int, ...] = ARITHMETIC_OPERANDS) -> list[dict]:
    """``count`` rows of generator ``kind`` (module docstring); ``operands`` is read by
    ``arithmetic`` only."""
    if kind not in KINDS:
        raise ValueError(f"generator: {kind!r} is not one of {', '.join(KINDS)}")
    if count < 1:
        raise ValueError(f"prompts: must be >= 1, got {count}")
    make = {"arithmetic": lambda r: arithmetic_row(r, operands), "code": code_row,
            "format": format_row, "chat": chat_row}[kind]
    rows = []
    for i in range(count):
        row = make(random.Random(f"rl-{kind}/{seed}/{i}"))
        rows.append({"id": f"{kind}-{i:05d}", **row})
    return rows


def arithmetic_row(r: random.Random, operands: tuple[int, ...] = ARITHMETIC_OPERANDS) -> dict:
    lo, hi = operands
    for _ in range(MAX_DRAWS):
        a, b = r.randint(lo, hi), r.randint(lo, hi)
        if not is_eval_question("+", a, b):
            return {"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
    raise ValueError(f"operands: every question in {list(operands)} is one the chat evaluation "
                     "keeps; widen the range")


def code_row(r: random.Random) -> dict:
    name = r.choice(CODE_NAMES)
    words, expr, fn = r.choice(CODE_OPS)
    a, b = r.randint(0, 9), r.randint(0, 9)
    verb = r.choice(("Write {name} = {what}.", "Set {name} to {what}."))
    prompt = verb.format(name=name, what=words.format(a=a, b=b))
    return {"prompt": prompt, "answer": f"{name} = {expr.format(a=a, b=b)}",
            "tests": f"assert {name} == {fn(a, b)}"}


def _question(r: random.Random) -> tuple[str, str, list[str]]:
    """(question, the corpus's reply, words of the question a constraint may name)."""
    kind = r.randrange(4)
    if kind == 0:
        country, city = r.choice(CAPITALS)
        return (f"What is the capital of {country}?", f"The capital of {country} is {city}.",
                [country, city.split()[-1], "capital"])
    if kind == 1:
        w, o = r.choice(OPPOSITES)
        return f"What is the opposite of {w}?", f"The opposite of {w} is {o}.", [w, o, "opposite"]
    if kind == 2:
        w, k = r.choice(WORDS), r.randrange(len(COUNT_WORDS))
        return (f"Please repeat the word '{w}' {COUNT_WORDS[k]} times for me.",
                f"Sure, here it is {COUNT_WORDS[k]} times: " + ", ".join([w] * (k + 2)) + ".",
                [w, "here"])
    n = r.randint(1, 998)
    return f"What number comes after {n}?", f"The number after {n} is {n + 1}.", ["number", "after"]


# (instruction template, constraint kind, value maker(r, words) -> V); {v} is the value in words
INSTRUCTIONS = (
    ("Answer in at most {v} words.", "max_words", lambda r, w: r.randint(4, 8)),
    ("Answer in at least {v} words.", "min_words", lambda r, w: r.randint(6, 10)),
    ("Answer in one sentence.", "number_of_sentences", lambda r, w: 1),
    ("Use the word '{v}' in your answer.", "must_include", lambda r, w: r.choice(w)),
    ("Do not use the word '{v}'.", "must_not_include", lambda r, w: r.choice(w)),
    ("End your answer with '{v}'", "ends_with", lambda r, w: r.choice(("!", ".", "?"))),
    ("Start your answer with '{v}'.", "starts_with", lambda r, w: r.choice(("The", "Yes", "Sure"))),
    ("Write in lowercase letters only.", "all_lowercase", lambda r, w: None),
    ("Do not use any commas.", "no_commas", lambda r, w: None),
)


CONFLICTS = {frozenset(p) for p in (("max_words", "min_words"),
                                    ("must_include", "must_not_include"),
                                    ("starts_with", "all_lowercase"))}


def format_row(r: random.Random) -> dict:
    question, _, words = _question(r)
    picked = r.sample(range(len(INSTRUCTIONS)), r.choice((1, 1, 2)))
    if frozenset(INSTRUCTIONS[j][1] for j in picked) in CONFLICTS:
        picked = picked[:1]  # never ask the impossible
    parts, constraints = [question], []
    for j in sorted(picked):
        template, kind, value = INSTRUCTIONS[j]
        v = value(r, words)
        parts.append(template.format(v=v))
        constraints.append({"kind": kind, "value": v})
    return {"prompt": " ".join(parts), "answer": "", "constraints": constraints}


def chat_row(r: random.Random) -> dict:
    question, reply, _ = _question(r)
    return {"prompt": question, "answer": reply}
