"""The vLLM rollout engine (GPU worker image only), colocated with the trainer on its GPU.

Not runnable on the CPU machines nor on the accelerator machine of CI (neither has vLLM,
FACTS.md); ``tests/gpu/test_vllm_rollout.py`` checks it in the worker image. Written against the
vLLM 0.32 docs (the release the Dockerfile pins for torch 2.13.0).

Construction: ``vllm.LLM`` over either an exported folder (``model_dir``: what
``stages.models.export.export_model`` writes) or, by default, a folder holding only
``config.json`` (``convert.granite_config(spec)``) with ``load_format="dummy"``: no weights are
read from disk, ``load_weights`` streams the policy's in, as the CPU engine does. Prompts and
completions are token ids (``skip_tokenizer_init``, no detokenizing): ``tokenizer_dir`` is not
needed and not read. The engine core runs in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so ``load_weights`` hands the trainer's tensors
to vLLM's model by reference, 512 MiB of the stream at a time: ``LLM.collective_rpc`` calls, in
the worker, the model runner's model's ``load_weights`` (vLLM's own HF-name loader: it fuses
q/k/v and gate/up and casts to the engine's dtype), then the prefix cache is reset (its KV was
computed with the old weights). A parameter the stream left unloaded is an error.

Memory: ``enable_sleep_mode``; ``sleep()`` is vLLM's level-2 sleep by default (weights and KV cache
freed: the next weights come from the trainer anyway), after which ``generate`` refuses to run
until ``load_weights`` and ``wake()``.

Behaviour log-probs (``stages/rl/engine.py``: log_softmax(z / T) before top-p): vLLM's
``logprobs_mode`` is engine-wide. ``processed_logprobs`` (default) is log_softmax after temperature
AND after top-k/top-p (renormalised over the nucleus): the definition exactly when top_p == 1.
``raw_logprobs`` is log_softmax of the logits before temperature: the definition exactly when
T == 1. ``generate`` refuses the arguments its mode cannot report exactly. ``SamplingParams`` per
prompt: ``n``, ``temperature``, ``top_p``, ``max_tokens``, ``stop_token_ids``, ``seed=seeds[p]``
(vLLM seeds a generator per request: the completions of a prompt do not depend on the batch),
``logprobs=0`` (the drawn token's only), ``ignore_eos`` (the stop set is ``stop_ids``, nothing
else). ``score`` reads vLLM's prompt log-probs (computed from the raw logits): the drawn tokens'
at T == 1, the full vocabulary re-normalised at T != 1 (slow; checks only).

Separate GPUs (vLLM's NCCL weight transfer: ``WeightTransferConfig(backend="nccl")`` on a served
engine, the trainer's ``WeightTransferTrainerFactory.trainer_init(NCCLTrainerInitInfo(...),
client=HTTPVLLMWeightSyncClient(url), source=...)`` fed by ``hf_weights_from_model``) is not
built: issue 13 (multi-node RL).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from stages.rl.engine import Completion, RolloutEngine, check_sampling
from stages.specs import ModelSpec

if TYPE_CHECKING:
    import torch

NEEDS = ("the vllm rollout engine needs vLLM and a CUDA GPU: run the RL stage in the stage-worker "
         "image (Dockerfile: it installs vllm==VLLM_VERSION beside torch==TORCH_VERSION), or "
         "`pip install .[vllm]` on a CUDA machine (never beside Prefect: FACTS.md); on CPU use "
         "engine kind 'cpu'")
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
CHUNK_BYTES = 512 << 20   # load_weights hands vLLM this much of the stream at a time


def require_vllm() -> None:
    """Raise RuntimeError naming the worker image when vLLM or CUDA is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(f"vLLM is not installed: {NEEDS}")
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError(f"no CUDA device is visible: {NEEDS}")


def _load_into_worker(worker, weights) -> list[str]:
    """Runs inside vLLM's worker (``collective_rpc``): the names of the parameters loaded."""
    model = worker.model_runner.get_model()
    return sorted(model.load_weights(weights=weights))


def _param_names(worker) -> list[str]:
    return sorted(n for n, _ in worker.model_runner.get_model().named_parameters())


class VllmEngine(RolloutEngine):
    name = "vllm"

    def __init__(self, spec: ModelSpec, *, tokenizer_dir: Path | None = None,
                 model_dir: Path | None = None, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.3, logprobs_mode: str = "processed_logprobs",
                 sleep_level: int = 2, enforce_eager: bool = True, seed: int = 0, **llm_options):
        """``model_dir``: an exported HF folder to start from (else dummy weights until
        ``load_weights``); ``llm_options`` go to ``vllm.LLM`` as they are."""
        require_vllm()
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"VllmEngine: logprobs_mode={logprobs_mode!r}; choose one of "
                             f"{', '.join(LOGPROBS_MODES)} (module docstring)")
        if sleep_level not in (1, 2):
            raise ValueError(f"VllmEngine: sleep_level={sleep_level}; vLLM has levels 1 and 2")
        # The engine core in this process: collective_rpc passes the trainer's tensors by reference.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm

        from stages.models.convert import granite_config
        self.spec, self.logprobs_mode, self.sleep_level = spec, logprobs_mode, sleep_level
        self._tmp = None
        if model_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="forge-vllm-"))
            granite_config(spec).save_pretrained(str(self._tmp))   # config.json only
            llm_options.setdefault("load_format", "dummy")
        folder = Path(model_dir) if model_dir is not None else self._tmp
        self.llm = vllm.LLM(
            model=str(folder), dtype=dtype, seed=seed, enable_sleep_mode=True,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            skip_tokenizer_init=True,   # ids in, ids out
            logprobs_mode=logprobs_mode, max_logprobs=spec.vocab_size,
            max_model_len=spec.max_position_embeddings, **llm_options)
        self._loaded = model_dir is not None
        self._asleep = self._weights_awake = False

    # ------------------------------------------------------------ weights, memory
    def load_weights(self, weights: Iterable[tuple[str, "torch.Tensor"]]) -> None:
        if self._asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])    # the KV cache stays freed until wake()
            self._weights_awake = True
        loaded: set[str] = set()
        for chunk in _chunks(weights, CHUNK_BYTES):   # bounded: q/k/v are copies (weights.py)
            loaded |= set(self.llm.collective_rpc(_load_into_worker, args=(chunk,))[0])
        missing = sorted(set(self.llm.collective_rpc(_param_names)[0]) - loaded)
        if missing:
            raise ValueError(f"VllmEngine.load_weights: the stream left vLLM's parameters "
                             f"{', '.join(missing)} unloaded; stream "
                             "stages.models.weights.hf_weights_from_model(model, spec) whole")
        self.llm.reset_prefix_cache()             # cached KV was computed with the old weights
        self._loaded = True

    def sleep(self) -> None:
        if not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True
            if self.sleep_level == 2:
                self._loaded = False              # level 2 discards the weights

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"] if self._weights_awake else None)
            self._asleep = self._weights_awake = False

    def _ready(self, what: str) -> None:
        if self._asleep:
            raise RuntimeError(f"VllmEngine.{what}: the engine is asleep; call wake() first")
        if not self._loaded:
            raise RuntimeError(f"VllmEngine.{what}: no weights loaded (dummy weights, or level-2 "
                               "sleep discarded them); call load_weights first")

    # ------------------------------------------------------------ sampling
    def generate(self, prompts: list[list[int]], *, n: int, max_new_tokens: int,
                 temperature: float, top_p: float, stop_ids: Sequence[int],
                 seeds: Sequence[int]) -> list[list[Completion]]:
        from vllm import SamplingParams
        check_sampling(prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, stop_ids=stop_ids, seeds=seeds,
                       vocab_size=self.spec.vocab_size,
                       max_positions=self.spec.max_position_embeddings)
        if self.logprobs_mode == "processed_logprobs" and top_p < 1:
            raise ValueError(f"VllmEngine.generate: top_p={top_p} with logprobs_mode="
                             "'processed_logprobs' would report log-probs renormalised over the "
                             "nucleus; use top_p=1, or build the engine with "
                             "logprobs_mode='raw_logprobs' and sample at temperature 1")
        if self.logprobs_mode == "raw_logprobs" and temperature != 1:
            raise ValueError(f"VllmEngine.generate: temperature={temperature} with logprobs_mode="
                             "'raw_logprobs' would report log-probs before temperature; use "
                             "temperature=1, or logprobs_mode='processed_logprobs' with top_p=1")
        self._ready("generate")
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p,
                                 max_tokens=max_new_tokens, stop_token_ids=list(stop_ids),
                                 ignore_eos=True, seed=int(seed), logprobs=0, detokenize=False)
                  for seed in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                 use_tqdm=False)
        return [[Completion(list(o.token_ids), _drawn_logprobs(o.token_ids, o.logprobs),
                            "stop" if o.finish_reason == "stop" else "length")
                 for o in out.outputs] for out in outs]

    def score(self, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
        import torch
        from vllm import SamplingParams
        if not prompt or not temperature > 0:
            raise ValueError("score: needs a non-empty prompt and temperature > 0")
        self._ready("score")
        if not completion:
            return []
        full = temperature != 1
        params = SamplingParams(max_tokens=1, temperature=1.0, detokenize=False,
                                prompt_logprobs=self.spec.vocab_size if full else 0)
        out = self.llm.generate([{"prompt_token_ids": prompt + completion}], params,
                                use_tqdm=False)[0]
        rows = out.prompt_logprobs[len(prompt):]             # position j predicts token j
        got = []
        for token, row in zip(completion, rows, strict=True):
            if not full:
                got.append(row[token].logprob)
                continue
            logp = torch.full((self.spec.vocab_size,), float("-inf"), dtype=torch.float64)
            for t, lp in row.items():
                logp[t] = lp.logprob
            got.append(torch.log_softmax(logp / temperature, 0)[token].item())
        return got

    def close(self) -> None:
        self.llm = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _chunks(weights, max_bytes: int):
    """Lists of (name, tensor) pairs of at most ``max_bytes`` each (one tensor may exceed it);
    vLLM's loader fills a fused q/k/v or gate/up parameter shard by shard, across lists too."""
    chunk, size = [], 0
    for name, tensor in weights:
        chunk.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _drawn_logprobs(token_ids, logprobs) -> list[float]:
    """The drawn token's log-prob at each step (vLLM gives a dict per step, the drawn token in
    it, plus the top-k when asked for; ``logprobs=0`` asks for none)."""
    return [step[t].logprob for t, step in zip(token_ids, logprobs, strict=True)]
