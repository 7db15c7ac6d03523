"""Export one checkpoint of a pipeline run as a standard Hugging Face model directory.

The result holds config.json (and generation_config.json) of the run's base model, the tokenizer
files of the run's tokenizer (with its chat template), safetensors weights (sharded with an index
above --max-shard-size) and export.json, which names the source file and sha256 of every tensor.
Tensors keep the dtype they were stored in; nothing is converted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.common import UserError, atomic_dir, atomic_write_json, fail_cleanly
from pipeline.checkpoint_io import (DEFAULT_SHARD_SIZE, RunSource, ShardWriter, copy_extras,
                                    expected_tensors, parse_size, stream_layers)
from pipeline.hf import model_identity

EPILOG = """examples:
  # the newest complete checkpoint of a run
  python -m pipeline.export runs/a-chat --out exports/a-chat
  # a given step, in 5GB shards, replacing an earlier export
  python -m pipeline.export runs/a-raw --step 2000 --out exports/a-raw-2000 --max-shard-size 5GB --force

memory: about one shard (--max-shard-size) plus one layer, whatever the model size.
"""


def check_out_not_input(out: Path, inputs: list[Path], flag: str = "--out") -> None:
    """--force replaces the output directory whole: refuse when that would delete an input."""
    o = out.resolve()
    for p in inputs:
        p = p.resolve()
        if o == p or p in o.parents or o in p.parents:
            raise UserError(f"{flag} {out}: overlaps the input {p}; choose a separate directory")


def export_run(run_dir, out, step: int | None = None, max_shard_size: str = DEFAULT_SHARD_SIZE,
               force: bool = False) -> dict:
    """Write RUN's checkpoint (latest complete, or `step`) to `out` as an HF directory; return export.json."""
    max_bytes = parse_size(max_shard_size)
    src = RunSource(run_dir, step, "RUN", "--step")
    out = Path(out)
    check_out_not_input(out, [src.path, src.model_dir, src.tokenizer_dir])
    recorded = (src.run.get("base_model") or {}).get("fingerprint")
    if recorded and model_identity(src.model_dir)["fingerprint"] != recorded:
        # Only config.json and the tokenizer are taken from there, and every tensor's name and shape
        # is checked against that config, so this is worth a warning, not a refusal.
        print(f"warning: {src.model_dir} has changed since the run started (run.json base_model."
              f"fingerprint differs); config.json and the tokenizer are copied from it as it is now",
              file=sys.stderr)
    expected = expected_tensors(src.model_dir)
    tied = bool(src.config.get("tie_word_embeddings", False))
    with atomic_dir(out, force=force) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        stream_layers([(i, src) for i in range(src.num_layers)], writer, expected, tied, desc="export")
        written = writer.close()
        copied = copy_extras(tmp, src.model_dir, src.tokenizer_dir)
        record = {"format_version": 1, "tool": "pipeline.export", "input": src.describe(),
                  "copied": copied, "files": written["files"], "tensors": written["tensors"]}
        atomic_write_json(tmp / "export.json", record)
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory written by `python -m pipeline.train`")
    p.add_argument("--step", type=int, help="checkpoint step to export (default: the latest complete one)")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent, unless --force)")
    p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE,
                   help=f"largest safetensors file, e.g. 500MB, 5GB (default {DEFAULT_SHARD_SIZE}); peak memory "
                        f"is about this plus one layer, so lower it on a small machine")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (only once the export succeeded)")
    return p


@fail_cleanly
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    record = export_run(args.run, args.out, args.step, args.max_shard_size, args.force)
    print(f"exported {args.run} step {record['input']['step']} -> {args.out} "
          f"({len(record['tensors'])} tensors in {len(record['files'])} file(s))")


if __name__ == "__main__":
    main()
