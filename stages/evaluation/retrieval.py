"""Needle-in-a-haystack retrieval probes (single- and multi-key, RULER-style) for context extension.

The task is the one the ``long`` corpus domain teaches (``stages.data.corpus``): a chronicle gives
days of the week to people ("Every Monday Mara opened the mill early."), and a later sentence that
names the day must be continued with that person ("... Nobody was surprised that on Monday" ->
" Mara"). Keys are days, values are names: both single tokens, the value right after the key.

A probe of ``length`` tokens is built from whole token lists, never by re-tokenizing a joined text:

- the haystack: chronicle filler sentences (no days at all), cut at the front so that the probe
  has exactly ``length`` tokens (a window into a longer book, like a packed training sample);
- the needle: one fact sentence (the queried day and its person), put at the sentence boundary
  nearest to fractional ``depth`` of the haystack (0 = first sentence, 1 = right before the query);
- ``keys - 1`` distractor facts (other days, other people) at seeded random boundaries
  (the multi-key variant: only the day tells which person is meant);
- the query: a fact sentence cut right after the day. ``answer`` is the person's single token.

The five people of the filler have invented multi-token names (``corpus.long_cast``), so the
answer occurs in the probe only in its needle.

Every sentence is encoded as " " + text; with the byte-level pre-tokenizer a leading space starts
a new pre-token, so the concatenated ids equal the encoding of the joined text. Keys and values
are kept only if " Monday" and " Mara" are single tokens of the tokenizer given.

Probe ``i`` of ``(length, depth, keys, seed)`` is drawn from its own string-seeded
``random.Random``: deterministic on every machine, and independent of ``samples``.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable, Iterable, Sequence

from stages.data.corpus import DAYS, FACT_SENTENCES, NAMES, TOWNS, long_cast, long_fill

CAST = 5  # people of the filler prose, as in a chronicle


@dataclasses.dataclass
class Probe:
    tokens: list[int]   # exactly ``length`` ids, ending right before the answer
    answer: int         # the single token the model must predict next
    depth: float        # where the queried needle sits in the haystack (0 = start, 1 = end)
    keys: int           # facts in the context (1 = single needle; >1 = distractors too)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def single_token_words(tokenizer, words: Iterable[str]) -> list[str]:
    """The words whose space-prefixed form (" Mara") is one token of ``tokenizer``."""
    return [w for w in words if len(encode(tokenizer, " " + w)) == 1]


def query_template(template: str) -> str:
    """A fact template cut right after its day: "On {d} {n} walked ..." -> "On {d}"."""
    return template[:template.index("{d}") + len("{d}")]


def make_probes(tokenizer, length: int, depth: float, keys: int, samples: int,
                seed: int) -> list[Probe]:
    """``samples`` probes of exactly ``length`` tokens (see the module docstring)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if keys < 1:
        raise ValueError(f"keys must be >= 1, got {keys}")
    days = single_token_words(tokenizer, DAYS)
    names = single_token_words(tokenizer, NAMES)
    if len(days) < keys or len(names) < keys:
        raise ValueError(f"{keys} keys need {keys} single-token days and names; this tokenizer "
                         f"has {len(days)} ({days}) and {len(names)} ({names}); lower the "
                         f"evaluation's keys to {min(len(days), len(names))} or below")
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
    if len(answer) != 1 or encode(tokenizer, query_text + " " + person) != query + answer:
        raise AssertionError(f"the answer {person!r} does not follow the query as a single token")
    budget = length - len(query) - sum(map(len, needles))
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
    assert len(tokens) == length, (len(tokens), length)
    return Probe(tokens=tokens, answer=answer[0], depth=depth, keys=keys)


def accuracy(last_logits_fn: Callable, probes: Sequence[Probe], batch_size: int) -> float:
    """Exact match of the argmax of ``last_logits_fn(LongTensor[B, L]) -> [B, V]`` vs the answers.

    Probes are batched by length (each batch holds probes of one length)."""
    import torch
    if not probes:
        raise ValueError("no probes")
    by_length: dict[int, list[Probe]] = {}
    for p in probes:
        by_length.setdefault(len(p.tokens), []).append(p)
    correct = 0
    with torch.no_grad():
        for group in by_length.values():
            for i in range(0, len(group), max(1, batch_size)):
                chunk = group[i:i + max(1, batch_size)]
                logits = last_logits_fn(torch.tensor([p.tokens for p in chunk], dtype=torch.long))
                pred = logits.argmax(dim=-1).tolist()
                correct += sum(int(a == p.answer) for a, p in zip(pred, chunk))
    return correct / len(probes)
