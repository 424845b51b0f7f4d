"""Rollouts: prompts -> engine -> rewards -> groups -> the batch a step trains on.

- ``PromptStream``: the training prompts in an order reshuffled every epoch
  (``random.Random(f"rl-order/{seed}/{epoch}")``); its ``position`` (prompts drawn so far) is all
  a checkpoint needs to continue it.
- Seeds: the completions of the prompt drawn at stream position ``p`` are sampled with seed
  ``rollout_seed(seed, p)`` (held-out prompt i: ``rollout_seed(seed, "heldout", i)``), so a
  resumed run, or a run with another data-parallel size, samples the same completions.
- ``generate_groups``: one round. Each DP rank generates and scores its share of the round's
  prompts (every ``dp``-th), then the groups are gathered in round order on every rank.
- ``collect``: rounds until the step's batch is full (dynamic sampling, ``advantages.BatchFiller``:
  each round draws a full ``prompts_per_step`` prompts, as DAPO does) or the extra rounds are
  spent; then ``to_batch`` turns the kept groups into a ``policy.RolloutBatch`` (advantages per
  group from the shaped rewards, loss weight 0 for completions cut at the cap when
  ``overlong_filter``). ``reward_shuffle_control`` permutes the shaped rewards across the kept
  batch before the advantages (a control run).
- ``heldout_reward``: one completion of each held-out prompt; mean reward, its standard error
  (sample std / sqrt(n)) and the pass rate.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import statistics
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from stages.data.chat_format import END_TURN, conversation_ids
from stages.rl.advantages import BatchFiller, Group, group_advantages, make_group
from stages.rl.policy import RolloutBatch

Scorer = Callable[[list[str], list[dict]], list]   # (texts, rows) -> [Score]


def rollout_seed(seed: int, *where) -> int:
    """A 63-bit seed from the stage seed and where a prompt was drawn."""
    text = "/".join(str(x) for x in (seed, *where))
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


class PromptStream:
    def __init__(self, n: int, seed: int, position: int = 0) -> None:
        if n < 1:
            raise ValueError("the prompt source has no training prompts left after the held-out "
                             "split; give it more prompts or hold out fewer")
        self.n, self.seed, self.position = n, seed, position
        self._epoch, self._order = -1, []

    def take(self, k: int) -> list[tuple[int, int]]:
        """The next ``k`` (stream position, row index) pairs."""
        out = []
        for _ in range(k):
            epoch, i = divmod(self.position, self.n)
            if epoch != self._epoch:
                self._order = list(range(self.n))
                random.Random(f"rl-order/{self.seed}/{epoch}").shuffle(self._order)
                self._epoch = epoch
            out.append((self.position, self._order[i]))
            self.position += 1
        return out


@dataclasses.dataclass
class Rollouts:
    """What one round (or a held-out pass) produced, for metrics and tables."""
    groups: list[Group]
    rows: list[dict]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return conversation_ids(tokenizer, [{"role": "user", "content": prompt}],
                            add_generation_prompt=True)[0]


def stop_ids(tokenizer) -> list[int]:
    return [i for i in (tokenizer.token_to_id(END_TURN), tokenizer.token_to_id("<|endoftext|>"))
            if i is not None]


def completion_text(tokenizer, tokens: list[int], stops: list[int]) -> str:
    """The decoded completion before its stop token."""
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=False)


def _gather(mine: list, env) -> list:
    """Every rank's list, interleaved back: rank r held items r, r + dp, r + 2 dp, ..."""
    if env.dp == 1:
        return mine
    from megatron.core import parallel_state as ps
    parts: list = [None] * env.dp
    dist.all_gather_object(parts, mine, group=ps.get_data_parallel_group())
    out = []
    for j in range(max(len(p) for p in parts)):
        out += [p[j] for p in parts if j < len(p)]
    return out


def generate_groups(engine, tokenizer, rows: list[dict], picks: list[tuple[int, int]], n: int,
                    config, env, scorer: Scorer, seeds: list[int]) -> list[Group]:
    """One round: ``n`` completions of each picked row, scored and shaped, in ``picks`` order."""
    stops = stop_ids(tokenizer)
    mine = list(range(env.dp_rank, len(picks), env.dp))
    prompts = [prompt_ids(tokenizer, rows[picks[k][1]]["prompt"]) for k in mine]
    outs = engine.generate(prompts, n=n, max_new_tokens=config.max_new_tokens,
                           temperature=config.temperature, top_p=config.top_p, stop_ids=stops,
                           seeds=[seeds[k] for k in mine]) if mine else []
    texts = [completion_text(tokenizer, c.tokens, stops) for out in outs for c in out]
    my_rows = [rows[picks[k][1]] for k in mine for _ in range(n)]
    scores = scorer(texts, my_rows) if texts else []
    groups = []
    for j, (k, out) in enumerate(zip(mine, outs)):
        sc = scores[j * n:(j + 1) * n]
        payload = {"prompt": prompts[j], "tokens": [c.tokens for c in out],
                   "logprobs": [list(map(float, c.logprobs)) for c in out],
                   "texts": texts[j * n:(j + 1) * n], "reasons": [s.reason for s in sc],
                   "passed": [bool(s.passed) for s in sc]}
        groups.append(make_group(picks[k][1], [s.value for s in sc], [len(c.tokens) for c in out],
                                 [c.finish for c in out], max_new_tokens=config.max_new_tokens,
                                 overlong_buffer=config.overlong_buffer, payload=payload))
    return _gather(groups, env)


def collect(engine, tokenizer, rows, stream: PromptStream, filler: BatchFiller, config, env,
            scorer: Scorer) -> tuple[list[Group], list[Group]]:
    """(kept groups, every group generated this step)."""
    seen: list[Group] = []
    while True:
        picks = stream.take(config.prompts_per_step)
        seeds = [rollout_seed(config.seed, pos) for pos, _ in picks]
        groups = generate_groups(engine, tokenizer, rows, picks, config.group_size, config, env,
                                 scorer, seeds)
        seen += groups
        filler.offer(groups)
        filler.round_done()
        if filler.full or filler.exhausted:
            return filler.take(), seen


def to_batch(groups: list[Group], config, step: int) -> RolloutBatch:
    """The kept groups as flat sequences with advantages and loss weights."""
    rewards = [list(g.rewards) for g in groups]
    if config.reward_shuffle_control and groups:
        flat = [r for rs in rewards for r in rs]
        random.Random(f"rl-shuffle/{config.seed}/{step}").shuffle(flat)
        g = config.group_size
        rewards = [flat[i * g:(i + 1) * g] for i in range(len(groups))]
    adv = group_advantages(rewards, normalise=config.advantage == "group_norm").tolist() \
        if groups else []
    batch = RolloutBatch([], [], [], [], [])
    for group, a in zip(groups, adv):
        p = group.payload["prompt"]
        for j, toks in enumerate(group.payload["tokens"]):
            batch.tokens.append(p + toks)
            batch.prompt_len.append(len(p))
            batch.behaviour.append(group.payload["logprobs"][j])
            batch.advantage.append(a[j])
            cut = group.finishes[j] == "length" and config.overlong_filter
            batch.weight.append(0.0 if cut else 1.0)
    return batch


def step_metrics(seen: list[Group], task: str) -> dict[str, float]:
    """Reward, pass rate and length over every completion generated this step."""
    raw = [r for g in seen for r in g.raw_rewards]
    shaped = [r for g in seen for r in g.rewards]
    passed = [p for g in seen for p in g.payload["passed"]]
    lengths = [n for g in seen for n in g.lengths]
    capped = [f == "length" for g in seen for f in g.finishes]
    if not raw:
        return {}
    return {"reward/mean": statistics.fmean(raw),
            "reward/std": statistics.pstdev(raw) if len(raw) > 1 else 0.0,
            "reward/shaped_mean": statistics.fmean(shaped),
            f"pass_rate/{task}": sum(passed) / len(passed),
            "response_length/mean": statistics.fmean(lengths),
            "response_length/max": float(max(lengths)),
            "response_length/capped_fraction": sum(capped) / len(capped)}


def rollout_table(path: Path, seen: list[Group], rows: list[dict], batch_groups: int = 2) -> None:
    """The first ``batch_groups`` groups of the step: prompt, completion, reward, reason."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for g in seen[:batch_groups]:
            for j, text in enumerate(g.payload["texts"]):
                f.write(json.dumps({"prompt": rows[g.prompt_row]["prompt"], "completion": text,
                                    "reward": g.raw_rewards[j], "shaped_reward": g.rewards[j],
                                    "reason": g.payload["reasons"][j], "finish": g.finishes[j],
                                    "tokens": g.lengths[j]}) + "\n")


def heldout_reward(engine, tokenizer, rows: list[dict], config, env, scorer: Scorer,
                   table: Path | None) -> dict[str, float]:
    """One completion per held-out prompt (fixed seeds): mean reward, standard error, pass rate."""
    if not rows:
        return {}
    picks = list(enumerate(range(len(rows))))
    seeds = [rollout_seed(config.seed, "heldout", i) for i in range(len(rows))]
    groups = generate_groups(engine, tokenizer, rows, picks, 1, config, env, scorer, seeds)
    values = [g.raw_rewards[0] for g in groups]
    passed = [g.payload["passed"][0] for g in groups]
    if table is not None and env.rank == 0:
        table.parent.mkdir(parents=True, exist_ok=True)
        with open(table, "w") as f:
            for g, row in zip(groups, rows):
                f.write(json.dumps({"id": row.get("id"), "prompt": row["prompt"],
                                    "completion": g.payload["texts"][0],
                                    "reward": g.raw_rewards[0],
                                    "reason": g.payload["reasons"][0]}) + "\n")
    n = len(values)
    se = statistics.stdev(values) / n ** 0.5 if n > 1 else 0.0
    return {"mean": statistics.fmean(values), "se": se, "pass_rate": sum(passed) / n,
            "prompts": float(n)}
