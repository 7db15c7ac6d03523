"""`python -m pipeline.probe`: the command line of pipeline/evaluation/layer_probe.py."""

from __future__ import annotations

import argparse

from data_prep.errors import UserError, fail_cleanly
from data_prep.files import check_writable

from .evaluation import layer_probe

EPILOG = """examples:
  # an instruct sibling against its base: where did chat tuning change the model?
  python -m pipeline.probe --base models/X --chat models/X-Instruct --prompts chat_eval.jsonl --out runs/probe
  # weights only (no prompts): run directories work too
  python -m pipeline.probe --base models/X --chat runs/chat-full --out runs/probe

writes OUT/probe.json, probe.md (the table and the suggestion) and probe.png (the plot).
"""


@fail_cleanly
def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.probe",
        description=layer_probe.__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", required=True, metavar="DIR", help="the base model (HF directory or run directory)")
    p.add_argument("--chat", required=True, metavar="DIR", help="its chat model (HF directory or run directory)")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="chat prompts (.jsonl, the --chat-eval format of pipeline.evaluate) for the hidden-state "
        "similarity; needs two HF directories",
    )
    p.add_argument("--max-prompts", type=int, default=16, help="prompts used at most (default 16)")
    p.add_argument("--out", required=True, help="folder for probe.json, probe.md, probe.png")
    a = p.parse_args(argv)
    if a.max_prompts < 1:
        raise UserError(f"--max-prompts {a.max_prompts}: must be >= 1 (it is how many prompts of --prompts are used)")
    if a.prompts is None and a.max_prompts != p.get_default("max_prompts"):
        raise UserError("--max-prompts applies to --prompts, which is not given")
    check_writable(a.out, "--out", inside=True)
    r = layer_probe.run_probe(a.base, a.chat, a.out, a.prompts, a.max_prompts)
    print(layer_probe.markdown(r))


if __name__ == "__main__":
    main()
