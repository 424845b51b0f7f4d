"""A phase's data mixture: a weighted blend of Megatron indexed datasets, one per source.

``build_blended_dataset`` goes through Megatron-core's own ``BlendedMegatronDatasetBuilder`` with
a ``GPTDatasetConfig``: each source (a ``.bin``/``.idx`` prefix from the tokenize stage) becomes a
``GPTDataset`` of packed ``seq_length + 1``-token samples (documents are EOD-terminated and packed
across boundaries; shuffled with ``seed``), and a ``BlendedDataset`` interleaves the sources in
proportion to their weights. Sample ``i`` depends only on (prefixes, weights, seq_length,
num_samples, seed): a resumed run reads exactly the samples the interrupted one would have.

Index caches are written under ``cache_dir`` (never next to the tokenize stage's data, Megatron's
default). Under torch.distributed, rank 0 builds them first and the other ranks read them (the
builder's own barrier protocol), so every rank must call. Each build gets its own sub-directory
with a ``.complete`` marker written after the build: a build killed half-way is wiped and redone
instead of being taken for a cache hit. Without torch.distributed a temporary world of one is set
up for the build (Megatron's BlendedDataset asks for the rank).

Loss masks and weights (``MaskedGPTDataset``): a source whose tokenize output has a loss mask
companion (``<prefix>.loss_mask``, written for documents with prompts) has its prompt tokens
excluded from the loss, and ``loss_weights`` scales a source's loss tokens (the training loss is
the weighted token mean). A completion-only source has a handful of loss tokens per sample: at
weight 1 they drown in the other sources' tokens (measured: the tiny model never learned the
retrieval drills that way), so the pipelines weigh them up.

Megatron wants a tokenizer for the special ids: ``EodTokenizer`` carries the EOD id and a pad id
of -1 (packed training samples are never padded, so no real token may be masked as padding).
"""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from stages.layout import loss_mask_prefix
from stages.training.cpu_shim import local_process_group

PAD_NONE = -1  # Megatron's "no pad token" id: never equal to a real token
def has_loss_mask(prefix) -> bool:
    return Path(loss_mask_prefix(prefix) + ".idx").exists()


class EodTokenizer:
    """The part of a Megatron tokenizer that GPTDataset reads: vocab size, EOD and pad ids."""

    def __init__(self, eod_id: int, vocab_size: int | None = None):
        self.eod = int(eod_id)
        self.pad = PAD_NONE
        self.vocab_size = vocab_size  # None: the token dtype is read from the .idx file
        self.unique_identifiers = {"class": "EodTokenizer", "eod": self.eod, "pad": self.pad}


@functools.cache
def _masked_gpt_dataset_class():
    """``MaskedGPTDataset``, defined on first use (importing Megatron's datasets costs seconds)."""
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    class MaskedGPTDataset(GPTDataset):
        """GPTDataset whose ``loss_mask`` also honours the source's loss mask companion (if any)
        and is multiplied by ``loss_weight`` (set after the build, see ``set_loss_weights``)."""
        loss_weight = 1.0

        def __init__(self, indexed_dataset, dataset_path, *args, **kwargs):
            super().__init__(indexed_dataset, dataset_path, *args, **kwargs)
            self.mask_dataset = None
            if dataset_path is not None and has_loss_mask(dataset_path):
                self.mask_dataset = IndexedDataset(loss_mask_prefix(dataset_path), multimodal=False)
                if len(self.mask_dataset) != len(indexed_dataset):
                    raise RuntimeError(f"{loss_mask_prefix(dataset_path)} has {len(self.mask_dataset)}"
                                       f" documents, its tokens {len(indexed_dataset)}; re-run tokenize")

        def __getitem__(self, idx):
            sample = super().__getitem__(idx)
            if self.mask_dataset is not None:
                sample["loss_mask"] = sample["loss_mask"] * self._companion_mask(idx)
            if self.loss_weight != 1.0:
                sample["loss_mask"] = sample["loss_mask"] * self.loss_weight
            return sample

        def _companion_mask(self, idx) -> torch.Tensor:
            # The mask has the tokens' document layout, so Megatron's own sample lookup, run on
            # the mask instead of the tokens, returns it aligned (no copy of the index logic).
            tokens, self.dataset = self.dataset, self.mask_dataset
            try:
                mask, _ = self._query_document_sample_shuffle_indices(0 if idx is None else idx)
            finally:
                self.dataset = tokens
            assert self.config.add_extra_token_to_sequence  # labels are text[1:]
            return torch.from_numpy(mask[1:] == 1).float()  # padding (PAD_NONE) counts as 0

    return MaskedGPTDataset


def set_loss_weights(dataset, weights_by_prefix: dict[str, float]) -> None:
    """Give each source dataset of ``dataset`` (a blend or one source) its loss weight."""
    for part in getattr(dataset, "datasets", [dataset]):
        part.loss_weight = float(weights_by_prefix.get(part.dataset_path, 1.0))


def _build_dir(cache_dir: Path, description: dict) -> Path:
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / digest


def _build_once(cache_dir: Path, description: dict, build):
    """Run ``build(path)`` (collective) in a marker-guarded cache sub-directory."""
    with local_process_group():
        path = _build_dir(cache_dir, description)
        rank = dist.get_rank()
        if rank == 0 and path.exists() and not (path / ".complete").exists():
            shutil.rmtree(path)  # a build that was killed half-way: never trust its files
        if rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            (path / "description.json").write_text(json.dumps(description, indent=1, sort_keys=True))
        dist.barrier()
        result = build(path)
        dist.barrier()
        if rank == 0:
            (path / ".complete").write_text("ok\n")
        return result


def _gpt_config(blend, seq_length: int, seed: int, eod_id: int, path: Path,
                document_mask: bool = False):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split="1,0,0",  # everything is training data; held-out data comes as its own prefixes
        path_to_cache=str(path),
        tokenizer=EodTokenizer(eod_id),
        reset_position_ids=False,  # RoPE is relative: positions need no reset inside a document
        # document_mask: each sample carries its own block-diagonal causal mask, so no token
        # attends across a packed document boundary; otherwise one shared causal mask.
        reset_attention_mask=document_mask,
        eod_mask_loss=False,
        create_attention_mask=document_mask,
        mid_level_dataset_surplus=0.05,  # small blends need a margin over the exact counts
    )


def prefix_tokens(prefix: str) -> int:
    """Tokens in the indexed dataset at ``prefix`` (from its ``.idx``, memory-mapped)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    dataset = IndexedDataset(str(prefix), mmap=True)   # held: its lengths live in its mmap
    return int(dataset.sequence_lengths.sum(dtype=np.int64))


def blend_parts(prefixes: dict[str, str | list[str]], weights: dict[str, float],
                used: list[str]) -> list[tuple[str, str, float]]:
    """``(source, absolute prefix, normalised weight)`` for each prefix of the ``used`` sources: a
    source's weight, shared among its prefixes (a source split at ``MAX_DOCUMENTS_PER_PREFIX``)
    in proportion to their tokens, so the split blends as the one dataset would."""
    total = float(sum(weights[s] for s in used))
    out = []
    for s in used:
        paths = [prefixes[s]] if isinstance(prefixes[s], str) else list(prefixes[s])
        if not paths:
            raise KeyError(f"mixture source {s!r}: its data stage has no tokens for it")
        paths = [str(Path(p).resolve()) for p in paths]
        tokens = [prefix_tokens(p) for p in paths] if len(paths) > 1 else [1]
        out += [(s, p, weights[s] / total * t / sum(tokens)) for p, t in zip(paths, tokens)]
    return out


def build_blended_dataset(prefixes: dict[str, str | list[str]], weights: dict[str, float],
                          seq_length: int, num_samples: int, seed: int, eod_id: int, cache_dir: Path,
                          document_mask: bool = False, loss_weights: dict[str, float] | None = None):
    """A dataset of ``num_samples`` samples (dicts with "tokens", "labels", "loss_mask", ...).

    ``prefixes``: source -> indexed-dataset prefix (path without .bin/.idx), or its prefixes in row
    order when it is split (``blend_parts``); ``weights``: source ->
    weight (normalised here; 0 drops the source); ``loss_weights``: source -> multiplier of its
    loss mask (default 1). Collective under torch.distributed.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    GPTDataset = _masked_gpt_dataset_class()
    unknown = sorted(set(weights) - set(prefixes))
    if unknown:
        raise KeyError(f"mixture sources without data: {unknown}; known sources: {sorted(prefixes)}")
    used = sorted(s for s, w in weights.items() if w > 0)
    if not used:
        raise ValueError("mixture: every weight is zero")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    parts = blend_parts(prefixes, weights, used)
    paths, norm = [p for _, p, _ in parts], [w for _, _, w in parts]
    description = {"what": "blend", "prefixes": paths, "weights": norm, "seq_length": seq_length,
                   "num_samples": num_samples, "seed": seed, "eod": eod_id}

    def build(path: Path):
        config = _gpt_config((paths, norm), seq_length, seed, eod_id, path, document_mask)
        builder = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0],
                                                lambda: True, config)
        return builder.build()[0]

    dataset = _build_once(cache_dir, description, build)
    if len(dataset) < num_samples:
        raise RuntimeError(f"blend has {len(dataset)} samples, {num_samples} were asked for")
    set_loss_weights(dataset, {p: (loss_weights or {}).get(s, 1.0) for s, p, _ in parts})
    return dataset


def build_heldout_dataset(prefix: str, seq_length: int, seed: int, eod_id: int, cache_dir: Path):
    """One epoch of one source's held-out documents, packed like the training data (its loss mask
    applies: a completion-only source's held-out loss is the loss on its completions)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    GPTDataset = _masked_gpt_dataset_class()
    path_str = str(Path(prefix).resolve())
    description = {"what": "heldout", "prefix": path_str, "seq_length": seq_length, "seed": seed,
                   "eod": eod_id}

    def build(path: Path):
        config = _gpt_config(([path_str], None), seq_length, seed, eod_id, path)
        builder = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config)
        return builder.build()[0]

    return _build_once(cache_dir, description, build)


def batch(dataset, indices):
    """Stack samples ``indices`` into (tokens, labels, loss_mask) [b, seq_length] and the samples'
    own attention masks [b, 1, s, s] (True = masked), or None when the dataset has none."""
    samples = [dataset[int(i)] for i in indices]
    masks = None
    if "attention_mask" in samples[0]:
        masks = torch.stack([s["attention_mask"] for s in samples]).bool()
    return (torch.stack([s["tokens"] for s in samples]),
            torch.stack([s["labels"] for s in samples]),
            torch.stack([s["loss_mask"] for s in samples]).float(), masks)


def write_indexed_dataset(prefix: Path, documents, dtype=np.int32) -> None:
    """Write token documents (lists/arrays of ids, EOD included) as a Megatron indexed dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for doc in documents:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
