"""A tiny trained chat model stage, made quickly, for tests that need a real model stage on disk.

What ``tests/integration/test_chat_eval.py`` built inline, shared: a byte-level BPE tokenizer with
the chat role tokens trained on arithmetic chats ("What is 23 + 45?" -> "23 + 45 = 68."), those
chats rendered with the chat template as a finished tokenize stage (Megatron indexed datasets +
``tokenizer.json``), a finished curate stage in the formats.md shape (hand-written parquet and
``eval_prompts.jsonl``), and ``run_worker``: a stage through the real worker entry
(``python -m stages.worker SPEC.json``) in a subprocess. ``pretrain_config(steps)`` is the tiny
Granite-shaped model's pretrain stage; at 400 steps its greedy replies have the trained format.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from stages.base import Artifact, StageInput, file_digest, read_artifact, write_artifact
from stages.data.chat_format import CHAT_TEMPLATE, ROLE_TOKENS, render, sample_digest

REPO = Path(__file__).resolve().parents[2]
SEQ = 64
MODEL = {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
         "kv_channels": 16, "ffn_hidden_size": 176, "vocab_size": 384,
         "max_position_embeddings": 128, "rope_theta": 300.0}


def pretrain_config(steps: int = 400) -> dict:
    """The tiny model's pretrain stage on the tokenize stage's chats: ``steps`` steps of 8 x SEQ."""
    return {"data": "tokenize", "model": MODEL, "tokens": steps * 8 * SEQ, "seq_length": SEQ,
            "global_batch_size": 8, "mixture": {"chat": 1.0},
            "schedule": {"kind": "wsd", "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5,
                         "decay_fraction": 0.2},
            "checkpoint_interval": 0, "log_interval": 50}


# ------------------------------------------------------------------ data
def chat(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]


def two_turns(a: int, b: int, c: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Answer with the sum."}, *chat(a, b),
            {"role": "user", "content": f"And {a + b} + {c}?"},
            {"role": "assistant", "content": f"{a + b} + {c} = {a + b + c}."}]


def train_tokenizer(path: Path, texts: list[str]) -> None:
    """A byte-level BPE of ``MODEL["vocab_size"]`` ids with the specials and the role tokens."""
    from tokenizers import pre_tokenizers, trainers
    from stages.data.tokenizer import SPECIAL_TOKENS, build_tokenizer
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=MODEL["vocab_size"], min_frequency=2,
                                  special_tokens=[*SPECIAL_TOKENS, *ROLE_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(path))


def tokenize_stage(root: Path) -> Path:
    """A finished tokenize stage: 1500 rendered arithmetic chats (a in [10, 60), b in [10, 40))
    + EOD, 1400 to train on and 100 held out, and its tokenizer."""
    from tokenizers import Tokenizer
    from stages.training.mixture import write_indexed_dataset
    rng = random.Random(0)
    convs = [chat(rng.randrange(10, 60), rng.randrange(10, 40)) for _ in range(1500)]
    texts = [render(c) for c in convs]
    out = root / "tokenize"
    out.mkdir(parents=True)
    train_tokenizer(out / "tokenizer.json", texts)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eod = tok.token_to_id("<|endoftext|>")
    docs = [tok.encode(t, add_special_tokens=False).ids + [eod] for t in texts]
    write_indexed_dataset(out / "tokens" / "chat", docs[:1400])
    write_indexed_dataset(out / "heldout" / "chat", docs[1400:])
    write_artifact(out, Artifact(
        kind="tokenize", stage="tokenize", key="tok0",
        outputs={"tokens/chat": "tokens/chat", "heldout/chat": "heldout/chat",
                 "tokenizer": "tokenizer.json"},
        extra={"vocab_size": tok.get_vocab_size(), "eod_id": eod, "pad_id": 1}))
    return out


def curate_stage(root: Path, name: str, heldout: list[list[dict]], prompts: list[dict]) -> StageInput:
    """A finished curate stage in the formats.md shape."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    out = root / name
    out.mkdir(parents=True)

    def table(convs):
        return pa.table({"id": [sample_digest(c) for c in convs], "source": ["chat"] * len(convs),
                         "messages": [json.dumps(c) for c in convs]})
    kept = [chat(a, a + 1) for a in range(10, 20)]
    pq.write_table(table(kept), out / "kept.parquet")
    pq.write_table(table(heldout), out / "heldout.parquet")
    (out / "eval_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    datasets = [{"name": n, "split": s, "rows": r, "path": str(out / f"{n}.parquet"),
                 "digest": file_digest(out / f"{n}.parquet")}
                for n, s, r in (("kept", "train", len(kept)), ("heldout", "heldout", len(heldout)))]
    art = Artifact(kind="curate", stage=name, key=f"cur-{name}",
                   outputs={"kept": "kept.parquet", "heldout": "heldout.parquet",
                            "eval_prompts": "eval_prompts.jsonl"},
                   datasets=datasets, extra={"tokenizer": "tokenizer", "kept": len(kept),
                                             "heldout": len(heldout)})
    write_artifact(out, art)
    return StageInput(name, out, art)


# ------------------------------------------------------------------ worker runs
def run_worker(out_dir: Path, kind: str, stage: str, config: dict, inputs: dict[str, Path],
               env: dict[str, str] | None = None, timeout: int = 300) -> str:
    """Run one stage through ``python -m stages.worker`` (its spec written into ``out_dir``) and
    return its output; a failed worker fails the calling test with the end of its log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"kind": kind, "stage": stage, "key": f"key-{stage}", "config": config,
            "inputs": {n: {"out_dir": str(d), "artifact": dataclasses.asdict(read_artifact(d))}
                       for n, d in inputs.items()},
            "out_dir": str(out_dir), "cluster": {}, "seed": 1234}
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "stages.worker", str(out_dir / "spec.json")],
                          cwd=REPO, env=full_env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, f"{stage} failed ({proc.returncode}):\n{proc.stdout[-6000:]}"
    return proc.stdout


def trained_chat_model(root: Path, steps: int = 400) -> Path:
    """A finished pretrain stage (``root/pretrain``) of the tiny model on the arithmetic chats of a
    fresh tokenize stage (``root/tokenize``), trained through the real worker."""
    tokenize = tokenize_stage(root)
    model = root / "pretrain"
    run_worker(model, "pretrain", "pretrain", pretrain_config(steps), {"tokenize": tokenize})
    return model


def stage_logits(stage_dir: Path, ids: list[int]):
    """The logits [1, len(ids), vocab] of a model stage's final checkpoint on Megatron-core (CPU,
    a world of one, fp32), for comparing an export with the model it came from."""
    import torch

    from stages.specs import PrecisionSpec, spec_of_artifact
    from stages.training.checkpoint import load_checkpoint
    from stages.training.cpu_shim import megatron_world
    from stages.training.model import build_model, causal_mask
    art = read_artifact(stage_dir)
    spec = spec_of_artifact(StageInput("model", Path(stage_dir), art))
    with megatron_world():
        model = build_model(spec, PrecisionSpec(), device="cpu")
        load_checkpoint(Path(stage_dir) / art.outputs["checkpoint"], model, None)
        model.eval()
        with torch.no_grad():
            out = model(torch.tensor([ids]), torch.arange(len(ids))[None],
                        causal_mask(len(ids), "cpu")).float()
    return out[..., :spec.vocab_size]


def tiny_granite(out: Path, hidden: int = 64, heads: int = 4) -> Path:
    """A random Hugging Face Granite folder with a BPE tokenizer that has the role tokens and the
    chat template: a model a judge server can serve (vLLM wants head dim 64: hidden 256, 4 heads)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GraniteConfig, GraniteForCausalLM, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the judge scores each answer with a number from one to five"] * 20,
                            trainer=trainers.BpeTrainer(
                                vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>", *ROLE_TOKENS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", pad_token="<|pad|>",
                                   eos_token="<|end_of_text|>")
    fast.chat_template = CHAT_TEMPLATE
    cfg = GraniteConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2,
                        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=0,
                        pad_token_id=1, eos_token_id=tok.token_to_id("<|end_of_text|>"))
    torch.manual_seed(0)
    GraniteForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out
