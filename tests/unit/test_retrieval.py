"""Needle-in-a-haystack probes: exact lengths, depth placement, determinism, single-token answers,
and ``accuracy`` against known oracle functions."""
from __future__ import annotations

import pytest
import torch

from stages.data import corpus
from stages.data.tokenizer import EOD, PAD, build_tokenizer
from stages.evaluation.retrieval import Probe, accuracy, encode, make_probes

VOCAB = 1024


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained like the train_tokenizer stage, on a few documents per domain."""
    from tokenizers import pre_tokenizers, trainers
    tok = build_tokenizer()
    texts = [t for d in corpus.GENERATORS for t in corpus.generate(d, 40 if d != "long" else 8, 0)]
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=VOCAB, min_frequency=2, special_tokens=[EOD, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def day_ids(tok) -> set[int]:
    return {encode(tok, " " + d)[0] for d in corpus.DAYS}


def induction_oracle(vocab: int):
    """At every position, predicts the token that followed the earlier occurrence of the current
    token with the longest common history (a copy head that matches a few tokens back, as induction
    heads do); positions whose token never occurred before predict nothing."""
    def fn(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(tokens.shape[0], tokens.shape[1], vocab)
        for b, row in enumerate(tokens.tolist()):
            for i, t in enumerate(row):
                best, best_j = 0, None
                for j in range(i - 1, -1, -1):
                    n = 0
                    while n < 4 and j - n >= 0 and row[j - n] == row[i - n]:
                        n += 1
                    if n > best:
                        best, best_j = n, j
                if best_j is not None:
                    out[b, i, row[best_j + 1]] = 1.0
        return out
    return fn


def name_of(tok, p: Probe) -> str:
    return tok.decode(p.answer).strip()


@pytest.mark.parametrize("length", [64, 128, 256, 512])
@pytest.mark.parametrize("keys", [1, 3])
def test_lengths_are_exact_and_the_answer_is_a_name(tokenizer, length, keys):
    multi = 0
    for depth in (0.0, 0.5, 1.0):
        probes = make_probes(tokenizer, length, depth, keys, samples=4, seed=0)
        assert len(probes) == 4
        for p in probes:
            assert isinstance(p, Probe) and p.depth == depth and p.keys == keys
            assert len(p.inputs) == length and p.inputs[:len(p.tokens)] == p.tokens
            # the context ends with a day; the answer is a whole name (one or more tokens), and
            # the probe plus its answer is exactly what the tokenizer makes of the decoded text
            assert p.tokens[-1] in day_ids(tokenizer)
            assert name_of(tokenizer, p) in corpus.NAMES
            assert encode(tokenizer, " " + name_of(tokenizer, p)) == p.answer
            multi += len(p.answer) > 1
            text = tokenizer.decode(p.tokens + p.answer)
            if text.startswith(" "):  # the front cut may fall inside a word; compare from a space
                assert encode(tokenizer, text)[-8:] == (p.tokens + p.answer)[-8:]
            # keys facts: each day of the context occurs once in a needle and the queried one again
            days = [t for t in p.tokens if t in day_ids(tokenizer)]
            assert len(days) == keys + 1 and len(set(days)) == keys
            # the name occurs in the context exactly once: right after the queried day
            n = len(p.answer)
            at = [i for i in range(len(p.tokens) - n + 1) if p.tokens[i:i + n] == p.answer]
            assert len(at) == 1 and p.tokens[at[0] - 1] == p.tokens[-1]
    assert multi > 0  # this small tokenizer splits most names: multi-token answers are exercised


def test_needle_depth_placement(tokenizer):
    length = 512
    positions = {}
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        probes = make_probes(tokenizer, length, depth, 1, samples=8, seed=3)
        rel = []
        for p in probes:
            n = len(p.answer)  # the needle's value position:
            at = next(i for i in range(len(p.tokens)) if p.tokens[i:i + n] == p.answer)
            rel.append(at / (length - 1))
        positions[depth] = sum(rel) / len(rel)
    assert positions[0.0] < 0.05                     # at the very start
    assert positions[1.0] > 0.9                      # right before the query
    for d in (0.25, 0.5, 0.75):
        assert abs(positions[d] - d) < 0.08, positions
    assert list(positions.values()) == sorted(positions.values())


def test_probes_are_deterministic(tokenizer):
    a = make_probes(tokenizer, 256, 0.5, 2, samples=6, seed=1)
    b = make_probes(tokenizer, 256, 0.5, 2, samples=6, seed=1)
    assert a == b
    assert make_probes(tokenizer, 256, 0.5, 2, samples=3, seed=1) == a[:3]  # independent of samples
    c = make_probes(tokenizer, 256, 0.5, 2, samples=6, seed=2)
    assert [p.tokens for p in a] != [p.tokens for p in c]


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="depth"):
        make_probes(tokenizer, 128, 1.5, 1, 1, 0)
    with pytest.raises(ValueError, match="too short"):
        make_probes(tokenizer, 16, 0.5, 3, 1, 0)
    with pytest.raises(ValueError, match="keys"):
        make_probes(tokenizer, 512, 0.5, len(corpus.DAYS) + 1, 1, 0)


def test_accuracy_on_oracles(tokenizer):
    probes = [p for k in (1, 3) for d in (0.0, 0.5, 1.0)
              for p in make_probes(tokenizer, 128, d, k, samples=5, seed=0)]
    probes += make_probes(tokenizer, 200, 0.3, 2, samples=4, seed=0)  # a second length
    vocab = tokenizer.get_vocab_size()
    by_inputs = {tuple(p.inputs): p for p in probes}

    def saying(pick):
        """Logits that continue each probe's context with the tokens ``pick(probe)``."""
        def fn(tokens):
            out = torch.zeros(tokens.shape[0], tokens.shape[1], vocab)
            for b, row in enumerate(tokens.tolist()):
                p = by_inputs[tuple(row)]
                for j, t in enumerate(pick(p)[:len(p.answer)]):
                    out[b, len(p.tokens) - 1 + j, t] = 1.0
            return out
        return fn

    perfect = saying(lambda p: p.answer)
    assert accuracy(perfect, probes, batch_size=4) == 1.0
    # the task is solved exactly by copying what followed the previous occurrence of each token
    assert accuracy(induction_oracle(vocab), probes, batch_size=7) == 1.0
    # a model that always says the same name is right only when that name is the answer
    name = max(probes, key=lambda p: len(p.answer)).answer
    assert len(name) > 1
    expected = sum(p.answer == name for p in probes) / len(probes)
    assert accuracy(saying(lambda p: name), probes, batch_size=5) == pytest.approx(expected)
    assert expected < 0.5
    # the first token alone is not enough: a wrong second token fails the probe
    first_only = saying(lambda p: p.answer[:1] + [(t + 1) % vocab for t in p.answer[1:]])
    single = sum(len(p.answer) == 1 for p in probes) / len(probes)
    assert accuracy(first_only, probes, batch_size=6) == pytest.approx(single) and single < 1.0
    with pytest.raises(ValueError):
        accuracy(perfect, [], batch_size=4)
