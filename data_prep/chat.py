"""`python -m data_prep chat`: chat conversations -> token shards + aligned loss-mask shards.

The loss mask must mark exactly what the model should learn to write: each assistant
message's content and its end-of-turn token, never the role header before it. Those characters
are found with the template itself, so any template works without knowing its syntax (the span
rule lives in data_prep/template.py, which also derives the end-of-turn token from it). Then the
full text is tokenized once with character offsets and a token is masked iff its characters
overlap an assistant span.

The manifest records the template that rendered the shards (text, sha256, where it came from)
and its end-of-turn token: training records it in run.json, and export, transplant and chat
vector ship it, so the model is served with the format it was trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError
from .files import JSONLineError, read_jsonl, refuse_repeated_inputs
from .manifest import command_line, totals, write_manifest
from .mmidx import token_dtype
from .raw import add_common_args, check_splits, run_job, strip_bom
from .shards import OutputSet, val_mask
from .template import BadRecord, Renderer, end_of_turn_ids, read_template_file, template_sha256, template_text
from .tokenizer import load_tokenizer, plain_backend, tokenizer_identity, vocab_size

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")
MAX_EXAMPLES = 20  # skipped-record reasons kept in the manifest

EPILOG = """examples:
  # the tokenizer's own chat template
  python -m data_prep chat convs.jsonl --tokenizer models/base-chat --output-prefix data/chat

  # a template from a file, skipping (and counting) malformed records
  python -m data_prep chat data/sharegpt/ --tokenizer tok/ --chat-template chatml.jinja \\
      --output-prefix data/chat --skip-bad

input records, one JSON object per line:
  {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
  {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}

output: token shards as for `raw` plus P.train.00000.mask.bin/.idx (uint8, 1 = assistant token)."""


def _messages(rec) -> list[dict]:
    """Validate one record and return its messages in OpenAI form."""
    if not isinstance(rec, dict):
        raise BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        raw, rkey, ckey, mapping = rec["messages"], "role", "content", {r: r for r in ROLES}
    elif "conversations" in rec:
        raw, rkey, ckey, mapping = rec["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        raise BadRecord("no 'messages' (OpenAI) or 'conversations' (ShareGPT) list")
    if not isinstance(raw, list) or not raw:
        raise BadRecord("the message list is empty or not a list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRecord(f"message {i} is not an object")
        role = m.get(rkey)
        if role not in mapping:
            raise BadRecord(f"message {i}: unknown {rkey} {role!r} (expected one of {', '.join(mapping)})")
        content = strip_bom(message_text(m.get(ckey), f"message {i} ({role})"))
        if not content.strip():
            raise BadRecord(f"message {i} ({role}): empty content")
        out.append({"role": mapping[role], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRecord("no assistant turn")
    return out


def message_text(content, where: str) -> str:
    """A message's text: a string, or (as the OpenAI format allows) a list of content parts, whose
    text parts are joined with newlines. A part that is not text (an image, audio) is refused:
    this pipeline trains on text, and dropping it silently would change the conversation."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for k, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRecord(f"{where}: content part {k} is {kind!r}, not text")
        return "\n".join(texts)
    raise BadRecord(f"{where}: content must be text or a list of text parts, got {type(content).__name__}")


def _records(paths: list[Path]) -> Iterator[tuple[str, object]]:
    """(where, record or BadRecord) for every record, in file order."""
    for path in paths:
        # json.loads reads bytes with a leading UTF-8 byte-order mark; the array test must skip it too.
        head = path.read_bytes()[:4096].removeprefix(b"\xef\xbb\xbf").lstrip()
        if path.suffix == ".json" and head.startswith(b"["):
            try:
                records = json.loads(path.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path}: invalid JSON ({e})") from None
            for i, rec in enumerate(records):
                yield f"{path}: record {i}", rec
            continue
        for lineno, rec in read_jsonl(path, bad_lines="yield"):
            yield f"{path}:{lineno}", BadRecord(str(rec)) if isinstance(rec, JSONLineError) else rec


def find_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    given: list[tuple[str, Path]] = []
    for arg in inputs:
        p = Path(arg)
        if not p.exists():
            raise UserError(f"input {p}: no such file or directory")
        for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")) if p.is_dir() else [p]:
            if f.suffix.lower() not in (".jsonl", ".json"):
                raise UserError(f"input {f}: unknown extension {f.suffix!r} (expected .jsonl or .json)")
            files.append(f)
            given.append((str(arg), f))
    refuse_repeated_inputs(given)
    return files


def token_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for each token whose characters overlap an assistant span."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if len(offsets):
        starts, ends = offsets[:, 0], offsets[:, 1]
        for a, b in spans:
            mask |= ((ends > a) & (starts < b)) | ((starts == ends) & (starts >= a) & (starts < b))
    return mask


def run(args, argv: list[str] | None = None) -> dict:
    """Do the whole job for parsed `args`; returns a summary (also printed as the final line)."""
    return run_job(_run, args, argv)


def _run(args, argv: list[str] | None) -> dict:
    files = find_files(args.inputs)
    if not files:
        raise UserError(f"inputs {' '.join(args.inputs)}: no .jsonl/.json files found")
    tok = load_tokenizer(args.tokenizer)
    flag = f"--tokenizer {args.tokenizer}"
    origin = f"the template of --tokenizer {Path(args.tokenizer).resolve()}"
    if args.chat_template is not None:
        path = Path(args.chat_template)
        tok.chat_template = read_template_file(path)
        flag, origin = f"--chat-template {path}", f"--chat-template {path.resolve()}"
    elif not template_text(tok):
        raise UserError(
            f"--tokenizer {args.tokenizer}: has no chat template; pass "
            "--chat-template FILE (a Jinja template, e.g. ChatML)"
        )
    template = template_text(tok)
    tok.chat_template = template  # named templates: the default one renders, and is the one recorded
    identity = tokenizer_identity(args.tokenizer, tok)
    vocab = vocab_size(tok)
    dtype = token_dtype(vocab)
    renderer = Renderer(tok, flag)
    backend = plain_backend(tok)

    from tqdm import tqdm

    start = time.perf_counter()
    stats = {"documents": 0, "tokens": 0, "assistant_tokens": 0, "skipped": 0}
    per_split = {"train": 0, "val": 0}
    examples: list[str] = []
    with OutputSet(args.output_prefix, dtype, args.shard_tokens, with_mask=True, force=args.force) as out:
        bar = tqdm(desc="chat", unit=" convs", disable=None, file=sys.stderr)
        batch: list[tuple[str, list]] = []

        def flush():
            encs = backend.encode_batch([t for t, _ in batch], add_special_tokens=False)
            toks = [np.array(e.ids, dtype=dtype) for e in encs]
            masks = [
                token_mask(np.array(e.offsets, dtype=np.int64).reshape(-1, 2), s) for e, (_, s) in zip(encs, batch)
            ]
            sizes = np.array([len(t) for t in toks], dtype=np.int64)
            is_val = val_mask(stats["documents"], len(batch), args.seed, args.val_fraction)
            for split, sel in (("train", ~is_val), ("val", is_val)):
                idx = np.flatnonzero(sel)
                per_split[split] += len(idx)
                if len(idx):
                    out.writers[split].add(
                        np.concatenate([toks[i] for i in idx]), sizes[idx], np.concatenate([masks[i] for i in idx])
                    )
            stats["documents"] += len(batch)
            stats["tokens"] += int(sizes.sum())
            stats["assistant_tokens"] += int(sum(int(m.sum()) for m in masks))
            bar.update(len(batch))
            batch.clear()

        for where, rec in _records(files):
            try:
                if isinstance(rec, BadRecord):
                    raise rec
                text, spans = renderer(_messages(rec))
            except BadRecord as e:
                if not args.skip_bad:
                    raise UserError(f"{where}: {e} (pass --skip-bad to skip such records)") from None
                stats["skipped"] += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append(f"{where}: {e}")
                continue
            batch.append((text, spans))
            if len(batch) >= args.batch_docs:
                flush()
        if batch:
            flush()
        bar.close()
        if stats["documents"] == 0:
            raise UserError(
                f"inputs {' '.join(map(str, args.inputs))}: no usable conversations ({stats['skipped']} skipped)"
            )
        check_splits(per_split, args.val_fraction, "conversations")
        eot = end_of_turn_ids(tok)  # after the records: a broken template has been reported by now
        if not eot:
            print(
                f"warning: {flag}: the chat template ends an assistant turn with no special token, so a "
                f"model trained on it has nothing to stop at but the tokenizer's eos",
                file=sys.stderr,
            )
        body = {
            "kind": "chat",
            "dtype": dtype.name,
            "mask_dtype": "uint8",
            "vocab_size": vocab,
            "eod_token_id": None,
            "append_eod": False,
            "tokenizer": identity,
            "chat_template": template,
            "chat_template_sha256": template_sha256(template),
            "chat_template_from": origin,
            "end_of_turn_ids": eot,
            "seed": args.seed,
            "val_fraction": args.val_fraction,
            "shard_tokens": args.shard_tokens,
            "assistant_tokens": stats["assistant_tokens"],
            "skipped_records": stats["skipped"],
            "skipped_examples": examples,
            "command": command_line(argv if argv is not None else sys.argv[2:], "chat"),
        }
        records = out.finish()
        # Still inside: the prefix is this run's until its manifest, written last, is there.
        path = write_manifest(Path(args.output_prefix), {**body, "totals": totals(records), "shards": records})
    secs = time.perf_counter() - start
    print(
        f"chat: {stats['documents']:,} conversations ({stats['skipped']:,} skipped), "
        f"{stats['tokens']:,} tokens ({stats['assistant_tokens']:,} assistant) in {secs:.1f}s "
        f"({stats['tokens'] / max(secs, 1e-9):,.0f} tokens/s) -> {path}"
    )
    return {**stats, "seconds": secs, "manifest": str(path)}


def parser(sub=None) -> argparse.ArgumentParser:
    kw = dict(
        description="Tokenize chat conversations (OpenAI or ShareGPT JSONL) with a chat "
        "template into token shards plus aligned assistant-only loss-mask shards.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p = (
        sub.add_parser("chat", help="chat JSONL -> token + loss-mask shards", **kw)
        if sub
        else argparse.ArgumentParser(**kw)
    )
    p.add_argument("inputs", nargs="+", help=".jsonl/.json files or directories of them")
    p.add_argument(
        "--chat-template",
        default=None,
        help="Jinja chat template file to use instead of the tokenizer's own; recorded in the "
        "manifest, and the model trained on this data ships it (export, transplant, chat vector)",
    )
    p.add_argument(
        "--skip-bad", action="store_true", help="skip malformed records (counted in the manifest) instead of stopping"
    )
    add_common_args(p)
    p.set_defaults(batch_docs=256)
    return p
