"""The CPU rollout engine's tokens/s against a plain transformers generate loop (goal >= 0.9x).

One model, two ways, same batch: the tiny spec of ``conf/model/tiny.yaml`` as the
``GraniteForCausalLM`` inside ``CpuEngine``, its weights streamed from a random-init Megatron
``GPTModel`` (``hf_weights_from_model``; throughput does not depend on the values),
P prompts of varied lengths (8 .. 23 tokens) x n completions x ``--new`` tokens each, no early
stop (``stop_ids`` empty, no eos), temperature 1.0, top-p 0.95. Both produce the tokens AND their
behaviour log-probs (log_softmax(logits / T) at the drawn token):

- ours: ``CpuEngine.generate`` (prefill once per prompt, per-prompt seeded Gumbel draws,
  log-probs gathered as it goes);
- plain: ``model.generate(do_sample=True, num_return_sequences=n, output_logits=True,
  return_dict_in_generate=True)`` on the same left-padded prompts, then log_softmax of the
  returned logits / T gathered at the generated tokens (inside the timed region: a rollout
  needs them). ``output_logits`` are the raw logits; ``output_scores`` would be the
  top-p-processed ones, not the behaviour log-prob.

Runs alternate (ours, plain, ours, ...) so drift in the machine's load hits both alike; prints
the median tokens/s of each and the ratio.

    OMP_NUM_THREADS=1 python benchmarks/rollout_throughput.py [--prompts 16] [--n 8] [--new 48]
                                                               [--vocab 100352]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new", type=int, default=48, help="new tokens per completion")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=None,
                    help="override the tiny spec's vocabulary (e.g. 100352, Granite's)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()

    import torch
    import yaml
    from transformers import GenerationConfig

    from stages.models.weights import hf_weights_from_model
    from stages.rl.engine import make_engine
    from stages.schema import from_dict
    from stages.specs import ModelSpec, PrecisionSpec
    from stages.training.cpu_shim import megatron_world
    from stages.training.model import build_model
    torch.set_num_threads(args.threads)
    path = ROOT / "conf" / "model" / "tiny.yaml"
    fields = yaml.safe_load(path.read_text())
    fields.update({"vocab_size": args.vocab} if args.vocab else {})
    spec = from_dict(ModelSpec, fields, f"model ({path.name})")
    engine = make_engine("cpu", spec)
    with megatron_world():   # random weights, through the one streaming path
        torch.manual_seed(0)
        megatron = build_model(spec, PrecisionSpec(), device="cpu")
        engine.load_weights(hf_weights_from_model(megatron, spec))
        del megatron
    model, T, top_p = engine.model, 1.0, 0.95
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, spec.vocab_size, (8 + i % 16,), generator=gen).tolist()
               for i in range(args.prompts)]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    config = GenerationConfig(do_sample=True, temperature=T, top_p=top_p, top_k=0,
                              max_new_tokens=args.new, min_new_tokens=args.new,
                              num_return_sequences=args.n, eos_token_id=None, pad_token_id=0,
                              bos_token_id=None, output_logits=True, return_dict_in_generate=True)
    tokens = len(prompts) * args.n * args.new

    def ours() -> int:
        out = engine.generate(prompts, n=args.n, max_new_tokens=args.new, temperature=T,
                              top_p=top_p, stop_ids=[], seeds=list(range(len(prompts))))
        return sum(len(c.tokens) for g in out for c in g)

    def plain() -> int:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            new = out.sequences[:, width:]
            logits = torch.stack(out.logits, dim=1).float()          # [rows, new, vocab]
            logp = torch.log_softmax(logits / T, -1).gather(2, new[..., None])[..., 0]
        assert logp.shape == new.shape
        return new.numel()

    rates: dict[str, list[float]] = {"ours": [], "plain": []}
    for fn in (ours, plain):   # warm-up (allocator, first-call paths)
        fn()
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("plain", plain)):
            t0 = time.perf_counter()
            made = fn()
            rates[name].append(made / (time.perf_counter() - t0))
            assert made == tokens, (name, made, tokens)
    o, p = statistics.median(rates["ours"]), statistics.median(rates["plain"])
    print(f"rollout throughput: tiny spec ({spec.num_parameters() / 1e6:.2f}M params, vocab "
          f"{spec.vocab_size}), {len(prompts)} prompts x n={args.n} x {args.new} new tokens "
          f"= {tokens} tokens per run, fp32, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'engine':<34} {'tokens/s':>10}")
    print(f"{'CpuEngine.generate (ours)':<34} {o:>10.0f}")
    print(f"{'transformers model.generate':<34} {p:>10.0f}")
    print(f"ratio ours / plain: {o / p:.2f}x (goal >= 0.9x)")


if __name__ == "__main__":
    main()
