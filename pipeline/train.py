"""Train one phase of the method: `python -m pipeline.train CONFIG.yaml [--key=value ...]`.

The same command runs on one process or under `deepspeed`, `mpirun` or `srun`; the world size
decides the data-parallel size, and the config decides the rest.
"""
from __future__ import annotations

import argparse
import sys

from data_prep.common import UserError, fail_cleanly

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


@fail_cleanly
def main(argv=None):
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, parse_overrides(rest))

    from .dist import init
    from .loop import train
    from .parallel import build_job

    rank, world_size, _ = init(timeout_s=cfg.parallel.dist_timeout_s)
    train(build_job(cfg, rank, world_size))


if __name__ == "__main__":
    main()
