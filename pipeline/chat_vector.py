"""`python -m pipeline.chat_vector`: the command line of pipeline/convert/chat_vector.py."""

from __future__ import annotations

import argparse

from data_prep.errors import fail_cleanly

from .convert import chat_vector as convert_chat_vector
from .convert.layer_weights import summary
from .convert.output import add_output_flags

EPILOG = """examples:
  # A-Raw (a run trained from the base) plus the chat vector of an instruct model of the same base
  python -m pipeline.chat_vector --raw runs/a-raw --chat models/X-Instruct --base models/X --out models/cv
  # a full continued pretraining of the base and a chat fine-tune of it, half the chat vector
  python -m pipeline.chat_vector --raw runs/cpt --chat runs/chat-full --base models/X --ratio 0.5 --out models/cv05

layer-aware weights: theta = base + a * (raw - base) + b * (chat - base), (a, b) per layer
  # per layer group (pipeline/groups.py): the raw change below format_start, the chat change from it up
  # (this is the transplant); groups not named keep raw 1, chat --ratio
  python -m pipeline.chat_vector --raw runs/a-raw --chat runs/a-chat --base models/X --out models/lw \\
      --raw-weights frozen=1,raw=1,format=0 --chat-weights frozen=0,raw=0,format=1
  # a continued pretraining and an instruct model: raw change below, chat change above, blended over
  # 2 layers on each side of format_start (Layer Swapping's transition zone)
  python -m pipeline.chat_vector --raw runs/cpt --chat models/X-Instruct --base models/X --out models/lw2 \\
      --raw-weights format=0 --chat-weights frozen=0,raw=0 --transition 2
  # two HF directories record no boundary: give it
  python -m pipeline.chat_vector --raw exports/cpt --chat models/X-Instruct --base models/X --out models/lw3 \\
      --format-start 24 --raw-weights format=0.5 --chat-weights raw=0.25
  # every weight explicit, per layer (one value per decoder layer) and for embed/norm/head:
  #   raw:  [1, 1, 1, 0.75, 0.25, 0, 0, 0]
  #   chat: [0, 0, 0, 0.25, 0.75, 1, 1, 1]
  #   embed: {raw: 1, chat: 0}
  #   norm:  {raw: 0, chat: 1}
  #   head:  {raw: 0, chat: 1}      # untied models only: a tied head is the embedding matrix
  python -m pipeline.chat_vector --raw runs/cpt --chat models/X-Instruct --base models/X --out models/lw4 \\
      --layer-weights weights.yaml

chat_vector.json records the weights of every tensor and the per-layer table; mergekit.yaml holds
the same merge with per-layer weight lists, which mergekit reproduces bitwise.

memory: about one shard (--max-shard-size) plus three layers (raw, chat, base), whatever the model size.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.chat_vector",
        description=convert_chat_vector.__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--raw",
        required=True,
        metavar="RUN_OR_HF_DIR",
        help="the model that learned your documents, trained from --base (A-Raw, or a full continued pretraining)",
    )
    p.add_argument(
        "--chat",
        required=True,
        metavar="RUN_OR_HF_DIR",
        help="the chat model of the same base: gives the chat vector (chat - base), the tokenizer and template",
    )
    p.add_argument("--base", required=True, metavar="HF_DIR", help="the base model both were trained from")
    p.add_argument("--ratio", type=float, help="how much of the chat vector to add to every tensor (default 1.0)")
    p.add_argument("--raw-step", type=int, metavar="N", help="checkpoint step of a --raw run (default: latest)")
    p.add_argument("--chat-step", type=int, metavar="N", help="checkpoint step of a --chat run (default: latest)")
    p.add_argument(
        "--chat-template-from",
        choices=("chat", "raw"),
        metavar="INPUT",
        help="whose chat template the result ships when --raw and --chat were trained with different "
        "ones (refused otherwise): chat or raw",
    )
    lw = p.add_argument_group(
        "layer-aware weights",
        "theta = base + a * (raw - base) + b * (chat - base), with (a, b) per layer instead of (1, --ratio) everywhere",
    )
    lw.add_argument(
        "--raw-weights",
        metavar="GROUP=W,...",
        help="a per layer group, e.g. frozen=1,raw=1,format=0 (groups: frozen, raw, format; the "
        "embeddings are frozen, the final norm and an untied LM head format; default 1)",
    )
    lw.add_argument(
        "--chat-weights",
        metavar="GROUP=W,...",
        help="b per layer group, e.g. frozen=0,raw=0,format=1 (default --ratio, 1.0)",
    )
    lw.add_argument(
        "--transition",
        metavar="W",
        help="blend the W layers on each side of format_start linearly from the raw group's weights "
        "to the format group's, instead of switching at one layer (default 0)",
    )
    lw.add_argument(
        "--format-start",
        type=int,
        metavar="N",
        help="first layer of the format group, for the group weights; needed only when --raw and "
        "--chat are both HF directories (with runs it must match their run.json)",
    )
    lw.add_argument(
        "--layer-weights",
        metavar="FILE.yaml",
        help="every weight explicit: raw: [a_0..a_L-1], chat: [b_0..b_L-1], embed/norm/head: "
        "{raw: A, chat: B} (head only when untied); instead of the flags above",
    )
    add_output_flags(p, made="merge", auto_dtype="the base's")
    return p


@fail_cleanly
def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    rec = convert_chat_vector.chat_vector(
        a.raw,
        a.chat,
        a.base,
        a.out,
        a.ratio,
        a.raw_step,
        a.chat_step,
        a.max_shard_size,
        a.force,
        a.dtype,
        a.chat_template_from,
        raw_weights=a.raw_weights,
        chat_weights=a.chat_weights,
        transition=a.transition,
        layer_weights=a.layer_weights,
        format_start=a.format_start,
    )
    where = f"{len(rec['tensors'])} tensors; provenance in chat_vector.json, mergekit equivalent in mergekit.yaml"
    if "weights" not in rec:
        print(f"chat vector: {a.raw} + {rec['ratio']} x ({a.chat} - {a.base}) -> {a.out} ({where})")
        return
    print(
        f"layer-aware chat vector: {a.base} + a x ({a.raw} - {a.base}) + b x ({a.chat} - {a.base}) -> {a.out} "
        f"({where}); a = raw, b = chat:"
    )
    print("\n".join(summary(rec["weights"])))


if __name__ == "__main__":
    main()
