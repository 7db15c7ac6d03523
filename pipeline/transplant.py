"""`python -m pipeline.transplant`: the command line of pipeline/convert/transplant.py (which explains the merge)."""

from __future__ import annotations

import argparse

from data_prep.errors import UserError, fail_cleanly

from .convert import transplant as convert_transplant
from .convert.output import add_output_flags
from .convert.transplant import donor_transplant, transplant

EPILOG = """examples:
  # two pipeline runs (latest complete checkpoints); the boundary comes from their run.json
  python -m pipeline.transplant --raw runs/a-raw --chat runs/a-chat --out models/transplant
  # given steps, 5GB shards
  python -m pipeline.transplant --raw runs/a-raw --raw-step 2000 --chat runs/a-chat --chat-step 800 \\
      --out models/transplant-2000 --max-shard-size 5GB
  # two Hugging Face directories: say where the format group starts
  python -m pipeline.transplant --raw exports/a-raw --chat exports/a-chat --format-start 24 --out models/t
  # no A-Chat run: the format group from an instruct model of the same family
  python -m pipeline.transplant --raw runs/a-raw --donor models/Llama-3-8B-Instruct --out models/t
  # A-Raw was itself trained on chat rendered with another template: say which one the result ships
  python -m pipeline.transplant --raw runs/a-raw --chat runs/a-chat --chat-template-from chat --out models/t

chat template: the result ships the one A-Chat's chat data was rendered with (run.json chat_template),
not necessarily its tokenizer's own; transplant.json records which, and its end-of-turn token is
added to generation_config.json's eos_token_id.

memory: about one shard (--max-shard-size) plus one layer, whatever the model size.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.transplant",
        description=convert_transplant.__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--raw", required=True, metavar="RUN_OR_HF_DIR", help="A-Raw: gives layers [0, format_start)")
    chat = p.add_mutually_exclusive_group(required=True)
    chat.add_argument(
        "--chat",
        metavar="RUN_OR_HF_DIR",
        help="A-Chat: gives layers [format_start, L), final norm, LM head, tokenizer, chat template",
    )
    chat.add_argument(
        "--donor",
        metavar="HF_DIR",
        help="instead of --chat: an instruct model of the same family (same shapes and vocabulary) "
        "gives the format group, norm, head, tokenizer and template; its lower layers are not used",
    )
    p.add_argument(
        "--format-start",
        type=int,
        metavar="N",
        help="first layer of the format group; needed only when both inputs are HF directories "
        "(with runs it must match their run.json)",
    )
    p.add_argument("--raw-step", type=int, metavar="N", help="checkpoint step of the --raw run (default: latest)")
    p.add_argument("--chat-step", type=int, metavar="N", help="checkpoint step of the --chat run (default: latest)")
    p.add_argument(
        "--chat-template-from",
        choices=("chat", "donor", "raw"),
        metavar="INPUT",
        help="whose chat template the result ships when the inputs were trained with different ones "
        "(refused otherwise): chat (or donor), or raw",
    )
    add_output_flags(p, made="transplant", auto_dtype="A-Chat's base model's")
    return p


@fail_cleanly
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    side = "donor" if args.donor else "chat"
    if args.chat_template_from in ("chat", "donor") and args.chat_template_from != side:
        raise UserError(
            f"--chat-template-from {args.chat_template_from}: there is no --{args.chat_template_from} "
            f"(choose {side} or raw)"
        )
    if args.donor:
        if args.chat_step is not None:
            raise UserError("--chat-step applies to --chat, not --donor")
        rec = donor_transplant(
            args.raw,
            args.donor,
            args.out,
            args.format_start,
            args.raw_step,
            args.max_shard_size,
            args.force,
            args.dtype,
            args.chat_template_from,
        )
    else:
        rec = transplant(
            args.raw,
            args.chat,
            args.out,
            args.format_start,
            args.raw_step,
            args.chat_step,
            args.max_shard_size,
            args.force,
            args.dtype,
            args.chat_template_from,
        )
    print(
        f"transplanted layers [0, {rec['format_start']}) of {args.raw} + [{rec['format_start']}, "
        f"{rec['num_layers']}) of {args.chat or args.donor} -> {args.out} ({len(rec['tensors'])} tensors; "
        f"provenance in transplant.json, mergekit equivalent in mergekit.yaml)"
    )


if __name__ == "__main__":
    main()
