"""`python -m pipeline.demo`: the whole method on a built-in synthetic world, on CPU.

Builds a world of fictional people, pretrains a tiny base on the known ones, trains A-Chat and
A-Raw, transplants, trains the baselines (naive, Q/A upper bound, chat vector, sequential) and the
recipe of configs/demo/recipe.yaml, then evaluates every model and says what the table shows.
With --sweep FILE it measures every recipe (and world variant) of the file instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.common import fail_cleanly

EPILOG = """\
examples:
  make demo                                        (the same as the next line, after setting up .venv)
  python -m pipeline.demo --out runs/demo          (~15 min on 2 idle CPU cores)
  python -m pipeline.demo --out runs/demo --sweep configs/demo/sweep.yaml      (make sweep: hours)
  python -m pipeline.demo --size tiny --out /tmp/demo-smoke    (a few minutes: plumbing only)

outputs in OUT: results.json, results.md (the table and what it shows), results.png (format
adherence vs knowledge), forgetting.png (A-Raw's and naive's validation losses while training, on
the new people's held-out biographies and on the base's corpus), models/ (every model as an HF
directory), runs/ (training runs with metrics.jsonl and loss.png), eval/, logs/; with --sweep also
sweep.json, sweep.md, sweep.png.
Rerunning continues where an interrupted run stopped; a sweep reuses a demo's runs in the same OUT.
"""


@fail_cleanly
def main(argv=None):
    from .run import CONFIGS

    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.splitlines()[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="demo directory (default: runs/demo)")
    p.add_argument("--size", choices=["full", "tiny"], default="full",
                   help="full: the real demo; tiny: minutes-long plumbing check with meaningless numbers")
    p.add_argument("--seed", type=int, default=0, help="one seed for the world, init, data order (default 0)")
    p.add_argument("--recipe", type=Path, default=CONFIGS / "recipe.yaml",
                   help="the recipe (or recipes) to run beside the baselines (default configs/demo/recipe.yaml, "
                        "the best the sweep found)")
    p.add_argument("--sweep", type=Path, metavar="FILE", help="measure every recipe and world of FILE instead")
    p.add_argument("--workers", type=int, default=2, help="steps run at once, one thread each (default 2: the cores)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per step (default 1); the base, which runs alone, gets workers x threads")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from . import recipes
    from .run import Demo

    if args.sweep:
        from .sweep import run_sweep

        run_sweep(Path(args.out), args.sweep, size=args.size, seed=args.seed, workers=args.workers)
        return
    chosen, _ = recipes.load(args.recipe)
    Demo(Path(args.out), size=args.size, seed=args.seed, recipes=chosen, workers=args.workers,
         threads=args.threads).run()


if __name__ == "__main__":
    main()
