"""Training windows straight out of memory-mapped shards: what the trainer reads.

A split's shards (in manifest order) form one token stream. Window w is the S+1 tokens
starting at w*S, so neighbours share one token and every token but the first is a prediction
target exactly once per epoch. Windows cross document (and shard) boundaries: documents are
separated by their EOD token, the usual pretraining packing, which wastes no padding.

Sample g (a global counter over the whole run) is window perm_e[g % n] of epoch e = g // n,
where perm_e is a permutation seeded by (seed, e). So a sample is a pure function of
(seed, g): resuming is just starting the counter at the right g, and data-parallel ranks
take disjoint slices of the same stream without talking to each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError
from .manifest import SPLITS, dtype_of, load_manifest, shard_paths
from .mmidx import read_index


def _map(bin_path: Path, dtype: np.dtype, nbytes: int) -> np.ndarray:
    # np.memmap refuses empty files; an empty shard is legal (e.g. only empty documents).
    if nbytes == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(bin_path, dtype=dtype, mode="r")


class TokenWindows:
    """Fixed-length windows of a manifest's split, shuffled per epoch by seed.

    ds = TokenWindows("data/wiki.manifest.json", split="train", seq_len=2048, seed=0)
    tokens, mask = ds.sample(g)        # int64 [S+1], uint8 [S+1] (chat) or None (raw)
    for tokens, mask in micro_batches(ds, 4, dp_rank, dp_size, start_sample=consumed): ...

    mask[i] == 1 means token i was written by the assistant: the loss on predicting token i
    (from position i-1) counts.
    """

    def __init__(
        self, manifest_path: str | Path, split: str = "train", seq_len: int = 2048, seed: int = 0, verify: str = "size"
    ):
        if split not in SPLITS:
            raise UserError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        if verify not in ("size", "sha256"):
            raise UserError(f"verify {verify!r}: expected 'size' or 'sha256'")
        if seq_len < 1:
            raise UserError(f"seq_len {seq_len}: must be >= 1")
        self.path = Path(manifest_path)
        self._manifest = load_manifest(self.path)
        self.split, self.seq_len, self.seed, self.verify = split, seq_len, seed, verify
        self._open()
        self._perms: dict[int, np.ndarray] = {}

    # -- opening -------------------------------------------------------------------------
    def _open(self) -> None:
        m = self._manifest
        dtype = dtype_of(m)
        records = [r for r in m["shards"] if r["split"] == self.split]
        self._has_mask = bool(records) and all("mask_file" in r for r in records)
        self._tokens, self._masks, starts = [], [], [0]
        for r in records:
            tok_bin, tok_idx = shard_paths(self.path, r, "tokens_file", self.verify)
            sizes = self._check_index(tok_idx, dtype, r)
            self._tokens.append(_map(tok_bin, dtype, r["tokens_file"]["bin_bytes"]))
            if self._has_mask:
                m_bin, m_idx = shard_paths(self.path, r, "mask_file", self.verify)
                m_sizes = self._check_index(m_idx, np.dtype(np.uint8), r)
                if not np.array_equal(sizes, m_sizes):
                    raise UserError(f"shard {m_idx}: its documents do not line up with {tok_idx}")
                self._masks.append(_map(m_bin, np.uint8, r["mask_file"]["bin_bytes"]))
            starts.append(starts[-1] + r["tokens"])
        self._starts = np.array(starts, dtype=np.int64)
        self.num_tokens = int(self._starts[-1])
        self._n = (self.num_tokens - 1) // self.seq_len if self.num_tokens else 0
        if self._n < 1:
            raise UserError(
                f"manifest {self.path}: split {self.split!r} has {self.num_tokens} "
                f"tokens, too few for one window of seq_len {self.seq_len} + 1"
            )

    @staticmethod
    def _check_index(idx: Path, dtype: np.dtype, record: dict) -> np.ndarray:
        index = read_index(idx)
        if index.dtype != dtype:
            raise UserError(f"shard {idx}: dtype {index.dtype}, its manifest says {dtype}")
        if index.num_tokens != record["tokens"] or len(index.sizes) != record["documents"]:
            raise UserError(
                f"shard {idx}: {len(index.sizes)} documents / {index.num_tokens} "
                f"tokens, its manifest says {record['documents']} / {record['tokens']}"
            )
        return index.sizes

    # Memory maps must not be pickled (that would copy the corpus into each DataLoader
    # worker); a worker reopens the files instead.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokens"] = state["_masks"] = None
        state["_perms"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    # -- what the trainer uses -------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def vocab_size(self) -> int:
        return int(self._manifest["vocab_size"])

    @property
    def has_mask(self) -> bool:
        return self._has_mask

    def __len__(self) -> int:
        return self._n

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a round can straddle two epochs; older ones are done
                self._perms.pop(min(self._perms))
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perms[epoch] = rng.permutation(self._n)
        return self._perms[epoch]

    def _slice(self, arrays: list[np.ndarray], lo: int, hi: int) -> np.ndarray:
        k = int(np.searchsorted(self._starts, lo, side="right")) - 1
        parts = []
        while lo < hi:
            s0, s1 = int(self._starts[k]), int(self._starts[k + 1])
            take = min(hi, s1)
            if take > lo:
                parts.append(arrays[k][lo - s0 : take - s0])
            lo, k = take, k + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Window w in stream order (no shuffle): tokens int64 [S+1], mask uint8 [S+1] or None."""
        lo = w * self.seq_len
        hi = lo + self.seq_len + 1
        tokens = self._slice(self._tokens, lo, hi).astype(np.int64)
        mask = self._slice(self._masks, lo, hi).astype(np.uint8) if self._has_mask else None
        return tokens, mask

    def sample(self, g: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Global sample g: window perm_{g // len}[g % len]."""
        if g < 0:
            raise ValueError(f"sample index {g}: must be >= 0")
        epoch, j = divmod(int(g), self._n)
        return self.window(int(self._perm(epoch)[j]))


MIX_BLOCK = 1000  # samples per interleave pattern; any weight precision finer than 1/1000 is rounded


class Mixture:
    """Deterministic weighted interleave of several TokenWindows, addressable by global index.

    Sample g of the mixture is a pure function of (seed, g), like a single TokenWindows', so
    resuming and data parallelism work the same way on a mix as on one manifest.
    """

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


def open_mixture(sources: list[tuple[str, float]], seq_len: int, seed: int, verify: str = "size") -> Mixture:
    """[(manifest, weight), ...] -> one Mixture (source i shuffled with seed + i)."""
    windows = [
        TokenWindows(path, split="train", seq_len=seq_len, seed=seed + i, verify=verify)
        for i, (path, _) in enumerate(sources)
    ]
    return Mixture(windows, [w for _, w in sources], seed)


def micro_batches(
    source, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, start_sample: int = 0
) -> Iterator[tuple]:
    """Endless (tokens [m, S+1] int64, mask [m, S+1] uint8 or None) torch tensors of one
    data-parallel rank, from a TokenWindows or a Mixture. The one batcher: training, the
    reference loop and the benchmarks all read their data through it.

    The sample stream start_sample, start_sample+1, ... is cut into rounds of m * dp_size;
    rank r takes samples [r*m, (r+1)*m) of each round. So step k of a run with global batch G
    sees samples [k*G, (k+1)*G) whatever the data-parallel size.
    """
    import torch

    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size or start_sample < 0:
        raise ValueError(
            f"micro_batches({micro_batch_size}, dp_rank={dp_rank}, "
            f"dp_size={dp_size}, start_sample={start_sample}): invalid"
        )
    m = micro_batch_size
    base = start_sample + dp_rank * m
    while True:
        got = [source.sample(base + k) for k in range(m)]
        tokens = torch.from_numpy(np.stack([t for t, _ in got]).astype(np.int64))
        mask = torch.from_numpy(np.stack([x for _, x in got])) if source.has_mask else None
        yield tokens, mask
        base += m * dp_size
