"""What every benchmark needs beside its models (bench.kit): random token shards written through
data_prep's own writer, and the statistics of repeated timings.

Random weights and random tokens cost the same FLOPs as real ones, so speed figures need no
download; loss values from these runs mean nothing and are never reported.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from data_prep.errors import UserError


def write_random_shards(
    prefix: Path, vocab: int, tokens: int, tokenizer: Path, seed: int = 0, chat: bool = False
) -> Path:
    """Random-token documents as a data-prep shard set (train + a small val split); returns the manifest.

    `chat=True` adds a loss mask in which roughly half of each document (its second half, as an
    assistant reply would be) counts, so a chat phase computes the same loss as on real chat shards.
    Goes through data_prep.shards/manifest, so the trainer reads exactly what `data_prep` writes.
    The manifest records `tokenizer`'s identity (the model directory's own), as data_prep would, so
    the trainer's data checks pass; the ids themselves are random over the model's whole vocabulary.
    """
    from data_prep.manifest import totals, write_manifest
    from data_prep.mmidx import token_dtype
    from data_prep.shards import OutputSet
    from data_prep.tokenizer import tokenizer_identity

    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab)
    sizes = rng.integers(200, 1200, size=max(2, tokens // 700 + 2))  # >= 2 documents: one goes to val
    while sizes.sum() < tokens:
        sizes = np.append(sizes, rng.integers(200, 1200))
    ids = rng.integers(1, vocab, size=int(sizes.sum()), dtype=np.int64)
    with OutputSet(prefix, dtype, shard_tokens=1 << 24, with_mask=chat, force=True) as out:
        val = max(1, len(sizes) // 50)
        ends = np.cumsum(sizes)
        split_at = int(ends[-val - 1])
        mask = None
        if chat:
            mask = np.zeros(len(ids), dtype=np.uint8)
            for s, e in zip(np.concatenate([[0], ends[:-1]]), ends):
                mask[(s + e) // 2 : e] = 1
        out.writers["train"].add(ids[:split_at], sizes[:-val], None if mask is None else mask[:split_at])
        out.writers["val"].add(ids[split_at:], sizes[-val:], None if mask is None else mask[split_at:])
        records = out.finish()
    body = {
        "kind": "chat" if chat else "raw",
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab,
        "eod_token_id": None,
        "tokenizer": tokenizer_identity(tokenizer),
        "command": "bench.synth.write_random_shards",
    }
    return write_manifest(Path(prefix), {**body, "totals": totals(records), "shards": records})


def median_spread(xs: list[float]) -> tuple[float, float]:
    """Median and half-range (max - min) / 2 of repeated measurements."""
    if not xs:
        raise UserError("no measurements to summarise")
    return statistics.median(xs), (max(xs) - min(xs)) / 2


def figure(
    name: str,
    value: float,
    baseline: float,
    goal: str,
    met: bool | None,
    unit: str = "",
    spread: float | None = None,
    notes: str = "",
    **extra,
) -> dict:
    """One row of latest.json; ratio is always value / baseline, so a reader can recompute it."""
    ratio = value / baseline if baseline else None
    row = {
        "name": name,
        "value": value,
        "baseline": baseline,
        "ratio": None if ratio is None else round(ratio, 4),
        "goal": goal,
        "met": met,
        "unit": unit,
    }
    if spread is not None:
        row["spread"] = round(spread, 4)
    if notes:
        row["notes"] = notes
    row.update(extra)
    return row
