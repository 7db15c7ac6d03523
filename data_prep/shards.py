"""Writing one split's shards crash-safely: temp names while writing, renamed only at commit.

Layout for output prefix P (a path like `data/wiki`):

    P.train.00000.bin / .idx        tokens, MMIDIDX (see mmidx.py)
    P.train.00000.mask.bin / .idx   chat only: the loss mask, uint8, one byte per token
    P.val.00000.bin / .idx          ...
    P.manifest.json                 written last: its presence means the whole set is complete

Each file is written as `.tmp-<name>.<pid>` next to its final place. Nothing gets a final name
until every shard of every split is complete; then the shards are renamed and the manifest
is written (atomically) last. A run killed before that leaves only `.tmp-*` files, which the
next run with the same prefix deletes.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import fsync_dir, owned, pid_alive
from .mmidx import index_bytes


def shard_name(prefix: Path, split: str, k: int, mask: bool = False) -> str:
    return f"{prefix.name}.{split}.{k:05d}{'.mask' if mask else ''}"


def _our_files(prefix: Path) -> re.Pattern:
    # Exactly the names this prefix produces (final or temp), so that cleaning up can never
    # touch another prefix's files (e.g. `wiki` must not match `wiki.v2.train...`).
    name = re.escape(prefix.name)
    return re.compile(
        rf"^(\.tmp-)?{name}\.(train|val)\.\d{{5}}(\.mask)?\.(bin|idx)(\.(\d+))?$"
        rf"|^\.tmp-{name}\.manifest\.json\.(\d+)$"
    )


def clean_stale(prefix: Path) -> int:
    """Delete temp files a killed run left for this prefix; refuse if their writer still runs."""
    pattern, removed = _our_files(prefix), 0
    if not prefix.parent.is_dir():
        return 0
    for p in prefix.parent.iterdir():
        m = pattern.match(p.name)
        if not m or not p.name.startswith(".tmp-"):
            continue
        pid = int(m.group(6) or m.group(7) or os.getpid())
        if pid != os.getpid() and pid_alive(pid):
            raise UserError(
                f"{p}: another run (pid {pid}) is writing --output-prefix {prefix}; "
                "wait for it or pick another prefix (if no such run exists, "
                "delete that prefix's .tmp-* files)"
            )
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def final_files(prefix: Path) -> list[Path]:
    """Shard files with final names for this prefix (a previous complete run, or an orphan)."""
    pattern = _our_files(prefix)
    if not prefix.parent.is_dir():
        return []
    return sorted(p for p in prefix.parent.iterdir() if pattern.match(p.name) and not p.name.startswith(".tmp-"))


@dataclass
class _File:
    """One .bin being written: its temp path, final path and running sha256."""

    final: Path
    tmp: Path = field(init=False)
    hash: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    nbytes: int = 0

    def __post_init__(self):
        self.tmp = self.final.with_name(f".tmp-{self.final.name}.{os.getpid()}")
        self.f = open(self.tmp, "wb")

    def write(self, arr: np.ndarray) -> None:
        b = memoryview(np.ascontiguousarray(arr)).cast("B")
        self.f.write(b)
        self.hash.update(b)
        self.nbytes += len(b)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _write_tmp(final: Path, data: bytes) -> tuple[Path, str]:
    tmp = final.with_name(f".tmp-{final.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp, hashlib.sha256(data).hexdigest()


class SplitWriter:
    """Appends documents to one split's shards, starting a new shard every `shard_tokens`.

    A document is never cut: a shard is closed once it holds >= shard_tokens tokens, so shards
    can overshoot by one document. Call `close()` at the end, then `commit()` on the result.
    """

    def __init__(self, prefix: Path, split: str, dtype: np.dtype, shard_tokens: int, with_mask: bool = False):
        self.prefix, self.split, self.dtype = prefix, split, np.dtype(dtype).newbyteorder("<")
        self.shard_tokens, self.with_mask = shard_tokens, with_mask
        self.records: list[dict] = []  # one per finished shard, for the manifest
        self.pending: list[tuple[Path, Path]] = []  # (tmp, final) to rename at commit
        self._open = None

    def _start(self) -> None:
        k = len(self.records)
        base = self.prefix.parent / shard_name(self.prefix, self.split, k)
        self._open = {"bin": _File(base.with_name(base.name + ".bin")), "sizes": [], "tokens": 0}
        if self.with_mask:
            mbase = self.prefix.parent / shard_name(self.prefix, self.split, k, mask=True)
            self._open["mask"] = _File(mbase.with_name(mbase.name + ".bin"))

    def _finish(self) -> None:
        o, self._open = self._open, None
        sizes = np.concatenate(o["sizes"]) if o["sizes"] else np.zeros(0, np.int64)
        rec = {"split": self.split, "documents": int(len(sizes)), "tokens": int(o["tokens"])}
        for kind, dtype in (("bin", self.dtype), ("mask", np.dtype(np.uint8))):
            if kind not in o:
                continue
            f: _File = o[kind]
            f.close()
            idx_final = f.final.with_name(f.final.name[: -len(".bin")] + ".idx")
            idx_tmp, idx_sha = _write_tmp(idx_final, index_bytes(sizes, dtype))
            self.pending += [(f.tmp, f.final), (idx_tmp, idx_final)]
            key = "tokens_file" if kind == "bin" else "mask_file"
            rec[key] = {
                "bin": f.final.name,
                "bin_bytes": f.nbytes,
                "bin_sha256": f.hash.hexdigest(),
                "idx": idx_final.name,
                "idx_bytes": idx_tmp.stat().st_size,
                "idx_sha256": idx_sha,
            }
        self.records.append(rec)

    def add(self, tokens: np.ndarray, sizes: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append documents: `tokens` is their concatenation, `sizes` their lengths."""
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id {int(tokens.max())} does not fit {self.dtype}")
        tokens = tokens.astype(self.dtype, copy=False)
        sizes = np.asarray(sizes, dtype=np.int64)
        ends = np.cumsum(sizes)
        doc0 = 0
        while doc0 < len(sizes):
            if self._open is None:
                self._start()
            o = self._open
            start = int(ends[doc0 - 1]) if doc0 else 0
            room = self.shard_tokens - o["tokens"]
            # First document whose end reaches the shard's budget closes the shard.
            doc1 = int(np.searchsorted(ends, start + room, side="left")) + 1
            doc1 = min(doc1, len(sizes))
            stop = int(ends[doc1 - 1])
            o["bin"].write(tokens[start:stop])
            if mask is not None:
                o["mask"].write(mask[start:stop].astype(np.uint8, copy=False))
            o["sizes"].append(sizes[doc0:doc1])
            o["tokens"] += stop - start
            doc0 = doc1
            if o["tokens"] >= self.shard_tokens:
                self._finish()

    def close(self) -> list[dict]:
        if self._open is not None and self._open["tokens"] + sum(map(len, self._open["sizes"])):
            self._finish()
        elif self._open is not None:
            for kind in ("bin", "mask"):
                if kind in self._open:
                    self._open[kind].close()
                    self._open[kind].tmp.unlink()
            self._open = None
        return self.records

    def abort(self) -> None:
        """Remove everything this writer created (used when the run fails with an error)."""
        if self._open is not None:
            for kind in ("bin", "mask"):
                if kind in self._open:
                    self._open[kind].f.close()
                    self._open[kind].tmp.unlink(missing_ok=True)
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)


def commit(prefix: Path, writers: list[SplitWriter]) -> None:
    """Give every finished shard its final name (old outputs of this prefix are removed first)."""
    manifest = prefix.with_name(prefix.name + ".manifest.json")
    # The old manifest goes first, so that at no moment does a manifest describe mixed shards.
    manifest.unlink(missing_ok=True)
    for old in final_files(prefix):
        old.unlink()
    for w in writers:
        for tmp, final in w.pending:
            os.replace(tmp, final)
    fsync_dir(prefix.parent)


def val_mask(first: int, n: int, seed: int, fraction: float) -> np.ndarray:
    """Which of documents first..first+n-1 go to the val split.

    Each document is decided on its own by a hash of (seed, document number): the split is
    the same whatever the batching or --workers, needs no document count up front and no
    memory. The cost: the val share is --val-fraction on average, not exactly.
    """
    if fraction <= 0:
        return np.zeros(n, dtype=bool)
    mix = (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    x = np.arange(first, first + n, dtype=np.uint64) * np.uint64(0xBF58476D1CE4E5B9) + np.uint64(mix)
    # splitmix64's finalizer: every input bit affects every output bit.
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def check_prefix(text: str) -> Path:
    """--output-prefix names files (data/wiki -> data/wiki.train.00000.bin), not a folder."""
    prefix = Path(text)
    if prefix.name in ("", ".", "..") or prefix.is_dir() or str(text).endswith(("/", os.sep)):
        raise UserError(
            f"--output-prefix {text}: names files, not a directory (e.g. data/wiki gives data/wiki.train.00000.bin ...)"
        )
    return prefix


class OutputSet:
    """The train and val writers of one run, plus the checks before and the commit after.

    Use as a context manager: if the block raises (a bad input, Ctrl-C), every temp file is
    removed and nothing of this run remains. The run owns its prefix from here until the block
    ends, manifest included (data_prep.files.owned): a second run on the same prefix is refused
    at once, naming this one's pid, instead of mixing its shards with this one's.
    """

    def __init__(
        self, prefix: str | Path, dtype: np.dtype, shard_tokens: int, with_mask: bool = False, force: bool = False
    ):
        prefix = check_prefix(str(prefix))
        if shard_tokens <= 0:
            raise UserError(f"--shard-tokens {shard_tokens}: must be positive")
        manifest = prefix.with_name(prefix.name + ".manifest.json")

        def refuse_existing():
            if manifest.exists() and not force:
                raise UserError(f"--output-prefix {prefix}: {manifest} already exists (pass --force to replace it)")

        refuse_existing()
        # Owning the prefix creates its folder; a refused or failed run removes what it created.
        self._owner = owned(prefix, "--output-prefix")
        self._owner.__enter__()
        try:
            refuse_existing()  # again, now that it is ours: a run may have finished in between
            clean_stale(prefix)
        except BaseException:
            self._owner.__exit__(None, None, None)
            raise
        self.prefix = prefix
        self.writers = {s: SplitWriter(prefix, s, dtype, shard_tokens, with_mask) for s in ("train", "val")}

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                for w in self.writers.values():
                    w.abort()
        finally:
            self._owner.__exit__(None, None, None)

    def finish(self) -> list[dict]:
        """Close every shard and give them final names; returns the shard records."""
        records = []
        for w in self.writers.values():
            records += w.close()
        commit(self.prefix, list(self.writers.values()))
        return records
