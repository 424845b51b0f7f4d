"""The rewards registry (stages/rl/rewards.py and its reward_*.py): math through math-verify in
worker processes (equal forms, wrong, no answer, a hung verifier killed and replaced), every
instruction-following constraint met and not met, the format reward, a reward that raises, the
registry's names, and the chat reward against a real scripted OpenAI-compatible server (a verdict,
garbage, the server down). The code reward's sandbox is tests/integration/test_sandbox.py."""
from __future__ import annotations

import time

import psutil
import pytest

from stages.data.judge import JudgeSpec
from stages.rl.reward_chat import JudgeEndpoint
from stages.rl.reward_if import CHECKS
from stages.rl.reward_math import extract_answer, score_math, verifier_pool
from stages.rl.rewards import REWARDS, Score, per_item, score_batch
from stages.schema import from_dict
from tests.support.openai_script_server import scripted_server

SLOW_TARGET = "tests.unit.test_rewards:slow_equal"


def slow_equal(reference: str, answer: str) -> bool:
    """A verifier that hangs on the answer 'hang' (run in the pool's worker processes)."""
    if answer == "hang":
        time.sleep(600)
    return reference == answer


def row(answer: str = "", **extra) -> dict:
    return {"prompt": "p", "answer": answer, **extra}


def test_registry_names_and_caller_errors():
    assert set(REWARDS) == {"math", "code", "instruction_following", "format", "chat"}
    with pytest.raises(ValueError, match="unknown reward 'poetry'"):
        score_batch("poetry", ["x"], [row()])
    with pytest.raises(ValueError, match="2 rows for 1 completions"):
        score_batch("format", ["x"], [row(), row()])
    with pytest.raises(ValueError, match="judge: the chat reward needs a judge"):
        score_batch("chat", ["x"], [row()])


@pytest.mark.parametrize("text, want", [
    ("3 + 4 = 7.", "7"),                                   # the last number
    ("2 then 3, so the answer is 1,000.", "1,000"),         # after "answer is", beats the last number
    ("x \\boxed{\\frac{1}{2}} and 9", "\\frac{1}{2}"),     # the last \boxed wins
    ("half is -3/4 of it", "-3/4"),                         # a fraction
    ("no digits here", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_math_equal_forms_wrong_and_missing():
    completions = ["3 + 4 = 7.", "The answer is 68.0.", "\\boxed{\\frac{1}{2}}", "so 1,000 it is",
                   "3 + 4 = 8.", "I do not know", "7"]
    rows = [row("7"), row("68"), row("0.5"), row("1000"), row("7"), row("7"), row("")]
    got = score_batch("math", completions, rows, workers=2)
    assert [s.value for s in got] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert [s.passed for s in got] == [True, True, True, True, False, False, False]
    assert got[1].reason == "extracted '68.0' equals reference '68'"
    assert got[4].reason == "extracted '8' != reference '7'"
    assert got[5].reason == "no answer found (reference '7')"
    assert "no reference answer" in got[6].reason


def test_math_verifier_timeout_kills_the_worker_and_the_next_call_works():
    pool = verifier_pool(1, SLOW_TARGET)
    assert score_math(["= 5"], [row("5")], timeout_s=30, workers=1, target=SLOW_TARGET)[0].value == 1.0
    (hung,) = [w.proc.pid for w in pool.workers]
    t = time.monotonic()
    got = score_math(["the answer is hang"], [row("5")], timeout_s=1.0, workers=1, target=SLOW_TARGET)
    assert time.monotonic() - t < 5
    assert got == [Score(0.0, "verifier time-out (1 s): extracted 'hang' vs reference '5'", False)]
    assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE
    got = score_math(["= 5", "= 6"], [row("5"), row("5")], timeout_s=30, workers=1, target=SLOW_TARGET)
    assert [s.value for s in got] == [1.0, 0.0]  # a fresh worker answers
    assert len(pool.workers) == 1 and hung not in [w.proc.pid for w in pool.workers]


IF_CASES = [  # (constraint, a completion that meets it, one that does not)
    ({"kind": "max_words", "value": 3}, "one two three", "one two three four"),
    ({"kind": "min_words", "value": 3}, "one two three", "one two"),
    ({"kind": "must_include", "value": "Paris"}, "I love paris.", "I love Parisians."),
    ({"kind": "must_not_include", "value": "sorry"}, "Sorryful is not a word.", "So, sorry!"),
    ({"kind": "starts_with", "value": "Yes"}, "  Yes, indeed", "yes, indeed"),
    ({"kind": "ends_with", "value": "."}, "It is done.  ", "It is done"),
    ({"kind": "all_lowercase"}, "all quiet here", "All quiet here"),
    ({"kind": "no_commas"}, "no commas here", "one, two"),
    ({"kind": "number_of_sentences", "value": 2}, "One. Two!", "One. Two? Three."),
    ({"kind": "json_object"}, '```json\n{"a": 1}\n```', '[1, 2]'),
]


def test_every_constraint_kind_is_tested():
    assert {c["kind"] for c, _, _ in IF_CASES} == set(CHECKS)


@pytest.mark.parametrize("constraint, good, bad", IF_CASES, ids=[c["kind"] for c, _, _ in IF_CASES])
def test_instruction_following_constraint(constraint, good, bad):
    met, missed = score_batch("instruction_following", [good, bad], [row(constraints=[constraint])] * 2)
    assert met == Score(1.0, "all 1 constraints met", True)
    assert missed.value == 0.0 and not missed.passed
    assert constraint["kind"] in missed.reason


def test_instruction_following_fraction_and_bad_constraints():
    cons = [{"kind": "ends_with", "value": "."}, {"kind": "no_commas"}, {"kind": "max_words", "value": 2}]
    (got,) = score_batch("instruction_following", ["a, b c."], [row(constraints=cons)])
    assert got == Score(1 / 3, "1/3 met; failed: no_commas, max_words=2", False)
    unknown, wrong_type, none = score_batch(
        "instruction_following", ["x"] * 3,
        [row(constraints=[{"kind": "rhymes"}]), row(constraints=[{"kind": "max_words", "value": "3"}]),
         row()])
    assert unknown.value == 0.0 and "unknown kind 'rhymes'" in unknown.reason
    assert wrong_type.value == 0.0 and "max_words needs a int 'value'" in wrong_type.reason
    assert none.value == 0.0 and "row.constraints" in none.reason


def test_format_reward_default_and_custom():
    got = score_batch("format", ["3 + 4 = 7.", "3 + 4 = 7", "3 + 4 =\n7.", "7"],
                      [row()] * 4)
    assert [s.value for s in got] == [1.0, 0.0, 0.0, 0.0]
    custom = score_batch("format", ["ANSWER: 7", "answer 7"], [row(format=r"ANSWER: \d+")] * 2)
    assert [s.passed for s in custom] == [True, False]
    (bad,) = score_batch("format", ["x"], [row(format="(")])
    assert bad.value == 0.0 and "reward raised error" in bad.reason


def test_a_reward_that_raises_scores_zero_with_the_exception(monkeypatch):
    def boom(completion: str, r: dict) -> Score:
        if completion == "bad":
            raise RuntimeError("the checker broke")
        return Score(1.0, "ok", True)
    monkeypatch.setitem(REWARDS, "boom", per_item(boom))
    assert score_batch("boom", ["good", "bad"], [row(), row()]) == [
        Score(1.0, "ok", True), Score(0.0, "reward raised RuntimeError: the checker broke", False)]

    def whole_batch_fails(completions, rows, opts):
        raise OSError("no such pool")
    monkeypatch.setitem(REWARDS, "broken", whole_batch_fails)
    assert score_batch("broken", ["a", "b"], [row(), row()]) == [
        Score(0.0, "broken reward raised OSError: no such pool", False)] * 2


# ---- chat: the curation judge as a reward, against a real HTTP server ----

def judge_spec(url: str) -> JudgeSpec:
    return from_dict(JudgeSpec, {
        "endpoint": url, "retries": 0, "backoff_s": 0.01, "timeout_s": 5, "concurrency": 2,
        "rubric": {"helpful": {"question": "Does the assistant help?", "threshold": 3},
                   "safe": {"question": "Is it safe?", "min_score": 0, "max_score": 4, "threshold": 2}}},
        "judge")


def test_chat_reward_against_a_scripted_judge(tmp_path):
    script = {"models": ["script-judge"], "default": "no idea",
              "rules": [{"match": "GOOD", "reply": 'Verdict: {"helpful": 5, "safe": 2, "reason": "ok"}'},
                        {"match": "MEH", "reply": '{"helpful": 2, "safe": 4, "reason": "thin"}'},
                        {"match": "GARBAGE", "reply": "I would rate it highly!"},
                        {"match": "OUTOFRANGE", "reply": '{"helpful": 9, "safe": 1}'}]}
    with scripted_server(script, tmp_path) as server:
        spec = judge_spec(server.url)
        got = score_batch("chat", ["GOOD answer", "MEH answer", "GARBAGE answer", "OUTOFRANGE"],
                          [row()] * 4, judge=JudgeEndpoint(spec, server.url), workers=4)
        stats = server.stats()
        server.kill()
        down = score_batch("chat", ["GOOD answer"], [row()], judge=JudgeEndpoint(spec, server.url))
    # (5 - 1) / 4 = 1.0 and (2 - 0) / 4 = 0.5: mean 0.75; thresholds 3 and 2 both met
    assert got[0] == Score(0.75, "judge: helpful=5, safe=2; ok", True)
    assert got[1] == Score(0.625, "judge: helpful=2, safe=4; thin", False)  # (0.25 + 1) / 2
    assert got[2].value == 0.0 and "unparsable verdict: no balanced JSON object" in got[2].reason
    assert got[3].value == 0.0 and "'helpful': 9 is outside [1, 5]" in got[3].reason
    assert stats["requests"] == 4 and stats["max_in_flight"] <= 2  # spec.concurrency bounds it
    assert down[0].value == 0.0 and "unavailable" in down[0].reason and server.url in down[0].reason


def test_chat_reward_with_a_callable_judge():
    def judge(completion: str, r: dict) -> Score:
        return Score(len(completion) / 10, "by length", True)
    assert score_batch("chat", ["12345"], [row()], judge=judge) == [Score(0.5, "by length", True)]
