"""`python -m data_prep raw`: raw text corpora -> token shards + manifest.

The work is one loop: read a batch of documents (corpus.py), encode it with the Rust
tokenizer on --workers threads (tokenizer.py), append EOD, route each document to train or val
by a seeded hash (shards.val_mask) and append it to that split's current shard (shards.py).
Documents keep their input order inside each split, which is what makes the output
byte-identical for any --workers: threads only change how fast a batch is encoded.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .corpus import find_sources, iter_text_batches
from .errors import UserError
from .files import check_writable
from .manifest import command_line, totals, write_manifest
from .mmidx import token_dtype
from .shards import OutputSet, check_prefix, val_mask
from .tokenizer import encode_batches, load_tokenizer, threads, to_arrays, tokenizer_identity, vocab_size

EPILOG = """examples:
  # a folder of .txt files (one file = one document) with a SentencePiece model
  python -m data_prep raw corpus/ --tokenizer tok.model --output-prefix data/wiki

  # JSONL whose text is under "body", an HF tokenizer, 2 threads, 1 % val
  python -m data_prep raw a.jsonl b.parquet --text-key body --tokenizer models/base \\
      --output-prefix data/mix --workers 2 --val-fraction 0.01

output: data/wiki.train.00000.bin/.idx, data/wiki.val.00000.bin/.idx (Megatron MMIDIDX) and
data/wiki.manifest.json, written last: no manifest means the run did not finish."""


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokenizer", required=True, help="HF tokenizer directory (with tokenizer.json) or SentencePiece .model file"
    )
    p.add_argument(
        "--output-prefix",
        required=True,
        help="path prefix of the outputs, e.g. data/wiki (files, not a folder: data/ is refused)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="share of documents put in the val split, chosen by a seeded hash (default 0.01)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizer threads; the output is byte-identical for any value (default 1)",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=250_000_000,
        help="start a new shard after this many tokens (default 250M = 500 MB of uint16)",
    )
    p.add_argument(
        "--batch-docs",
        type=int,
        default=1024,
        help="documents encoded per batch; larger keeps threads busier, costs memory",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output with this prefix")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        help="files or directories: .txt (one document each), .jsonl/.json, .parquet, "
        "or datasets save_to_disk directories. Directories are read recursively "
        "in name order; every file in them must have one of these extensions",
    )
    p.add_argument(
        "--text-key",
        default="text",
        help="field holding the text in .jsonl/.json/.parquet/datasets inputs (default: text)",
    )
    eod = p.add_mutually_exclusive_group()
    eod.add_argument(
        "--append-eod",
        dest="append_eod",
        action="store_true",
        default=True,
        help="append the tokenizer's EOS token to every document (default)",
    )
    eod.add_argument(
        "--no-append-eod",
        dest="append_eod",
        action="store_false",
        help="do not append EOD: documents run into each other in training windows",
    )
    add_common_args(p)


def check_common(args) -> None:
    """The flags both subcommands share, and the output's place: all before any input is read."""
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be >= 1")
    if args.batch_docs < 1:
        raise UserError(f"--batch-docs {args.batch_docs}: must be >= 1")
    if args.shard_tokens < 1:
        raise UserError(f"--shard-tokens {args.shard_tokens}: must be >= 1")
    check_writable(check_prefix(args.output_prefix), "--output-prefix")


def strip_bom(text: str) -> str:
    """A document's leading UTF-8 byte-order mark (Windows editors write one at the start of a
    file) is an encoding artefact, not text: left in, it would be trained on as a token."""
    return text.removeprefix("\ufeff")


def check_splits(docs: dict[str, int], val_fraction: float, what: str) -> None:
    """A train split left empty by --val-fraction is refused; an empty val split is noted."""
    total = docs["train"] + docs["val"]
    if not docs["train"]:
        raise UserError(
            f"--val-fraction {val_fraction}: all {total} {what} went to the val split (it is drawn "
            f"per {what[:-1]}), so the train split is empty; add {what} or lower --val-fraction "
            f"(0 keeps every one for training)"
        )
    if val_fraction > 0 and not docs["val"]:
        print(
            f"note: --val-fraction {val_fraction}: none of the {total} {what} went to the val split (it is drawn "
            f"per {what[:-1]}), so training has no val split of this data to validate on",
            file=sys.stderr,
        )


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Produce `items` in a background thread, up to `depth` ahead of the consumer.

    Used to overlap the next batch's reading and encoding (the Rust encoder releases the GIL)
    with this batch's conversion and writing: without it one core idles during each, which
    costs ~10 % of throughput on 2 cores. Order is preserved; an exception in the producer is
    re-raised in the consumer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for x in items:
                if not put((x, None)):
                    return
            put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises
            put((None, e))

    worker = threading.Thread(target=produce, name="data_prep-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            x, err = q.get()
            if err is not None:
                raise err
            if x is done:
                return
            yield x
    finally:
        stop.set()
        worker.join()


def run_job(job, args, argv: list[str] | None) -> dict:
    """Check the flags both subcommands share, then run `job(args, argv)` (raw's or chat's)."""
    check_common(args)
    with threads(args.workers):  # first, so the tokenizer's thread pool gets --workers threads
        return job(args, argv)


def run(args, argv: list[str] | None = None) -> dict:
    """Do the whole job for parsed `args`; returns a summary (also printed as the final line)."""
    return run_job(_run, args, argv)


def _run(args, argv: list[str] | None) -> dict:
    sources = find_sources(args.inputs)
    if not sources:
        raise UserError(f"inputs {' '.join(args.inputs)}: no input files found")
    tok = load_tokenizer(args.tokenizer)
    identity = tokenizer_identity(args.tokenizer, tok)
    vocab = vocab_size(tok)
    dtype = token_dtype(vocab)
    eod = tok.eos_token_id
    if args.append_eod and eod is None:
        raise UserError(
            f"--tokenizer {args.tokenizer}: has no EOS token to use as EOD "
            "(set eos_token in it, or pass --no-append-eod)"
        )
    eod_arr = np.array([eod if eod is not None else 0], dtype=dtype)

    from tqdm import tqdm

    start = time.perf_counter()
    docs = tokens = 0
    empty = [0]
    per_split = {"train": 0, "val": 0}

    def non_empty(batches):
        # A blank document teaches nothing and would become a lone EOD token: skipped, and counted.
        for texts in batches:
            kept = [t for t in map(strip_bom, texts) if t.strip()]
            empty[0] += len(texts) - len(kept)
            if kept:
                yield kept

    with OutputSet(args.output_prefix, dtype, args.shard_tokens, force=args.force) as out:
        with tqdm(desc="tokenizing", unit=" docs", disable=None, file=sys.stderr) as bar:
            batches = non_empty(iter_text_batches(sources, args.text_key, args.batch_docs))
            for encs in prefetch(encode_batches(tok, batches)):
                arrays, sizes = to_arrays(encs, dtype)
                is_val = val_mask(docs, len(encs), args.seed, args.val_fraction)
                for split, sel in (("train", ~is_val), ("val", is_val)):
                    idx = np.flatnonzero(sel)
                    if len(idx) == 0:
                        continue
                    per_split[split] += len(idx)
                    if args.append_eod:
                        parts = [a for i in idx for a in (arrays[i], eod_arr)]
                        out.writers[split].add(np.concatenate(parts), sizes[idx] + 1)
                    else:
                        out.writers[split].add(np.concatenate([arrays[i] for i in idx]), sizes[idx])
                docs += len(encs)
                tokens += int(sizes.sum()) + (len(encs) if args.append_eod else 0)
                bar.update(len(encs))
                bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
        if docs == 0:
            raise UserError(
                f"inputs {' '.join(map(str, args.inputs))}: the corpus is empty "
                f"(no documents{f'; {empty[0]} blank ones skipped' if empty[0] else ''})"
            )
        check_splits(per_split, args.val_fraction, "documents")
        body = {
            "kind": "raw",
            "dtype": dtype.name,
            "vocab_size": vocab,
            "eod_token_id": eod if args.append_eod else None,
            "append_eod": args.append_eod,
            "tokenizer": identity,
            "text_key": args.text_key,
            "seed": args.seed,
            "val_fraction": args.val_fraction,
            "shard_tokens": args.shard_tokens,
            "blank_documents_skipped": empty[0],
            "command": command_line(argv if argv is not None else sys.argv[2:], "raw"),
        }
        records = out.finish()
        # Still inside: the prefix is this run's until its manifest, written last, is there.
        path = write_manifest(Path(args.output_prefix), {**body, "totals": totals(records), "shards": records})
    secs = time.perf_counter() - start
    t = totals(records)
    print(
        f"raw: {docs:,} documents ({t['val']['documents']:,} val, {empty[0]:,} blank skipped), {tokens:,} tokens in "
        f"{secs:.1f}s ({tokens / max(secs, 1e-9):,.0f} tokens/s) -> {path}"
    )
    return {"documents": docs, "tokens": tokens, "seconds": secs, "manifest": str(path)}


def parser(sub=None) -> argparse.ArgumentParser:
    kw = dict(
        description="Tokenize raw text corpora into Megatron-style token shards "
        "(train/val, .bin + .idx) and a manifest.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p = sub.add_parser("raw", help="raw text -> token shards", **kw) if sub else argparse.ArgumentParser(**kw)
    add_args(p)
    return p
