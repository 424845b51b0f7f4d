"""RL prompt sources: the tiny verifiable generators, JSON Lines through `datasets` with custom
columns, the seeded held-out split (whole prompt texts, never trained on), and the errors that
name the field or file before any compute."""
from __future__ import annotations

import json
import re

import pytest

from stages.rl.prompts import PromptSource, load_prompts, prompt_digest, split_heldout
from stages.data.chat_corpus import is_eval_question
from stages.rl.tiny_tasks import CONSTRAINT_KINDS, KINDS, generate
from stages.schema import ConfigError, from_dict

WHERE = "stages.rl-math.prompts"


def load(spec: PromptSource, tmp_path, seed: int = 0):
    return load_prompts(spec, seed=seed, cache_dir=tmp_path / "cache", where=WHERE)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ------------------------------------------------------------------ generators
def test_generator_rows_are_deterministic_in_seed_and_differ_across_seeds(tmp_path):
    spec = PromptSource(generator="arithmetic", prompts=300, heldout=40)
    train, held = load(spec, tmp_path, seed=3)
    assert (train, held) == load(spec, tmp_path, seed=3)
    other_train, other_held = load(spec, tmp_path, seed=4)
    assert [r["prompt"] for r in train] != [r["prompt"] for r in other_train]
    assert {r["prompt"] for r in held} != {r["prompt"] for r in other_held}
    assert prompt_digest(train) == prompt_digest(load(spec, tmp_path, seed=3)[0])
    assert prompt_digest(train) != prompt_digest(other_train)


def test_heldout_is_disjoint_from_train_and_of_the_asked_size(tmp_path):
    spec = PromptSource(generator="arithmetic", prompts=500, heldout=60)
    train, held = load(spec, tmp_path)
    assert len(held) == 60 and len({r["prompt"] for r in held}) == 60
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    assert not {r["id"] for r in held} & {r["id"] for r in train}
    # every generated row is either held out, or trained on, or a repeat of a held-out question
    all_rows = generate("arithmetic", 500, 0)
    held_texts = {r["prompt"] for r in held}
    assert train == [r for r in all_rows if r["prompt"] not in held_texts]


def test_a_repeated_prompt_is_held_out_whole():
    rows = [{"id": str(i), "prompt": f"q{i % 4}", "answer": ""} for i in range(12)]
    for seed in range(5):
        train, held = split_heldout(rows, 2, seed, WHERE)
        assert len(held) == 2 and len(train) == 6     # 3 copies of each of the 2 others
        assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    with pytest.raises(ConfigError, match=r"heldout: 4 held-out prompts need at least 5 "
                                          r"distinct prompts; the source has 4 \(12 rows\)"):
        split_heldout(rows, 4, 0, WHERE)


def test_arithmetic_rows_are_verifiable_and_never_a_chat_evaluation_question():
    for operands in ((0, 19), (10, 99), (3, 5)):
        rows = generate("arithmetic", 300, 1, operands=operands)
        for row in rows:
            a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", row["prompt"]).groups())
            assert operands[0] <= a <= operands[1] and operands[0] <= b <= operands[1]
            assert row["answer"] == str(a + b) and not is_eval_question("+", a, b)
    assert len({r["prompt"] for r in generate("arithmetic", 2000, 0)}) > 300
    only_eval = next(a for a in range(1000) if is_eval_question("+", a, a))  # a range of one
    with pytest.raises(ValueError, match="every question in"):
        generate("arithmetic", 1, 0, operands=(only_eval, only_eval))


def test_code_rows_reference_solutions_pass_their_tests_and_wrong_ones_fail():
    for row in generate("code", 100, 2):
        exec(row["answer"] + "\n" + row["tests"], {})          # our own generated code
        name = row["answer"].split(" = ")[0]
        with pytest.raises(AssertionError):
            exec(f"{name} = 1000\n" + row["tests"], {})


def test_format_rows_carry_constraints_the_if_reward_can_read():
    rows = generate("format", 400, 3)
    kinds = {c["kind"] for r in rows for c in r["constraints"]}
    assert kinds == set(CONSTRAINT_KINDS)                     # every kind, and no other
    for r in rows:
        assert 1 <= len(r["constraints"]) <= 2
        for c in r["constraints"]:
            assert set(c) == {"kind", "value"}
            if c["kind"] in ("max_words", "min_words", "number_of_sentences"):
                assert isinstance(c["value"], int) and c["value"] >= 1
            elif c["kind"] in ("all_lowercase", "no_commas"):
                assert c["value"] is None
            else:
                assert isinstance(c["value"], str) and c["value"]
        got = {c["kind"] for c in r["constraints"]}
        assert not {"max_words", "min_words"} <= got and not {"must_include",
                                                              "must_not_include"} <= got


def test_the_instruction_following_reward_reads_every_generated_constraint():
    from stages.rl.reward_if import check, constraints_reward
    rows = generate("format", 300, 4)
    for row in rows:
        for c in row["constraints"]:
            check("The capital of Peru is Lima.", c)          # a wrong kind or value raises
    row = {"prompt": "q", "answer": "", "constraints": [{"kind": "no_commas", "value": None},
                                                         {"kind": "ends_with", "value": "!"}]}
    assert constraints_reward("yes, it is!", row).value == 0.5
    assert constraints_reward("yes it is!", row).passed


def test_every_generator_makes_enough_distinct_prompts_for_the_default_heldout(tmp_path):
    for kind in KINDS:
        train, held = load(PromptSource(generator=kind), tmp_path)
        assert len(held) == 200 and len(train) >= 200, kind
        assert all(r["id"].startswith(f"{kind}-") and r["prompt"] for r in train + held)


# ------------------------------------------------------------------ builders
def test_jsonl_builder_with_custom_fields_and_mixed_type_extra_columns(tmp_path):
    records = [{"question": f"What is {i} + 1?", "solution": i + 1,
                "constraints": [{"kind": "max_words", "value": 5},
                                {"kind": "ends_with", "value": "."}]}
               for i in range(30)]
    records[3]["constraints"] = [{"kind": "no_commas", "value": None}]
    path = write_jsonl(tmp_path / "math.jsonl", records)
    spec = from_dict(PromptSource, {"builder": "json", "data_files": [path],
                                    "prompt_field": "question", "answer_field": "solution",
                                    "extra_fields": ["constraints"], "heldout": 5}, WHERE)
    train, held = load(spec, tmp_path)
    assert len(train) == 25 and len(held) == 5
    by_id = {r["id"]: r for r in train + held}
    assert by_id["train-3"] == {"id": "train-3", "prompt": "What is 3 + 1?", "answer": "4",
                                "constraints": [{"kind": "no_commas", "value": None}]}
    assert by_id["train-0"]["constraints"][1] == {"kind": "ends_with", "value": "."}


def test_builder_errors_name_the_field_or_file(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "answer": "1"} for i in range(3)])
    with pytest.raises(ConfigError, match=r"prompts\.prompt_field: .* has no column 'question'"):
        load(PromptSource(builder="json", data_files=(path,), prompt_field="question",
                          heldout=1), tmp_path)
    with pytest.raises(ConfigError, match=r"prompts\.extra_fields: .* has no column 'tests'"):
        load(PromptSource(builder="json", data_files=(path,), extra_fields=("tests",),
                          heldout=1), tmp_path)
    missing = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(ConfigError, match=r"prompts\.data_files: .*nowhere\.jsonl.* matches no "
                                          r"file"):
        load(PromptSource(builder="json", data_files=(missing,), heldout=1), tmp_path)
    with pytest.raises(ConfigError, match=r"prompts\.heldout: 3 held-out prompts need at least "
                                          r"4 distinct prompts"):
        load(PromptSource(builder="json", data_files=(path,), heldout=3), tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"prompts(\.data_files)?: .*empty\.jsonl"):
        load(PromptSource(builder="json", data_files=(str(empty),), heldout=1), tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "answer": "1"}\n[1, 2]\n')
    with pytest.raises(ConfigError, match=r"line 2 of .*bad\.jsonl.* is a JSON list"):
        load(PromptSource(builder="json", data_files=(str(bad),), heldout=0), tmp_path)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "  ", "answer": "1"}])
    with pytest.raises(ConfigError, match=r"prompts\.prompt_field: row 0 .* no prompt text"):
        load(PromptSource(builder="json", data_files=(blank,), heldout=0), tmp_path)


def test_parquet_builder_and_a_source_without_answers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["hi?", "why?", "who?"]}), path)
    spec = PromptSource(builder="parquet", data_files=(str(path),), prompt_field="text",
                        answer_field=None, heldout=1)
    train, held = load(spec, tmp_path)
    assert sorted(r["id"] for r in train + held) == ["a", "b", "c"]
    assert all(r["answer"] == "" and set(r) == {"id", "prompt", "answer"} for r in train + held)


# ------------------------------------------------------------------ config validation
@pytest.mark.parametrize("data, message", [
    ({}, "give exactly one of `generator`"),
    ({"generator": "arithmetic", "builder": "json"}, "give exactly one of `generator`"),
    ({"generator": "code", "data_files": ["x.jsonl"]}, "data_files: are read by a `builder`"),
    ({"builder": " "}, "builder: is empty"),
    ({"generator": "chat", "prompts": 10, "heldout": 10}, "heldout: 10 held-out prompts leave "
                                                          "none of the 10"),
    ({"generator": "arithmetic", "operands": [0, 9]}, r"operands: \[0, 9\] give at most 100 "
                                                      r"distinct questions, fewer than heldout "
                                                      r"\+ 1 = 201"),
    ({"generator": "arithmetic", "operands": [5, 2]}, r"operands: \[5, 2\] must be"),
    ({"generator": "arithmetic", "operands": [1, 2, 3]}, r"operands: \[1, 2, 3\] must be"),
    ({"generator": "code", "operands": [0, 9]}, "operands: is read by the arithmetic"),
    ({"builder": "json", "answer_field": "prompt"}, "answer_field: 'prompt' is also the "
                                                    "prompt_field"),
    ({"builder": "json", "extra_fields": ["answer"]}, "extra_fields: 'answer' is already"),
    ({"generator": "poetry"}, "generator: 'poetry' is not one of"),
    ({"generator": "chat", "prompts": 0}, "prompts: must be > 0"),
])
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=rf"^{re.escape(WHERE)}(\.|: ){message}"):
        from_dict(PromptSource, data, WHERE)
