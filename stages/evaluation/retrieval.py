"""Needle-in-a-haystack retrieval probes (single- and multi-key, RULER-style) for context extension.

The task is the one the ``long`` and ``recall`` corpus domains teach (``stages.data.chronicle``):
a chronicle gives days of the week to people ("Every Monday Mara opened the mill early."), and a
later sentence that names the day must be continued with that person ("... Nobody was surprised
that on Monday" -> " Mara"). Keys are days (single tokens), values are names (one or more tokens, whatever the
tokenizer makes of them), the value right after the key. A probe is right when the model's greedy
continuation is the whole name (exact match, as RULER scores generated strings).

A probe of ``length`` tokens is built from whole token lists, never by re-tokenizing a joined text:

- the haystack: chronicle filler sentences (no days at all), cut at the front so that the probe
  has exactly ``length`` tokens (a window into a longer book, like a packed training sample);
- the needle: one fact sentence (the queried day and its person), put at the sentence boundary
  nearest to fractional ``depth`` of the haystack (0 = first sentence, 1 = right before the query);
- ``keys - 1`` distractor facts (other days, other people) at seeded random boundaries
  (the multi-key variant: only the day tells which person is meant);
- the query: a fact sentence cut right after the day. ``answer`` is the person's tokens; the
  probe's input is the query followed by all but the last answer token (teacher forcing, so one
  forward pass scores the whole name), and that input has exactly ``length`` tokens.

The five people of the filler have invented names (``chronicle.long_cast``) that are not in
``NAMES``, so the answer occurs in the probe only in its needle.

Every sentence is encoded as " " + text; with the byte-level pre-tokenizer a leading space starts
a new pre-token, so the concatenated ids equal the encoding of the joined text. Days are kept
only if " Monday" is a single token of the tokenizer given.

Probe ``i`` of ``(length, depth, keys, seed)`` is drawn from its own string-seeded
``random.Random``: deterministic on every machine, and independent of ``samples``.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable, Iterable, Sequence

from stages.data.chronicle import FACT_SENTENCES, long_cast, long_fill, query_template
from stages.data.words import DAYS, NAMES, TOWNS

CAST = 5  # people of the filler prose, as in a chronicle


@dataclasses.dataclass
class Probe:
    tokens: list[int]   # the context, ending right before the answer
    answer: list[int]   # the name's tokens, which the model must continue with
    depth: float        # where the queried needle sits in the haystack (0 = start, 1 = end)
    keys: int           # facts in the context (1 = single needle; >1 = distractors too)

    @property
    def inputs(self) -> list[int]:
        """What the model reads: the context and the answer but its last token (``length`` ids)."""
        return self.tokens + self.answer[:-1]


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def single_token_words(tokenizer, words: Iterable[str]) -> list[str]:
    """The words whose space-prefixed form (" Mara") is one token of ``tokenizer``."""
    return [w for w in words if len(encode(tokenizer, " " + w)) == 1]


def make_probes(tokenizer, length: int, depth: float, keys: int, samples: int,
                seed: int) -> list[Probe]:
    """``samples`` probes of exactly ``length`` tokens (see the module docstring)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if keys < 1:
        raise ValueError(f"keys must be >= 1, got {keys}")
    days = single_token_words(tokenizer, DAYS)
    names = list(NAMES)
    if len(days) < keys:
        raise ValueError(f"{keys} keys need {keys} single-token days; this tokenizer has "
                         f"{len(days)} ({days}); lower the evaluation's keys to {len(days)} or below")
    return [_probe(tokenizer, length, depth, keys, days, names,
                   random.Random(f"retrieval/{length}/{depth!r}/{keys}/{seed}/{i}"))
            for i in range(samples)]


def _probe(tokenizer, length: int, depth: float, keys: int, days: Sequence[str],
           names: Sequence[str], r: random.Random) -> Probe:
    town = r.choice(TOWNS)
    cast = long_cast(r, CAST)
    facts = list(zip(r.sample(list(days), keys), r.sample(list(names), keys)))
    needles = [encode(tokenizer, " " + long_fill(r, cast, town, r.choice(FACT_SENTENCES), d=d, n=n))
               for d, n in facts]
    day, person = facts[0]
    query_text = " " + long_fill(r, cast, town, query_template(r.choice(FACT_SENTENCES)), d=day)
    query = encode(tokenizer, query_text)
    answer = encode(tokenizer, " " + person)
    if encode(tokenizer, query_text + " " + person) != query + answer:
        raise AssertionError(f"the answer {person!r} does not tokenize apart from the query")
    budget = length - len(query) - (len(answer) - 1) - sum(map(len, needles))
    if budget < 1:
        raise ValueError(f"length {length} is too short for {keys} needle(s) and a query "
                         f"({length - budget} tokens)")
    filler: list[list[int]] = []
    while sum(map(len, filler)) < budget:
        filler.append(encode(tokenizer, " " + long_fill(r, cast, town)))
    excess = sum(map(len, filler)) - budget
    while excess >= len(filler[0]):  # cut at the front: the probe is a window into a longer text
        excess -= len(filler.pop(0))
    filler[0] = filler[0][excess:]
    n = len(filler)
    slots: list[list[list[int]]] = [[] for _ in range(n + 1)]  # slot j: before filler sentence j
    slots[round(depth * n)].append(needles[0])
    for needle in needles[1:]:
        slot = slots[r.randint(0, n)]
        slot.insert(r.randint(0, len(slot)), needle)
    tokens: list[int] = []
    for j in range(n + 1):
        for needle in slots[j]:
            tokens += needle
        if j < n:
            tokens += filler[j]
    tokens += query
    assert len(tokens) + len(answer) - 1 == length, (len(tokens), len(answer), length)
    return Probe(tokens=tokens, answer=answer, depth=depth, keys=keys)


def accuracy(logits_fn: Callable, probes: Sequence[Probe], batch_size: int) -> float:
    """Share of probes whose greedy continuation is their whole answer.

    ``logits_fn(LongTensor[B, L]) -> [B, L, V]`` scores the probes' ``inputs`` (teacher forcing:
    answer token j is right when the argmax after the context and answer tokens < j is it).
    Probes are batched by input length."""
    import torch
    if not probes:
        raise ValueError("no probes")
    by_length: dict[int, list[Probe]] = {}
    for p in probes:
        by_length.setdefault(len(p.inputs), []).append(p)
    correct = 0
    with torch.no_grad():
        for group in by_length.values():
            for i in range(0, len(group), max(1, batch_size)):
                chunk = group[i:i + max(1, batch_size)]
                pred = logits_fn(torch.tensor([p.inputs for p in chunk], dtype=torch.long)).argmax(-1)
                for row, p in zip(pred.tolist(), chunk):
                    start = len(p.tokens) - 1  # the prediction made at the context's last token
                    correct += int(row[start:start + len(p.answer)] == p.answer)
    return correct / len(probes)
