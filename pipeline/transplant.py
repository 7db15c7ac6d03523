"""Transplant: A-Raw's decoder layers below format_start + A-Chat's format group -> one HF model.

The result holds A-Raw's layers [0, format_start), A-Chat's layers [format_start, L), A-Chat's
final norm and LM head, and the base embeddings (both inputs must carry the same ones). Its
config.json, tokenizer, chat template and generation config come from A-Chat. Alongside the
weights: transplant.json (every tensor's source and sha256) and mergekit.yaml (the same merge as
a mergekit passthrough config).

Inputs are run directories (one checkpoint step each, the latest complete one by default) or
Hugging Face directories. The boundary comes from the runs' run.json; only when both inputs are
HF directories must --format-start give it. Nothing is written unless every check passes.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from data_prep.common import UserError, atomic_dir, atomic_write_json, atomic_write_text, fail_cleanly
from pipeline.checkpoint_io import (DEFAULT_SHARD_SIZE, ShardWriter, copy_extras, expected_tensors,
                                    has_chat_template, open_source, parse_size, stream_layers)
from pipeline.export import check_out_not_input

EPILOG = """examples:
  # two pipeline runs (latest complete checkpoints); the boundary comes from their run.json
  python -m pipeline.transplant --raw runs/a-raw --chat runs/a-chat --out models/transplant
  # given steps, 5GB shards
  python -m pipeline.transplant --raw runs/a-raw --raw-step 2000 --chat runs/a-chat --chat-step 800 \\
      --out models/transplant-2000 --max-shard-size 5GB
  # two Hugging Face directories: say where the format group starts
  python -m pipeline.transplant --raw exports/a-raw --chat exports/a-chat --format-start 24 --out models/t

memory: about one shard (--max-shard-size) plus one layer, whatever the model size.
"""

# Config keys that decide tensor shapes or the computation; the two inputs must agree on all of them.
SHAPE_KEYS = ("architectures", "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
              "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
              "hidden_act", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
              "attention_bias", "mlp_bias")
EMBED = "model.embed_tokens.weight"


def check_same_shape(raw, chat) -> None:
    for key in SHAPE_KEYS:
        a, b = raw.config.get(key), chat.config.get(key)
        if a != b:
            raise UserError(f"--raw and --chat are different models: config.json {key} is {a!r} in "
                            f"{raw.model_dir} but {b!r} in {chat.model_dir}")


def check_same_base(raw, chat) -> None:
    if raw.kind == "run" and chat.kind == "run":
        a, b = (raw.run.get("base_model") or {}), (chat.run.get("base_model") or {})
        if a.get("fingerprint") != b.get("fingerprint"):
            raise UserError(f"--raw and --chat were trained from different base models (run.json base_model."
                            f"fingerprint: {raw.path} started from {a.get('path')}, {chat.path} from {b.get('path')})")


def check_roles(raw, chat) -> None:
    """A swapped --raw/--chat would silently build the opposite model; the runs know their phase."""
    if raw.kind == "run" and "raw" not in raw.groups.get("trained_groups", []):
        raise UserError(f"--raw {raw.path}: this run did not train the raw group (phase "
                        f"{raw.run.get('phase')!r}); were --raw and --chat swapped?")
    if chat.kind == "run" and "format" not in chat.groups.get("trained_groups", []):
        raise UserError(f"--chat {chat.path}: this run did not train the format group (phase "
                        f"{chat.run.get('phase')!r}); were --raw and --chat swapped?")


def resolve_boundary(raw, chat, given: int | None) -> int:
    recorded = {src.flag: int(src.groups["format_start"]) for src in (raw, chat) if src.kind == "run"}
    if len(set(recorded.values())) > 1:
        raise UserError(f"the runs disagree on the boundary (run.json groups.format_start): --raw "
                        f"{raw.path} has {recorded['--raw']}, --chat {chat.path} has {recorded['--chat']}")
    if given is not None and recorded and given not in recorded.values():
        flag, f = next(iter(recorded.items()))
        raise UserError(f"--format-start {given} disagrees with {flag} run.json groups.format_start ({f}); "
                        f"drop the flag to use the recorded boundary")
    f = given if given is not None else next(iter(recorded.values()), None)
    if f is None:
        raise UserError("--raw and --chat are both Hugging Face directories, which do not record the "
                        "boundary: pass --format-start N (the first layer of the format group)")
    L = chat.num_layers
    if not 0 < f < L:
        raise UserError(f"--format-start {f}: must be between 1 and {L - 1} (the model has {L} layers)")
    return f


def check_embeddings(raw, chat) -> None:
    """The result has one embedding matrix; both inputs must hold the same (the base's) one."""
    tied = bool(chat.config.get("tie_word_embeddings", False))
    for src in (raw, chat):
        if src.kind == "run" and src.groups.get("embeddings_trained"):
            tie_note = (" With tie_word_embeddings the LM head *is* that matrix, so A-Chat's head and "
                        "A-Raw's embeddings cannot both be kept." if tied else "")
            raise UserError(
                f"{src.flag} {src.path} trained the embeddings (run.json groups.embeddings_trained, phase "
                f"{src.run.get('phase')!r}), so there is no single set of embeddings both halves were trained "
                f"with.{tie_note} Choose: transplant runs that kept the embeddings frozen (phases raw and chat), "
                f"or use this run as a whole model (python -m pipeline.export).")
    a, a_origin = raw.layer(0)[EMBED]
    b, b_origin = chat.layer(0)[EMBED]
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
        what = "the embeddings and (tied) LM head" if tied else "the embeddings"
        raise UserError(
            f"{EMBED} differs between --raw ({a_origin['path']}/{a_origin['file']}) and --chat "
            f"({b_origin['path']}/{b_origin['file']}): the inputs changed {what} or come from different "
            f"bases, and the transplant will not pick one silently. Choose which embeddings the result "
            f"must carry, and retrain the other model with them frozen.")


def mergekit_yaml(raw, chat, f: int, L: int, dtype: str) -> str:
    def where(src, label):
        if src.kind == "hf":
            return str(src.path.resolve()), None
        path = f"exports/{label}-step{src.step}"
        return path, f"python -m pipeline.export {src.path.resolve()} --step {src.step} --out {path}"

    raw_path, raw_cmd = where(raw, "a-raw")
    chat_path, chat_cmd = where(chat, "a-chat")
    q = json.dumps  # a JSON string is a valid YAML scalar, whatever the path contains
    lines = ["# The same transplant as a mergekit config: mergekit-yaml mergekit.yaml OUT_DIR"]
    if raw_cmd or chat_cmd:
        lines += ["# mergekit reads Hugging Face directories; export the pipeline runs first:"]
        lines += [f"#   {c}" for c in (raw_cmd, chat_cmd) if c]
    lines += [
        "# How mergekit builds it (its planner takes pre-layer weights from the first slice's model and",
        "# post-layer weights from the last slice's; config.json and tokenizer files from base_model):",
        f"#   layers [0, {f}) from A-Raw, [{f}, {L}) from A-Chat        -> same as pipeline.transplant",
        "#   embeddings from A-Raw (first slice)                  -> same tensor: the transplant checked that",
        "#                                                           both inputs' embeddings are bitwise equal",
        "#   final norm + lm_head from A-Chat (last slice)        -> same",
        "#   config.json, tokenizer, chat template, generation_config.json from base_model (A-Chat) -> same files",
        "# Differences: mergekit re-serialises config.json (setting its dtype from `dtype` below), shards",
        "# and names files its own way and writes no provenance; it does not check that the inputs share",
        "# a base model, a boundary and their embeddings. Bitwise, the tensors should be the same.",
        "merge_method: passthrough",
        f"base_model: {q(chat_path)}",
        f"dtype: {dtype}",
        "slices:",
        "  - sources:",
        f"      - model: {q(raw_path)}",
        f"        layer_range: [0, {f}]",
        "  - sources:",
        f"      - model: {q(chat_path)}",
        f"        layer_range: [{f}, {L}]",
    ]
    return "\n".join(lines) + "\n"


def transplant(raw, chat, out, format_start: int | None = None, raw_step: int | None = None,
               chat_step: int | None = None, max_shard_size: str = DEFAULT_SHARD_SIZE, force: bool = False) -> dict:
    """Build the transplant in `out`; return the transplant.json record. Raises UserError, writing nothing."""
    max_bytes = parse_size(max_shard_size)
    rs = open_source(raw, raw_step, "--raw", "--raw-step")
    cs = open_source(chat, chat_step, "--chat", "--chat-step")
    out = Path(out)
    check_out_not_input(out, [rs.path, cs.path, rs.model_dir, cs.model_dir, cs.tokenizer_dir])
    check_same_shape(rs, cs)
    check_same_base(rs, cs)
    check_roles(rs, cs)
    f = resolve_boundary(rs, cs, format_start)
    check_embeddings(rs, cs)
    L = cs.num_layers
    expected = expected_tensors(cs.model_dir)
    tied = bool(cs.config.get("tie_word_embeddings", False))
    # Layer 0 brings the embeddings (from A-Raw) and layer L-1 the final norm and head (from A-Chat).
    plan = [(i, rs if i < f else cs) for i in range(L)]
    with atomic_dir(out, force=force) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        stream_layers(plan, writer, expected, tied, desc="transplant")
        written = writer.close()
        copied = copy_extras(tmp, cs.model_dir, cs.tokenizer_dir)
        if not has_chat_template(tmp):
            print(f"warning: A-Chat's tokenizer ({cs.tokenizer_dir}) has no chat template; the result has none",
                  file=sys.stderr)
        dtype = Counter(e["dtype"] for e in written["tensors"]).most_common(1)[0][0]
        record = {"format_version": 1, "tool": "pipeline.transplant", "format_start": f, "num_layers": L,
                  "inputs": {"raw": rs.describe(), "chat": cs.describe()}, "copied": copied,
                  "files": written["files"], "tensors": written["tensors"]}
        atomic_write_json(tmp / "transplant.json", record)
        atomic_write_text(tmp / "mergekit.yaml", mergekit_yaml(rs, cs, f, L, dtype))
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.transplant", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", required=True, metavar="RUN_OR_HF_DIR", help="A-Raw: gives layers [0, format_start)")
    p.add_argument("--chat", required=True, metavar="RUN_OR_HF_DIR",
                   help="A-Chat: gives layers [format_start, L), final norm, LM head, tokenizer, chat template")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent, unless --force)")
    p.add_argument("--format-start", type=int, metavar="N",
                   help="first layer of the format group; needed only when both inputs are HF directories "
                        "(with runs it must match their run.json)")
    p.add_argument("--raw-step", type=int, metavar="N", help="checkpoint step of the --raw run (default: latest)")
    p.add_argument("--chat-step", type=int, metavar="N", help="checkpoint step of the --chat run (default: latest)")
    p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE,
                   help=f"largest safetensors file, e.g. 500MB, 5GB (default {DEFAULT_SHARD_SIZE}); peak memory "
                        f"is about this plus one layer, so lower it on a small machine")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (only once the transplant succeeded)")
    return p


@fail_cleanly
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    rec = transplant(args.raw, args.chat, args.out, args.format_start, args.raw_step, args.chat_step,
                     args.max_shard_size, args.force)
    print(f"transplanted layers [0, {rec['format_start']}) of {args.raw} + [{rec['format_start']}, "
          f"{rec['num_layers']}) of {args.chat} -> {args.out} ({len(rec['tensors'])} tensors; "
          f"provenance in transplant.json, mergekit equivalent in mergekit.yaml)")


if __name__ == "__main__":
    main()
