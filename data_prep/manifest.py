"""The manifest: the one file that says a shard set is complete and what is in it.

`P.manifest.json` is written last, atomically, after every shard has its final name. Shard
paths in it are relative to the manifest's directory, so the folder can be moved or copied.

    {"format_version": 1, "kind": "raw" | "chat", "dtype": "uint16", "vocab_size": ...,
     "eod_token_id": ..., "tokenizer": {name, path, sha256, files, vocab_size, ...},
     "totals": {"train": {"documents", "tokens", "shards"}, "val": {...}},
     "shards": [{"split", "documents", "tokens",
                 "tokens_file": {"bin", "bin_bytes", "bin_sha256", "idx", "idx_bytes", "idx_sha256"},
                 "mask_file": {...same, chat only...}}, ...],
     "command": "python -m data_prep raw ...", ...}

A chat manifest also records the template its shards were rendered with: `chat_template` (the
text), `chat_template_sha256`, `chat_template_from` (the --chat-template file or the tokenizer)
and `end_of_turn_ids` (data_prep/template.py). Training copies it into run.json, and the
trained model ships it (pipeline/convert/template.py).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import atomic_write_json, sha256_file

FORMAT_VERSION = 1
SPLITS = ("train", "val")


def manifest_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".manifest.json")


def command_line(argv: list[str], subcommand: str) -> str:
    return shlex.join(["python", "-m", "data_prep", subcommand, *argv])


def totals(records: list[dict]) -> dict:
    out = {s: {"documents": 0, "tokens": 0, "shards": 0} for s in SPLITS}
    for r in records:
        t = out[r["split"]]
        t["documents"] += r["documents"]
        t["tokens"] += r["tokens"]
        t["shards"] += 1
    return out


def write_manifest(prefix: Path, body: dict) -> Path:
    path = manifest_path(prefix)
    atomic_write_json(path, {"format_version": FORMAT_VERSION, **body})
    return path


def load_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"manifest {path}: no such file (a shard set without its manifest is "
            "incomplete: rerun `python -m data_prep`)"
        )
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"manifest {path}: not valid JSON ({e})") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"manifest {path}: format_version {m.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    for key in ("dtype", "vocab_size", "shards"):
        if key not in m:
            raise UserError(f"manifest {path}: missing key {key!r}")
    return m


def check_file(path: Path, nbytes: int, sha256: str | None, verify: str) -> None:
    """Size always; checksum too when verify == 'sha256'. A mismatch names the file."""
    if not path.is_file():
        raise UserError(f"shard {path}: missing (listed in its manifest)")
    actual = path.stat().st_size
    if actual != nbytes:
        raise UserError(
            f"shard {path}: {actual} bytes, its manifest says {nbytes}: the file is truncated or was replaced"
        )
    if verify == "sha256" and sha256_file(path) != sha256:
        raise UserError(f"shard {path}: sha256 differs from its manifest: the file is corrupted or was replaced")


def shard_paths(manifest: Path, record: dict, which: str, verify: str) -> tuple[Path, Path]:
    """(bin, idx) of one shard's tokens ('tokens_file') or mask ('mask_file'), checked."""
    f = record[which]
    base = manifest.parent
    b, i = base / f["bin"], base / f["idx"]
    check_file(b, f["bin_bytes"], f["bin_sha256"], verify)
    check_file(i, f["idx_bytes"], f["idx_sha256"], verify)
    return b, i


def dtype_of(m: dict) -> np.dtype:
    return np.dtype(m["dtype"])
