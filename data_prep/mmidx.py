"""The Megatron MMIDIDX shard format: a flat `.bin` of tokens plus an `.idx` describing it.

We write exactly the layout Megatron-LM (`megatron/core/datasets/indexed_dataset.py`) and
GPT-NeoX read, so our shards can be fed to either without conversion:

    .idx = magic  b"MMIDIDX\\x00\\x00"          9 bytes
           version                             u64 little-endian, = 1
           dtype code                          u8  (Megatron's codes, see DTYPE_CODES)
           sequence count  n                   u64
           document count  d = n + 1           u64 (doc_idx has a leading 0)
           sizes           int32[n]            tokens per sequence
           pointers        int64[n]            byte offset of each sequence in .bin
           doc_idx         int64[d]            sequence index where each document starts
    .bin = the tokens of every sequence, back to back, in the dtype above

One sequence is one document here, so doc_idx is simply 0..n.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's codes. Only uint8 (masks), uint16 and int32 (tokens) are written here, but the
# reader accepts every code so that it can open shards made by Megatron's own preprocessor.
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count

# uint16 halves the disk and page-cache footprint; the margin below 65,536 leaves room for the
# special tokens some tokenizers add past their base vocab.
UINT16_VOCAB_LIMIT = 65_500


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when the vocab is < 65,500, else int32 (what Megatron's preprocessor picks too)."""
    return np.dtype(np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32)


def index_bytes(sizes: np.ndarray, dtype: np.dtype) -> bytes:
    """The whole .idx file for documents of the given lengths (in tokens) stored as `dtype`."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n = len(sizes)
    if n and sizes.max() > np.iinfo(np.int32).max:
        raise ValueError("a document longer than 2^31 tokens cannot be described by MMIDIDX")
    pointers = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(sizes[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
    doc_idx = np.arange(n + 1, dtype=np.int64)
    header = _HEADER.pack(MAGIC, VERSION, CODE_OF[np.dtype(dtype)], n, n + 1)
    return b"".join(
        [header, sizes.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(), doc_idx.astype("<i8").tobytes()]
    )


@dataclass
class Index:
    """A parsed .idx: arrays are zero-copy views of the memory-mapped file."""

    path: Path
    dtype: np.dtype
    sizes: np.ndarray  # int32 [n]
    pointers: np.ndarray  # int64 [n]
    doc_idx: np.ndarray  # int64 [d]

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))


def read_index(path: str | Path) -> Index:
    """Parse and check an .idx; any damage (truncation, wrong magic/version/counts) is a UserError."""
    path = Path(path)
    size = path.stat().st_size
    if size < _HEADER.size:
        raise UserError(f"{path}: truncated index ({size} bytes, the header alone is {_HEADER.size})")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    magic, version, code, n, d = _HEADER.unpack(bytes(buf[: _HEADER.size]))
    if magic != MAGIC:
        raise UserError(f"{path}: not an MMIDIDX index (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise UserError(f"{path}: index version {version}, only version {VERSION} is supported")
    if code not in DTYPE_CODES:
        raise UserError(f"{path}: unknown dtype code {code}")
    expected = _HEADER.size + 4 * n + 8 * n + 8 * d
    if size != expected:
        raise UserError(
            f"{path}: {size} bytes but its header ({n} sequences, {d} document "
            f"entries) implies {expected}: the file is truncated or corrupted"
        )
    off = _HEADER.size
    sizes = np.frombuffer(buf, dtype="<i4", count=n, offset=off)
    pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=off + 4 * n)
    doc_idx = np.frombuffer(buf, dtype="<i8", count=d, offset=off + 12 * n)
    return Index(path, np.dtype(DTYPE_CODES[code]), sizes, pointers, doc_idx)
