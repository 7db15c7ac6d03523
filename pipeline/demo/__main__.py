"""`python -m pipeline.demo`: the whole method on a built-in synthetic world, on CPU.

Builds a world of fictional people, pretrains a tiny base on the known ones, trains A-Chat and
A-Raw, transplants, trains the baselines (naive, Q/A upper bound) and a re-attach remedy, then
evaluates every model and prints a table of format adherence against knowledge.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.common import fail_cleanly

EPILOG = """\
examples:
  make demo                                   (the same as the next line, after setting up .venv)
  python -m pipeline.demo --out runs/demo     (~11 min on 2 CPU cores)
  python -m pipeline.demo --ablations         (adds raw_trains_format, low raw lr, a format_start sweep)
  python -m pipeline.demo --size tiny --out /tmp/demo-smoke   (a 1-minute plumbing check)

outputs in OUT: results.json, results.md (the table and what it means), results.png
(format adherence vs knowledge), models/ (every model as an HF directory), runs/ (training runs
with metrics.jsonl and loss.png), logs/. Rerunning continues where an interrupted run stopped.
"""


@fail_cleanly
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.splitlines()[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="demo directory (default: runs/demo)")
    p.add_argument("--size", choices=["full", "tiny"], default="full",
                   help="full: the real demo; tiny: minutes-long plumbing check with meaningless numbers")
    p.add_argument("--seed", type=int, default=0, help="one seed for the world, init, data order (default 0)")
    p.add_argument("--ablations", action="store_true", help="also run the ablations (takes longer than 20 min)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per step (default 1: robust when other work shares the cores)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from .run import Demo

    kw = {"threads": args.threads} if args.threads else {}
    Demo(Path(args.out), size=args.size, seed=args.seed, ablations=args.ablations, **kw).run()


if __name__ == "__main__":
    main()
