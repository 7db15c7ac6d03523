"""A stand-in for pipeline.train in launch tests: start the job the way train does
(pipeline.training.dist.init), prove the ranks talk (all_reduce), write what each rank saw.

    python tests/helpers/dist_probe.py OUT_DIR [--key=value ...]
Writes OUT_DIR/rank_<RANK>.json. Extra arguments are recorded, to check pass-through.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, for `pipeline`

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pipeline.training.dist import init  # noqa: E402

# The deepspeed launcher prepends --local_rank=N unless told --no_local_rank; pipeline.train
# tolerates it the same way.
argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
out = Path(argv[0])
rank, world, local = init(timeout_s=60)
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)  # sum of 1..world: every rank must have joined the same group
record = {
    "rank": rank,
    "world": world,
    "local_rank": local,
    "sum": t.item(),
    "backend": dist.get_backend(),
    "args": argv[1:],
    "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")},
}
(out / f"rank_{rank}.json").write_text(json.dumps(record))
dist.barrier()
dist.destroy_process_group()
