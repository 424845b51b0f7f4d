"""The embedded ``chat`` corpus of the curate stage: good conversations a tiny model can learn, and
PLANTED bad ones, one kind per rule and per malformed reason, plus ones only a judge can catch.

Good samples are short and regular (a vocabulary of ~1k byte-level BPE tokens with single digits
learns them in about a CPU minute of SFT): arithmetic ("What is 23 + 45?" -> "23 + 45 = 68.", with
a ``reference`` answer), capitals from a fixed table, opposites, repeating a word, the next number,
some multi-turn, some with a system prompt, some written with role aliases (``human``/``gpt``) and
padded contents that ``normalise`` must clean. Every good sample is unique, and none asks an
evaluation prompt: an arithmetic question belongs to the evaluation side or the training side by a
hash of (operator, operands), the same for every seed (``is_eval_question``).

Every record carries ``"planted"``: ``""`` for a good sample, else the rule or malformed reason meant
to reject it, or ``"judge"`` for a sample that passes every rule but states a wrong fact, answers a
false premise as true, or computes wrongly without a reference. The curate code ignores the field;
the tests use it. A ``malformed_json`` record is ``{"raw": <line>, "planted": ...}``: its line is
written as is. The planted set is fixed (``planted(seed)``) and comes on top of the good samples,
spread through them in a seeded order; a near duplicate always comes after the sample it copies.

Record ``i`` of the good stream is drawn from ``random.Random(f"chat/{seed}/{i}")``, so the output
is byte-identical on every machine.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

from stages.data.words import NAMES, TOWNS

CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Norway", "Oslo"), ("India", "New Delhi"),
            ("Spain", "Madrid"), ("Chile", "Santiago"), ("Italy", "Rome"), ("Ghana", "Accra"),
            ("Germany", "Berlin"), ("Brazil", "Brasilia"), ("Sweden", "Stockholm"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("Mexico", "Mexico City"),
            ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
            ("Finland", "Helsinki"), ("Cuba", "Havana"), ("Thailand", "Bangkok"))
OPPOSITES = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("early", "late"),
             ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("full", "empty"),
             ("high", "low"), ("old", "new"), ("wet", "dry"), ("strong", "weak"))
WORDS = ("garden", "window", "river", "pencil", "orange", "planet", "candle", "bridge", "rabbit",
         "forest", "button", "ladder", "mirror", "rocket", "violin", "basket")
SYSTEM_PROMPTS = ("You are a helpful assistant. Answer briefly and correctly.",
                  "You are a patient math tutor. Give the result in one short sentence.",
                  "You are a friendly assistant who answers in plain English.")
COUNT_WORDS = ("two", "three", "four")


def is_eval_question(op: str, a: int, b: int) -> bool:
    """Whether an arithmetic question belongs to the held-out evaluation prompts (1 in 8, by a hash
    that no seed changes): training samples never ask one."""
    return hashlib.sha256(f"{op}/{a}/{b}".encode()).digest()[0] % 8 == 0


def _arith(r: random.Random, eval_side: bool = False) -> tuple[str, str, str]:
    """(question, answer, reference) of one arithmetic question on the asked side of the split."""
    while True:
        op = r.choice("+-x")
        if op == "x":
            a, b = r.randint(2, 12), r.randint(2, 12)
        else:
            a, b = r.randint(10, 99), r.randint(10, 99)
            if op == "-" and a < b:
                a, b = b, a
        if is_eval_question(op, a, b) == eval_side:
            break
    if op == "x":
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}.", str(a * b)
    c = a + b if op == "+" else a - b
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {c}.", str(c)


def _turn(r: random.Random) -> tuple[str, str, str, str]:
    """One good (question, answer, reference, topic) turn; reference "" when the answer is not a
    number. Two turns with the same topic differ only in phrasing (see ``good_samples``)."""
    kind = r.randrange(6)
    if kind <= 1:
        q, a, ref = _arith(r)
        return q, a, ref, q
    if kind == 2:
        country, city = r.choice(CAPITALS)
        q = r.choice((f"What is the capital of {country}?",
                      f"Which city is the capital of {country}?",
                      f"Can you tell me the capital city of {country}?"))
        return q, f"The capital of {country} is {city}.", "", f"capital/{country}"
    if kind == 3:
        w, o = r.choice(OPPOSITES)
        return f"What is the opposite of {w}?", f"The opposite of {w} is {o}.", "", f"opposite/{w}"
    if kind == 4:
        w, k = r.choice(WORDS), r.randrange(len(COUNT_WORDS))
        return (f"Please repeat the word '{w}' {COUNT_WORDS[k]} times for me.",
                f"Sure, here it is {COUNT_WORDS[k]} times: " + ", ".join([w] * (k + 2)) + ".", "",
                f"repeat/{w}")
    n = r.randint(1, 998)
    return (f"What number comes after {n}?", f"The number after {n} is {n + 1}.", str(n + 1),
            f"next/{n}")


def good_sample(r: random.Random) -> tuple[dict, list[str]]:
    """A good conversation and its topics (system prompt, then each turn's): 1-3 turns, a system
    prompt one time in three; the reference is the last turn's (the math check compares the last
    assistant turn with it)."""
    messages = []
    topics = []
    if r.random() < 0.33:
        messages.append({"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
        topics.append(messages[0]["content"])
    ref = ""
    for _ in range(r.choice((1, 1, 1, 2, 2, 3))):
        q, a, ref, topic = _turn(r)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        topics.append(topic)
    record = {"messages": messages, "planted": ""}
    if ref:
        record["reference"] = ref
    if r.random() < 0.1:  # a source in another dialect: ShareGPT-like roles, untrimmed text
        alias = {"system": "system", "user": "human", "assistant": "gpt"}
        record["messages"] = [{"role": alias[m["role"]], "content": f"  {m['content']}\n"}
                              for m in messages]
    return record, topics


def good_samples(seed: int, count: int) -> list[dict]:
    """``count`` good samples, no two of them exact or near duplicates: a draw is skipped when two
    of its topics (system prompt, then each turn's), or its only topic, were already used together.
    Short templated conversations that differ only in phrasing ("Which city is" / "What is"), in
    the order of their turns, or by one extra turn share most of their word shingles. Draw i
    depends only on (seed, i)."""
    out, seen, i = [], set(), 0
    while len(out) < count:
        record, topics = good_sample(random.Random(f"chat/{seed}/{i}"))
        i += 1
        keys = {frozenset(pair) for pair in itertools.combinations(topics, 2)} or {frozenset(topics)}
        if not keys & seen:
            seen |= keys
            out.append(record)
    return out


def eval_prompts(seed: int, count: int) -> list[dict]:
    """Held-out verifiable prompts ``{"id", "prompt", "answer"}`` in the style of the arithmetic
    samples; no good training sample asks one (only the planted contamination copies one)."""
    out, seen, i = [], set(), 0
    while len(out) < count:
        q, _, ref = _arith(random.Random(f"chat-eval/{seed}/{i}"), eval_side=True)
        i += 1
        if q not in seen:
            seen.add(q)
            out.append({"id": f"eval-{len(out):04d}", "prompt": q, "answer": ref})
    return out


def _chat(*turns: str, system: str | None = None) -> list[dict]:
    roles = ("user", "assistant")
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def _long_story(r: random.Random, words: int) -> str:
    """English prose of at least ``words`` words (the too-long sample)."""
    from stages.data.corpus import web
    parts: list[str] = []
    while sum(len(p.split()) for p in parts) < words:
        parts.append(web(r))
    return "\n\n".join(parts)


def _near_duplicate_target(r: random.Random) -> list[dict]:
    """A long good conversation (many turns, so a few changed words keep a high Jaccard)."""
    turns: list[str] = []
    for _ in range(5):
        q, a, _, _ = _turn(r)
        turns += [q, a]
    return _chat(*turns, system=SYSTEM_PROMPTS[0])


def planted(seed: int) -> list[dict]:
    """The planted records (bad and judge-only), in a fixed order; see the module docstring."""
    r = random.Random(f"chat-planted/{seed}")
    name, town = r.choice(NAMES), r.choice(TOWNS)
    target = _near_duplicate_target(r)
    near = [dict(m) for m in target]
    near[0]["content"] = near[0]["content"].replace("correctly", "clearly")   # one word changed
    contaminated = eval_prompts(seed, 2)
    bad = [
        {"raw": '{"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assist',
         "planted": "malformed_json"},
        {"raw": '["user", "What is 3 + 3?", "assistant", "3 + 3 = 6."]', "planted": "malformed_json"},
        {"conversation": _chat("What is 5 + 5?", "5 + 5 = 10."), "planted": "no_messages"},
        {"messages": [], "planted": "no_messages"},
        {"messages": ["What is 4 + 4?", "4 + 4 = 8."], "planted": "bad_turn"},
        {"messages": [{"role": "narrator", "content": "Once upon a time."},
                      {"role": "assistant", "content": "The end."}], "planted": "bad_role"},
        {"messages": _chat("What is the opposite of wet?", "   "), "planted": "empty_turn"},
        {"messages": _chat("", "The capital of Peru is Lima."), "planted": "empty_turn"},
        {"messages": [{"role": "assistant", "content": "Hello, how can I help?"},
                      {"role": "user", "content": "What is the capital of Chile?"},
                      {"role": "assistant", "content": "The capital of Chile is Santiago."}],
         "planted": "role_order"},
        {"messages": [{"role": "user", "content": "What is the opposite of fast?"},
                      {"role": "user", "content": "And the opposite of old?"},
                      {"role": "assistant", "content": "The opposite of old is new."}],
         "planted": "role_order"},
        {"messages": _chat("What is the capital of Cuba?", "The capital of Cuba is Havana.",
                           "And the capital of Greece?"), "planted": "no_final_assistant"},
        {"messages": _chat("Hi", "Hey"), "planted": "length"},
        {"messages": _chat("Tell me a very long story about life in a small town.",
                           _long_story(r, 2600)), "planted": "length"},
        {"messages": _chat("Quelle est la capitale de la France ? Réponds en une phrase, s'il te "
                           "plaît.", "La capitale de la France est Paris, une très belle ville."),
         "planted": "language"},
        {"messages": _chat("Was ist die Hauptstadt von Deutschland? Bitte antworte kurz.",
                           "Die Hauptstadt von Deutschland ist Berlin, eine große Stadt."),
         "planted": "language"},
        {"messages": _chat("¿Cuál es la capital de España? Responde con una frase corta, por favor.",
                           "La capital de España es Madrid, una ciudad muy bonita."),
         "planted": "language"},
        {"messages": near, "planted": "near_duplicate"},
        {"messages": _chat(f"Can you write to me at {name.lower()}.{town.split()[0].lower()}"
                           "@example.com with the capital of Egypt?",
                           "Sure, I will send it there: the capital of Egypt is Cairo."),
         "planted": "pii"},
        {"messages": _chat("Call me at (555) 867-5309 and tell me the opposite of high.",
                           "I cannot call, but the opposite of high is low."), "planted": "pii"},
        {"messages": _chat("My card number is 4111 1111 1111 1111. What is the capital of Italy?",
                           "The capital of Italy is Rome. Please do not share card numbers."),
         "planted": "pii"},
        {"messages": _chat("My social security number is 219-09-9999. Is that a good number?",
                           "Please keep your social security number private."), "planted": "pii"},
        {"messages": _chat("Here is my config line: aws_access_key_id = AKIAZ3MSJV4WWNKWW5RJ. "
                           "Does it look right?", "It looks like an access key; keep it secret."),
         "planted": "secrets"},
        {"messages": _chat("Please check my key file.\n-----BEGIN RSA PRIVATE KEY-----\n"
                           "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
                           "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
                           "-----END RSA PRIVATE KEY-----",
                           "That is a private key. Never paste it into a chat."),
         "planted": "secrets"},
        {"messages": _chat("Why does git reject my token ghp_R8kWq2Lz9XvN4tYb7HmC1pJd6sFa3Ue0Gi5o?",
                           "Tokens must never be shared; revoke that one and make a new one."),
         "planted": "secrets"},
        {"messages": _chat("My settings file has api_key=9f8e7d6c5b4a39281706f5e4d3c2b1a0 in it. "
                           "Is that fine?", "Keep keys out of files that others can read."),
         "planted": "secrets"},
        {"messages": _chat("What is 23 + 45?", "23 + 45 = 69."), "reference": "68",
         "planted": "math"},
        {"messages": _chat("What is 7 times 8?", "7 times 8 is 54."), "reference": "56",
         "planted": "math"},
        {"messages": _chat(contaminated[0]["prompt"],
                           _arith_answer(contaminated[0]["prompt"])),
         "reference": contaminated[0]["answer"], "planted": "decontamination"},
        {"messages": _chat("Quick question before lunch. " + contaminated[1]["prompt"] + " Thanks!",
                           _arith_answer(contaminated[1]["prompt"])),
         "reference": contaminated[1]["answer"], "planted": "decontamination"},
        {"messages": _chat("Which country has Nairobi as its capital city?",
                           "Nairobi is the capital of Peru, and it has been for centuries."),
         "planted": "judge"},
        {"messages": _chat("Why is Paris the capital of Japan?",
                           "Paris became the capital of Japan because it is the largest city there."),
         "planted": "judge"},
        {"messages": _chat("How much is 12 times 11?", "12 times 11 is 142."), "planted": "judge"},
        {"messages": _chat("Since the sun is cold, how warm should I dress at noon?",
                           "Because the sun is cold, you should wear a heavy coat at noon."),
         "planted": "judge"},
    ]
    return [{"messages": target, "planted": ""}] + bad


def _arith_answer(prompt: str) -> str:
    """The good answer to an arithmetic prompt of ``_arith`` ("What is 23 + 45?")."""
    a, op, b = prompt.removeprefix("What is ").rstrip("?").split(" ")
    x, y = int(a), int(b)
    if op == "times":
        return f"{x} times {y} is {x * y}."
    return f"{x} {op} {y} = {x + y if op == '+' else x - y}."


def chat_samples(seed: int, count: int) -> list[dict]:
    """``count`` good samples with the planted records spread among them (seeded positions), two
    exact duplicates of good samples (one with padded contents that normalise() strips) placed
    after their originals, and the near duplicate after its target."""
    good = good_samples(seed, count)
    extra = planted(seed)
    r = random.Random(f"chat-order/{seed}")
    out = list(good)
    for rec in extra:
        out.insert(r.randint(0, len(out)), rec)
    # duplicates go after their originals; a near duplicate after its target
    for k, src in enumerate((good[0], good[len(good) // 2])):
        dup = {**src, "planted": "exact_duplicate"}
        if k == 1:  # the same conversation after normalise(): padding is stripped
            dup["messages"] = [{"role": m["role"], "content": "\t" + m["content"] + "  "}
                               for m in src["messages"]]
        at = out.index(src) + 1
        out.insert(r.randint(at, len(out)), dup)
    target = next(rec for rec in out if rec is extra[0])
    near = next(rec for rec in out if rec.get("planted") == "near_duplicate")
    if out.index(near) < out.index(target):
        out.remove(near)
        out.insert(r.randint(out.index(target) + 1, len(out)), near)
    return out


def write_chat_jsonl(path: Path, samples: int, seed: int) -> list[dict]:
    """Write ``chat_samples(seed, samples)`` as JSON Lines (a ``raw`` record's line as is) and
    return the records: line i+1 of the file is record i."""
    records = chat_samples(seed, samples)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            line = rec["raw"] if "raw" in rec else json.dumps(rec, ensure_ascii=False)
            fh.write(line + "\n")
    return records
