"""Packing without crossing document boundaries inside the attention (extend_context's default)."""
from __future__ import annotations

import torch

from stages.training.mixture import batch, build_blended_dataset, write_indexed_dataset

EOD = 0


def test_each_sample_gets_a_block_diagonal_causal_mask(tmp_path):
    docs = [[5, 6, 7, EOD], [8, 9, EOD], [10, 11, 12, 13, 14, EOD], [15, EOD]] * 8
    write_indexed_dataset(tmp_path / "src", docs)
    kw = dict(prefixes={"src": str(tmp_path / "src")}, weights={"src": 1.0}, seq_length=8,
              num_samples=6, seed=3, eod_id=EOD)
    masked = build_blended_dataset(**kw, cache_dir=tmp_path / "a", document_mask=True)
    tokens, _, _, masks = batch(masked, range(6))
    assert masks is not None and masks.shape == (6, 1, 8, 8)
    seen_boundary = False
    for toks, mask in zip(tokens, masks[:, 0]):
        doc = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), (toks[:-1] == EOD).long()]), 0)
        for q in range(8):
            for k in range(8):
                allowed = k <= q and doc[k] == doc[q]  # same document, not in the future
                assert bool(mask[q, k]) == (not allowed), (toks.tolist(), q, k)
        seen_boundary |= bool((doc != doc[0]).any())
    assert seen_boundary  # the samples did pack several documents
    # without document masking: the same tokens, one shared causal mask
    plain = build_blended_dataset(**kw, cache_dir=tmp_path / "b")
    plain_tokens, _, _, plain_masks = batch(plain, range(6))
    assert plain_masks is None and torch.equal(plain_tokens, tokens)
