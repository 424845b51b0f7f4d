"""The RL loop: ``train_rl(config, inputs, out_dir, ctx) -> Artifact`` (the objective: grpo.py).

Build order (one function, ``_run``): distributed + model-parallel state (``training.loop.setup``)
-> the policy (Megatron-core ``GPTModel`` of the parent's spec) and AdamW -> start state (this
stage's newest checkpoint with its loop state, or the parent's weights) -> DDP when DP > 1 -> the
frozen reference when ``kl_coef > 0`` -> tokenizer and prompts -> the rollout engine, fed the
policy's weights -> the judge's endpoint (chat) -> held-out reward before -> steps -> final
checkpoint -> held-out reward after -> artifact.

A step: ``rollout.collect`` (generate, score, dynamic sampling) -> ``policy.update``
(``updates_per_batch`` AdamW steps) -> weights to the engine -> metrics (rank 0, ``metrics.jsonl``,
streamed to MLflow by the orchestrator) -> every ``sample_interval`` steps a table of rollouts in
``report/rollouts/`` -> a checkpoint every ``checkpoint_interval`` steps (and after a SIGTERM /
SIGINT: ``preemption.py``).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (no-op if loaded)

import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.distributed as dist  # noqa: E402

from stages.base import Artifact, RunContext, StageInput  # noqa: E402
from stages.rl import rollout  # noqa: E402
from stages.rl.advantages import BatchFiller  # noqa: E402
from stages.rl.engine import engine_kind  # noqa: E402
from stages.schema import to_dict  # noqa: E402
from stages.training import checkpoint as ckpt  # noqa: E402
from stages.training import loop as tl  # noqa: E402
from stages.training.model import build_model  # noqa: E402
from stages.training.preemption import Preempted, StopSignals  # noqa: E402
from stages.training.schedules import lr_at  # noqa: E402
from stages.training.step import make_optimizer  # noqa: E402

REPORT = "report"


def train_rl(config, inputs: dict[str, StageInput], out_dir: Path, ctx: RunContext) -> Artifact:
    """Every rank calls it; rank 0's artifact counts."""
    from stages.training.precision import require_fp8_runtime
    t_start = time.time()
    out_dir = Path(out_dir)
    require_fp8_runtime(config.precision, f"stages.{ctx.stage}.precision")
    ckpt.prewarm_writer()
    stop = StopSignals().install()
    try:
        env = tl.setup(ctx.cluster, config.seed)
        return _run(config, inputs, out_dir, ctx, env, t_start, stop)
    finally:
        stop.uninstall()
        tl.teardown()
        gc.freeze()


def start_state(config, parent: StageInput, out_dir: Path, model, optimizer, env, stage: str):
    """(TrainState, loop state): this stage's newest checkpoint, or the parent's weights."""
    found = [tl.newest_checkpoint(out_dir, stage) if env.rank == 0 else None]
    dist.broadcast_object_list(found, src=0)
    layout = dict(world_size=env.world, tensor_parallel=env.tp, data_parallel=env.dp)
    if found[0] is not None:
        state = ckpt.load_checkpoint(Path(found[0]), model, optimizer, restore_rng=True)
        tl.say(env, f"[{stage}] resuming from {found[0]} (step {state.step})")
        loop_state = ckpt.read_loop_state(Path(found[0])) or {}
        state = type(state)(**{**state.__dict__, **layout})
    else:
        prev = ckpt.load_checkpoint(parent.checkpoint(), model, None)  # weights; fresh AdamW
        state = ckpt.TrainState(tokens_total=prev.tokens_total, **layout)
        loop_state = {}
        tl.say(env, f"[{stage}] policy from {parent.name} ({parent.path('checkpoint')})")
    if env.rank == 0:
        tl.keep_metrics_upto(out_dir, state.step)
    return state, loop_state


@contextlib.contextmanager
def judge_url(config, inputs, out_dir: Path, env, stage: str):
    """The chat reward's judge endpoint: the configured one, or rank 0 serving its model stage."""
    judge = config.judge
    if judge is None or judge.serve is None:
        yield None if judge is None else judge.endpoint
        return
    url = [None]
    with contextlib.ExitStack() as stack:
        if env.rank == 0:
            from stages.data.judge_server import serve_model
            from stages.models.export import export_model
            target = out_dir / "judge_model"
            if not (target / "config.json").exists():
                shutil.rmtree(target, ignore_errors=True)
                export_model(inputs[judge.serve], target)
            url[0] = stack.enter_context(serve_model(target, out_dir / "judge_server.log",
                                                     device=env.device))
            tl.say(env, f"[{stage}] judge {judge.serve} served at {url[0]}")
        dist.broadcast_object_list(url, src=0)
        yield url[0]


def make_scorer(config, url):
    from stages.rl.reward_chat import JudgeEndpoint
    from stages.rl.rewards import score_batch
    judge = None if config.judge is None else JudgeEndpoint(config.judge, url)

    def scorer(texts, rows):
        return score_batch(config.task, texts, rows, timeout_s=config.reward_timeout_s,
                           workers=config.reward_workers, judge=judge)
    return scorer


def _run(config, inputs, out_dir: Path, ctx: RunContext, env, t_start: float,
         stop: StopSignals) -> Artifact:
    from tokenizers import Tokenizer

    from stages.models.weights import hf_weights_from_model
    from stages.rl.engine import make_engine
    from stages.rl.policy import update
    from stages.rl.prompts import load_prompts, prompt_digest
    from stages.specs import spec_of_artifact
    stage, parent = ctx.stage, inputs[config.from_]
    spec = spec_of_artifact(parent)
    model = build_model(spec, config.precision, device=env.device, tensor_parallel=env.tp,
                        recompute=ctx.cluster.recompute)
    optimizer = make_optimizer(model, config)
    state, loop_state = start_state(config, parent, out_dir, model, optimizer, env, stage)
    ddp = tl.data_parallel(model, False) if env.dp > 1 else None
    net = ddp or model
    ref = None
    if config.kl_coef > 0:
        ref = build_model(spec, config.precision, device=env.device, tensor_parallel=env.tp)
        ckpt.load_checkpoint(parent.checkpoint(), ref, None)
        ref.eval()
    tokenizer = Tokenizer.from_file(str(parent.path("tokenizer")))
    train_rows, heldout_rows = load_prompts(config.prompts, seed=config.seed,
                                            cache_dir=out_dir / "prompt_cache",
                                            where=f"stages.{stage}.prompts")
    stream = rollout.PromptStream(len(train_rows), config.seed,
                                  loop_state.get("stream_position", 0))
    filler = BatchFiller.from_state(loop_state["filler"]) if "filler" in loop_state else \
        BatchFiller(config.prompts_per_step, config.max_extra_rounds,
                    dynamic_sampling=config.dynamic_sampling)
    kind = engine_kind(config.engine, env.device)
    t0 = time.time()
    engine = make_engine(kind, spec, tokenizer_dir=parent.out_dir)
    engine.load_weights(hf_weights_from_model(model, spec))
    tl.say(env, f"[{stage}] {kind} engine ready ({time.time() - t0:.1f}s); start-up "
                f"{time.time() - t_start:.1f}s; {config.steps} steps of {config.prompts_per_step}"
                f" x {config.group_size} rollouts, task {config.task}, DP={env.dp}, from step "
                f"{state.step}; {len(train_rows)} train / {len(heldout_rows)} held-out prompts")
    report = out_dir / REPORT
    times = {"generate": 0.0, "train": 0.0, "sync": 0.0}
    try:
        with judge_url(config, inputs, out_dir, env, stage) as url:
            scorer = make_scorer(config, url)
            before = loop_state.get("heldout_before")
            if before is None:
                t0 = time.time()
                before = rollout.heldout_reward(engine, tokenizer, heldout_rows, config, env,
                                                scorer, report / "heldout_before.jsonl")
                tl.say(env, f"[{stage}] held-out reward before: {_fmt(before)} "
                            f"({time.time() - t0:.1f}s)")
            net.train()
            while state.step < config.steps:
                lr = lr_at(config.schedule, state.step, config.steps, state.tokens_total)
                t0 = time.time()
                kept, seen = rollout.collect(engine, tokenizer, train_rows, stream, filler,
                                             config, env, scorer)
                t1 = time.time()
                batch = rollout.to_batch(kept, config, state.step)
                stats = update(net, model, ddp, optimizer, batch, spec, config, env, lr, ref) \
                    if len(batch) else {}
                t2 = time.time()
                engine.load_weights(hf_weights_from_model(model, spec))
                t3 = time.time()
                state.step += 1
                state.optimizer_steps += config.updates_per_batch if len(batch) else 0
                state.consumed_samples = stream.position
                trained = batch.response_tokens(range(len(batch)))
                state.tokens_phase += trained
                state.tokens_total += trained
                times = {k: times[k] + v for k, v in
                         (("generate", t1 - t0), ("train", t2 - t1), ("sync", t3 - t2))}
                row = {**rollout.step_metrics(seen, config.task), **stats, **filler.metrics(),
                       "lr": lr, "time/generate_s": t1 - t0, "time/train_s": t2 - t1,
                       "time/weight_sync_s": t3 - t2, "groups_trained": float(len(kept))}
                if env.rank == 0:
                    ctx.metric(out_dir, state.step, **row)
                    if state.step % config.sample_interval == 0 or state.step == 1:
                        rollout.rollout_table(report / "rollouts" / f"step_{state.step:06d}.jsonl",
                                              seen, train_rows)
                if not len(batch):
                    tl.say(env, f"[{stage}] step {state.step}: every group's rewards were equal "
                                f"after {filler.last_step.get('rounds')} rounds; no update")
                if state.step % config.log_interval == 0 or state.step == config.steps:
                    tl.say(env, f"[{stage}] step {state.step}/{config.steps} reward "
                                f"{row.get('reward/mean', float('nan')):.3f} pass "
                                f"{row.get(f'pass_rate/{config.task}', float('nan')):.2f} kept "
                                f"{len(kept)}/{filler.last_step.get('groups_seen')} loss "
                                f"{stats.get('loss', float('nan')):.4f} gen {t1 - t0:.1f}s "
                                f"train {t2 - t1:.1f}s")
                loop_state = {"stream_position": stream.position, "filler": filler.to_state(),
                              "heldout_before": before}
                if signum := stop.agreed(env.device):
                    path = _save(out_dir, model, optimizer, state, config, env, stage, loop_state)
                    raise Preempted(signum, state.step, f"{ckpt.CHECKPOINTS}/{path.name}")
                if state.step < config.steps and config.checkpoint_interval and \
                        state.step % config.checkpoint_interval == 0:
                    _save(out_dir, model, optimizer, state, config, env, stage, loop_state)
            final = out_dir / ckpt.CHECKPOINTS / ckpt.iter_name(config.steps)
            if not (final / ckpt.DONE).exists():
                final = _save(out_dir, model, optimizer, state, config, env, stage,
                              {"stream_position": stream.position, "filler": filler.to_state(),
                               "heldout_before": before})
            t0 = time.time()
            after = rollout.heldout_reward(engine, tokenizer, heldout_rows, config, env, scorer,
                                           report / "heldout_after.jsonl")
            tl.say(env, f"[{stage}] held-out reward after: {_fmt(after)} "
                        f"({time.time() - t0:.1f}s)")
    finally:
        engine.close()
    datasets = write_prompt_sets(out_dir, {"train": train_rows, "heldout": heldout_rows}) \
        if env.rank == 0 else []
    return _artifact(config, ctx, out_dir, parent, state, before, after, times, spec, env,
                     final, prompt_digest(train_rows), prompt_digest(heldout_rows), kind, datasets)


def write_prompt_sets(out_dir: Path, sets: dict[str, list[dict]]) -> list[dict]:
    """The prompts trained on and held out, as JSON Lines: the stage's dataset inputs in MLflow."""
    from stages.layout import FAST_DIGEST, fast_file_digest
    folder = out_dir / "prompts"
    folder.mkdir(exist_ok=True)
    out = []
    for split, rows in sets.items():
        path = folder / f"{split}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        tmp.replace(path)
        out.append({"name": "prompts", "split": split, "rows": len(rows), "path": str(path),
                    "digest": fast_file_digest(path), "digest_algo": FAST_DIGEST})
    return out


def _fmt(r: dict) -> str:
    return f"{r['mean']:.3f} +- {r['se']:.3f} (pass {r['pass_rate']:.2f}, {int(r['prompts'])} " \
           "prompts)" if r else "no held-out prompts"


def _save(out_dir, model, optimizer, state, config, env, stage, loop_state) -> Path:
    return tl.save(out_dir, model, optimizer, state, config, env, stage, loop_state=loop_state)


def _artifact(config, ctx, out_dir: Path, parent: StageInput, state, before, after, times, spec,
              env, final: Path, train_digest: str, heldout_digest: str, kind: str,
              datasets: list[dict]) -> Artifact:
    metrics = {"steps": float(config.steps), "optimizer_steps": float(state.optimizer_steps),
               "response_tokens": float(state.tokens_phase), **{
                   f"time_{k}_s": v for k, v in times.items()}}
    for name, r in (("before", before), ("after", after)):
        for k, v in (r or {}).items():
            metrics[f"heldout_reward_{name}" if k == "mean" else f"heldout_{k}_{name}"] = v
    outputs = {"checkpoint": f"{ckpt.CHECKPOINTS}/{final.name}"}
    if "tokenizer" in parent.artifact.outputs:
        shutil.copyfile(parent.path("tokenizer"), out_dir / "tokenizer.json")
        outputs["tokenizer"] = "tokenizer.json"
    report = out_dir / REPORT
    if env.rank == 0 and report.is_dir():
        for path in sorted(report.rglob("*.jsonl")):
            rel = str(path.relative_to(out_dir))
            outputs[rel.removesuffix(".jsonl")] = rel
    inherited = {k: parent.artifact.extra[k] for k in ("padded_vocab_size", "seq_length")
                 if k in parent.artifact.extra}
    extra = {**inherited, "model": to_dict(spec), "parent": config.from_,
             "task": config.task, "engine": kind, "tokens_total": state.tokens_total,
             "tokens_phase": state.tokens_phase, "prompts_drawn": state.consumed_samples,
             "prompts_digest": train_digest, "heldout_digest": heldout_digest,
             "world_size": env.world, "data_parallel": env.dp, "tensor_parallel": env.tp}
    if env.rank == 0:
        (out_dir / "rl_summary.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return Artifact(kind="rl", stage=ctx.stage, key=ctx.key, outputs=outputs, metrics=metrics,
                    datasets=datasets, extra=extra)
