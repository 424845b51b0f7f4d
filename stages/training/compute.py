"""Compute planner: parameters, FLOPs, time and memory per device for a training stage.

Pure arithmetic (no torch import), so `forge plan` sizes a GPU cluster from a laptop.

- Parameters: dense decoder with GQA, SwiGLU, RMSNorm; the published 8.79B / 28.9B counts of
  Granite 4.1 8B / 30B come out of it (tests pin them).
- FLOPs: model FLOPs (no recompute), counted as Megatron-LM does (Narayanan et al. 2021): forward =
  2 x matmul parameters + 4 x seq x (query width) per layer for attention (full, not causal-halved),
  training = 3 x forward. With full recompute the layers cost 4 x forward; that variant equals
  Megatron's 96 B s l h^2 (1 + s/6h + V/16lh) exactly for a GPT-3-shaped model (tested). Selective
  recompute reruns the attention core's forward (4 x seq x query width per layer).
- Memory: weights + gradients + optimizer from bytes per parameter (Megatron's table:
  bf16 params/fp32 grads 18 or 6 + 12/d with the distributed optimizer; fp32 16 or 8 + 8/d, where
  d is the data-parallel x context-parallel size: Megatron's DDP and distributed optimizer shard
  over the DP group *with* CP, whose ranks hold the same weights), and activations per layer from
  Korthikanti et al. 2022 (34 sbh + 5 a s^2 b for GPT-3 with dropout), rewritten for GQA and SwiGLU;
  it reproduces the paper's formulas exactly for a GPT-3 shape, selective recompute (drops the
  5 a s^2 b attention term) and full recompute (keeps the layer input, 2 sbh) included. With
  recompute, the layer being recomputed in backward holds its full activations for a moment: one
  layer's difference is added to the peak (the paper leaves it out).
- Time: GPU-hours = executed FLOPs (model FLOPs plus what recompute reruns) / (peak x MFU) /
  (1 - bubble); the MFU is stated in the cluster config (the busy devices' utilisation). The
  bubble is 1F1B's: with p pipeline stages and m micro-batches per step per replica each device
  idles (p - 1) / (m + p - 1) of the step (Narayanan et al. 2021), 0 without PP; wall = hours /
  devices.

What the built training loop does, and so what a stage plan assumes: fp32 master weights with
bf16 autocast (16 bytes per parameter; 8 + 8/d with the distributed optimizer, which the loop runs
on GPUs through Megatron's ``DistributedOptimizer``), no sequence parallelism, the stage's recompute
(GPU only; Megatron's ``recompute_granularity``), flash attention on GPUs (Transformer Engine) and
the plain local attention on CPU (it keeps the s x s probabilities). With 1F1B pipelining the first
stage holds p micro-batches of l/p layers: l layers' worth, whatever p. Pipeline parallelism runs
on CPU (gloo) and GPU alike, so CPU plans may choose it; context parallelism stays GPU-only.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

GIB = 1024 ** 3
USABLE = 0.9   # of device memory; the rest is the CUDA context, NCCL buffers and fragmentation


@dataclasses.dataclass(frozen=True)
class Accelerator:
    memory_gib: float          # per device
    bf16_tflops: float         # dense peak (CPU: fp32 per worker thread)
    fp8_tflops: float          # dense peak; 0 = no FP8


# Vendor dense peaks (no sparsity). CPU: ~90 GFLOP/s fp32 per thread, measured here (FACTS.md).
ACCELERATORS = {
    "cpu": Accelerator(memory_gib=8.0, bf16_tflops=0.09, fp8_tflops=0.0),
    "a100": Accelerator(memory_gib=80.0, bf16_tflops=312.0, fp8_tflops=0.0),
    "h100": Accelerator(memory_gib=80.0, bf16_tflops=989.0, fp8_tflops=1979.0),
    "h200": Accelerator(memory_gib=141.0, bf16_tflops=989.0, fp8_tflops=1979.0),
    "b200": Accelerator(memory_gib=180.0, bf16_tflops=2250.0, fp8_tflops=4500.0),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """A decoder's shape; ``gated_mlp`` False and ``dropout`` True describe a GPT-3-style model."""
    hidden: int
    layers: int
    heads: int
    groups: int        # KV heads
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = True
    gated_mlp: bool = True
    dropout: bool = False

    @classmethod
    def of(cls, model) -> "Shape":   # a ModelSpec
        return cls(model.hidden_size, model.num_layers, model.num_attention_heads,
                   model.num_query_groups, model.kv_channels, model.ffn_hidden_size,
                   model.vocab_size, model.tied_embeddings)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.groups * self.head_dim

    def layer_matmul_params(self) -> int:
        h, q, kv, f = self.hidden, self.q_width, self.kv_width, self.ffn
        return h * (q + 2 * kv) + q * h + (3 if self.gated_mlp else 2) * h * f

    def layer_params(self) -> int:
        return self.layer_matmul_params() + 2 * self.hidden   # two RMSNorm weights

    def params(self) -> int:
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params() + emb + self.hidden   # + final norm


def flops_per_token(shape: Shape, seq: int, recompute: bool | str = False) -> float:
    """Training FLOPs per token: 3 x forward (4 x for the layers with full recompute; selective
    reruns the attention core's forward). ``recompute``: True or "full", "selective", False or
    "none"."""
    core_fwd = 4 * seq * shape.q_width                 # QK^T and attention x V
    layer_fwd = 2 * shape.layer_matmul_params() + core_fwd
    logits_fwd = 2 * shape.hidden * shape.vocab
    rerun = {True: layer_fwd, "full": layer_fwd, "selective": core_fwd}.get(recompute, 0)
    return shape.layers * (3 * layer_fwd + rerun) + 3 * logits_fwd


# bytes per parameter (weights, gradients, optimizer state before DP sharding)
STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 4, 12)}


def state_bytes_per_param(params_dtype: str, distributed: bool, dp: int) -> tuple[float, float, float]:
    """Megatron's table: fp32 params 16 (8 + 8/d), bf16 params 18 (6 + 12/d); ``dp`` is the size
    of the group the distributed optimizer shards over (d)."""
    w, g, opt = STATE_BYTES[params_dtype]
    return float(w), float(g), opt / dp if distributed else float(opt)


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    micro_batch: int = 1
    act_bytes: int = 2                  # compute dtype of the activations
    sequence_parallel: bool = False
    flash_attention: bool = True
    recompute: str = "none"             # none | selective (core attention) | full
    params_dtype: str = "fp32"
    distributed_optimizer: bool = False
    fp8_weight_copies: bool = False     # TE keeps an FP8 copy (and transpose) of linear weights
    replica_batch: int = 0              # samples per step per DP replica (0: one micro-batch)

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def world(self) -> int:
        return self.model_parallel * self.dp

    @property
    def shard_group(self) -> int:
        """Ranks the distributed optimizer shards over: DP x CP (Megatron's dp_cp group)."""
        return self.dp * self.cp

    def describe(self) -> str:
        return f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp}"

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step per replica: what fills the pipeline."""
        return max(1, self.replica_batch // self.micro_batch)

    @property
    def bubble(self) -> float:
        """1F1B's idle share of each device's step: (p - 1) / (m + p - 1); 0 at PP=1."""
        return (self.pp - 1) / (self.micro_batches + self.pp - 1)

    def savers(self) -> str:
        """The memory savers in force: 'dist-opt', 'rc-full', ... ('-' for none)."""
        out = (["dist-opt"] if self.distributed_optimizer else []) + (
            [f"rc-{self.recompute}"] if self.recompute != "none" else [])
        return ",".join(out) or "-"


def layer_activation_bytes(shape: Shape, seq: int, layout: Layout) -> float:
    """Activations one layer keeps for backward, one micro-batch, on one device."""
    s, b, e, t = seq / layout.cp, layout.micro_batch, layout.act_bytes, layout.tp
    h, a = shape.hidden, shape.heads
    if layout.recompute == "full":       # only the layer input is kept
        return e * s * b * h / (t if layout.sequence_parallel else 1)
    t_sp = t if layout.sequence_parallel else 1
    # norm inputs and outputs (residual stream side) + dropout masks there: sharded by SP only
    replicated = 4 * h * e + (2 * h if shape.dropout else 0)
    fc1_out = 2 * shape.ffn if shape.gated_mlp else shape.ffn
    # QKV out, attention out, fc1 out, activation out: sharded by TP
    sharded = e * (shape.q_width + 2 * shape.kv_width + shape.q_width + fc1_out + shape.ffn)
    per_token = replicated / t_sp + sharded / t
    scores = 0.0
    if not layout.flash_attention and layout.recompute == "none":
        # softmax output (+ dropout mask and output) per head: a s^2 b, split over TP and CP
        per_score = e + (1 + e if shape.dropout else 0)
        scores = per_score * (a / t) * s * seq * b
    return s * b * per_token + scores


@dataclasses.dataclass(frozen=True)
class Memory:
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def memory_per_device(shape: Shape, seq: int, layout: Layout) -> Memory:
    """The fullest pipeline stage: the first (embedding + l/p layers, p micro-batches in flight,
    1F1B) or the last (l/p layers, the output layer and the logits of one micro-batch)."""
    t, p = layout.tp, layout.pp
    layers = shape.layers / p
    emb = shape.vocab * shape.hidden / t
    body = layers * shape.layer_params() / t
    linear = layers * shape.layer_matmul_params() / t
    acts_layer = layer_activation_bytes(shape, seq, layout)
    # backward reruns one layer at a time: that layer holds its full activations meanwhile
    rerun = (layer_activation_bytes(shape, seq, dataclasses.replace(layout, recompute="none"))
             - acts_layer)
    s, b, e = seq / layout.cp, layout.micro_batch, layout.act_bytes
    embed_out = e * s * b * shape.hidden / (t if layout.sequence_parallel else 1)
    logits = s * b * shape.vocab / t * (e + 4)          # logits + fp32 copy for the cross-entropy
    if p == 1:
        stages = [(body + emb * (1 if shape.tied else 2) + shape.hidden,
                   shape.layers * acts_layer + rerun + embed_out + logits)]
    else:  # tied embeddings keep a copy on the last stage; untied ones have the output layer there
        stages = [(body + emb, p * (layers * acts_layer + embed_out) + rerun),
                  (body + emb + shape.hidden, layers * acts_layer + rerun + logits)]
    per_param = state_bytes_per_param(layout.params_dtype, layout.distributed_optimizer,
                                      layout.shard_group)
    fp8 = 2 * linear if layout.fp8_weight_copies else 0.0   # FP8 weight and its transpose
    mems = [Memory(weights=params * per_param[0] + fp8, grads=params * per_param[1],
                   optimizer=params * per_param[2], activations=acts) for params, acts in stages]
    return max(mems, key=lambda m: m.total)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(shape: Shape, seq: int, base: Layout, gpus_per_node: int,
                      max_gpus: int = 8192, cpu: bool = False):
    """Layouts that keep the stage's DP and never shrink its TP/CP/PP, cheapest first: fewest
    model-parallel devices, then the largest micro-batch (a smaller one only costs some speed),
    then TP (within a node) before CP before PP. On CPU CP stays as it is (no ring attention
    there); PP runs on CPU too (gloo)."""
    tps = [t for t in divisors(shape.groups)
           if shape.heads % t == 0 and base.tp <= t <= max(gpus_per_node, base.tp)]
    pps = [p for p in divisors(shape.layers) if p >= base.pp]
    cps = [c for c in (1, 2, 4, 8, 16, 32, 64, 128)
           if c >= base.cp and (c == 1 or seq % (2 * c) == 0) and (c == base.cp or not cpu)]
    mbs = divisors(base.micro_batch)
    out = []
    for t, c, p, m in itertools.product(tps, cps, pps, mbs):
        lay = dataclasses.replace(base, tp=t, cp=c, pp=p, micro_batch=m)
        if lay.world <= max_gpus:
            out.append(lay)
    return sorted(out, key=lambda l: (l.model_parallel, -l.micro_batch, l.pp, l.cp, -l.tp))


def first_fitting(shape: Shape, seq: int, base: Layout, usable_bytes: float,
                  gpus_per_node: int, cpu: bool = False) -> Layout | None:
    for lay in candidate_layouts(shape, seq, base, gpus_per_node, cpu=cpu):
        if memory_per_device(shape, seq, lay).total <= usable_bytes:
            return lay
    return None


def gpu_hours(flops: float, peak_tflops: float, mfu: float) -> float:
    return flops / (peak_tflops * 1e12 * mfu) / 3600.0


def size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB / 10 else f"{n_bytes / 1024 ** 2:.1f} MiB"


def human(n: float, unit: str = "") -> str:
    """1.23e9 -> '1.23G' (k, M, G, T, P, E)."""
    if n == 0:
        return f"0{unit}"
    exp = min(int(math.log10(abs(n)) // 3), 6) if abs(n) >= 1 else 0
    return f"{n / 10 ** (3 * exp):.3g}{' kMGTPE'[exp].strip()}{unit}"


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """The compute plan of one training stage on its layout."""
    stage: str
    shape: Shape
    tokens: int
    seq: int
    flops: float              # model FLOPs (what MFU counts)
    layout: Layout
    memory: Memory
    usable_bytes: float
    accelerator: str
    peak_tflops: float
    mfu: float
    fit: Layout | None        # when it does not fit: the first layout that would
    saver: Layout | None = None   # when it does not fit: the same layout with savers that fit

    @property
    def executed_flops(self) -> float:
        """What the devices run: model FLOPs plus the forward passes recompute repeats."""
        return self.flops * (flops_per_token(self.shape, self.seq, self.layout.recompute)
                             / flops_per_token(self.shape, self.seq))

    @property
    def params(self) -> int:
        return self.shape.params()

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable_bytes

    @property
    def bubble(self) -> float:
        """The pipeline bubble of the stage's layout (0 without PP): devices idle that share."""
        return self.layout.bubble

    @property
    def gpu_hours(self) -> float:
        """Device-hours: the executed FLOPs at the stated MFU, plus the bubble's idle time."""
        return gpu_hours(self.executed_flops, self.peak_tflops, self.mfu) / (1.0 - self.bubble)

    @property
    def wall_hours(self) -> float:
        return self.gpu_hours / self.layout.world

    def refusal(self) -> str:
        need, have = size(self.memory.total), size(self.usable_bytes)
        text = (f"stages.{self.stage}: does not fit: {need} per device > {have} "
                f"usable on {self.accelerator} ({self.layout.describe()}, micro-batch "
                f"{self.layout.micro_batch}, seq {self.seq})")
        if self.fit is None:
            text += "; no layout up to 8192 devices fits: shorten seq_length or micro_batch_size"
        else:
            f, todo = self.fit, self._overrides(self.fit)
            fit_size = size(memory_per_device(self.shape, self.seq, f).total)
            text += (f"; it would fit with {f.describe()}, micro-batch {f.micro_batch} "
                     f"({fit_size}, {f.model_parallel} device(s) per replica): set "
                     + " and ".join(todo))
        if self.saver is not None:   # no more devices, a little more compute (recompute) at most
            fit_size = size(memory_per_device(self.shape, self.seq, self.saver).total)
            text += (f" (or, on the same {self.layout.world} devices ({fit_size}): set "
                     + " and ".join(self._overrides(self.saver)) + ")")
        return text

    def _overrides(self, f: Layout) -> list[str]:
        """Command-line overrides that turn this stage's layout into ``f``. One field each
        (`stages.S.parallel.F=v` adds or sets F), so the stage's other layout fields stay."""
        out = []
        if f.micro_batch != self.layout.micro_batch:
            out.append(f"stages.{self.stage}.micro_batch_size={f.micro_batch}")
        for key, short in _SHORT.items():
            value = getattr(f, short)
            if value != getattr(self.layout, short):
                text = str(value).lower() if isinstance(value, bool) else value
                out.append(f"stages.{self.stage}.parallel.{key}={text}")
        return out


_SHORT = {"tensor_parallel": "tp", "context_parallel": "cp", "pipeline_parallel": "pp",
          "distributed_optimizer": "distributed_optimizer", "recompute": "recompute"}


def saver_fit(shape: Shape, seq: int, base: Layout, usable_bytes: float) -> Layout | None:
    """The same layout with the memory savers (GPU only) that make it fit, cheapest first: the
    distributed optimizer (costs communication only), then full recompute (~1/3 more layer FLOPs)."""
    tries = [dataclasses.replace(base, distributed_optimizer=True),
             dataclasses.replace(base, recompute="full"),
             dataclasses.replace(base, distributed_optimizer=True, recompute="full")]
    for lay in tries:
        if lay != base and memory_per_device(shape, seq, lay).total <= usable_bytes:
            return lay
    return None


def plan_training_stage(stage: str, config, cluster) -> StagePlan:
    """``config``: a pretrain / extend_context Config; ``cluster``: the stage's ParallelSpec."""
    shape = Shape.of(config.run_model)
    dp = cluster.data_parallel
    accel = ACCELERATORS[cluster.accelerator]
    fp8 = config.precision.fp8 != "none"
    layout = Layout(
        tp=cluster.tensor_parallel, pp=cluster.pipeline_parallel, cp=cluster.context_parallel,
        dp=dp, micro_batch=config.micro_batch_size or max(config.global_batch_size // dp, 1),
        act_bytes=4 if config.precision.dtype == "fp32" else 2,
        flash_attention=cluster.device == "cuda", fp8_weight_copies=fp8,
        distributed_optimizer=cluster.distributed_optimizer, recompute=cluster.recompute,
        replica_batch=max(config.global_batch_size // dp, 1))
    peak = accel.fp8_tflops if fp8 else accel.bf16_tflops
    if cluster.device == "cpu":
        peak *= cluster.threads_per_worker
    usable = (cluster.memory_gib or accel.memory_gib) * GIB * USABLE
    memory = memory_per_device(shape, config.seq_length, layout)
    fit = saver = None
    if memory.total > usable:
        fit = first_fitting(shape, config.seq_length, layout, usable, cluster.gpus_per_node,
                            cpu=cluster.device == "cpu")
        if cluster.device == "cuda":
            saver = saver_fit(shape, config.seq_length, layout, usable)
    return StagePlan(stage=stage, shape=shape, tokens=config.tokens, seq=config.seq_length,
                     flops=config.tokens * flops_per_token(shape, config.seq_length), layout=layout,
                     memory=memory, usable_bytes=usable, accelerator=cluster.accelerator,
                     peak_tflops=peak, mfu=cluster.mfu, fit=fit, saver=saver)
