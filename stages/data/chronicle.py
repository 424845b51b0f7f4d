"""The chronicle domains: ``long`` (books-like chronicles whose facts recur) and ``recall``
(retrieval drills cut from the same prose, with the loss on the answer only).

Split from ``stages.data.corpus`` (which registers both generators) because the retrieval
evaluation (``stages.evaluation.retrieval``) builds its probes from the same sentences.
"""
from __future__ import annotations

import math
import random

from stages.data.words import DAYS, NAMES, TOWNS

# ---------------------------------------------------------------- long: chronicles with recurring facts
# The long domain carries the retrieval skill that context extension is measured on (see
# stages/evaluation/retrieval.py): each chronicle gives some days of the week to people of the
# town ("Every Monday Mara opened the mill early."), states that schedule near the start, and keeps
# mentioning it in the prose at random intervals, so a window of any length holds the pattern
# "... Monday Mara ... on Monday" -> " Mara" at distances from a few tokens to several hundred.
# Days (the keys) are single BPE tokens whatever the vocabulary (they are frequent in the web and
# math domains too); names (the values) may be split, and the value directly follows the key: the
# easiest copy pattern for a small model (an induction head). The schedule is drawn per document, so only
# the context tells whose day it is. The filler prose never names a day.
# Copying has to be learned before it can be used, and the recalls are only a few percent of the
# tokens. To give a small model more to copy, chronicles also quote: a character writes down a
# rhyme of random words, and later chapters quote it again word for word (runs of tokens that only
# copying predicts), and the five main characters carry invented names ("Dorvel Quolorin"), split
# into several tokens, so every later mention of a person is a copy too, as names are in books.
# Measured (2-layer, hidden-64 model, 2026-11): even so, LM training on this domain did not form
# the copy circuit within the tiny pipeline's budgets (chance-level retrieval after 2.4M tokens of
# long documents alone); the ``recall`` drills below do.
ROLES = ("baker", "smith", "fisher", "teacher", "doctor", "miller", "guard", "painter")
PLACES = ("market", "harbor", "mill", "school", "bridge", "tower", "forest", "square")
OBJECTS = ("lamp", "rope", "basket", "map", "bell", "coat", "letter", "hammer")
LONG_SENTENCES = (  # filler: no days, so the day -> name schedule stays unambiguous
    "{N} the {R} walked to the {P} to fetch a {O}.",
    "At the {P}, {N} met {M}, who was carrying a {O}.",
    "{N} told {M} that the {P} would be busy before the evening.",
    "The {P} was quiet, so {N} the {R} sat down and waited for {M}.",
    "Everyone in {T} knew that {N} was the {R} and {M} was the {S}.",
    "{M} asked {N} for a {O}, and {N} agreed to bring it the next morning.",
    "By noon, {N} had finished the work at the {P}.",
    "Later, {N} and {M} went back to the {P} together.",
)
FACT_SENTENCES = (  # "{d} {n}": the day (key) is directly followed by its person (value)
    "Every {d} {n} opened the {P} early.",
    "On {d} {n} walked to the {P} to fetch a {O}.",
    "That {d} {n} met {M} at the {P}.",
    "Each {d} {n} carried a {O} to the {P}.",
    "Last {d} {n} waited at the {P} for {M}.",
    "On {d} {n} and {M} cleaned the {P}.",
    "As usual, on {d} {n} rang the bell of the {P}.",
    "Nobody in {T} was surprised that on {d} {n} kept the {P}.",
)


SYLLABLES = ("vel", "lor", "an", "tho", "mir", "ka", "sen", "dru", "bel", "ost", "rin", "ga",
             "quo", "zim", "har", "wen", "pel", "u", "dor", "is")


def surname(r: random.Random) -> str:
    """An invented family name of two or three syllables ("Velloran")."""
    return "".join(r.choice(SYLLABLES) for _ in range(r.randint(2, 3))).capitalize()


def long_cast(r: random.Random, count: int = 5) -> list[tuple[str, str]]:
    """The main characters: (invented full name, role). Their names are never in ``NAMES``, so
    the only ``NAMES`` in a chronicle are the people of its schedule."""
    return [(f"{surname(r)} {surname(r)}", role) for role in r.sample(ROLES, count)]


RHYME_WORDS = ("river", "candle", "bridge", "garden", "orange", "planet", "window", "rabbit",
               "pencil", "lamp", "rope", "basket", "map", "bell", "coat", "letter", "hammer",
               "stone", "apple", "cloud", "silver", "winter", "moon", "salt", "feather", "honey",
               "wolf", "anchor", "mirror", "thread", "lantern", "meadow")
QUOTE_NEW = ("{N} wrote a rhyme on the wall of the {P}: \"{q}\"",
             "That night {N} sang a new song to {M}: \"{q}\"",
             "{N} found an old note at the {P}. It said: \"{q}\"")
QUOTE_AGAIN = ("{M} still remembered the words: \"{q}\"",
               "Again {N} sang the old song: \"{q}\"",
               "At the {P}, someone read the note aloud: \"{q}\"")


def rhyme(r: random.Random) -> str:
    words = [r.choice(RHYME_WORDS) for _ in range(r.randint(6, 12))]
    return " ".join(words).capitalize() + "."


def long_fill(r: random.Random, cast, town: str, template: str | None = None, **kw) -> str:
    """One chronicle sentence about two of ``cast`` (pairs of name and role) in ``town``;
    ``template`` defaults to a filler sentence, ``kw`` fills a fact template's {d} and {n}."""
    (n, role), (m, other) = r.sample(cast, 2)
    return (template or r.choice(LONG_SENTENCES)).format(
        N=n, R=role, M=m, S=other, T=town, P=r.choice(PLACES), O=r.choice(OBJECTS), **kw)


def long(r: random.Random) -> str:
    town = r.choice(TOWNS)
    keys = r.randint(2, 5)
    cast = long_cast(r)
    facts = list(zip(r.sample(DAYS, keys), r.sample(NAMES, keys)))  # day -> whose day it is
    out = [f"# The Chronicle of {town}", "## Who is who\n\n" + "\n".join(
        f"- {n} is the {role} of {town}." for n, role in cast),
           "## The week\n\n" + " ".join(
        long_fill(r, cast, town, r.choice(FACT_SENTENCES), d=d, n=n) for d, n in facts)]
    rhymes: list[str] = []
    for ch in range(1, r.randint(12, 26) + 1):
        # Dense chapters recall the schedule every few sentences (many short-range copies); sparse
        # ones rarely (copies across hundreds of tokens).
        rate = r.choice((0.3, 0.7, 0.9))
        sents = []
        new_at = r.randint(0, 9) if r.random() < 0.3 else -1  # a new rhyme now and then
        for j in range(r.randint(10, 16)):
            if j == new_at:
                rhymes.append(rhyme(r))
                sents.append(long_fill(r, cast, town, r.choice(QUOTE_NEW), q=rhymes[-1]))
            elif rhymes and r.random() < 0.1:
                sents.append(long_fill(r, cast, town, r.choice(QUOTE_AGAIN), q=r.choice(rhymes)))
            elif r.random() < rate:
                d, n = r.choice(facts)
                sents.append(long_fill(r, cast, town, r.choice(FACT_SENTENCES), d=d, n=n))
            else:
                sents.append(long_fill(r, cast, town))
        out.append(f"## Chapter {ch}: the {r.choice(PLACES)}\n\n" + " ".join(sents))
    out.append("## Summary\n\n" + " ".join(f"{n} was the {role}." for n, role in cast)
               + " " + " ".join(f"On {d} {n} still kept the {r.choice(PLACES)}." for d, n in facts))
    return "\n\n".join(out)


# ---------------------------------------------------------------- recall: retrieval drills
# Measured (2026-11-29, tiny model): language-model loss on chronicles never formed the copy
# circuit, while the loss on the answers of drills like these formed it within a few hundred
# steps; the same drills with the loss on every token did not (the answers drown in the filler's
# loss). So a drill is a prompt (prose with the facts, then a question cut after the day) and a
# text (the person): with ``prompt`` set, only the text's tokens carry loss.
# A drill fits a 128-token pretraining window (1 to 9 filler sentences, log-uniform; about 12
# tokens each with the tiny tokenizer), so its needle is in view when its answer is. Measured: drills
# of up to 40 sentences left most answers in a window without their needle, and the tiny model never
# learned retrieval; the extension steps teach the longer distances (with the raised RoPE theta).
RECALL_SENTENCES = (1, 9)


def query_template(template: str) -> str:
    """A fact template cut right after its day: "On {d} {n} walked ..." -> "On {d}"."""
    return template[:template.index("{d}") + len("{d}")]


def recall(r: random.Random) -> dict:
    """One to four day -> person facts hidden in chronicle filler; the prompt ends with a sentence
    cut right after one of the days, and the text is its person (" Mara")."""
    town = r.choice(TOWNS)
    cast = long_cast(r)
    keys = r.randint(1, 4)
    facts = list(zip(r.sample(DAYS, keys), r.sample(NAMES, keys)))
    low, high = RECALL_SENTENCES
    count = int(math.exp(r.uniform(math.log(low), math.log(high + 1))))
    sents = [long_fill(r, cast, town) for _ in range(count)]
    for d, n in facts:
        sents.insert(r.randint(0, len(sents)), long_fill(r, cast, town, r.choice(FACT_SENTENCES),
                                                         d=d, n=n))
    day, person = r.choice(facts)
    query = long_fill(r, cast, town, query_template(r.choice(FACT_SENTENCES)), d=day)
    return {"prompt": " ".join(sents + [query]), "text": " " + person}

