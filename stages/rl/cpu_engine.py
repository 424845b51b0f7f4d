"""The CPU rollout engine: our own batched generation on a transformers ``GraniteForCausalLM``.

The model is built from ``convert.granite_config(spec)`` (what the Megatron model of ``spec``
computes, multipliers included), fp32, eval mode; no weights are read from disk: ``load_weights``
copies the (HF name, tensor) stream of ``stages.models.weights`` into its parameters by name and
refuses a stream with a missing, unexpected, repeated or misshaped name.

Generation (``generate``), all under ``torch.inference_mode``:

1. Prefill once per prompt, not once per completion: the P prompts, left-padded to the longest,
   with an attention mask and position ids ``cumsum(mask) - 1`` (so every row sees positions
   0, 1, ... as in an unpadded forward, which ``score`` and Megatron use), logits of the last
   position only; then the KV cache is repeated n times (rows ``p*n .. p*n+n-1`` are prompt p).
   Left padding rather than grouping prompts by length: one forward per step for the whole batch
   (RL prompts vary in length; a tiny model on CPU is bound by per-call overhead, so fewer,
   larger calls win), and every row's new token sits at the same cache index.
2. Each step: ``logp = log_softmax(logits / T)`` over the vocabulary (the behaviour log-prob);
   top-p masks it to the nucleus; the token is ``argmax(masked logp + Gumbel noise)`` (a draw from
   the renormalised nucleus), its log-prob ``logp[token]``, before truncation. The noise of prompt
   p's n rows comes from one ``torch.Generator`` seeded with ``seeds[p]``, n x vocab uniforms per
   step, drawn every step while any of its rows is running: the draws, hence the tokens, do not
   depend on the other prompts of the batch.
3. A row stops at a stop id (kept, ``finish="stop"``) or after ``max_new_tokens`` (``"length"``);
   finished rows leave the batch (the KV cache keeps only running rows), so long-tailed lengths
   cost what the running rows cost.

``score`` runs one unpadded forward over prompt + completion: the same log-probs, computed
without the cache (what the tests compare generation against).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from stages.rl.engine import Completion, RolloutEngine, check_sampling
from stages.specs import ModelSpec


class CpuEngine(RolloutEngine):
    name = "cpu"

    def __init__(self, spec: ModelSpec, *, attn_implementation: str = "sdpa", seed: int = 0):
        """``attn_implementation``: transformers' attention ("sdpa" or "eager"). The model starts
        with transformers' random init (seeded with ``seed``), to be replaced by ``load_weights``."""
        from transformers import GraniteForCausalLM

        from stages.models.convert import granite_config
        self.spec = spec
        config = granite_config(spec)
        config._attn_implementation = attn_implementation
        with torch.random.fork_rng():  # the caller's RNG stays where it was
            torch.manual_seed(seed)
            self.model = GraniteForCausalLM(config).float().eval()
        self.model.requires_grad_(False)
        # named_parameters() lists a tied lm_head once, as model.embed_tokens.weight
        self._params = dict(self.model.named_parameters())
        self._loaded = False

    # ------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._loaded = False   # until the whole stream has landed
        seen, unexpected, misshaped, repeated = set(), [], [], []
        with torch.no_grad():
            for name, tensor in weights:
                param = self._params.get(name)
                if param is None:
                    unexpected.append(name)
                elif name in seen:
                    repeated.append(name)
                elif tuple(tensor.shape) != tuple(param.shape):
                    misshaped.append(f"{name} {tuple(tensor.shape)} (the model's is "
                                     f"{tuple(param.shape)})")
                else:
                    param.copy_(tensor)   # a copy: the trainer's tensors may change next step
                    seen.add(name)
        missing = [n for n in self._params if n not in seen]
        problems = [f"{what}: {', '.join(names)}" for what, names in (
            ("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped),
            ("repeated", repeated)) if names]
        if problems:
            raise ValueError(
                "CpuEngine.load_weights: the stream does not fit a GraniteForCausalLM of this spec ("
                + "; ".join(problems) + "). Stream stages.models.weights.hf_weights_from_model(model, "
                "spec) of a model with the engine's spec; the engine's weights are now partly "
                "updated: load a whole stream again before generating.")
        self._loaded = True

    def _ready(self, what: str) -> None:
        if not self._loaded:
            raise RuntimeError(f"CpuEngine.{what}: no weights loaded yet (the model holds its "
                               "random init); call load_weights first")

    # ------------------------------------------------------------ scoring
    def score(self, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
        if not prompt:
            raise ValueError("score: prompt is empty; the first completion token needs a context")
        if not temperature > 0:
            raise ValueError(f"score: temperature={temperature}; it must be > 0")
        self._ready("score")
        if not completion:
            return []
        ids = torch.tensor([prompt + completion])
        with torch.inference_mode():
            logits = self.model(input_ids=ids, use_cache=False).logits[0].float()
        logits = logits[len(prompt) - 1:-1]                      # the positions that predict
        logp = torch.log_softmax(logits / temperature, dim=-1)
        return logp.gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()

    # ------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], *, n: int, max_new_tokens: int,
                 temperature: float, top_p: float, stop_ids: Sequence[int],
                 seeds: Sequence[int]) -> list[list[Completion]]:
        from transformers import DynamicCache
        spec = self.spec
        check_sampling(prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, stop_ids=stop_ids, seeds=seeds, vocab_size=spec.vocab_size,
                       max_positions=spec.max_position_embeddings)
        self._ready("generate")
        P, V = len(prompts), spec.vocab_size
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        tokens: list[list[int]] = [[] for _ in range(P * n)]
        logprobs: list[list[float]] = [[] for _ in range(P * n)]
        finish = ["length"] * (P * n)

        with torch.inference_mode():
            # 1. prefill, one row per prompt, left-padded
            width = max(map(len, prompts))
            ids = torch.zeros(P, width, dtype=torch.long)
            mask = torch.zeros(P, width, dtype=torch.long)
            for p, prompt in enumerate(prompts):
                ids[p, width - len(prompt):] = torch.tensor(prompt)
                mask[p, width - len(prompt):] = 1
            positions = (mask.cumsum(1) - 1).clamp_min(0)
            cache = DynamicCache(config=self.model.config)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             cache=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
            cache.batch_repeat_interleave(n)
            mask = mask.repeat_interleave(n, dim=0)
            next_pos = positions[:, -1].repeat_interleave(n) + 1
            rows = torch.arange(P * n)                  # the running rows, in batch order

            for step in range(max_new_tokens):
                # 2. the behaviour log-probs, the nucleus, the per-prompt noise, the draw
                logp = torch.log_softmax(logits / temperature, dim=-1)
                scores = _top_p_masked(logp, top_p) if top_p < 1 else logp.clone()
                prompt_of = rows // n
                for p in prompt_of.unique_consecutive().tolist():
                    at = (prompt_of == p).nonzero()[:, 0]
                    noise = _gumbel(n, V, gens[p])          # all n rows' noise, running or not
                    scores[at] += noise[rows[at] - p * n]
                new = scores.argmax(dim=-1)
                new_logp = logp.gather(1, new[:, None])[:, 0]
                for r, t, lp in zip(rows.tolist(), new.tolist(), new_logp.tolist()):
                    tokens[r].append(t)
                    logprobs[r].append(lp)
                stopped = torch.isin(new, stops) if len(stops) else torch.zeros_like(new, dtype=torch.bool)
                for r in rows[stopped].tolist():
                    finish[r] = "stop"
                if step == max_new_tokens - 1:
                    break
                # 3. finished rows leave the batch
                keep = (~stopped).nonzero()[:, 0]
                if len(keep) == 0:
                    break
                if len(keep) < len(rows):
                    cache.batch_select_indices(keep)
                    rows, new, mask, next_pos = rows[keep], new[keep], mask[keep], next_pos[keep]
                mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
                out = self.model(input_ids=new[:, None], attention_mask=mask,
                                 position_ids=next_pos[:, None], cache=cache, use_cache=True)
                logits = out.logits[:, -1].float()
                next_pos = next_pos + 1

        return [[Completion(tokens[r], logprobs[r], finish[r]) for r in range(p * n, p * n + n)]
                for p in range(P)]

    def close(self) -> None:
        self.model = None
        self._params = {}


def _top_p_masked(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logp`` with -inf outside each row's nucleus: the fewest most probable tokens whose
    probability mass reaches ``top_p`` (the most probable token always stays)."""
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    probs = sorted_logp.exp()
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logp.masked_fill(drop, float("-inf"))


def _gumbel(rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Standard Gumbel noise [rows, vocab] from ``gen``: argmax(logits + noise) draws from
    softmax(logits)."""
    u = torch.rand(rows, vocab, generator=gen).clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))
