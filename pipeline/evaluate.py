"""Evaluate a Hugging Face chat model: format adherence, knowledge, raw perplexity.

Thin entry point; the metrics and their exact definitions live in pipeline/evaluation/metrics.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_prep.errors import UserError, fail_cleanly
from data_prep.files import check_writable, owned

EPILOG = """\
file formats (.jsonl, one record per line):
  --chat-eval  {"messages": [{"role": "user", "content": "..."}], "answer": "...", "candidates": [...]}
               "answer" and "candidates" are optional; {"prompt": "..."} is a one-turn shorthand;
               a trailing assistant message is dropped and used as the answer.
  --raw-eval   {"text": "..."}   (or a .txt file: paragraphs separated by blank lines)
  --probe      {"prompt": "Ana Berg grew up in", "answer": "Oslo", "candidates": ["Oslo", ...]}

naming: a file given as NAME=FILE is its own suite. Unnamed chat files are pooled into the main
metrics (format_adherence, knowledge_accuracy, knowledge_rank, chance_rank); a named one gives
NAME_format_adherence, NAME_accuracy, NAME_rank, NAME_chance_rank. Raw files give ppl_raw or
ppl_raw_NAME; probes give raw_rank or raw_rank_NAME.

examples:
  # format and knowledge on your own prompts
  python -m pipeline.evaluate --model out/transplant --chat-eval my_questions.jsonl

  # the demo's metric set, appended to a results file (results.md / results.png beside it)
  python -m pipeline.evaluate --model runs/demo/transplant --name transplant \\
      --chat-eval world/chat_eval_format.jsonl --chat-eval world/chat_eval_new.jsonl \\
      --chat-eval heldout_known=world/chat_eval_heldout.jsonl \\
      --raw-eval new=world/raw_eval_new.jsonl --raw-eval known=world/raw_eval_known.jsonl \\
      --probe new=world/probe_new.jsonl --out runs/demo/results.json
"""


# How long an evaluation waits for another one to finish writing the same results file (a write
# takes about a second: the table and the chart).
WAIT_FOR_RESULTS_S = 300


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate",
        description="Evaluate an HF causal LM directory on chat prompts (format adherence, exact-match "
        "accuracy, rank of the true answer among candidates), raw completion probes and "
        "raw-text perplexity. Greedy decoding; candidates are scored by log-prob, not sampled.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="HF model directory (config.json + weights)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--chat-eval", action="append", metavar="[NAME=]FILE", help="chat prompts (repeatable)")
    p.add_argument("--raw-eval", action="append", metavar="[NAME=]FILE", help="raw texts for perplexity (repeatable)")
    p.add_argument("--probe", action="append", metavar="[NAME=]FILE", help="raw completion probes (repeatable)")
    p.add_argument("--out", help="results .json to create or update (entry --name); writes .md and .png beside it")
    p.add_argument("--name", help="model name in the results (default: the model directory's name)")
    p.add_argument("--details", help="write every prompt's reply, verdict and rank to this .jsonl")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="reply length limit; a reply without end-of-turn by then fails format (default 32)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch (default 32)")
    p.add_argument(
        "--score-batch-size",
        type=int,
        default=256,
        help="(prompt, candidate) pairs per scoring forward pass; lower it for big models (default 256)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not (args.chat_eval or args.raw_eval or args.probe):
        p.error("nothing to evaluate: give at least one of --chat-eval, --raw-eval, --probe")
    for flag in ("max_new_tokens", "batch_size", "score_batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    return args


@fail_cleanly
def main(argv=None):
    args = parse_args(argv)
    from .evaluation.report import load_results, markdown_table, write_report
    from .evaluation.runner import evaluate_model, parse_named

    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: no such directory")
    if (Path(args.model) / "run.json").is_file():
        raise UserError(
            f"--model {args.model}: this is a training run directory, not a model; export it first: "
            f"python -m pipeline.export {args.model} --out {args.model.rstrip('/')}-hf"
        )
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix != ".json":
        raise UserError(f"--out {args.out}: must name a .json file")
    # Every output is checked before the model is even loaded, not once the evaluation is done.
    for flag, path in (("--out", out), ("--details", args.details)):
        if path is not None:
            if Path(path).is_dir():
                raise UserError(f"{flag} {path}: is a directory; name a file")
            check_writable(path, flag)
    if out:
        load_results(out)  # fail on a bad results file before the work
    metrics = evaluate_model(
        args.model,
        chat=parse_named(args.chat_eval, "--chat-eval"),
        raw=parse_named(args.raw_eval, "--raw-eval"),
        probes=parse_named(args.probe, "--probe"),
        tokenizer_dir=args.tokenizer,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        score_batch_size=args.score_batch_size,
        details_path=args.details,
        progress=not args.no_progress,
    )
    name = args.name or Path(args.model).resolve().name
    if out:
        # The results file is shared: several evaluations add their model to it, perhaps at the same
        # time. Each reads it again and writes it while it owns it (waiting for another writer to
        # finish), so a model added while this one was evaluated is kept, not overwritten.
        with owned(out, "--out", wait_s=WAIT_FOR_RESULTS_S):
            results = load_results(out)
            results["models"][name] = metrics
            table = write_report(results, out.parent, stem=out.stem)
    else:
        table = markdown_table({name: metrics})
    print(json.dumps({name: metrics}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
