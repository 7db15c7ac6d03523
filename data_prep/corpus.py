"""Finding the input documents and reading them, in a fixed order, through `datasets`.

Inputs are streamed (`streaming=True`): nothing is converted into a datasets cache, so a
100 GB corpus costs no extra disk and starts at once. The cost: the number of documents is not
known up front, so the progress bar counts instead of showing a percentage.

When `datasets` fails on a file, we re-read that file in plain Python to find the exact line
at fault: the error path is slow, the normal path is not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .files import read_jsonl, refuse_repeated_inputs

SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
KNOWN = ".txt, .jsonl, .json, .parquet or a directory saved with datasets' save_to_disk"
# Many small .txt files are read through one `load_dataset` call: each call costs ~10 ms.
TXT_GROUP = 512


@dataclass
class Source:
    kind: str  # "text" | "json" | "parquet" | "arrow"
    paths: list[Path]  # several only for a group of .txt files


def _is_saved_dataset(d: Path) -> bool:
    return (d / "dataset_dict.json").is_file() or ((d / "state.json").is_file() and (d / "dataset_info.json").is_file())


def _walk(d: Path) -> Iterator[Path]:
    """Files and saved datasets under d, sorted, hidden names skipped."""
    for p in sorted(d.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if _is_saved_dataset(p):
                yield p
            else:
                yield from _walk(p)
        else:
            yield p


def find_sources(inputs: list[str]) -> list[Source]:
    """Expand the input arguments into an ordered list of sources (the document order)."""
    items: list[Path] = []
    given: list[tuple[str, Path]] = []
    for arg in inputs:
        p = Path(arg)
        if not p.exists():
            raise UserError(f"input {p}: no such file or directory")
        found = list(_walk(p)) if p.is_dir() and not _is_saved_dataset(p) else [p]
        items.extend(found)
        given += [(str(arg), f) for f in found]
    refuse_repeated_inputs(given)
    sources: list[Source] = []
    for p in items:
        if p.is_dir():
            sources.append(Source("arrow", [p]))
            continue
        kind = SUFFIXES.get(p.suffix.lower())
        if kind is None:
            raise UserError(f"input {p}: unknown extension {p.suffix!r} (expected {KNOWN})")
        if kind == "text" and sources and sources[-1].kind == "text" and len(sources[-1].paths) < TXT_GROUP:
            sources[-1].paths.append(p)
        else:
            sources.append(Source(kind, [p]))
    return sources


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    # Its own error logs would print before our one-line error: we re-read a failing file and name
    # the line ourselves, so nothing of datasets' logging is for the user.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def _diagnose_json(path: Path, key: str, err: Exception | None) -> UserError:
    """Find the first record at fault in a .json/.jsonl file that datasets could not use."""
    if not path.read_bytes().strip():
        return UserError(f"{path}: empty file: no documents to read")
    try:
        whole = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        whole = None
    if isinstance(whole, list):  # a .json array: records have indices, not lines
        for i, rec in enumerate(whole):
            if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
                return UserError(f"{path}: record {i}: no string field {key!r} (set --text-key)")
    else:
        records = [(1, whole)] if isinstance(whole, dict) else read_jsonl(path)
        for lineno, rec in records:
            if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
                return UserError(f"{path}:{lineno}: no string field {key!r} (set --text-key)")
    return UserError(f"{path}: could not be read as JSON ({type(err).__name__}: {err})")


def _diagnose_text(paths: list[Path], err: Exception) -> UserError:
    for p in paths:
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            return UserError(f"{p}: not valid UTF-8 text (byte {e.start}: {e.reason})")
    return UserError(f"{paths[0]}: could not be read ({type(err).__name__}: {err})")


def _open(src: Source, key: str):
    datasets = _quiet_datasets()
    path = src.paths[0]
    if src.kind == "arrow":
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"input {path}: cannot load the saved dataset ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if len(ds) != 1:
                raise UserError(
                    f"input {path}: a DatasetDict with splits {sorted(ds)}; "
                    f"pass one split's directory, e.g. {path / sorted(ds)[0]}"
                )
            ds = next(iter(ds.values()))
    else:
        files = [str(p) for p in src.paths]
        kwargs = {"sample_by": "document"} if src.kind == "text" else {}
        ds = datasets.load_dataset(src.kind, data_files=files, split="train", streaming=True, **kwargs)
    cols = ds.column_names
    if cols is not None and key not in cols:
        if src.kind == "json":
            raise _diagnose_json(path, key, None)
        raise UserError(f"input {path}: no column {key!r} (columns: {', '.join(cols)}; set --text-key)")
    return ds.select_columns([key]) if cols is not None and len(cols) > 1 else ds


def iter_text_batches(sources: list[Source], key: str, batch_docs: int) -> Iterator[list[str]]:
    """Batches of document texts, in source order. Every yielded text is a str."""
    for src in sources:
        text_key = "text" if src.kind == "text" else key
        try:
            ds = _open(src, text_key)
            row = 0
            for batch in ds.iter(batch_size=batch_docs):
                if text_key not in batch:
                    raise KeyError(text_key)
                texts = batch[text_key]
                if not all(type(t) is str for t in texts):
                    bad = next(i for i, t in enumerate(texts) if type(t) is not str)
                    raise _BadValue(row + bad, texts[bad])
                row += len(texts)
                yield texts
        except UserError:
            raise
        except _BadValue as e:
            if src.kind == "json":
                raise _diagnose_json(src.paths[0], key, e) from None
            raise UserError(
                f"input {src.paths[0]}: row {e.row}: {key!r} is {type(e.value).__name__}, not text"
            ) from None
        except Exception as e:  # noqa: BLE001 - datasets/pyarrow wrap parse errors many ways
            if src.kind == "text":
                raise _diagnose_text(src.paths, e) from None
            if src.kind == "json":
                raise _diagnose_json(src.paths[0], key, e) from None
            raise UserError(f"input {src.paths[0]}: cannot be read ({type(e).__name__}: {e})") from None


class _BadValue(Exception):
    def __init__(self, row: int, value):
        super().__init__(row)
        self.row, self.value = row, value
