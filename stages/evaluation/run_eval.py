"""The work of an `evaluate` stage (what it measures: ``stages/evaluation/evaluate.py``)."""
from __future__ import annotations

import dataclasses
import json
import time
import types
from pathlib import Path

import torch

from stages.base import Artifact, RunContext, StageInput
from stages.specs import spec_of_artifact

HELDOUT_SEED = 1234  # the pretrain phases' default seed: the same held-out samples they report on


def _load_model(spec, ckpt: Path, device: str):
    from stages.training.checkpoint import load_checkpoint
    from stages.training.model import build_model
    from stages.specs import PrecisionSpec
    torch.manual_seed(0)  # every weight is overwritten by the checkpoint
    model = build_model(spec, PrecisionSpec(), device=device)
    load_checkpoint(ckpt, model, None)
    return model.eval()


def _logits_fn(model, vocab: int, device: str):
    from stages.training.model import causal_mask

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        b, s = tokens.shape
        tokens = tokens.to(device)
        with torch.no_grad():
            logits = model(tokens, torch.arange(s, device=device).expand(b, s), causal_mask(s, device))
        return logits[..., :vocab].float().cpu()  # rows past vocab are TP padding
    return logits_fn


def _heldout(model, data: StageInput | None, config, device: str, out_dir: Path) -> dict[str, float]:
    from stages.specs import PrecisionSpec
    from stages.training.step import Env, heldout_losses
    if data is None:
        return {}
    prefixes = {k.split("/", 1)[1]: str(data.path(k)) for k in sorted(data.artifact.outputs)
                if k.startswith("heldout/")}
    if not prefixes:
        return {}
    shape = types.SimpleNamespace(seq_length=config.heldout_length, seed=HELDOUT_SEED,
                                  micro_batch_size=config.batch_size,
                                  global_batch_size=config.batch_size, precision=PrecisionSpec())
    env = Env(device=device, rank=0, world=1, tp=1, dp=1, dp_rank=0)
    from stages.training.model import causal_mask
    out = heldout_losses(model, prefixes, int(data.artifact.extra["eod_id"]), shape, env, out_dir,
                         causal_mask(config.heldout_length, device))
    model.eval()
    return out


def _probes(tokenizer, config) -> dict[tuple[int, int, float], list]:
    """Every (length, keys, depth) cell's probes, made before the model loads: a tokenizer that
    cannot express the task fails the stage before any compute."""
    from stages.evaluation.retrieval import make_probes
    return {(n, k, d): make_probes(tokenizer, n, d, k, config.samples, config.seed)
            for n in config.lengths for k in config.keys for d in config.depths}


def _retrieval(model, probes: dict, vocab: int, config, device: str, stage: str) -> dict[str, float]:
    from stages.evaluation.retrieval import accuracy
    fn = _logits_fn(model, vocab, device)
    out: dict[str, float] = {}
    for length in config.lengths:
        t0, cells = time.time(), []
        for keys in config.keys:
            for depth in config.depths:
                acc = accuracy(fn, probes[length, keys, depth], config.batch_size)
                out[f"retrieval/L{length}/k{keys}/d{depth:g}"] = acc
                cells.append(acc)
        out[f"retrieval/L{length}"] = sum(cells) / len(cells)
        print(f"[{stage}] retrieval at {length} tokens: {out[f'retrieval/L{length}']:.3f} "
              f"({time.time() - t0:.1f}s)", flush=True)
    if config.lengths:
        out["retrieval"] = sum(out[f"retrieval/L{n}"] for n in config.lengths) / len(config.lengths)
    return out


def _chat(model, tokenizer, curate: StageInput, config, context: int, vocab: int, device: str,
          out_dir: Path, stage: str) -> dict[str, float]:
    """``chat/*`` metrics (defined in ``evaluation/chat_eval.py``)."""
    from stages.evaluation.chat_eval import assistant_loss, exact_match
    t0 = time.time()
    loss = assistant_loss(model, tokenizer, curate, context=context, device=device,
                          batch_size=config.batch_size)
    out = {"chat/heldout_tokens": loss["tokens"], "chat/heldout_conversations": loss["conversations"],
           "chat/heldout_truncated": loss["truncated"]}
    if loss["tokens"]:
        out["chat/heldout_loss"] = loss["loss"]
        print(f"[{stage}] held-out assistant-token loss: {loss['loss']:.4f} over {loss['tokens']} "
              f"tokens of {loss['conversations']} conversations", flush=True)
    em = exact_match(model, tokenizer, curate, out_dir, samples=config.chat_samples,
                     max_new_tokens=config.max_new_tokens, context=context, vocab=vocab,
                     device=device, batch_size=config.batch_size)
    out |= {"chat/exact_match_prompts": em["prompts"], "chat/exact_match_correct": em["correct"]}
    if em["prompts"]:
        out["chat/exact_match"] = em["accuracy"]
        print(f"[{stage}] greedy exact match: {em['correct']}/{em['prompts']} "
              f"({time.time() - t0:.1f}s)", flush=True)
    return out


def _lm_eval(model_in: StageInput, config, out_dir: Path, device: str, stage: str) -> dict[str, float]:
    """``lm_eval/*`` metrics (``evaluation/harness.py``) on an export of the model stage, which is
    removed after (it is the model stage's, not this stage's output)."""
    import shutil

    from stages.evaluation.harness import run_tasks
    from stages.models.export import export_model
    t0 = time.time()
    hf_dir = out_dir / "hf-export"
    try:
        export_model(model_in, hf_dir, overwrite=True)  # an attempt that died may have left one
        out = run_tasks(hf_dir, list(config.lm_eval_tasks), out_dir, device=device,
                        limit=config.lm_eval_limit, batch_size=config.lm_eval_batch_size,
                        chat_template=config.lm_eval_chat_template,
                        threads=torch.get_num_threads())
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    for name, value in sorted(out.items()):
        if "_stderr" not in name and not name.endswith("/samples"):
            print(f"[{stage}] {name}: {value:.4f}", flush=True)
    print(f"[{stage}] lm-eval ({', '.join(config.lm_eval_tasks)}): {time.time() - t0:.1f}s",
          flush=True)
    return out


def heatmap(metrics: dict[str, float], config, path: Path, title: str) -> None:
    """One panel per key count: accuracy by length (rows) and needle depth (columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(config.keys), figsize=(1.2 + 3.2 * len(config.keys), 3.0),
                             squeeze=False, layout="constrained")
    for ax, keys in zip(axes[0], config.keys):
        grid = [[metrics[f"retrieval/L{n}/k{keys}/d{d:g}"] for d in config.depths] for n in config.lengths]
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(config.depths)), [f"{d:g}" for d in config.depths])
        ax.set_yticks(range(len(config.lengths)), [str(n) for n in config.lengths])
        ax.set_xlabel("needle depth")
        if ax is axes[0][0]:
            ax.set_ylabel("context length")
        ax.set_title(f"{keys} key{'s' if keys > 1 else ''}")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=axes[0].tolist(), label="exact-match accuracy")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def evaluate_model(config, inputs: dict[str, StageInput], out_dir: Path, ctx: RunContext) -> Artifact:
    from tokenizers import Tokenizer

    from stages.training.cpu_shim import megatron_world
    t0 = time.time()
    model_in = inputs[config.from_]
    data = inputs[config.data] if config.data is not None else None
    curate = inputs[config.chat] if config.chat is not None else None
    checkpoint = model_in.checkpoint()   # damaged: refused before any work
    spec = spec_of_artifact(model_in)
    # the chat evaluation stays within the length the model was trained at
    context = int(model_in.artifact.extra.get("seq_length") or spec.max_position_embeddings)
    longest = max((*config.lengths, config.heldout_length or 0, context))
    # RoPE is computed for any length; max positions only sizes the rotary cache.
    spec = dataclasses.replace(spec, max_position_embeddings=max(spec.max_position_embeddings, longest))
    device = getattr(ctx.cluster, "device", "cpu")
    torch.set_num_threads(getattr(ctx.cluster, "threads_per_worker", 1))
    tokenizer = Tokenizer.from_file(str((data or model_in).path("tokenizer")))
    probes = _probes(tokenizer, config)
    if curate is not None:
        from stages.data.chat_format import missing_role_tokens
        missing = missing_role_tokens(tokenizer)
        if missing:  # before the model loads
            raise ValueError(f"chat: the tokenizer of {config.from_} has no {', '.join(missing)} "
                             "token(s); train it with train_tokenizer's chat_roles: true")
        for output in ("heldout", "eval_prompts"):  # a curate stage without them: said now
            curate.path(output)
    if config.lm_eval_tasks and config.lm_eval_chat_template:
        from stages.data.chat_format import missing_role_tokens
        if missing := missing_role_tokens(Tokenizer.from_file(str(model_in.path("tokenizer")))):
            raise ValueError(f"lm_eval_chat_template: the tokenizer of {config.from_} has no "
                             f"{', '.join(missing)} token(s), so its export has no chat template; "
                             "set lm_eval_chat_template: false, or train the tokenizer with "
                             "train_tokenizer's chat_roles: true")
    vocab = min(spec.vocab_size, tokenizer.get_vocab_size())  # ids a completion can decode to
    metrics: dict[str, float] = {}
    datasets: list[dict] = []
    if data is not None or curate is not None or config.lengths:  # lm-eval alone needs no model here
        with megatron_world():
            model = _load_model(spec, checkpoint, device)
            metrics = _heldout(model, data, config, device, out_dir)
            if "heldout_loss" in metrics:
                print(f"[{ctx.stage}] held-out loss at {config.heldout_length} tokens: "
                      f"{metrics['heldout_loss']:.4f}", flush=True)
            metrics |= _retrieval(model, probes, spec.vocab_size, config, device, ctx.stage)
            if curate is not None:
                metrics |= _chat(model, tokenizer, curate, config, context, vocab, device, out_dir,
                                 ctx.stage)
            del model  # its memory goes before lm-eval loads the export
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    outputs = {}
    if config.lm_eval_tasks:
        metrics |= _lm_eval(model_in, config, out_dir, device, ctx.stage)
        from stages.evaluation import harness
        outputs |= {"lm_eval_results": harness.RESULTS_FILE, "lm_eval_samples": harness.SAMPLES_FILE}
        datasets = harness.task_datasets(out_dir)
    if config.lengths:
        (out_dir / "retrieval.json").write_text(json.dumps(
            {k: v for k, v in metrics.items() if k.startswith("retrieval")}, indent=1) + "\n")
        heatmap(metrics, config, out_dir / "retrieval.png",
                f"{ctx.stage}: retrieval of {config.from_} (rope theta {spec.rope_theta:g})")
        outputs |= {"retrieval": "retrieval.json", "heatmap": "retrieval.png"}
    if curate is not None:
        from stages.evaluation.chat_eval import SAMPLES_FILE
        outputs["chat_samples"] = SAMPLES_FILE
    metrics["eval_s"] = time.time() - t0
    from stages.data.words import NAMES
    chance = 1.0 / len(NAMES)  # a uniform guess of a name
    return Artifact(kind="evaluate", stage=ctx.stage, key=ctx.key, outputs=outputs, metrics=metrics,
                    datasets=datasets,
                    extra={"model_stage": config.from_, "rope_theta": spec.rope_theta,
                           **({"chat_stage": config.chat, "chat_context": context} if curate else {}),
                           **({"lm_eval_tasks": list(config.lm_eval_tasks),
                               "lm_eval_limit": config.lm_eval_limit,
                               "lm_eval_chat_template": config.lm_eval_chat_template}
                              if config.lm_eval_tasks else {}),
                           "probes_per_length": config.samples * len(config.depths) * len(config.keys),
                           "chance": chance,
                           "trained_length": model_in.artifact.extra.get("seq_length")})
