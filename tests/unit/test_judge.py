"""The curation judge against real HTTP server processes on loopback (``openai_script_server``):
verdicts and thresholds, unparsable replies under each policy, the concurrency bound, time-outs and
retries, a judge killed mid-run and a rerun on a new server asking only the rest, and cache keys."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from stages.data.judge import (JudgeError, JudgeSpec, JudgeUnavailable, UnparsableVerdict, Verdict,
                               VerdictCache, first_json_object, judge_all, parse_verdict,
                               review_text, rubric_digest)
from stages.data.judge_server import JudgeServerError, server_command
from stages.schema import ConfigError, from_dict
from tests.support.helpers import ROOT
from tests.support.openai_script_server import sample_key, scripted_server

GOOD = '{"helpful": 5, "correct": 4, "reason": "fine"}'
WRONG = 'Verdict: {"helpful": 4, "correct": 1, "reason": "2+2 is not 5 {sic}"} done'
GARBLED = "I think it is pretty good, maybe a 4?"


def spec(**over) -> JudgeSpec:
    data = {"endpoint": "http://127.0.0.1:1", "retries": 1, "backoff_s": 0.01, "timeout_s": 5,
            "rubric": {"helpful": {"question": "Does the assistant help?", "threshold": 3},
                       "correct": {"question": "Is every computation right?", "threshold": 2}}}
    data.update(over)
    return from_dict(JudgeSpec, data, "judge")


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": f"question {text}"}, {"role": "assistant", "content": f"answer {text}"}]


def samples(*texts: str) -> list[tuple[str, list[dict]]]:
    return [(f"digest-{t}", chat(t)) for t in texts]


def key(text: str) -> str:
    return sample_key(review_text(chat(text)))


SCRIPT = {"models": ["judge-a", "judge-b"], "default": GOOD,
          "rules": [{"match": "wrong", "reply": WRONG}, {"match": "garbled", "reply": GARBLED}]}


def test_spec_is_checked_when_built():
    with pytest.raises(ConfigError, match="exactly one of endpoint"):
        spec(serve="sft")
    with pytest.raises(ConfigError, match=r"judge.rubric.helpful.threshold: must be in \[1, 5\]"):
        spec(rubric={"helpful": {"question": "q", "threshold": 6}})
    with pytest.raises(ConfigError, match="rubric: must name at least one"):
        spec(rubric={})
    with pytest.raises(ConfigError, match="rubric.reason: a criterion name"):
        spec(rubric={"reason": {"question": "q", "threshold": 2}})
    with pytest.raises(ConfigError, match="judge.concurrency: must be >= 1"):
        spec(concurrency=0)


def test_strict_parsing_and_thresholds():
    s = spec()
    v = parse_verdict(WRONG, s)
    assert (v.scores, v.passed, v.unparsable, v.reason) == ({"helpful": 4, "correct": 1}, False, False,
                                                            "2+2 is not 5 {sic}")
    assert v.failed(s) == ["correct"]
    assert parse_verdict('{"helpful": 3, "correct": 2}', s).passed is True  # at the threshold passes
    assert first_json_object('x {"a": "}\\"{"} {"b": 1}') == '{"a": "}\\"{"}'
    for raw, why in [(GARBLED, "no balanced JSON object"), ('{"helpful": 5', "no balanced JSON"),
                     ("{helpful: 5}", "is not JSON"), ('{"helpful": 5}', "'correct' is missing"),
                     ('{"helpful": 4.0, "correct": 3}', "expected an integer"),
                     ('{"helpful": true, "correct": 3}', "expected an integer"),
                     ('{"helpful": "4", "correct": 3}', "expected an integer"),
                     ('{"helpful": 6, "correct": 3}', r"outside \[1, 5\]")]:
        v = parse_verdict(raw, s)
        assert v.unparsable and v.scores is None and v.passed is None and v.raw == raw
        assert re.search(why, v.reason), (raw, v.reason)


def test_verdicts_and_unparsable_policies(tmp_path):
    data = samples("good", "wrong", "garbled")
    with scripted_server(SCRIPT, tmp_path) as server, VerdictCache(tmp_path / "v.sqlite") as cache:
        seen = []
        got = judge_all(data, spec(endpoint=server.url), server.url, cache,
                        progress=lambda d, t: seen.append((d, t)))
        assert got["digest-good"].passed is True and got["digest-good"].scores == {"helpful": 5, "correct": 4}
        assert got["digest-wrong"].passed is False and got["digest-wrong"].failed(spec()) == ["correct"]
        bad = got["digest-garbled"]
        assert bad.unparsable and bad.passed is False and bad.raw == GARBLED  # reject: the default
        assert seen[0] == (0, 3) and seen[-1] == (3, 3) and len(seen) == 4
        stats = server.stats()
        # no model configured: the first id of GET /v1/models is asked; no response_format sent
        assert stats["models"] == {"judge-a": 3} and stats["response_format"] == 0
        # the policy acts on the cached verdict: no request is made again
        kept = judge_all(data, spec(endpoint=server.url, on_unparsable="keep"), server.url, cache)
        assert kept["digest-garbled"].passed is True and kept["digest-garbled"].unparsable
        with pytest.raises(UnparsableVerdict, match="sample digest-garbled .*I think it is pretty good"):
            judge_all(data, spec(endpoint=server.url, on_unparsable="fail"), server.url, cache)
        assert server.stats()["requests"] == 3
        # fail on a fresh cache: the verdicts received before the failure are still cached
        with VerdictCache(tmp_path / "fresh.sqlite") as fresh:
            with pytest.raises(UnparsableVerdict):
                judge_all(data, spec(endpoint=server.url, on_unparsable="fail", concurrency=1),
                          server.url, fresh)
            assert len(fresh) == 3
        structured = spec(endpoint=server.url, structured_output=True, model="judge-b")
        judge_all(data[:1], structured, server.url, cache)
        assert server.stats()["response_format"] == 1 and server.stats()["models"]["judge-b"] == 1


def test_concurrency_bound_holds(tmp_path):
    data = samples(*(f"s{i}" for i in range(12)))
    with scripted_server(dict(SCRIPT, delay_s=0.15), tmp_path) as server:
        t0 = time.perf_counter()
        with VerdictCache(tmp_path / "one.sqlite") as cache:
            judge_all(data[:4], spec(endpoint=server.url, concurrency=1), server.url, cache)
        serial = time.perf_counter() - t0
        assert server.stats()["max_in_flight"] == 1
        with VerdictCache(tmp_path / "three.sqlite") as cache:
            t0 = time.perf_counter()
            got = judge_all(data, spec(endpoint=server.url, concurrency=3), server.url, cache)
            parallel = time.perf_counter() - t0
        assert server.stats()["max_in_flight"] == 3 and len(got) == 12
        assert parallel < 3 * serial  # 12 samples 3 at a time take about as long as 4 one at a time


def test_timeout_and_5xx_retry_with_backoff_then_unavailable(tmp_path):
    script = {"models": ["judge-a"], "default": GOOD,
              "rules": [{"match": "slow", "delay_s": 3}, {"match": "flaky", "status": 503, "fail_times": 2},
                        {"match": "broken", "status": 500}, {"match": "junk", "body": "<html>oops"}]}
    with scripted_server(script, tmp_path) as server, VerdictCache(tmp_path / "v.sqlite") as cache:
        # two 503s, then an answer: retries=2 is enough
        got = judge_all(samples("flaky"), spec(endpoint=server.url, retries=2), server.url, cache)
        assert got["digest-flaky"].passed and server.stats()["received"][key("flaky")] == 3
        t0 = time.perf_counter()
        tight = spec(endpoint=server.url, retries=2, backoff_s=0.2, timeout_s=0.3, concurrency=1)
        with pytest.raises(JudgeUnavailable) as err:
            judge_all(samples("first", "slow", "never"), tight, server.url, cache)
        elapsed = time.perf_counter() - t0
        msg = str(err.value)
        assert server.url in msg and "timeout_s=0.3" in msg and "failed 3 times" in msg
        assert "1 of 3 verdicts are cached; a rerun asks only the other 2" in msg
        assert server.stats()["received"][key("slow")] == 3       # 1 try + 2 retries
        assert key("never") not in server.stats()["received"]      # nothing asked after the failure
        assert elapsed >= 3 * 0.3 + 0.2 + 0.4                     # three time-outs, backoff 0.2 then 0.4
        with pytest.raises(JudgeUnavailable, match="HTTP 500"):
            judge_all(samples("broken"), spec(endpoint=server.url), server.url, cache)
        with pytest.raises(JudgeUnavailable, match="not an OpenAI response"):
            judge_all(samples("junk"), spec(endpoint=server.url), server.url, cache)
        # a 4xx is not retried: the server's words and the endpoint are in the error
        with pytest.raises(JudgeError, match=f"{server.url} refused .*HTTP 404.*'nope' not found") as err:
            judge_all(samples("other"), spec(endpoint=server.url, model="nope", retries=3), server.url, cache)
        assert not isinstance(err.value, JudgeUnavailable)
        assert server.stats()["models"]["nope"] == 1
    with pytest.raises(JudgeUnavailable, match=r"127.0.0.1:1 is unavailable: GET /v1/models .*connection"):
        judge_all(samples("x"), spec(), "http://127.0.0.1:1", VerdictCache(tmp_path / "w.sqlite"))


def test_killed_judge_then_rerun_asks_only_the_rest(tmp_path):
    data = samples(*(f"s{i}" for i in range(20)))
    s = spec(concurrency=2, retries=2, backoff_s=0.05, timeout_s=5)
    cache = VerdictCache(tmp_path / "v.sqlite")
    with scripted_server(dict(SCRIPT, delay_s=0.1), tmp_path, name="first") as first:
        def kill_after_six(done: int, total: int) -> None:
            if done >= 6:
                first.kill()
        with pytest.raises(JudgeUnavailable, match=f"judge at {first.url} is unavailable") as err:
            judge_all(data, s, first.url, cache, progress=kill_after_six)
    rubric = rubric_digest(s, "judge-a")
    before = set(cache.get_many([d for d, _ in data], rubric, "judge-a"))
    assert 6 <= len(before) < 20 and f"{len(before)} of 20 verdicts are cached" in str(err.value)
    assert before <= {f"digest-s{i}" for i in range(20)}
    assert set(first.stats()["received"]) >= {key(d.removeprefix("digest-")) for d in before}
    with scripted_server(SCRIPT, tmp_path, name="second") as second:
        got = judge_all(data, s, second.url, cache)
        asked = second.stats()["received"]
    assert len(got) == 20 and all(v.passed for v in got.values())
    rest = {key(d.removeprefix("digest-")) for d, _ in data if d not in before}
    assert set(asked) == rest and all(n == 1 for n in asked.values())  # the rest, each once
    assert len(cache) == 20
    cache.close()


def test_cache_keys_rubric_and_model(tmp_path):
    data = samples("a", "b", "wrong")
    with scripted_server(SCRIPT, tmp_path) as server, VerdictCache(tmp_path / "v.sqlite") as cache:
        def asks(s: JudgeSpec) -> int:
            n = server.stats()["requests"]
            judge_all(data, s, server.url, cache)
            return server.stats()["requests"] - n
        base = spec(endpoint=server.url, model="judge-a")
        assert asks(base) == 3 and asks(base) == 0
        assert asks(spec(endpoint=server.url)) == 0  # model None resolves to judge-a: the same key
        assert asks(spec(endpoint=server.url, model="judge-b")) == 3
        polite = {"helpful": {"question": "Is the assistant polite?", "threshold": 3},
                  "correct": {"question": "Is every computation right?", "threshold": 2}}
        assert asks(spec(endpoint=server.url, model="judge-a", rubric=polite)) == 3
        assert asks(spec(endpoint=server.url, model="judge-a", max_tokens=64)) == 3
        # a threshold acts on the cached scores: no request, another decision
        lenient = spec(endpoint=server.url, model="judge-a",
                       rubric={"helpful": {"question": "Does the assistant help?", "threshold": 3},
                               "correct": {"question": "Is every computation right?", "threshold": 1}})
        n = server.stats()["requests"]
        assert judge_all(data, lenient, server.url, cache)["digest-wrong"].passed is True
        assert server.stats()["requests"] == n
    assert rubric_digest(base) != rubric_digest(base, "judge-b")


def test_cache_is_shared_by_processes(tmp_path):
    """Two processes writing verdicts one commit at a time into one file lose none."""
    writer = ("import sys\nfrom stages.data.judge import Verdict, VerdictCache\n"
              "c = VerdictCache(sys.argv[1])\n"
              "for i in range(300):\n"
              "    c.put(f'{sys.argv[2]}-{i}', 'r', 'm', Verdict({'a': 1}, True, False, '', '{}'))\n")
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(tmp_path / "v.sqlite"), name], cwd=ROOT)
             for name in ("p", "q")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    with VerdictCache(tmp_path / "v.sqlite") as cache:
        assert len(cache) == 600
        got = cache.get_many([f"p-{i}" for i in range(80)] + ["absent"], "r", "m")
        assert len(got) == 80 and got["p-7"] == Verdict({"a": 1}, True, False, "", "{}")
        assert cache.get_many(["p-1"], "r", "other-model") == {}


def test_serving_on_cuda_without_vllm_says_where_vllm_lives(tmp_path):
    import importlib.util
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is importable here: the message under test is for environments without it")
    with pytest.raises(JudgeServerError, match="GPU worker image"):
        server_command(tmp_path, 8000, "cuda")
    cmd = server_command(tmp_path, 8000, "cpu")
    assert cmd[-1] == str(tmp_path) and cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_a_sample_refused_after_others_were_answered_is_an_unparsable_verdict(tmp_path):
    """A server that answers others but refuses one conversation (400: longer than the judge's
    context) gives that one an unparsable verdict, handled by the policy and cached, also when it
    is the first request (a one-word probe shows the server works); a server that refuses the
    probe too has a setting wrong, and that stops the shard."""
    script = {"models": ["judge-a"], "default": GOOD, "rules": [{"match": "huge", "status": 400}]}
    with scripted_server(script, tmp_path) as server, VerdictCache(tmp_path / "v.sqlite") as cache:
        one_by_one = spec(endpoint=server.url, concurrency=1)
        got = judge_all(samples("first", "second", "huge"), one_by_one, server.url, cache)
        refused = got["digest-huge"]
        assert refused.unparsable and refused.passed is False and "HTTP 400" in refused.reason
        assert got["digest-first"].passed and got["digest-second"].passed
        judge_all(samples("first", "second", "huge"), one_by_one, server.url, cache)
        assert server.stats()["received"][key("huge")] == 1          # cached, never asked again
        with VerdictCache(tmp_path / "fresh.sqlite") as fresh:   # refused first: the probe passes
            assert judge_all(samples("huge too"), one_by_one, server.url, fresh)[
                "digest-huge too"].unparsable
    everything = {"models": ["judge-a"], "default": GOOD, "rules": [{"match": "", "status": 400}]}
    with scripted_server(everything, tmp_path / "b") as server:
        with pytest.raises(JudgeError, match="refused .*HTTP 400"):
            judge_all(samples("any"), spec(endpoint=server.url), server.url,
                      VerdictCache(tmp_path / "b.sqlite"))
