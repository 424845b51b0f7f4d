"""Chat sources on the real loading path (HF `datasets`, JSON Lines through the text builder,
Parquet): malformed lines are counted with their reason and never raise; normalise() maps
dialects onto the OpenAI messages format and names what is wrong with a conversation."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")       # before `datasets` is imported anywhere
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json

import pytest

from stages.data.chat_corpus import chat_samples, eval_prompts, good_samples, write_chat_jsonl
from stages.data.chat_sources import (MALFORMED, ChatSourceSpec, load_rows, normalise,
                                      reference_of)
from stages.schema import ConfigError, from_dict

JSONL = ChatSourceSpec(builder="json", data_files=("unused",))


def spec(**fields):
    return from_dict(ChatSourceSpec, fields, "stages.curate.sources.chat")


def chat(*turns):
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def test_spec_needs_exactly_one_of_generator_and_builder():
    with pytest.raises(ConfigError, match="exactly one of `generator`"):
        spec()
    with pytest.raises(ConfigError, match="exactly one of `generator`"):
        spec(generator="chat", builder="json")
    with pytest.raises(ConfigError, match="data_files: are read by a `builder`"):
        spec(generator="chat", data_files=["x.jsonl"])
    with pytest.raises(ConfigError, match="samples: must be > 0"):
        spec(generator="chat", samples=0)
    with pytest.raises(ConfigError, match="'llama' is not one of"):
        spec(generator="llama")
    assert spec(builder="parquet", data_files=["a.parquet"]).reference_field == "reference"


def test_malformed_lines_are_counted_with_their_reason_and_never_raise(tmp_path):
    good = {"messages": chat("What is 2 + 3?", "2 + 3 = 5."), "reference": "5"}
    lines = [json.dumps(good), "{not json", "[1, 2, 3]", "null", "42", '"a string"',
             "", "   ", '{"messages": "not a list"}', '{"messages": [{"role": "user"}]}',
             '{"messages": [], "extra": {"nested": [1, {"a": null}]}}',
             '{"messages": 7}', "\x00\x01 binary junk \ufffd", json.dumps(good)[:-1]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    src = spec(builder="json", data_files=[str(path)])
    rows = list(load_rows(src, "mixed", tmp_path / "raw", seed=0))
    # blank lines are not rows; every other line is a row, numbered by its line
    assert [r.line for r in rows] == [1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14]
    assert [r.problem for r in rows] == ["", "malformed_json", "malformed_json", "malformed_json",
                                         "malformed_json", "malformed_json", "", "", "", "",
                                         "malformed_json", "malformed_json"]
    assert "not an object" in rows[2].detail and "not JSON" in rows[1].detail
    assert rows[1].text == "{not json" and rows[1].record is None and rows[0].text == ""
    reasons = [normalise(r.record, src)[1] for r in rows if not r.problem]
    assert reasons == ["", "malformed_json", "bad_turn", "no_messages", "no_messages"]
    assert reference_of(rows[0].record, src) == "5"


def test_unicode_line_separators_inside_json_strings_do_not_split_a_line(tmp_path):
    odd = {"messages": chat("Line\u2028separator\x85next\x1cfile?", "Yes.")}
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(odd, ensure_ascii=False) + "\r\n" + json.dumps(odd) + "\n",
                    encoding="utf-8")
    rows = list(load_rows(spec(builder="json", data_files=[str(path)]), "odd", tmp_path, seed=0))
    assert [(r.line, r.problem) for r in rows] == [(1, ""), (2, "")]
    assert normalise(rows[0].record, JSONL)[0] == odd["messages"]


def test_parquet_source_with_json_string_and_struct_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    convo = chat("What is the capital of Peru?", "The capital of Peru is Lima.")
    pq.write_table(pa.table({"messages": [json.dumps(convo), json.dumps(convo[:1])],
                             "sys": ["Be brief.", None], "answer": [None, 3]}),
                   tmp_path / "strings.parquet")
    pq.write_table(pa.table({"messages": [convo]}), tmp_path / "structs.parquet")
    src = spec(builder="parquet", data_files=[str(tmp_path / "strings.parquet")],
               system_field="sys", reference_field="answer")
    rows = list(load_rows(src, "p", tmp_path / "raw", seed=0))
    assert [r.line for r in rows] == [1, 2] and not any(r.problem for r in rows)
    msgs, why = normalise(rows[0].record, src)
    assert why == "" and msgs == [{"role": "system", "content": "Be brief."}, *convo]
    assert normalise(rows[1].record, src) == (None, "no_final_assistant")
    assert [reference_of(r.record, src) for r in rows] == ["", "3"]
    src2 = spec(builder="parquet", data_files=[str(tmp_path / "structs.parquet")])
    (row,) = load_rows(src2, "s", tmp_path / "raw", seed=0)
    assert normalise(row.record, src2) == (convo, "")


def test_normalise_maps_dialects_onto_the_openai_format():
    sharegpt = {"messages": [{"from": "human", "value": "  Hi there, what is 2 + 2?\n"},
                             {"from": "gpt", "value": "2 + 2 = 4."}]}
    assert normalise(sharegpt, JSONL) == (chat("Hi there, what is 2 + 2?", "2 + 2 = 4."), "")
    aliases = {"messages": [{"role": "System", "content": "Be kind."},
                            {"role": "user", "content": [{"type": "text", "text": "Say "},
                                                          {"type": "text", "text": "hi."}]},
                            {"role": "bot", "content": "hi."}, {"role": "user", "content": "Again"},
                            {"role": "model", "content": "hi."}]}
    msgs, why = normalise(aliases, JSONL)
    assert why == "" and [m["role"] for m in msgs] == ["system", "user", "assistant", "user",
                                                       "assistant"]
    assert msgs[1]["content"] == "Say hi."
    with_sys = spec(builder="json", data_files=["x"], system_field="system")
    rec = {"system": "  You are terse. ", "messages": chat("Q?", "A.")}
    assert normalise(rec, with_sys)[0][0] == {"role": "system", "content": "You are terse."}
    # a system prompt from the column and one in the messages: two system turns
    twice = {"system": "One.", "messages": [{"role": "system", "content": "Two."}, *chat("Q?", "A.")]}
    assert normalise(twice, with_sys) == (None, "role_order")
    assert normalise({"system": "", "messages": chat("Q?", "A.")}, with_sys)[0] == chat("Q?", "A.")


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "bad_turn"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "bad_turn"),
    ([{"role": "narrator", "content": "x"}], "bad_role"),
    ([{"role": None, "content": "x"}], "bad_role"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": " \n\t"}], "empty_turn"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
      {"role": "assistant", "content": "a"}], "role_order"),
    (chat("q", "a") + [{"role": "system", "content": "late"}] + chat("q", "a"), "role_order"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
      {"role": "assistant", "content": "a"}], "role_order"),
    (chat("q", "a", "q2"), "no_final_assistant"),
    ([{"role": "system", "content": "s"}], "no_final_assistant"),
    ([], "no_messages"),
])
def test_normalise_names_what_is_wrong(messages, reason):
    assert normalise({"messages": messages}, JSONL) == (None, reason)
    assert reason in MALFORMED


def test_generator_source_writes_and_reads_the_same_jsonl(tmp_path):
    src = spec(generator="chat", samples=40)
    rows = list(load_rows(src, "tiny", tmp_path, seed=3))
    records = chat_samples(3, 40)
    assert (tmp_path / "tiny.jsonl").exists() and len(rows) == len(records)
    assert [r.line for r in rows] == list(range(1, len(records) + 1))
    for row, rec in zip(rows, records):
        assert (row.problem == "malformed_json") == (rec["planted"] == "malformed_json")
        if not row.problem:
            assert row.record["planted"] == rec["planted"]


def test_chat_corpus_is_deterministic_and_keeps_eval_prompts_out(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    write_chat_jsonl(a, 60, 1)
    write_chat_jsonl(b, 60, 1)
    write_chat_jsonl(c, 60, 2)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert good_samples(1, 60)[:25] == good_samples(1, 25)   # draw i depends on (seed, i) only
    prompts = eval_prompts(1, 200)
    assert eval_prompts(1, 10) == prompts[:10] and len({p["prompt"] for p in prompts}) == 200
    asked = {m["content"].strip() for rec in good_samples(1, 2000) for m in rec["messages"]}
    assert not asked & {p["prompt"] for p in prompts}
    p = prompts[0]
    assert p["prompt"].startswith("What is ") and p["answer"].lstrip("-").isdigit()
