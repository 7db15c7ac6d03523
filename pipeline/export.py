"""`python -m pipeline.export`: the command line of pipeline/convert/export.py."""

from __future__ import annotations

import argparse

from data_prep.errors import fail_cleanly

from .convert import export as convert_export
from .convert.export import export_run
from .convert.output import add_output_flags

EPILOG = """examples:
  # the newest complete checkpoint of a run
  python -m pipeline.export runs/a-chat --out exports/a-chat
  # a given step, in 5GB shards, replacing an earlier export
  python -m pipeline.export runs/a-raw --step 2000 --out exports/a-raw-2000 --max-shard-size 5GB --force

memory: about one shard (--max-shard-size) plus one layer, whatever the model size.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.export",
        description=convert_export.__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run directory written by `python -m pipeline.train`")
    p.add_argument("--step", type=int, help="checkpoint step to export (default: the latest complete one)")
    add_output_flags(p, made="export", auto_dtype="the base model's")
    return p


@fail_cleanly
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    record = export_run(args.run, args.out, args.step, args.max_shard_size, args.force, args.dtype)
    print(
        f"exported {args.run} step {record['input']['step']} -> {args.out} "
        f"({len(record['tensors'])} tensors in {len(record['files'])} file(s))"
    )


if __name__ == "__main__":
    main()
