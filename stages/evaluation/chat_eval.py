"""Chat evaluation of a model stage against a curate stage's held-out data: the two numbers that
say whether SFT helped, measured the same way before and after it.

- ``assistant_loss``: held-out assistant-token loss. Every conversation of the curate stage's
  ``heldout.parquet`` is tokenized on its own (``chat_format.conversation_ids``; no packing, no
  EOD, no other conversation in its context) and truncated to the model's context (its first
  ``context + 1`` tokens: ``context`` inputs and their labels). The label at position t is token
  t+1; a position counts when its label is an assistant token (an assistant turn's content or its
  closing ``<|end_of_text|>``, the chat format's loss mask). The loss is the token mean of the
  cross-entropy over all counted positions of all conversations (not a mean of per-conversation
  means), computed by the same Megatron loss as training (``model.token_losses``: over the model's
  whole output, TP padding rows included), so it compares with the SFT stage's own held-out loss.
- ``exact_match``: greedy exact match on verifiable prompts. The first ``samples`` lines of the
  curate stage's ``eval_prompts.jsonl`` (``{"id", "prompt", "answer"}``), each rendered as one
  user turn with the generation prompt. Greedy decoding: the argmax over the real vocabulary
  (never a TP padding id), no sampling, until ``<|end_of_text|>`` or ``<|endoftext|>`` or
  ``max_new_tokens`` new tokens; the completion is the decoded text before the stop token. Prompts
  of equal token length share a batch, so batching changes no completion (no padding). Beyond the
  model's context the window slides (the last ``context`` tokens are fed).
  Correct when ``final_answer(completion) == final_answer(answer)``, where ``final_answer(text)`` is
  the last number in the text (optional minus sign, digits, optional decimal part; commas between
  digit groups dropped first: "1,234" is "1234"), or, when the text holds no number, the whole
  text with surrounding whitespace stripped. So "23 + 45 = 68." matches "68", "68.0" does not match
  "68", and "The answer is Paris" matches only "The answer is Paris". Every prompt's row (id,
  prompt, completion, answer, final answer, correct) goes to ``chat_samples.jsonl``.

Both take a model loaded as ``run_eval`` loads it (Megatron-core ``GPTModel``, eval mode, model
parallel state set up), the pipeline's ``tokenizers.Tokenizer`` and the curate stage's
``StageInput``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from stages.base import StageInput
from stages.data.chat_format import END_TURN, conversation_ids

STOP_TOKENS = (END_TURN, "<|endoftext|>")
SAMPLES_FILE = "chat_samples.jsonl"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_GROUPED = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def final_answer(text: str) -> str:
    """The last number in ``text`` (digit-group commas dropped), or the stripped text if none."""
    numbers = _NUMBER.findall(_GROUPED.sub("", text))
    return numbers[-1] if numbers else text.strip()


# ------------------------------------------------------------------ reading the curate stage
def heldout_conversations(curate: StageInput) -> list[list[dict[str, str]]]:
    """The ``messages`` of every row of the curate stage's ``heldout.parquet``."""
    import pyarrow.parquet as pq
    path = curate.path("heldout")
    out = []
    for i, raw in enumerate(pq.read_table(path, columns=["messages"]).column("messages").to_pylist()):
        try:
            messages = json.loads(raw)
            assert isinstance(messages, list) and all("role" in m and "content" in m for m in messages)
        except (TypeError, ValueError, AssertionError):
            raise ValueError(f"{path}: row {i}: messages is not a JSON list of {{role, content}}; "
                             f"rerun the curate stage {curate.name}") from None
        out.append(messages)
    return out


def eval_prompts(curate: StageInput, limit: int) -> list[dict[str, str]]:
    """The first ``limit`` prompts of the curate stage's ``eval_prompts.jsonl``."""
    path = curate.path("eval_prompts")
    out = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if len(out) == limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append({"id": str(row["id"]), "prompt": str(row["prompt"]),
                            "answer": str(row["answer"])})
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}: line {n} is not a JSON object with id, prompt and "
                                 f"answer; rerun the curate stage {curate.name}") from None
    return out


# ------------------------------------------------------------------ held-out assistant loss
def assistant_loss(model, tokenizer, curate: StageInput, *, context: int, device: str = "cpu",
                   batch_size: int = 16) -> dict[str, float]:
    """Token-mean loss over the held-out conversations' assistant tokens (module docstring):
    ``{"loss", "tokens", "conversations", "truncated"}``; ``loss`` is nan when no assistant token
    fits the context."""
    from stages.specs import PrecisionSpec
    from stages.training.model import causal_mask, token_losses
    rows = []
    truncated = 0
    for messages in heldout_conversations(curate):
        ids, mask = conversation_ids(tokenizer, messages)
        truncated += len(ids) > context + 1
        ids, mask = ids[:context + 1], mask[:context + 1]
        if sum(mask[1:]):
            rows.append((ids[:-1], ids[1:], mask[1:]))  # inputs, labels, does the label count
    rows.sort(key=lambda r: len(r[0]))  # batches of similar length: little padding
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            s = max(len(r[0]) for r in chunk)
            # right padding: a causal model never attends to later positions, so it changes nothing
            pad = lambda v: v + [0] * (s - len(v))  # noqa: E731
            tokens = torch.tensor([pad(r[0]) for r in chunk], device=device)
            labels = torch.tensor([pad(r[1]) for r in chunk], device=device)
            counted = torch.tensor([pad(r[2]) for r in chunk], dtype=torch.float32, device=device)
            losses = token_losses(model, tokens, labels, causal_mask(s, device), PrecisionSpec(), device)
            total += float((losses.double() * counted).sum())
            count += int(counted.sum())
    return {"loss": total / count if count else float("nan"), "tokens": count,
            "conversations": len(rows), "truncated": truncated}


# ------------------------------------------------------------------ greedy exact match
def greedy_generate(model, prompts: list[list[int]], *, stop_ids: set[int], max_new_tokens: int,
                    context: int, vocab: int, device: str = "cpu", batch_size: int = 16) -> list[list[int]]:
    """Each prompt's greedy continuation, without its stop token. Prompts of one length share a
    batch; finished rows keep decoding until the batch ends, their extra tokens dropped."""
    from stages.training.model import causal_mask
    out: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length in sorted(by_length):
        group = by_length[length]
        for j in range(0, len(group), batch_size):
            rows = group[j:j + batch_size]
            seqs = torch.tensor([prompts[i] for i in rows], device=device)
            done = [False] * len(rows)
            for _ in range(max_new_tokens):
                window = seqs[:, -context:]
                b, s = window.shape
                with torch.no_grad():
                    logits = model(window, torch.arange(s, device=device).expand(b, s),
                                   causal_mask(s, device))
                nxt = logits[:, -1, :vocab].float().argmax(dim=-1)
                seqs = torch.cat([seqs, nxt[:, None]], dim=1)
                for k, tok in enumerate(nxt.tolist()):
                    if done[k]:
                        continue
                    if tok in stop_ids:
                        done[k] = True
                    else:
                        out[rows[k]].append(tok)
                if all(done):
                    break
    return out


def exact_match(model, tokenizer, curate: StageInput, out_dir: Path, *, samples: int,
                max_new_tokens: int, context: int, vocab: int, device: str = "cpu",
                batch_size: int = 16) -> dict[str, Any]:
    """Greedy exact match over the first ``samples`` eval prompts (module docstring):
    ``{"accuracy", "prompts", "correct", "rows", "path"}``; every row is written to
    ``out_dir/chat_samples.jsonl``; ``accuracy`` is nan when there is no prompt."""
    prompts = eval_prompts(curate, samples)
    stop_ids = {tokenizer.token_to_id(t) for t in STOP_TOKENS} - {None}
    ids = [conversation_ids(tokenizer, [{"role": "user", "content": p["prompt"]}],
                            add_generation_prompt=True)[0] for p in prompts]
    completions = greedy_generate(model, ids, stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                                  context=context, vocab=vocab, device=device, batch_size=batch_size)
    rows = []
    for p, c in zip(prompts, completions):
        text = tokenizer.decode(c, skip_special_tokens=True)
        got = final_answer(text)
        rows.append({"id": p["id"], "prompt": p["prompt"], "completion": text, "answer": p["answer"],
                     "final_answer": got, "correct": got == final_answer(p["answer"])})
    path = Path(out_dir) / SAMPLES_FILE
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / len(rows) if rows else float("nan"), "prompts": len(rows),
            "correct": correct, "rows": rows, "path": path}
