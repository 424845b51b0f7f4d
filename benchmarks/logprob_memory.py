"""Peak memory (and time) of token log-probs, forward + backward: naive [T, V] log-softmax vs the
chunked, fused ``forge_kernels.logprobs.token_logprobs``.

Shapes (defaults): vocab 100,352 (Granite's padded vocabulary), 8,192 tokens, hidden 256 (small so
that the CPU matmuls stay quick; the [T, V] blocks, which are the point, do not depend on it),
chunk 1024, fp32 inputs, temperature 1, loss = sum of logp (gradients to hidden and weight).

    naive:  logp = log_softmax(hidden @ weight.T / tau).gather(targets)   (autograd; [T, V] fp32)
    fused:  token_logprobs(..., chunk_size, with_entropy=False)           ([chunk, V] at a time)

Entropy is left out of both by default: the naive entropy adds two more [T, V] fp32 blocks
(13+ GB at these shapes on CPU); ``--entropy`` includes it (fused: the entropy output's gradient too).

Method, CPU: each variant runs in its own fresh subprocess, which imports torch and the kernels,
runs the variant once on tiny shapes (so lazily loaded code is resident), allocates the inputs,
then takes its RSS as the baseline and resets the peak (``/proc/self/clear_refs`` = 5 resets VmHWM
to the current RSS) and runs forward + backward. Peak = VmHWM - baseline: every byte the variant
touched above its inputs, including the weight gradient (both variants pay it). glibc serves these
large blocks with mmap and unmaps them on free, so RSS follows the tensors' lifetimes.
Method, CUDA: the same, with torch.cuda.max_memory_allocated() - memory_allocated() after the inputs;
time = median of 3 runs after one warm-up, synchronised; with Triton the Triton variant is added.

Goal: fused peak <= 0.25x naive peak.

    OMP_NUM_THREADS=2 python benchmarks/logprob_memory.py [--device cuda] [--tokens 8192]
        [--vocab 100352] [--hidden 256] [--chunk-size 1024] [--entropy]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL = 0.25
GB = 1e9


# ---------------------------------------------------------------- child side
def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def _variant(name: str, chunk_size: int, entropy: bool):
    import torch
    from forge_kernels.logprobs import token_logprobs

    def naive(hidden, weight, targets):
        logp_all = torch.log_softmax(torch.matmul(hidden, weight.T).div_(1.0), dim=-1)
        loss = logp_all.gather(1, targets[:, None]).sum()
        if entropy:
            loss = loss - (logp_all.exp() * logp_all).sum()
        loss.backward()

    def fused(hidden, weight, targets, impl):
        logp, ent = token_logprobs(hidden, weight, targets, chunk_size=chunk_size,
                                   with_entropy=entropy, impl=impl)
        (logp.sum() + (ent.sum() if entropy else 0)).backward()

    if name == "naive":
        return naive
    return lambda h, w, t: fused(h, w, t, name.removeprefix("fused-"))


def child(args) -> dict:
    import torch
    torch.manual_seed(0)
    dev = torch.device(args.device)
    run = _variant(args.child, args.chunk_size, args.entropy)

    def inputs(T, V, H):
        hidden = torch.randn(T, H, device=dev, requires_grad=True)
        weight = (torch.randn(V, H, device=dev) * 0.05).requires_grad_()
        return hidden, weight, torch.randint(0, V, (T,), device=dev)

    run(*inputs(64, 512, 16))                           # warm-up: load lazily loaded code
    hidden, weight, targets = inputs(args.tokens, args.vocab, args.hidden)
    times = []
    if dev.type == "cuda":
        run(hidden, weight, targets)                    # warm-up at size (Triton compile, cuBLAS)
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            t0 = time.perf_counter()
            run(hidden, weight, targets)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            hidden.grad = weight.grad = None
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")                               # VmHWM := current RSS
        t0 = time.perf_counter()
        run(hidden, weight, targets)
        times.append(time.perf_counter() - t0)
        peak = _status("VmHWM") - base
    return {"variant": args.child, "peak_bytes": peak, "seconds": statistics.median(times),
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- parent side
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=100_352)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--entropy", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    variants = ["naive", "fused-torch"]
    if args.device == "cuda":
        from forge_kernels import triton_logprobs
        if triton_logprobs.available():
            variants.append("fused-triton")
    full = args.tokens * args.vocab * 4
    print(f"T={args.tokens} V={args.vocab} H={args.hidden} chunk={args.chunk_size} "
          f"entropy={args.entropy} device={args.device}; one fp32 [T, V] block = {full / GB:.2f} GB")
    rows = {}
    for name in variants:
        cmd = [sys.executable, __file__, "--child", name] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    naive = rows["naive"]
    print(f"{'variant':14} {'peak GB':>8} {'x naive':>8} {'seconds':>8} {'x naive':>8}")
    for name, r in rows.items():
        print(f"{name:14} {r['peak_bytes'] / GB:8.3f} {r['peak_bytes'] / naive['peak_bytes']:8.3f} "
              f"{r['seconds']:8.2f} {r['seconds'] / naive['seconds']:8.2f}")
    ratio = max(r["peak_bytes"] for n, r in rows.items() if n != "naive") / naive["peak_bytes"]
    print(f"threads={naive['threads']}; peak ratio fused/naive = {ratio:.3f} "
          f"(goal <= {GOAL}): {'met' if ratio <= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
