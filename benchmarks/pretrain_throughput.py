"""Pretrain stage tokens/s vs a minimal Megatron-core loop on the same tiny model, side by side.

1. Builds the data stages of the tiny pipeline once (prepare_data, tokenizer, tokenize).
2. Runs the `pretrain` stage worker exactly as the orchestrator launches it (its own process,
   blended Megatron dataset, AdamW, grad clip, metrics, checkpoints every N steps).
3. Runs a minimal loop in a fresh process: the same GPTModel, random tokens already in memory,
   forward + backward + AdamW, nothing else.
Both are timed over the same steps after the same warm-up, each alternating run repeated; the
ratio stage / minimal is printed (goal >= 0.9).

    python benchmarks/pretrain_throughput.py [--steps 200] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MINIMAL = textwrap.dedent("""
    import json, sys, time
    import torch
    from stages.schema import from_dict
    from stages.specs import ModelSpec, PrecisionSpec
    from stages.training.cpu_shim import apply_cpu_shim, init_cpu_rng_tracker
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from stages.training.model import build_model, causal_mask

    cfg = json.loads(sys.argv[1])
    apply_cpu_shim()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ps.initialize_model_parallel(1)
    torch.manual_seed(0)
    init_cpu_rng_tracker()
    spec = from_dict(ModelSpec, cfg["model"], "model")
    model = build_model(spec, PrecisionSpec(), device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b, s, steps, warm = cfg["batch"], cfg["seq"], cfg["steps"], cfg["warmup"]
    data = torch.randint(0, spec.vocab_size, (steps + warm, b, s + 1))
    mask = causal_mask(s, "cpu")
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    for i in range(steps + warm):
        if i == warm:
            t0 = time.perf_counter()
        x, y = data[i, :, :-1], data[i, :, 1:]
        loss = model(x, pos, mask, labels=y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(json.dumps({"tokens_per_s": steps * b * s / (time.perf_counter() - t0)}))
""")


def run(cmd: list[str], env: dict) -> str:
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def stage_tokens_per_s(out_dir: Path, warmup: int) -> float:
    """Steady-state tokens/s from the stage's own per-step timestamps (after warm-up)."""
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    first, last = recs[warmup - 1], recs[-1]
    return (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from flows import runner
    work = Path(tempfile.mkdtemp(prefix="forge-tput-"))
    env = dict(os.environ, FORGE_STORE=str(work / "store"), OMP_NUM_THREADS="1",
               PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    print("building the data stages once ...", flush=True)
    run([sys.executable, "-m", "flows.cli", "run", "--only", "data|tokenizer|tokenize"], env)

    os.environ["FORGE_STORE"] = env["FORGE_STORE"]
    prep = runner.prepare([])
    node = prep.dag.nodes["pretrain-1"]
    cfg = node.config
    tokens = (args.steps + args.warmup) * cfg.global_batch_size * cfg.seq_length
    from stages.schema import to_dict
    from flows.launch import worker_command, worker_env
    tok = prep.dag.nodes["tokenize"]
    inputs = {"tokenize": {"out_dir": str(tok.out_dir),
                           "artifact": json.loads((tok.out_dir / "artifact.json").read_text())}}
    stage_conf = dict(to_dict(cfg), tokens=tokens, log_interval=50, **{"from": None})
    stage_conf.pop("from_")
    minimal_conf = json.dumps({"model": to_dict(cfg.model), "batch": cfg.global_batch_size,
                               "seq": cfg.seq_length, "steps": args.steps, "warmup": args.warmup})
    stage_rates, minimal_rates = [], []
    for i in range(args.repeats):
        out_dir = work / f"pretrain-{i}"
        out_dir.mkdir()
        spec = {"kind": "pretrain", "stage": "pretrain-1", "key": f"bench{i}", "config": stage_conf,
                "inputs": inputs, "out_dir": str(out_dir), "cluster": to_dict(prep.dag.pipeline.cluster)}
        (out_dir / "spec.json").write_text(json.dumps(spec))
        t0 = time.perf_counter()
        run(worker_command("torchrun", prep.dag.pipeline.cluster, out_dir / "spec.json"),
            worker_env(prep.dag.pipeline.cluster))
        stage_wall = time.perf_counter() - t0
        stage_rates.append(stage_tokens_per_s(out_dir, args.warmup))
        minimal_rates.append(json.loads(run([sys.executable, "-c", MINIMAL, minimal_conf],
                                            worker_env(prep.dag.pipeline.cluster)).splitlines()[-1])
                             ["tokens_per_s"])
        print(f"  repeat {i + 1}: stage {stage_rates[-1]:.0f} tok/s (whole process {stage_wall:.1f}s "
              f"incl. start-up and {args.steps + args.warmup} steps), minimal {minimal_rates[-1]:.0f} tok/s",
              flush=True)
    s, m = statistics.median(stage_rates), statistics.median(minimal_rates)
    n_params = cfg.model.num_parameters()
    print(f"\npretrain stage vs minimal Megatron-core loop, tiny model ({n_params / 1e6:.2f}M params, "
          f"batch {cfg.global_batch_size}x{cfg.seq_length}, 1 thread, {args.steps} timed steps)")
    print(f"{'stage tok/s':>12}{'minimal tok/s':>15}{'ratio':>8}   goal >= 0.9")
    print(f"{s:>12.0f}{m:>15.0f}{s / m:>8.2f}")


if __name__ == "__main__":
    main()
