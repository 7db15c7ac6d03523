"""`python -m pipeline.export`: the command line of pipeline/convert/export.py."""
from __future__ import annotations

import argparse

from data_prep.common import fail_cleanly

from .convert import export as convert_export
from .convert.export import export_run
from .convert.output import DTYPES
from .convert.shards import DEFAULT_SHARD_SIZE

EPILOG = """examples:
  # the newest complete checkpoint of a run
  python -m pipeline.export runs/a-chat --out exports/a-chat
  # a given step, in 5GB shards, replacing an earlier export
  python -m pipeline.export runs/a-raw --step 2000 --out exports/a-raw-2000 --max-shard-size 5GB --force

memory: about one shard (--max-shard-size) plus one layer, whatever the model size.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.export", description=convert_export.__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory written by `python -m pipeline.train`")
    p.add_argument("--step", type=int, help="checkpoint step to export (default: the latest complete one)")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent, unless --force)")
    p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE,
                   help=f"largest safetensors file, e.g. 500MB, 5GB (default {DEFAULT_SHARD_SIZE}); peak memory "
                        f"is about this plus one layer, so lower it on a small machine")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype of the written weights (default auto: the base model's, as its config.json says, "
                        "even when training ran in fp32)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (only once the export succeeded)")
    return p


@fail_cleanly
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    record = export_run(args.run, args.out, args.step, args.max_shard_size, args.force, args.dtype)
    print(f"exported {args.run} step {record['input']['step']} -> {args.out} "
          f"({len(record['tensors'])} tensors in {len(record['files'])} file(s))")


if __name__ == "__main__":
    main()
