"""The instruction-following reward: checkable constraints, IFEval-style.

A row's ``constraints`` is a list of ``{"kind": K, "value": V}`` (``value`` omitted where the
kind takes none). The reward is the fraction of constraints met; ``passed`` when all are; the
reason names each failed one. Text is the completion with surrounding whitespace stripped.
Words are whitespace-separated tokens (``str.split``); sentences are the non-empty pieces left
when the text is cut after each run of '.', '!' or '?' that is followed by whitespace or the end.

The kinds (``CHECKS``):

- ``max_words`` / ``min_words`` (int): at most / at least that many words.
- ``must_include`` / ``must_not_include`` (str): the value appears / does not appear as a whole
  word or phrase, case-insensitively (not inside a longer word).
- ``starts_with`` / ``ends_with`` (str): the text starts / ends with the value exactly.
- ``all_lowercase``: no uppercase letter.
- ``no_commas``: no ','.
- ``number_of_sentences`` (int): exactly that many sentences.
- ``json_object``: the whole text is one JSON object (``{...}``; a Markdown ```json fence around
  it is allowed).

An unknown kind or a value of the wrong type raises ``ValueError`` naming it (the reward then
scores 0 with that reason: the prompt set is wrong, not the completion).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable

from stages.rl.reward_types import Score


def words(text: str) -> list[str]:
    return text.split()


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def _phrase(text: str, value: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(value) + r"(?!\w)", text, re.IGNORECASE) is not None


def _json_object(text: str) -> bool:
    body = re.sub(r"^```(?:json)?\s*\n(.*)\n```$", r"\1", text, flags=re.DOTALL).strip()
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


CHECKS: dict[str, tuple[type | None, Callable[[str, object], bool]]] = {
    "max_words": (int, lambda t, v: len(words(t)) <= v),
    "min_words": (int, lambda t, v: len(words(t)) >= v),
    "must_include": (str, lambda t, v: _phrase(t, v)),
    "must_not_include": (str, lambda t, v: not _phrase(t, v)),
    "starts_with": (str, lambda t, v: t.startswith(v)),
    "ends_with": (str, lambda t, v: t.endswith(v)),
    "all_lowercase": (None, lambda t, v: t == t.lower()),
    "no_commas": (None, lambda t, v: "," not in t),
    "number_of_sentences": (int, lambda t, v: len(sentences(t)) == v),
    "json_object": (None, lambda t, v: _json_object(t)),
}


def describe(c: dict) -> str:
    return f"{c['kind']}={c['value']!r}" if "value" in c else str(c.get("kind"))


def check(text: str, constraint: dict) -> bool:
    """Is ``constraint`` met by ``text`` (already stripped)?"""
    kind = constraint.get("kind") if isinstance(constraint, dict) else None
    if kind not in CHECKS:
        raise ValueError(f"constraints: unknown kind {kind!r} in {constraint!r}; the kinds are "
                         f"{sorted(CHECKS)}")
    want, fn = CHECKS[kind]
    value = constraint.get("value")
    if want is not None and (not isinstance(value, want) or isinstance(value, bool)):
        raise ValueError(f"constraints: {kind} needs a {want.__name__} 'value', got {value!r}")
    return fn(text, value)


def constraints_reward(completion: str, row: dict) -> Score:
    constraints = row.get("constraints")
    if not isinstance(constraints, list) or not constraints:
        raise ValueError("row.constraints: the instruction_following reward needs a non-empty "
                         "list of {kind, value} constraints")
    text = completion.strip()
    missed = [describe(c) for c in constraints if not check(text, c)]
    met = len(constraints) - len(missed)
    value = met / len(constraints)
    if not missed:
        return Score(1.0, f"all {met} constraints met", True)
    return Score(value, f"{met}/{len(constraints)} met; failed: {', '.join(missed)}", False)
