"""`python -m pipeline.chat_vector`: the command line of pipeline/convert/chat_vector.py."""
from __future__ import annotations

import argparse

from data_prep.common import fail_cleanly

from .convert import chat_vector as convert_chat_vector
from .convert.output import add_output_flags

EPILOG = """examples:
  # A-Raw (a run trained from the base) plus the chat vector of an instruct model of the same base
  python -m pipeline.chat_vector --raw runs/a-raw --chat models/X-Instruct --base models/X --out models/cv
  # a full continued pretraining of the base and a chat fine-tune of it, half the chat vector
  python -m pipeline.chat_vector --raw runs/cpt --chat runs/chat-full --base models/X --ratio 0.5 --out models/cv05

memory: about one shard (--max-shard-size) plus three layers (raw, chat, base), whatever the model size.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.chat_vector", description=convert_chat_vector.__doc__,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", required=True, metavar="RUN_OR_HF_DIR",
                   help="the model that learned your documents, trained from --base (A-Raw, or a full continued pretraining)")
    p.add_argument("--chat", required=True, metavar="RUN_OR_HF_DIR",
                   help="the chat model of the same base: gives the chat vector (chat - base), the tokenizer and template")
    p.add_argument("--base", required=True, metavar="HF_DIR", help="the base model both were trained from")
    p.add_argument("--ratio", type=float, default=1.0, help="how much of the chat vector to add (default 1.0)")
    p.add_argument("--raw-step", type=int, metavar="N", help="checkpoint step of a --raw run (default: latest)")
    p.add_argument("--chat-step", type=int, metavar="N", help="checkpoint step of a --chat run (default: latest)")
    p.add_argument("--chat-template-from", choices=("chat", "raw"), metavar="INPUT",
                   help="whose chat template the result ships when --raw and --chat were trained with different "
                        "ones (refused otherwise): chat or raw")
    add_output_flags(p, made="merge", auto_dtype="the base's")
    return p


@fail_cleanly
def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    rec = convert_chat_vector.chat_vector(a.raw, a.chat, a.base, a.out, a.ratio, a.raw_step, a.chat_step,
                                          a.max_shard_size, a.force, a.dtype, a.chat_template_from)
    print(f"chat vector: {a.raw} + {a.ratio} x ({a.chat} - {a.base}) -> {a.out} ({len(rec['tensors'])} tensors; "
          f"provenance in chat_vector.json, mergekit equivalent in mergekit.yaml)")


if __name__ == "__main__":
    main()
