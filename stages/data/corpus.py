"""Embedded, deterministic corpus: one template grammar per mixture domain.

Nothing can be downloaded here, so the pipeline ships its own data. Each domain has its own
vocabulary and structure that a tiny model can learn in minutes (correct arithmetic, consistently
indented code, facts that recur within a document), and the domains are easy to tell apart.

Document ``i`` of ``(domain, seed)`` is drawn from ``random.Random(f"{domain}/{seed}/{i}")``:
pure Python, seeded by string (SHA-512), so output is byte-identical on every machine and does not
depend on how many documents are asked for (the first 100 of 2000 are the 100 of 100).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Iterator, Union

from stages.data import chronicle
from stages.data.words import DAYS, NAMES, TOWNS

# ---------------------------------------------------------------- web: blog-like prose by topic
WEB_TOPICS = {
    "Cooking": (("soup", "bread", "sauce", "recipe", "salad", "pie", "kitchen", "dinner"),
                ("fresh", "warm", "simple", "crispy", "rich", "homemade")),
    "Travel": (("beach", "museum", "market", "harbor", "hotel", "trail", "old town", "cafe"),
               ("quiet", "crowded", "charming", "sunny", "historic", "beautiful")),
    "Gardening": (("tomato", "rose", "seed", "garden", "hedge", "pond", "flower bed", "lawn"),
                  ("green", "healthy", "shady", "wild", "colorful", "young")),
    "Football": (("team", "coach", "match", "season", "goal", "stadium", "league", "fan"),
                 ("strong", "young", "loud", "famous", "local", "tired")),
}
WEB_SENTENCES = (
    "{N} said that the {a} {n} was the best part of the {m}.",
    "If you like a {a} {n}, you will love the {m} in {T}.",
    "We spent {k} hours with the {n}, and it was {b}.",
    "Many people think the {n} is {a}, but the {m} is even more {b}.",
    "Last {D}, {N} and {M} tried a new {n} near the {m}.",
    "The {m} in {T} is {a} in the morning and {b} at night.",
    "My advice is simple: start with a {a} {n} and take your time.",
    "Nobody in {T} expected the {n} to be so {a}.",
    "I wrote about the {m} before, but this {n} surprised me.",
    "On {D} the {n} was {a}, so we stayed for {k} more hours.",
)


def web(r: random.Random) -> str:
    topic = r.choice(tuple(WEB_TOPICS))
    nouns, adjs = WEB_TOPICS[topic]
    town = r.choice(TOWNS)
    out = [f"{r.randint(3, 9)} Things I Learned About {topic} in {town}"]
    for _ in range(r.randint(3, 5)):
        sents = [r.choice(WEB_SENTENCES).format(
            N=r.choice(NAMES), M=r.choice(NAMES), T=town, D=r.choice(DAYS), k=r.randint(2, 9),
            n=r.choice(nouns), m=r.choice(nouns), a=r.choice(adjs), b=r.choice(adjs))
            for _ in range(r.randint(4, 7))]
        out.append(" ".join(sents))
    out.append(f"Thanks for reading, and see you next {r.choice(DAYS)} in {town}!")
    return "\n\n".join(out)


# ---------------------------------------------------------------- code: small Python modules
CODE_THINGS = (("orders", "order"), ("users", "user"), ("files", "file"), ("tasks", "task"),
               ("items", "item"), ("records", "record"), ("books", "book"), ("points", "point"))
CODE_ATTRS = ("price", "size", "score", "age", "weight", "count", "length", "priority")
CODE_FUNCS = (
    'def total_{a}({c}):\n    """Return the total {a} of all {c}."""\n    total = 0\n'
    '    for {i} in {c}:\n        total += {i}.{a}\n    return total\n',
    'def {c}_above({c}, limit):\n    """Return the {c} whose {a} is above the limit."""\n'
    '    result = []\n    for {i} in {c}:\n        if {i}.{a} > limit:\n'
    '            result.append({i})\n    return result\n',
    'def max_{a}({c}):\n    """Return the largest {a}, or None when there are no {c}."""\n'
    '    best = None\n    for {i} in {c}:\n        if best is None or {i}.{a} > best:\n'
    '            best = {i}.{a}\n    return best\n',
    'def count_by_{a}({c}):\n    """Count the {c} for each {a}."""\n    counts = {{}}\n'
    '    for {i} in {c}:\n        key = {i}.{a}\n        counts[key] = counts.get(key, 0) + 1\n'
    '    return counts\n',
    'def sort_by_{a}({c}, reverse=False):\n    """Sort the {c} by {a}."""\n'
    '    return sorted({c}, key=lambda {i}: {i}.{a}, reverse=reverse)\n',
)
CODE_CLASS = ('class {K}:\n    """A {i} with a name and a {a}."""\n\n'
              '    def __init__(self, name, {a}):\n        self.name = name\n        self.{a} = {a}\n\n'
              '    def __repr__(self):\n        return f"{K}({{self.name!r}}, {{self.{a}}})"\n')


def code(r: random.Random) -> str:
    coll, item = r.choice(CODE_THINGS)
    out = [f'"""Helpers for working with {coll}."""\n'
           + "".join(sorted(r.sample(("import math\n", "import os\n", "import json\n",
                                      "from typing import List\n"), r.randint(1, 3))))]
    attr = r.choice(CODE_ATTRS)
    if r.random() < 0.6:
        out.append(CODE_CLASS.format(K=item.capitalize(), i=item, a=attr))
    for tpl in r.sample(CODE_FUNCS, r.randint(2, 4)):
        out.append(tpl.format(c=coll, i=item, a=attr if r.random() < 0.7 else r.choice(CODE_ATTRS)))
    k, name = r.randint(2, 9), r.choice(("scale", "times", "multiply"))
    checks = "".join(f"    assert {name}({x}) == {x * k}\n" for x in r.sample(range(1, 50), 3))
    out.append(f"def {name}(x, factor={k}):\n    return x * factor\n\n\n"
               f'if __name__ == "__main__":\n{checks}    print("ok")\n')
    return "\n\n".join(out)


# ---------------------------------------------------------------- repo: whole code repositories
REPO_NAMES = ("ledgerkit", "tallyhub", "stockroom", "gradebook", "fleetops", "pantry")


def _module(r: random.Random, coll: str, item: str) -> tuple[str, list[str], str]:
    """One module of a repository: (source, the names it defines, its class name)."""
    attr, klass = r.choice(CODE_ATTRS), item.capitalize()
    funcs = [tpl.format(c=coll, i=item, a=attr) for tpl in r.sample(CODE_FUNCS, r.randint(2, 4))]
    names = [f.split("(", 1)[0].removeprefix("def ") for f in funcs]
    src = "\n\n".join([f'"""{klass} records and helpers for working with {coll}."""\n',
                        CODE_CLASS.format(K=klass, i=item, a=attr), *funcs])
    return src, names, klass


def repo(r: random.Random) -> str:
    """A whole small repository, its files concatenated with path headers (the extension's
    code-repository documents): later files import and call what earlier files define, so names
    refer back across thousands of tokens, as in a real repository."""
    pkg = r.choice(REPO_NAMES)
    files, exports = [], []
    for coll, item in r.sample(CODE_THINGS, r.randint(5, 8)):
        src, names, klass = _module(r, coll, item)
        files.append((f"{pkg}/{coll}.py", src))
        exports.append((coll, item, klass, names))
    files.insert(0, (f"{pkg}/__init__.py", "".join(
        f"from .{m} import {k}, {', '.join(ns)}\n" for m, _, k, ns in exports)))
    calls = []
    for m, item, klass, names in r.sample(exports, min(4, len(exports))):
        values, fn = r.sample(range(1, 99), 3), r.choice(names)
        calls.append(f"    {m} = [{', '.join(f'{klass}({item!r} + str({v}), {v})' for v in values)}]\n"
                     f"    print({fn}({m}{', 10' if fn.endswith('_above') else ''}))\n")
    imports = "".join(f"from {pkg}.{m} import {k}, {', '.join(ns)}\n" for m, _, k, ns in exports)
    files.append((f"{pkg}/main.py", f"{imports}\n\ndef main():\n{''.join(calls)}\n\n"
                                     'if __name__ == "__main__":\n    main()\n'))
    files.append(("README.md", f"# {pkg}\n\nModules: " + ", ".join(f"`{p}`" for p, _ in files) + ".\n"))
    return "\n\n".join(f"# ===== {path} =====\n{src}" for path, src in files)


# ---------------------------------------------------------------- math: problems, worked solutions
def _arith(r: random.Random) -> str:
    a, b = r.randint(10, 99), r.randint(10, 99)
    op = r.choice("+-*")
    if op == "-":
        a, b = max(a, b), min(a, b)
    if op == "*":
        b = r.randint(2, 9)
        t, u = divmod(a, 10)
        return (f"What is {a} * {b}?\nSolution: {a} * {b} = {t * 10} * {b} + {u} * {b} = "
                f"{t * 10 * b} + {u * b} = {a * b}.\nAnswer: {a * b}")
    res = a + b if op == "+" else a - b
    return f"What is {a} {op} {b}?\nSolution: {a} {op} {b} = {res}.\nAnswer: {res}"


def _story(r: random.Random) -> str:
    name, thing = r.choice(NAMES), r.choice(("apple", "book", "marble", "coin", "stamp", "card"))
    a, b = r.randint(5, 60), r.randint(2, 30)
    c = r.randint(1, a + b)
    return (f"{name} has {a} {thing}s. {name} buys {b} more and then gives away {c}. "
            f"How many {thing}s does {name} have now?\nSolution: After buying: {a} + {b} = "
            f"{a + b}. After giving away: {a + b} - {c} = {a + b - c}.\nAnswer: {a + b - c}")


def _equation(r: random.Random) -> str:
    a, x, b = r.randint(2, 9), r.randint(1, 20), r.randint(1, 40)
    return (f"Solve for x: {a}x + {b} = {a * x + b}.\nSolution: Subtract {b} from both sides: "
            f"{a}x = {a * x}. Divide both sides by {a}: x = {x}.\nAnswer: x = {x}")


def _geometry(r: random.Random) -> str:
    l, w = r.randint(2, 30), r.randint(2, 30)
    if r.random() < 0.5:
        return (f"A rectangle has length {l} and width {w}. What is its area?\nSolution: "
                f"area = length * width = {l} * {w} = {l * w}.\nAnswer: {l * w}")
    return (f"A rectangle has length {l} and width {w}. What is its perimeter?\nSolution: "
            f"perimeter = 2 * (length + width) = 2 * ({l} + {w}) = 2 * {l + w} = {2 * (l + w)}."
            f"\nAnswer: {2 * (l + w)}")


def _percent(r: random.Random) -> str:
    p, n = r.choice((5, 10, 20, 25, 50)), 20 * r.randint(1, 40)
    return (f"What is {p}% of {n}?\nSolution: {p}% of {n} = {n} * {p} / 100 = {n * p} / 100 = "
            f"{n * p // 100}.\nAnswer: {n * p // 100}")


MATH_KINDS = (_arith, _story, _equation, _geometry, _percent)


def math(r: random.Random) -> str:
    out = [f"Exercise set {r.randint(1, 99)}: {r.choice(('practice', 'review', 'homework'))}"]
    for i in range(1, r.randint(4, 9) + 1):
        out.append(f"Problem {i}. " + r.choice(MATH_KINDS)(r))
    return "\n\n".join(out)


# ---------------------------------------------------------------- technical: software documentation
PRODUCTS = ("fluxdb", "kestrel", "orbitq", "parsec", "quillserve", "tessera")
OPTIONS = (
    ("timeout", "int", "{t}", "Number of seconds to wait for a response before the request fails."),
    ("max_connections", "int", "{c}", "Maximum number of open connections in the pool."),
    ("log_level", "str", "info", "Minimum level of messages written to the log file."),
    ("cache_dir", "path", "~/.cache/{p}", "Directory where downloaded files are stored."),
    ("retries", "int", "3", "How many times a failed request is sent again."),
    ("compression", "bool", "false", "Compress responses larger than one kilobyte."),
    ("workers", "int", "4", "Number of worker processes that handle requests."),
)


def technical(r: random.Random) -> str:
    p, port = r.choice(PRODUCTS), r.choice((8080, 8000, 5000, 9090))
    t, c = r.randint(5, 60), 16 * r.randint(1, 8)
    ver = f"{r.randint(0, 4)}.{r.randint(0, 12)}"
    opts = "\n".join(f"- `{o}` ({ty}, default `{d.format(t=t, c=c, p=p)}`): {doc}"
                     for o, ty, d, doc in sorted(r.sample(OPTIONS, r.randint(3, 6))))
    sections = [
        f"# {p} {ver} documentation\n\n`{p}` is a small server that stores and serves data over HTTP.",
        f"## Installation\n\nInstall {p} with pip:\n\n    pip install {p}=={ver}.0\n\n"
        f"Check the installed version with `{p} --version`; it prints `{p} {ver}.0`.",
        f"## Configuration\n\nSettings are read from `{p}.toml` in the working directory.\n\n{opts}",
        f"## Usage\n\nStart the server:\n\n    {p} serve --port {port}\n\nThe server listens on port "
        f"{port}. To check that it is running, send a request to `http://localhost:{port}/health`; "
        'it returns `{"status": "ok"}`.',
        f"## Troubleshooting\n\nIf a request fails with `TimeoutError: no response after {t} seconds`, "
        f"raise `timeout` in `{p}.toml` or check that the server on port {port} is running. "
        f"If the error says `too many connections`, raise `max_connections` above {c}.",
    ]
    return "\n\n".join(sections[:2] + r.sample(sections[2:], 3))


# ---------------------------------------------------------------- chat: instruction turns
CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Norway", "Oslo"), ("India", "New Delhi"),
            ("Spain", "Madrid"), ("Chile", "Santiago"), ("Italy", "Rome"), ("Ghana", "Accra"))
OPPOSITES = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("early", "late"),
             ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("full", "empty"))
WORDS = ("garden", "window", "river", "pencil", "orange", "planet", "candle", "bridge", "rabbit")


def _turn(r: random.Random) -> tuple[str, str]:
    kind = r.randrange(6)
    if kind == 0:
        a, b = r.randint(2, 12), r.randint(2, 12)
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    if kind == 1:
        country, city = r.choice(CAPITALS)
        return f"What is the capital of {country}?", f"The capital of {country} is {city}."
    if kind == 2:
        w, o = r.choice(OPPOSITES)
        return f"What is the opposite of {w}?", f"The opposite of {w} is {o}."
    if kind == 3:
        nums = r.sample(range(1, 100), r.randint(3, 6))
        return (f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}.",
                f"Here they are in order: {', '.join(map(str, sorted(nums)))}.")
    w = r.choice(WORDS)
    if kind == 4:
        return f"How many letters are in the word '{w}'?", f"The word '{w}' has {len(w)} letters."
    return f"Write the word '{w}' in capital letters.", f"Sure: {w.upper()}"


def chat(r: random.Random) -> str:
    out = ["System: You are a helpful assistant. Answer briefly and correctly.",
           "User: " + r.choice(("Hi!", "Hello there.", "Good morning!")) + " Can you help me?",
           "Assistant: Of course. What do you need?"]
    for _ in range(r.randint(3, 7)):
        q, a = _turn(r)
        out += [f"User: {q}", f"Assistant: {a}"]
    out += ["User: Thank you!", "Assistant: You are welcome."]
    return "\n".join(out)


Document = Union[str, dict]  # a text, or {"prompt": ..., "text": ...}: loss on the text only
GENERATORS: dict[str, Callable[[random.Random], Document]] = {
    "web": web, "code": code, "math": math, "technical": technical, "chat": chat,
    "long": chronicle.long, "repo": repo, "recall": chronicle.recall}


def generate(domain: str, documents: int, seed: int) -> Iterator[Document]:
    """Yield ``documents`` documents of ``domain``; document i depends only on (domain, seed, i)."""
    if domain not in GENERATORS:
        raise ValueError(f"unknown corpus domain {domain!r}; known: {', '.join(GENERATORS)}")
    gen = GENERATORS[domain]
    for i in range(documents):
        yield gen(random.Random(f"{domain}/{seed}/{i}"))


def write_jsonl(domain: str, documents: int, seed: int, path: Path) -> int:
    """Write the documents as JSONL (one ``{"text": ...}`` or ``{"prompt": ..., "text": ...}``
    per line); return the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for doc in generate(domain, documents, seed):
            row = doc if isinstance(doc, dict) else {"text": doc}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return documents


def full_text(doc: Document) -> str:
    """What the model reads of a document: the prompt (if any) followed by the text."""
    return doc["prompt"] + doc["text"] if isinstance(doc, dict) else doc
