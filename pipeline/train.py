"""Train one phase of the method: `python -m pipeline.train CONFIG.yaml [--key=value ...]`.

The same command runs on one process or under `deepspeed`, `mpirun` or `srun`; the world size
decides the data-parallel size, and the config decides the rest. Each rank first builds the run's
plan (pipeline/training/plan.py: every check, before DeepSpeed starts), then the engine, then
trains (pipeline/training/loop.py).
"""

from __future__ import annotations

import argparse
import sys

from data_prep.errors import fail_cleanly

from .config import describe_keys, load_config, parse_overrides

EPILOG = """\
examples:
  python -m pipeline.train demo/chat.yaml
  python -m pipeline.train demo/raw.yaml --lr=5e-4 --steps=200
  deepspeed --num_gpus 4 --module pipeline.train raw.yaml                  (2 stages x 2 data-parallel)
  launch/run.sh raw.yaml                      (hostfile, nodes and GPUs from the environment)

A relative CONFIG that is not a file under the working directory names a config shipped with
the package (chat.yaml, raw.yaml, demo/*.yaml: pipeline/configs/), from any folder and from an
installed wheel; your own file of the same name wins. The config's own paths (model, data, out) are relative
to the working directory. Rerunning the same command resumes from the newest complete
checkpoint in `out`.

config keys (YAML `key: value`, or --key=value on the command line, which wins):
"""


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description=__doc__.splitlines()[0],
        epilog=EPILOG + describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="run config YAML: your file, or a shipped one (chat.yaml, raw.yaml, demo/raw.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print DeepSpeed's start-up lines (its seed, topology and op-build messages) as they come; "
        "by default rank 0 prints one line that sums them up",
    )
    return p.parse_known_args(argv)


def preflight(cfg, info: dict | None = None):
    """The run's plan, built before DeepSpeed starts: a mistake in the model, the boundaries,
    the layout, the DeepSpeed JSON or the data fails in seconds, on every rank, writing nothing.
    The world size comes from the launcher's environment (deepspeed, torchrun, srun, mpirun)."""
    from .training.dist import setup_distributed_env
    from .training.plan import build_plan

    info = info or setup_distributed_env()
    return build_plan(cfg, int(info["WORLD_SIZE"]))


@fail_cleanly
def main(argv=None):
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, parse_overrides(rest))

    from .training import engine, loop
    from .training.dist import init, setup_distributed_env
    from .training.watchdog import guard

    info = setup_distributed_env()
    plan = preflight(cfg, info)
    held = StartUpLines(args.verbose)
    with held:
        rank, world_size, _ = init(timeout_s=cfg.parallel.dist_timeout_s, info=info)
    # With several ranks, a failure anywhere ends every rank with a message naming the rank
    # that stopped (pipeline/training/watchdog.py), instead of a hang or a wall of tracebacks.
    with guard(rank, world_size):
        with held:
            eng = engine.build_engine(plan, rank)
        held.sum_up(rank, eng)
        loop.train(eng)


class StartUpLines:
    """DeepSpeed's start-up prints (its op-build, seed and topology lines: several per rank, at
    every start, in every SLURM log) held back while the process group and the engine start; rank
    0 then prints our own `[dist]` line and one line that sums the rest up. `--verbose` lets them
    through. A failure prints what was held back first, since it may explain the failure."""

    def __init__(self, verbose: bool):
        import io

        self.verbose, self.text = verbose, io.StringIO()

    def __enter__(self):
        import contextlib

        self._cm = contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(self.text)
        self._cm.__enter__()
        return self

    def __exit__(self, kind, value, tb):
        self._cm.__exit__(kind, value, tb)
        if kind is not None and not self.verbose:
            sys.stdout.write(self.text.getvalue())
        return False

    def sum_up(self, rank: int, eng) -> None:
        if self.verbose or rank != 0:
            return
        import deepspeed

        lines = [line for line in self.text.getvalue().splitlines() if line.strip()]
        ours = [line for line in lines if line.startswith("[dist]")]
        print(
            "\n".join(
                ours
                + [
                    f"DeepSpeed {deepspeed.__version__}: {eng.plan.num_stages} pipeline stage(s) x "
                    f"{eng.plan.batch.dp_size} data-parallel rank(s) ({len(lines) - len(ours)} start-up line(s) of "
                    f"rank 0 held back; --verbose shows them)"
                ]
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
