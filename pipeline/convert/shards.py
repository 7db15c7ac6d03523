"""Model weights out: a standard Hugging Face safetensors directory, written as the tensors stream by.

`ShardWriter` holds tensors until they reach `max_shard_bytes`, then writes one shard and lets
them go, so peak memory is about one shard (plus one layer when layers are larger than shards)
whatever the model size. A smaller shard size lowers that peak and costs only more files
(loaders don't care); the 2GB default keeps a 70B merge under ~4-5 GB of RAM.

Every tensor written is reported with the sha256 of its bytes and where it came from, so
export.json / transplant.json / chat_vector.json can say exactly what is inside.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import torch

from data_prep.errors import UserError

from ..hf import INDEX_FILE

DEFAULT_SHARD_SIZE = "2GB"
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'2GB', '500MB', '64MiB' or a byte count -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"{flag} {text!r}: expected a size such as 2GB, 500MB or 64MiB")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    if n <= 0:
        raise UserError(f"{flag} {text!r}: must be positive")
    return n


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, without a copy when it is already contiguous."""
    t = t.detach().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, items: list[tuple[str, torch.Tensor]]) -> tuple[str, list[str]]:
    """Write one safetensors file straight from the tensors' memory (no serialised copy).

    Returns the file's sha256 and each tensor's sha256 (same order as `items`).
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in items:
        if t.dtype not in _ST_DTYPES:
            raise UserError(f"tensor {name!r}: dtype {t.dtype} has no safetensors equivalent")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header with spaces to 8-byte alignment
    file_hash, sums = hashlib.sha256(), []
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            f.write(chunk)
            file_hash.update(chunk)
        for _, t in items:
            data = tensor_bytes(t)
            f.write(data)
            file_hash.update(data)
            sums.append(hashlib.sha256(data).hexdigest())
    return file_hash.hexdigest(), sums


class ShardWriter:
    """Collects whole layers into shards of at most `max_bytes` and writes each shard as soon as
    the next layer would not fit. A layer larger than `max_bytes` is split by tensor; a tensor
    larger than that gets a shard of its own (as with HF's save_pretrained)."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = Path(out_dir), max_bytes
        self.pending: list[tuple[str, torch.Tensor, dict]] = []
        self.pending_bytes = 0
        self.shards: list[str] = []
        self.file_sha: dict[str, str] = {}
        self.entries: list[dict] = []
        self.total_bytes = 0

    def add_layer(self, items: list[tuple[str, torch.Tensor, dict]]) -> None:
        """Add one layer's tensors, starting a new shard first if the layer would not fit.

        Keeping a layer inside one shard matters for memory: tensors loaded from one mmapped
        layer file share its mapping, and pages already read (for writing) stay resident until
        the last tensor of that file is let go. A layer straddling two shards would keep its
        first half resident through the whole next shard.
        """
        n = sum(t.numel() * t.element_size() for _, t, _ in items)
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self.flush()
        for name, t, origin in items:
            self.add(name, t, origin)

    def add(self, name: str, t: torch.Tensor, origin: dict) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self.flush()
        self.pending.append((name, t, origin))
        self.pending_bytes += n
        self.total_bytes += n

    def flush(self) -> None:
        if not self.pending:
            return
        fname = f".shard-{len(self.shards):05d}.safetensors"  # final name known only at the end
        file_sha, sums = write_safetensors(self.out_dir / fname, [(n, t) for n, t, _ in self.pending])
        self.shards.append(fname)
        self.file_sha[fname] = file_sha
        for (name, t, origin), sha in zip(self.pending, sums):
            self.entries.append(
                {
                    "name": name,
                    "file": fname,
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "shape": list(t.shape),
                    "sha256": sha,
                    "source": origin,
                }
            )
        self.pending, self.pending_bytes = [], 0

    def close(self) -> dict:
        """Write the last shard, give shards their final names (+ index if several). Returns
        {"files": {file: sha256}, "tensors": [entry, ...]}."""
        self.flush()
        n = len(self.shards)
        final = {
            s: ("model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors")
            for k, s in enumerate(self.shards)
        }
        for s, f in final.items():
            (self.out_dir / s).rename(self.out_dir / f)
        for e in self.entries:
            e["file"] = final[e["file"]]
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {e["name"]: e["file"] for e in self.entries},
            }
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return {"files": {final[s]: h for s, h in self.file_sha.items()}, "tensors": self.entries}


def stream_layers(
    plan: list[tuple[int, object]], writer: ShardWriter, expected: dict[str, tuple], desc: str, dtype=None
) -> None:
    """Write layer i of each (i, source) in `plan`, checking every name and shape against `expected`
    and casting to `dtype` when given (the record then says what the tensor was cast from).

    Each layer is dropped as soon as its tensors are handed to the writer, which drops them when
    their shard is written: memory holds one shard, plus one layer at most.
    """
    from tqdm import tqdm

    seen = set()
    for i, src in tqdm(plan, desc=desc, unit="layer"):
        tensors, items = src.layer(i), []
        for name in sorted(tensors):
            t, origin = tensors[name]
            if name not in expected:
                raise UserError(
                    f"{origin['path']}/{origin['file']}: tensor {name!r} is not part of a "
                    f"{(src.config.get('architectures') or ['?'])[0]} model with this config.json"
                )
            if tuple(t.shape) != expected[name]:
                raise UserError(
                    f"{origin['path']}/{origin['file']}: {name} has shape {tuple(t.shape)}, "
                    f"config.json implies {expected[name]}"
                )
            if dtype is not None and t.dtype != dtype and t.is_floating_point():
                origin = {**origin, "cast_from": str(t.dtype).removeprefix("torch.")}
                t = t.to(dtype)
            items.append((name, t, origin))
            seen.add(name)
        writer.add_layer(items)
        del tensors, items
    missing = sorted(set(expected) - seen)
    if missing:
        raise UserError(f"the inputs lack {len(missing)} tensor(s) the model needs, e.g. {missing[0]!r}")
