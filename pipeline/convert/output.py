"""Writing a model directory: weights streamed into shards, the side files, and the provenance
record, all inside one atomic directory (a failure or a kill leaves no output that looks done)."""

from __future__ import annotations

from pathlib import Path

from data_prep.errors import UserError
from data_prep.files import atomic_dir, atomic_write_json, atomic_write_text, check_writable

from .. import hf
from .hf_files import write_side_files
from .shards import ShardWriter, stream_layers
from .template import ChatTemplate

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_output_flags(p, *, made: str, auto_dtype: str) -> None:
    """--out, --max-shard-size, --dtype and --force: the same four flags on every command that writes a
    model (export, transplant, chat_vector). `made` names what must succeed before --force replaces
    anything; `auto_dtype` says whose dtype `auto` keeps."""
    from .shards import DEFAULT_SHARD_SIZE

    p.add_argument("--out", required=True, help="output directory (must be empty or absent, unless --force)")
    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_SHARD_SIZE,
        help=f"largest safetensors file, e.g. 500MB, 5GB (default {DEFAULT_SHARD_SIZE}); peak memory "
        f"is about this plus one layer per input, so lower it on a small machine",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help=f"dtype of the written weights (default auto: {auto_dtype}, as its config.json says, "
        f"even when training ran in fp32)",
    )
    p.add_argument("--force", action="store_true", help=f"replace a non-empty --out (only once the {made} succeeded)")


def output_dtype(name: str, config: dict):
    """`auto` keeps the dtype the base checkpoint declares (a bf16 model stays bf16 even when it
    was trained in fp32 on CPU); otherwise the named one."""
    import torch

    if name not in DTYPES:
        raise UserError(f"--dtype {name}: expected one of {', '.join(DTYPES)}")
    return hf.config_dtype(config) if name == "auto" else getattr(torch, name)


def check_out_not_input(out: Path, inputs: list[Path], flag: str = "--out") -> None:
    """The checks of --out before any weight is read: it can be written (a read-only place fails
    here, in a second, not after the whole merge), and --force, which replaces it whole, would not
    delete an input."""
    o = out.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a directory")
    check_writable(out, flag)
    for p in inputs:
        p = p.resolve()
        if o == p or p in o.parents or o in p.parents:
            raise UserError(f"{flag} {out}: overlaps the input {p}; choose a separate directory")


def write_model(
    out: Path,
    layers: list,
    *,
    config: dict,
    model_dir: Path,
    tokenizer_dir: Path,
    dtype,
    max_bytes: int,
    force: bool,
    tool: str,
    record: dict,
    template: ChatTemplate,
    extra_files: dict | None = None,
) -> dict:
    """Stream `layers` ([(i, source with .layer(i))]) into `out` with config.json from model_dir and
    the tokenizer from tokenizer_dir, rendering with `template` (template.py's choice); write
    `{tool}.json` (record + the chat template shipped + files + per-tensor provenance) and any
    extra text files. Returns the record."""
    expected = hf.expected_tensors(config)
    # Owned while written (data_prep.files.owned): a second writer of the same --out is refused.
    with atomic_dir(out, force=force, flag="--out") as tmp:
        writer = ShardWriter(tmp, max_bytes)
        stream_layers(layers, writer, expected, desc=tool, dtype=dtype)
        written = writer.close()
        side, chat_template = write_side_files(tmp, model_dir, tokenizer_dir, template, dtype, shown_as=out)
        rec = {
            "format_version": 1,
            "tool": f"pipeline.{tool}",
            **record,
            "dtype": str(dtype).removeprefix("torch."),
            "chat_template": chat_template,
            "copied": side,
            "files": written["files"],
            "tensors": written["tensors"],
        }
        atomic_write_json(tmp / f"{tool}.json", rec)
        for name, text in (extra_files or {}).items():
            atomic_write_text(tmp / name, text)
    return rec
