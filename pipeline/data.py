"""From data-prep manifests to the (input_ids, labels) micro-batches the pipeline engine eats.

Sample g of the job is fixed by the seed alone, so step k always sees global samples
[k*G, (k+1)*G) whatever the data-parallel size, and resuming at step k is just starting there.
"""
from __future__ import annotations

import numpy as np
import torch

from data_prep.reader import TokenWindows

from .model import IGNORE_INDEX

MIX_BLOCK = 1000  # samples per interleave pattern; any weight precision finer than 1/1000 is rounded


class Mixture:
    """Deterministic weighted interleave of several TokenWindows, addressable by global index."""

    def __init__(self, sources: list[TokenWindows], weights: list[float], seed: int):
        self.sources = sources
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        counts = np.floor(w * MIX_BLOCK).astype(np.int64)
        # Largest remainder: the block holds exactly MIX_BLOCK samples, each source >= 1.
        for k in np.argsort(-(w * MIX_BLOCK - counts), kind="stable")[: MIX_BLOCK - counts.sum()]:
            counts[k] += 1
        pattern = np.repeat(np.arange(len(sources)), counts)
        np.random.default_rng(seed).shuffle(pattern)
        self.counts = counts
        self.pattern = pattern
        # rank of each position among the positions of the same source
        self.rank_in_source = np.zeros(MIX_BLOCK, dtype=np.int64)
        for k in range(len(sources)):
            idx = np.nonzero(pattern == k)[0]
            self.rank_in_source[idx] = np.arange(len(idx))
        self.has_mask = any(s.has_mask for s in sources)

    def sample(self, g: int):
        if len(self.sources) == 1:
            tokens, mask = self.sources[0].sample(g)
        else:
            block, pos = divmod(g, MIX_BLOCK)
            k = self.pattern[pos]
            tokens, mask = self.sources[k].sample(int(block * self.counts[k] + self.rank_in_source[pos]))
        if mask is None and self.has_mask:
            mask = np.ones_like(tokens, dtype=np.uint8)  # raw text mixed with chat: every token counts
        return tokens, mask


def to_inputs_labels(tokens: torch.Tensor, mask: torch.Tensor | None):
    """[m, S+1] windows -> inputs [m, S] and next-token labels [m, S] (IGNORE_INDEX where unmasked)."""
    inputs = tokens[:, :-1].contiguous()
    labels = tokens[:, 1:].clone()
    if mask is not None:
        labels[mask[:, 1:] == 0] = IGNORE_INDEX
    return inputs, labels


def micro_batches(data: Mixture, micro: int, dp_rank: int, dp_size: int, start_sample: int):
    """Infinite (inputs, labels) stream of this data-parallel rank, starting at a global sample.

    Rounds of micro*dp_size consecutive samples; rank r takes [r*micro, (r+1)*micro) of each.
    """
    g = start_sample
    while True:
        idx = range(g + dp_rank * micro, g + (dp_rank + 1) * micro)
        pairs = [data.sample(i) for i in idx]
        tokens = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.int64))
        mask = torch.from_numpy(np.stack([p[1] for p in pairs])) if data.has_mask else None
        yield to_inputs_labels(tokens, mask)
        g += micro * dp_size


def open_data(sources: list[tuple[str, float]], seq_len: int, seed: int, verify: str = "size") -> Mixture:
    """verify="sha256" re-hashes every shard against its manifest (catches a same-size corruption,
    costs one read of the corpus); "size" only compares file sizes (catches truncation)."""
    windows = [TokenWindows(path, split="train", seq_len=seq_len, seed=seed + i, verify=verify)
               for i, (path, _) in enumerate(sources)]
    return Mixture(windows, [w for _, w in sources], seed)
