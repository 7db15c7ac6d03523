"""Train one phase of the method: `python -m pipeline.train CONFIG.yaml [--key=value ...]`.

The same command runs on one process or under `deepspeed`, `mpirun` or `srun`; the world size
decides the data-parallel size, and the config decides the rest.
"""
from __future__ import annotations

import argparse
import sys

from data_prep.common import fail_cleanly

from .config import describe_keys, load_config, parse_overrides

EPILOG = """\
examples:
  python -m pipeline.train configs/demo/chat.yaml
  python -m pipeline.train configs/demo/raw.yaml --lr=5e-4 --steps=200
  deepspeed --num_gpus 4 --module pipeline.train configs/demo/raw.yaml --pipeline_stages=2
  launch/run.sh configs/demo/raw.yaml              (hostfile, nodes and GPUs from the environment)

Rerunning the same command resumes from the newest complete checkpoint in `out`.

config keys (YAML `key: value`, or --key=value on the command line, which wins):
"""


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m pipeline.train", description=__doc__.splitlines()[0],
        epilog=EPILOG + describe_keys(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="run config YAML (see configs/ for examples)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    return args, rest


def preflight(cfg) -> None:
    """Every check that needs no other rank, before DeepSpeed starts: a mistake in the model, the
    layer boundaries, the DeepSpeed JSON or the data fails in seconds, with one message, and
    before anything is written. (The world size is known here only when the launcher set
    WORLD_SIZE; under mpirun/srun the same check runs once the ranks have met.)"""
    import os

    import torch

    from .config import data_sources, load_ds_config
    from .data import open_data
    from .groups import partition
    from .loop import data_check
    from .parallel import batch_plan, check_model

    hf_config, groups, _ = check_model(cfg)
    partition(groups, cfg.parallel.pipeline_stages)
    load_ds_config(cfg, torch.cuda.is_available())
    if os.environ.get("WORLD_SIZE", "").isdigit():
        batch_plan(cfg, int(os.environ["WORLD_SIZE"]))
    data_check(cfg, hf_config, open_data(data_sources(cfg.data.data), cfg.data.seq_len, cfg.schedule.seed))


@fail_cleanly
def main(argv=None):
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, parse_overrides(rest))
    preflight(cfg)

    from .dist import init
    from .loop import train
    from .parallel import build_job
    from .watchdog import guard

    rank, world_size, _ = init(timeout_s=cfg.parallel.dist_timeout_s)
    # With several ranks, a failure anywhere ends every rank with a message naming the rank
    # that stopped (pipeline/watchdog.py), instead of a hang or a wall of tracebacks.
    with guard(rank, world_size):
        train(build_job(cfg, rank, world_size))


if __name__ == "__main__":
    main()
