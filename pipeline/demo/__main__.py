"""`python -m pipeline.demo`: the whole method on a built-in synthetic world, on CPU.

Builds a world of fictional people, pretrains a tiny base on the known ones, trains A-Chat and
A-Raw, transplants, trains the baselines (naive, Q/A upper bound, chat vector, sequential) and the
recipe of demo/recipe.yaml (shipped in pipeline/configs/), then evaluates every model and says what the table shows.
With --sweep FILE it measures every recipe (and world variant) of the file instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.errors import fail_cleanly

EPILOG = """\
examples:
  make demo                                        (the same as the next line, after setting up .venv)
  python -m pipeline.demo --out runs/demo          (~15 min on 2 idle CPU cores)
  python -m pipeline.demo --out runs/demo --sweep demo/sweep.yaml      (make sweep: hours)
  python -m pipeline.demo --size tiny --out /tmp/demo-smoke    (a few minutes: plumbing only)
  python -m pipeline.demo --out runs/demo-seeds --seeds 0-4    (make demo SEEDS=0,1,2,3,4: ~15 min a seed)

outputs in OUT: results.json, results.md (the table and what it shows), results.png (format
adherence vs knowledge), forgetting.png (A-Raw's and naive's validation losses while training, on
the new people's held-out biographies and on the base's corpus), models/ (every model as an HF
directory), runs/ (training runs with metrics.jsonl and loss.png), eval/, logs/; with --sweep also
sweep.json, sweep.md, sweep.png. With --seeds, OUT/seed-S/ holds each seed's demo, and
OUT/aggregate.{md,json,png} the means, 95% intervals, paired differences and the verdict; seeds a
recipe was chosen on (its `tuned_on`) are reported apart, and the verdict is read on the others.
Rerunning continues where an interrupted run stopped; a sweep reuses a demo's runs in the same OUT.
"""


@fail_cleanly
def main(argv=None):
    from .run import CONFIGS

    p = argparse.ArgumentParser(
        prog="python -m pipeline.demo",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="demo directory (default: runs/demo)")
    p.add_argument(
        "--size",
        choices=["full", "tiny"],
        default="full",
        help="full: the real demo; tiny: minutes-long plumbing check with meaningless numbers",
    )
    p.add_argument("--seed", type=at_least(0), default=0, help="one seed for the world, init, data order (default 0)")
    p.add_argument(
        "--seeds",
        type=seed_list,
        metavar="S,S,...",
        help="run each seed in OUT/seed-S (skipping what is done), then write OUT/aggregate.{md,json,png}: "
        "means with 95%% intervals, paired differences and a verdict that reads them",
    )
    p.add_argument(
        "--recipe",
        type=Path,
        default=CONFIGS / "recipe.yaml",
        help="the recipe (or recipes) to run beside the baselines (default demo/recipe.yaml, the best the sweep found)",
    )
    p.add_argument(
        "--world",
        type=world_arg,
        default={},
        metavar="KEY=VALUE,...",
        help="another world than the default: build_world's parameters, e.g. names=syllables (names split into "
        "several tokens), qa_form=plain (the base saw Q/A as 'Q: ... A: ...', not in the chat's role words) or "
        "pretrain_qa_rounds=0 (a base that never saw Q/A); see pipeline/demo/world.py",
    )
    p.add_argument("--sweep", type=Path, metavar="FILE", help="measure every recipe and world of FILE instead")
    p.add_argument(
        "--workers", type=at_least(1), default=2, help="steps run at once, one thread each (default 2: the cores)"
    )
    p.add_argument(
        "--threads",
        type=at_least(1),
        default=1,
        help="CPU threads per step (default 1); the base, which runs alone, gets workers x threads",
    )
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from . import recipes
    from .run import Demo

    out = Path(args.out)
    if args.sweep:
        from .sweep import run_sweep, sweep_seeds

        if args.seeds:
            sweep_seeds(out, args.sweep, args.seeds, size=args.size, workers=args.workers)
        else:
            run_sweep(out, args.sweep, size=args.size, seed=args.seed, workers=args.workers)
        return
    chosen, _ = recipes.load(args.recipe)
    if not args.seeds:
        Demo(
            out,
            size=args.size,
            seed=args.seed,
            recipes=chosen,
            world_overrides=args.world,
            workers=args.workers,
            threads=args.threads,
        ).run()
        return
    from .aggregate import write_aggregate
    from .run import BASELINES
    from .verdict import LAYER_AWARE

    folders = []
    for s in args.seeds:
        print(f"== seed {s} ==", flush=True)
        d = Demo(
            out / f"seed-{s}",
            size=args.size,
            seed=s,
            recipes=chosen,
            world_overrides=args.world,
            workers=args.workers,
            threads=args.threads,
        )
        d.run()
        folders.append(d.out)
    tuned = sorted({t for r in chosen for t in r.tuned_on})
    print(
        write_aggregate(
            folders,
            out,
            [*LAYER_AWARE, *(r.model for r in chosen)],
            tuned,
            order=[*BASELINES, *(r.model for r in chosen)],
            world=args.world,
        ),
        flush=True,
    )


def world_arg(text: str) -> dict:
    from .world import world_options

    try:
        return world_options(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def at_least(low: int):
    """An argparse type: an integer >= low, refused (exit 2, the flag named) before anything runs."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def seed_list(text: str) -> list[int]:
    """`0,1,2` or a range `0-4` -> [0, 1, 2, ...], each seed once, in order."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2 or 0-4, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds like 0,1,2 or 0-4, got {text!r}")
    return seeds


if __name__ == "__main__":
    main()
