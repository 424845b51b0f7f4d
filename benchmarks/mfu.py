"""MFU of the training step on one GPU, in bf16 and in each FP8 recipe, side by side.

Trains a Granite-shaped model (conf/model/granite-8b.yaml: hidden 4096, 32/8 heads of 128, MLP
12800, vocabulary 100352, untied; cut to --layers 4 so that it fits one GPU) at --seq 4096 on
synthetic tokens, once per precision: bf16, then each FP8 recipe (delayed, tensorwise, blockwise,
mxfp8) that this GPU and its Transformer Engine can run; the others are listed with the reason
(mxfp8 needs Blackwell, blockwise Hopper with CUDA >= 12.9 and TE >= 2.3, ...). Every run goes
through the pretrain stage's own model build, AdamW and train step (stages/training/measure.py),
from the same weights on the same batches. The steps after --warmup are timed, and one table says
per precision: tokens/s; TFLOP/s achieved, with model FLOPs per token from
stages/training/compute.py (the formula `forge plan` sizes GPU-hours with); MFU against the
accelerator's dense bf16 peak and against its FP8 peak; peak memory; the final loss (mean of the
last 5 steps); and tokens/s over the bf16 row's, measured in the same run.

    python benchmarks/mfu.py                           # GPU: granite-8b shape, 4 layers, seq 4096
    python benchmarks/mfu.py --recipes bf16,delayed --json mfu.json
    python benchmarks/mfu.py --device cpu --model tiny --seq 64 --batch 2 --micro-batch 1 \\
        --steps 4 --warmup 1                           # CPU smoke test of the code path

On CPU the base row is fp32 (bf16 autocast fails there in the backward of Megatron's linear layers,
which restore CUDA autocast only), the FP8 rows say "needs a GPU", and the peak is compute.py's CPU
figure (fp32, one thread).
On a GPU without Transformer Engine the bf16 row runs Megatron's local layer spec (--spec auto),
marked "local": not the path a cuda stage trains with, which needs TE.
It exits 1 when a precision raised or none was measured, after the table (and --json) is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from stages.schema import from_dict  # noqa: E402
from stages.training.compute import ACCELERATORS, GIB, Shape, flops_per_token, human  # noqa: E402
from stages.specs import FP8_RECIPES, ModelSpec  # noqa: E402

SHAPE_FLAGS = {"hidden": "hidden_size", "layers": "num_layers", "heads": "num_attention_heads",
               "groups": "num_query_groups", "head_dim": "kv_channels", "ffn": "ffn_hidden_size",
               "vocab": "vocab_size"}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="default cuda")
    ap.add_argument("--model", default="granite-8b", help="conf/model/<name>.yaml (default granite-8b)")
    ap.add_argument("--layers", type=int,
                    help="num_layers (default: the model's, at most 4, so that 8B fits one GPU)")
    for flag in ("hidden", "heads", "groups", "head_dim", "ffn", "vocab"):
        ap.add_argument("--" + flag.replace("_", "-"), dest=flag, type=int,
                        help=f"override the model's {SHAPE_FLAGS[flag]}")
    ap.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per optimizer step (default 8)")
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per forward (default 2)")
    ap.add_argument("--steps", type=int, default=15,
                    help="steps per precision, warm-up included (default 15)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed first steps (default 5)")
    ap.add_argument("--lr", type=float, default=3e-4, help="constant learning rate (default 3e-4)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--recipes", help="comma list of bf16 (or fp32) and FP8 recipes (default: "
                                      "bf16 and every FP8 recipe; fp32 in place of bf16 on CPU)")
    ap.add_argument("--spec", choices=("auto", "te", "local"), default="auto",
                    help="layer spec on GPU: te, local, or auto = te when importable")
    ap.add_argument("--accelerator", choices=sorted(ACCELERATORS),
                    help="peak FLOP/s table row (default: from the GPU's name)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    return ap.parse_args()


def model_spec(args) -> ModelSpec:
    import yaml
    path = ROOT / "conf" / "model" / f"{args.model}.yaml"
    spec = from_dict(ModelSpec, yaml.safe_load(path.read_text()), f"model ({path.name})")
    overrides = {field: getattr(args, flag) for flag, field in SHAPE_FLAGS.items()
                 if getattr(args, flag) is not None}
    if args.layers is None:
        overrides["num_layers"] = min(spec.num_layers, 4)
    return dataclasses.replace(spec, **overrides)


def accelerator(args) -> tuple[str, str]:
    """(ACCELERATORS key, device name)."""
    if args.device == "cpu":
        return args.accelerator or "cpu", "cpu"
    name = torch.cuda.get_device_name()
    if args.accelerator:
        return args.accelerator, name
    for key in ("h200", "h100", "b200", "a100"):
        if key in name.lower():
            return key, name
    raise SystemExit(f"no peak FLOP/s known for {name!r}: pass --accelerator (one of "
                     f"{', '.join(sorted(ACCELERATORS))}) for the closest")


def versions() -> dict[str, str]:
    from importlib import metadata
    out = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for dist in ("megatron-core", "transformer-engine", "transformer-engine-torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def row_of(run, fpt: float, bf16_peak: float, fp8_peak: float) -> dict:
    tflops = run.tokens_per_s * fpt / 1e12
    return {"recipe": run.name, "spec": run.spec, "tokens_per_s": run.tokens_per_s, "tflops": tflops,
            "mfu_bf16_peak": tflops / bf16_peak, "mfu_fp8_peak": tflops / fp8_peak if fp8_peak else None,
            "peak_memory_gib": None if run.peak_memory_bytes is None else run.peak_memory_bytes / GIB,
            "final_loss": run.final_loss(), "seconds": run.seconds, "losses": run.losses}


def print_table(rows: list[dict], base: str, device: str) -> None:
    print(f"\n{'recipe':<12}{'tok/s':>10}{'TFLOP/s':>9}{'MFU bf16pk':>11}{'MFU fp8pk':>10}"
          f"{'peak mem':>10}{'loss':>8}{'x ' + base:>8}")
    for r in rows:
        local = device == "cuda" and r.get("spec") == "local"
        label = r["recipe"] + ("*" if local else "")
        if "skipped" in r:
            print(f"{label:<12}  {'' if r.get('failed') else 'skipped: '}{r['skipped']}")
            continue
        fp8 = "-" if r["mfu_fp8_peak"] is None else f"{r['mfu_fp8_peak']:.1%}"
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}G"
        ratio = "-" if r.get("vs_bf16") is None else f"{r['vs_bf16']:.2f}"
        print(f"{label:<12}{r['tokens_per_s']:>10.0f}{r['tflops']:>9.4g}{r['mfu_bf16_peak']:>11.1%}"
              f"{fp8:>10}{mem:>10}{r['final_loss']:>8.3f}{ratio:>8}")
    if any(r["recipe"] in FP8_RECIPES and "skipped" not in r for r in rows):
        # Megatron keeps the output layer (a large share of the FLOPs when layers are few) and
        # the attention core in bf16
        print("FP8 quantises the transformer layers' linear GEMMs only: MFU against the FP8 peak "
              "understates it")
    if device == "cuda" and any(r.get("spec") == "local" for r in rows):
        print("* Megatron's local layer spec (no Transformer Engine): not the cuda training path")


def main() -> None:
    args = parse()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU visible: run on a GPU, or smoke-test on CPU with a tiny shape "
                         "(--device cpu --model tiny --seq 64 --batch 2 --steps 4 --warmup 1)")
    if args.batch % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} does not divide --batch {args.batch}")
    if args.recipes is None:
        # bf16 autocast fails on CPU: Megatron's linear backward restores CUDA autocast only
        args.recipes = ",".join(("bf16" if args.device == "cuda" else "fp32",) + FP8_RECIPES)
    from stages.training import measure
    from stages.training.model import fp8_unsupported, have_transformer_engine
    spec = model_spec(args)
    accel, device_name = accelerator(args)
    peaks = ACCELERATORS[accel]
    # the CPU figure is per thread, and a worker runs one (ParallelSpec.threads_per_worker)
    bf16_peak, fp8_peak = peaks.bf16_tflops, peaks.fp8_tflops
    shape = Shape.of(spec)
    fpt = flops_per_token(shape, args.seq)
    use_te = args.device == "cuda" and (args.spec == "te" or
                                        (args.spec == "auto" and have_transformer_engine()))
    info = {"device": device_name, "accelerator": accel, "versions": versions(),
            "model": dataclasses.asdict(spec), "params": shape.params(), "seq": args.seq,
            "batch": args.batch, "micro_batch": args.micro_batch, "steps": args.steps,
            "warmup": args.warmup, "flops_per_token": fpt,
            "peak_tflops": {"bf16": bf16_peak, "fp8": fp8_peak}}
    print(f"{device_name} ({accel}: dense peak bf16 {bf16_peak:g} / fp8 {fp8_peak:g} TFLOP/s); "
          + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"model {spec.name}: {spec.num_layers} layers, hidden {spec.hidden_size}, heads "
          f"{spec.num_attention_heads}/{spec.num_query_groups} x {spec.kv_channels}, MLP "
          f"{spec.ffn_hidden_size}, vocab {spec.vocab_size}, {human(shape.params())} params; "
          f"{args.batch} x {args.seq} tokens per step (micro-batch {args.micro_batch}), "
          f"{human(fpt, 'FLOP')} per token; {args.steps} steps, first {args.warmup} untimed; "
          f"layer spec {'te' if use_te else 'local'}", flush=True)

    env = measure.start(args.device, args.seed)
    rows = []
    try:
        t0 = time.perf_counter()
        tokens = measure.markov_tokens(spec.vocab_size, args.steps * args.batch, args.seq, args.seed)
        print(f"synthetic tokens: {time.perf_counter() - t0:.1f}s", flush=True)
        for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
            why = fp8_unsupported(name) if name in FP8_RECIPES else ""
            if name in FP8_RECIPES and not why and not use_te:
                why = "needs the Transformer Engine layer spec (--spec te)"
            if why:
                print(f"[{name}] skipped: {why}", flush=True)
                rows.append({"recipe": name, "skipped": why})
                continue
            t0 = time.perf_counter()
            try:
                run = measure.train(spec, name, env, tokens, batch=args.batch,
                                    micro_batch=args.micro_batch, steps=args.steps,
                                    warmup=args.warmup, lr=args.lr, seed=args.seed, use_te=use_te)
            except Exception as e:  # one recipe failing must not lose the others' figures
                traceback.print_exc()
                rows.append({"recipe": name, "failed": True,
                             "skipped": f"FAILED: {type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else ''}"})
                continue
            rows.append(row_of(run, fpt, bf16_peak, fp8_peak))
            print(f"[{name}] {run.tokens_per_s:.0f} tok/s, loss {run.losses[0]:.3f} -> "
                  f"{run.final_loss():.3f} ({time.perf_counter() - t0:.0f}s with build)", flush=True)
    finally:
        measure.finish()
    base = next((r for r in rows if r["recipe"] in ("bf16", "fp32") and "skipped" not in r), None)
    for r in rows:
        if base is not None and "skipped" not in r:
            r["vs_bf16"] = r["tokens_per_s"] / base["tokens_per_s"]
    print_table(rows, base["recipe"] if base else "bf16", args.device)
    fp8 = [r for r in rows if r["recipe"] in FP8_RECIPES and "vs_bf16" in r]
    if fp8:
        print(f"FP8 / {base['recipe']} tokens/s, same run: "
              + ", ".join(f"{r['recipe']} {r['vs_bf16']:.2f}x" for r in fp8))
    why = failure(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info | {"rows": rows, "failure": why}, indent=1))
        print(f"wrote {args.json}")
    if why:
        raise SystemExit(f"mfu.py: {why}")


def failure(rows: list[dict]) -> str:
    """Why the run must exit non-zero ("" when it need not): a precision that raised, or none
    measured at all. Rows skipped for a stated reason (no FP8 on this GPU) are not failures."""
    failed = [r["recipe"] for r in rows if r.get("failed")]
    if failed:
        return f"{', '.join(failed)} failed (the traceback is above)"
    if not any("skipped" not in r for r in rows):
        return "no precision was measured (every row was skipped; the table says why)"
    return ""


if __name__ == "__main__":
    main()
