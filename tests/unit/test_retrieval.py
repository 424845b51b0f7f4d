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
    """Predicts the token that followed the previous occurrence of the last token (a copy head)."""
    def fn(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(tokens.shape[0], vocab)
        for b, row in enumerate(tokens.tolist()):
            last = row[-1]
            prev = max(i for i in range(len(row) - 1) if row[i] == last)
            out[b, row[prev + 1]] = 1.0
        return out
    return fn


@pytest.mark.parametrize("length", [64, 128, 256, 512])
@pytest.mark.parametrize("keys", [1, 3])
def test_lengths_are_exact_and_the_answer_is_one_token(tokenizer, length, keys):
    for depth in (0.0, 0.5, 1.0):
        probes = make_probes(tokenizer, length, depth, keys, samples=4, seed=0)
        assert len(probes) == 4
        for p in probes:
            assert isinstance(p, Probe) and p.depth == depth and p.keys == keys
            assert len(p.tokens) == length
            assert isinstance(p.answer, int)
            # the query ends with a day; the answer is a name, one token, and the probe plus its
            # answer is exactly what the tokenizer makes of the decoded text
            assert p.tokens[-1] in day_ids(tokenizer)
            assert tokenizer.decode([p.answer]).strip() in corpus.NAMES
            assert encode(tokenizer, " " + tokenizer.decode([p.answer]).strip()) == [p.answer]
            text = tokenizer.decode(p.tokens + [p.answer])
            if text.startswith(" "):  # the front cut may fall inside a word; compare from a space
                assert encode(tokenizer, text)[-8:] == (p.tokens + [p.answer])[-8:]
            # keys facts: each day of the context occurs once in a needle and the queried one again
            days = [t for t in p.tokens if t in day_ids(tokenizer)]
            assert len(days) == keys + 1 and len(set(days)) == keys
            # the answer occurs in the probe exactly once: right after the queried day
            at = [i for i, t in enumerate(p.tokens) if t == p.answer]
            assert len(at) == 1 and p.tokens[at[0] - 1] == p.tokens[-1]


def test_needle_depth_placement(tokenizer):
    length = 512
    positions = {}
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        probes = make_probes(tokenizer, length, depth, 1, samples=8, seed=3)
        rel = []
        for p in probes:
            rel.append(p.tokens.index(p.answer) / (length - 1))  # the needle's value position
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
    answers = {tuple(p.tokens): p.answer for p in probes}

    def perfect(tokens):
        out = torch.zeros(tokens.shape[0], vocab)
        for b, row in enumerate(tokens.tolist()):
            out[b, answers[tuple(row)]] = 1.0
        return out

    assert accuracy(perfect, probes, batch_size=4) == 1.0
    # the task is solved exactly by copying what followed the previous occurrence of the last token
    assert accuracy(induction_oracle(vocab), probes, batch_size=7) == 1.0
    # a model that always says the same name is right only when that name is the answer
    name = probes[0].answer

    def constant(tokens):
        out = torch.zeros(tokens.shape[0], vocab)
        out[:, name] = 1.0
        return out

    expected = sum(p.answer == name for p in probes) / len(probes)
    assert accuracy(constant, probes, batch_size=5) == pytest.approx(expected)
    assert expected < 0.5
    # half right: the oracle's answer on even batch rows only
    def half(tokens):
        out = perfect(tokens)
        out[1::2] = constant(tokens)[1::2]
        return out

    acc = accuracy(half, probes[:8], batch_size=8)
    assert acc == pytest.approx((4 + sum(p.answer == name for p in probes[1:8:2])) / 8)
    with pytest.raises(ValueError):
        accuracy(perfect, [], batch_size=4)
