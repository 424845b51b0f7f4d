"""`forge export STAGE --format hf --out DIR` end to end, through ``flows.cli.main``.

The module fixture makes a finished model stage of the tiny pipeline (``pretrain-1`` under
``store=<tmp>``) the fast way: a tokenizer from the real ``train_tokenizer`` stage code (chat role
tokens included) and the tiny model (``conf/model/tiny.yaml``) trained in-process on Megatron-core
for a few seconds on one multi-turn conversation, assistant tokens only, until it says the last
reply by heart. Its checkpoint (``save_checkpoint``), tokenizer and ``artifact.json`` go where
``forge`` looks for the stage. Then ``forge export`` writes the folder, and ``transformers`` loads
it: the chat template renders what ``chat_format`` renders, with the training ids; the logits equal
Megatron's; ``generate()`` says the memorised reply and stops at ``<|end_of_text|>``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from stages.data import chat_format

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the CPU shim must not be applied on a GPU machine")

STAGE = "pretrain-1"
CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "12 + 30 = 42."},
        {"role": "user", "content": "And the quick brown fox?"},
        {"role": "assistant", "content": "It jumps over the lazy dog."}]
# fp32, relative to the largest |logit|: the trained weights make logits up to ~17, where one fp32
# ulp is 1.9e-6, and the two stacks share no reduction order. Measured 2026-12-03 on the 2-core
# CPU: max |HF - Megatron| = 1.22e-5 with max |logit| 17.3, i.e. 7.0e-7 relative (~6 fp32 eps);
# the bound keeps a 4x margin for another CPU's kernels. Rounding, not a mapping error: each fp32
# stack is 1.3e-4 from the same export run in fp64, ten times further than from the other.
# (Random-init logits near 1: tests/unit/test_convert.py holds 1e-6 absolute.)
RELATIVE_LOGIT_TOLERANCE = 3e-6
TRAIN_STEPS, LR = 150, 1e-2


def train_chat_tokenizer(root: Path) -> Path:
    """``tokenizer.json`` from the real train_tokenizer stage over a small chat-flavoured corpus."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.base import Artifact, RunContext, StageInput
    from stages.data.tokenizer import TrainTokenizerConfig, train_tokenizer
    data = root / "data"
    data.mkdir(parents=True)
    texts = [m["content"] for m in CHAT] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    pq.write_table(pa.table({"text": texts}), data / "chat.parquet")
    src = StageInput("data", data, Artifact(kind="prepare_data", stage="data", key="d",
                                            outputs={"sources/chat": "chat.parquet"}))
    art = train_tokenizer(TrainTokenizerConfig(data="data", vocab_size=400, min_frequency=1),
                          {"data": src}, root / "tokenizer", RunContext("tokenizer", "t", None))
    return root / "tokenizer" / art.outputs["tokenizer"]


def megatron_logits(model, ids: list[int]) -> torch.Tensor:
    from stages.training.model import causal_mask
    tokens = torch.tensor([ids])
    with torch.no_grad():
        return model(tokens, torch.arange(len(ids))[None], causal_mask(len(ids), "cpu")).float()


def train_memorised_model(spec, ids: list[int], mask: list[int], out_dir: Path):
    """Train ``spec`` on one conversation (loss on its assistant tokens) and checkpoint it into
    ``out_dir``; returns (checkpoint, Megatron logits of ``ids``, final loss)."""
    from stages.specs import PrecisionSpec
    from stages.training.checkpoint import TrainState, save_checkpoint
    from stages.training.cpu_shim import megatron_world
    from stages.training.model import build_model, causal_mask, token_losses
    tokens, labels = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    weight = torch.tensor([mask[1:]], dtype=torch.float32)
    with megatron_world():
        torch.manual_seed(0)
        model = build_model(spec, PrecisionSpec(), device="cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        for _ in range(TRAIN_STEPS):
            opt.zero_grad()
            losses = token_losses(model, tokens, labels, causal_mask(tokens.shape[1], "cpu"),
                                  PrecisionSpec(), "cpu")
            loss = (losses * weight).sum() / weight.sum()
            loss.backward()
            opt.step()
        model.eval()
        logits = megatron_logits(model, ids)
        ckpt = save_checkpoint(out_dir, model, None, TrainState(step=TRAIN_STEPS))
    return ckpt, logits, loss.item()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import shutil

    from tokenizers import Tokenizer

    from flows.config import load
    from flows.dag import build
    from stages.base import Artifact, write_artifact
    from stages.schema import to_dict
    root = tmp_path_factory.mktemp("export")
    overrides = [f"store={root / 'store'}"]
    dag = build(load(overrides))
    node, spec = dag.nodes[STAGE], dag.graph.model_of(STAGE)
    tokenizer_json = train_chat_tokenizer(root)
    raw = Tokenizer.from_file(str(tokenizer_json))
    ids, mask = chat_format.conversation_ids(raw, CHAT)
    ckpt, logits, loss = train_memorised_model(spec, ids, mask, node.out_dir)
    shutil.copyfile(tokenizer_json, node.out_dir / "tokenizer.json")
    write_artifact(node.out_dir, Artifact(
        kind=node.kind, stage=STAGE, key=node.key,
        outputs={"checkpoint": str(ckpt.relative_to(node.out_dir)), "tokenizer": "tokenizer.json"},
        extra={"model": to_dict(spec), "seq_length": 128}))
    return dict(root=root, overrides=overrides, node=node, spec=spec, raw=raw, ids=ids,
                logits=logits, loss=loss, ckpt=ckpt)


@pytest.fixture(scope="module")
def exported(world):
    from flows.cli import main
    out = world["root"] / "hf"
    code = main(["export", STAGE, "--format", "hf", "--out", str(out), *world["overrides"]])
    assert code == 0
    return out


def forge_export(capsys, *args) -> tuple[int, str]:
    from flows.cli import main
    capsys.readouterr()
    code = main(["export", *args])
    got = capsys.readouterr()
    return code, got.out + got.err


def test_the_model_learned_its_reply(world):
    assert world["loss"] < 0.05, world["loss"]   # the premise of the generate() test below


def test_folder_holds_weights_tokenizer_template_and_stop_tokens(world, exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "forge-export.json"} <= names
    assert not list(exported.parent.glob(".tmp-export-*"))
    tok_cfg = json.loads((exported / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == chat_format.CHAT_TEMPLATE
    raw = world["raw"]
    end_turn, eod = raw.token_to_id(chat_format.END_TURN), raw.token_to_id("<|endoftext|>")
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [end_turn, eod]
    assert json.loads((exported / "config.json").read_text())["eos_token_id"] == eod
    record = json.loads((exported / "forge-export.json").read_text())
    assert record["stage"] == STAGE and record["key"] == world["node"].key


def test_chat_template_renders_the_training_ids(world, exported):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(exported)
    assert set(chat_format.ROLE_TOKENS) <= set(tok.all_special_tokens)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    for msgs, gen in ((CHAT, False), (CHAT[:-1], True)):
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert text == chat_format.render(msgs, gen)
        assert all(t in text for t in chat_format.ROLE_TOKENS)
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)["input_ids"]
        assert ids == chat_format.conversation_ids(world["raw"], msgs, gen)[0]
    assert tok.decode(world["ids"], skip_special_tokens=True).count(CHAT[-1]["content"]) == 1


def test_hf_logits_equal_megatron_logits(world, exported):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([world["ids"]])).logits.float()
    v = world["spec"].vocab_size
    assert out.shape == (1, len(world["ids"]), v)
    diff, scale = (out - world["logits"][..., :v]).abs().max().item(), out.abs().max().item()
    print(f"max |HF - Megatron| logit over {len(world['ids'])} tokens: {diff:.3g} (logits up to "
          f"{scale:.3g}: {diff / scale:.2g} relative)")
    assert diff <= RELATIVE_LOGIT_TOLERANCE * scale, f"{diff:.3g} > {RELATIVE_LOGIT_TOLERANCE:g} x {scale:.3g}"
    assert torch.equal(out.argmax(-1), world["logits"][..., :v].argmax(-1))


def test_generate_says_the_reply_and_stops_at_end_of_turn(world, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template(CHAT[:-1], add_generation_prompt=True, return_tensors="pt")
    limit = 40
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=limit, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert len(new) < limit, "generation ran to max_new_tokens instead of stopping"
    assert new[-1] == tok.convert_tokens_to_ids(chat_format.END_TURN)
    assert tok.decode(new, skip_special_tokens=True) == CHAT[-1]["content"]


# ------------------------------------------------------------------ refusals
def test_unknown_stage_is_refused(world, capsys):
    code, text = forge_export(capsys, "nope", "--out", str(world["root"] / "x"), *world["overrides"])
    assert code == 2 and "no stage named 'nope'" in text and STAGE in text
    assert not (world["root"] / "x").exists()


def test_non_model_stage_is_refused(world, capsys):
    code, text = forge_export(capsys, "tokenize", "--out", str(world["root"] / "x"),
                              *world["overrides"])
    assert code == 2 and "makes no model" in text and "merge-3" in text
    assert not (world["root"] / "x").exists()


def test_incomplete_stage_is_refused_with_the_command_that_completes_it(world, capsys):
    code, text = forge_export(capsys, "pretrain-2", *world["overrides"], "--out",
                              str(world["root"] / "x"))
    assert code == 2 and "not complete" in text
    assert f"forge run {' '.join(world['overrides'])} --only pretrain-2" in text
    assert not (world["root"] / "x").exists()


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_existing_out_is_kept_without_overwrite_and_replaced_with_it(world, exported, capsys):
    before = snapshot(exported)
    code, text = forge_export(capsys, STAGE, "--out", str(exported), *world["overrides"])
    assert code == 2 and "--overwrite" in text
    assert snapshot(exported) == before
    (exported / "stale.txt").write_text("left by hand")
    code, text = forge_export(capsys, STAGE, "--out", str(exported), "--overwrite",
                              *world["overrides"])
    assert code == 0, text
    assert snapshot(exported) == before     # the same export, whole; the stale file is gone
    assert "AutoModelForCausalLM.from_pretrained" in text
    assert not list(exported.parent.glob(".tmp-export-*")) + list(exported.parent.glob(".old-export-*"))


def test_a_failed_export_leaves_no_half_folder(world, tmp_path):
    from stages.base import Artifact, StageInput, read_artifact
    from stages.models.export import export_model
    node = world["node"]
    art = read_artifact(node.out_dir)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not a tokenizer")   # fails after the temporary folder was started
    broken = StageInput(STAGE, node.out_dir, Artifact(
        **{**art.__dict__, "outputs": {**art.outputs, "tokenizer": str(bad)}}))
    out = tmp_path / "out"
    with pytest.raises(Exception):
        export_model(broken, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]


def test_a_damaged_checkpoint_is_refused_before_anything_is_written(world, tmp_path):
    import shutil

    from stages.base import Artifact, DamagedInput, StageInput, read_artifact
    from stages.models.export import export_model
    node = world["node"]
    art = read_artifact(node.out_dir)
    ckpt = shutil.copytree(world["ckpt"], tmp_path / "ckpt")
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-16] + bytes(16))     # same size, other bytes
    damaged = StageInput(STAGE, node.out_dir, Artifact(
        **{**art.__dict__, "outputs": {**art.outputs, "checkpoint": str(ckpt)}}))
    with pytest.raises(DamagedInput, match="damaged"):
        export_model(damaged, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
