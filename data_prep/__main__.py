"""`python -m data_prep {raw,chat} ...`: parse the command line and hand over to raw.py / chat.py."""

from __future__ import annotations

import argparse
import sys

from . import chat, raw
from .errors import fail_cleanly

EPILOG = """examples:
  python -m data_prep raw corpus/ --tokenizer models/base --output-prefix data/wiki
  python -m data_prep chat convs.jsonl --tokenizer models/base --output-prefix data/chat
  python -m data_prep raw --help      (each subcommand explains its own options)

Then train on the manifest: data/wiki.manifest.json (data_prep.reader.TokenWindows reads it)."""


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Pack text into memory-mapped token shards for training: raw corpora "
        "(`raw`) or chat conversations with an assistant-only loss mask (`chat`).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{raw,chat}")
    raw.parser(sub)
    chat.parser(sub)
    args = p.parse_args(argv)
    (raw.run if args.command == "raw" else chat.run)(args, argv[1:])


if __name__ == "__main__":
    main()
