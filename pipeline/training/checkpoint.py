"""Saving and resuming through the engine: DeepSpeed writes the tensors, the run directory
(pipeline/rundir.py) decides what counts as complete and which step is the latest.

Both functions are collectives: every rank calls them. The cost: rank 0 hashes every file of
each checkpoint, so a checkpoint that disagrees with its record is caught when opened.
"""

from __future__ import annotations

import torch.distributed as dist

from data_prep.common import UserError

from ..rundir import RunDir, tag_for


def save(engine, run: RunDir, step: int, keep_last: int) -> None:
    rank = dist.get_rank()
    if rank == 0:
        run.discard_incomplete(step)  # a leftover from a killed save of the same step
    dist.barrier()
    engine.save_checkpoint(str(run.checkpoints), tag=tag_for(step), client_state={"step": step}, save_latest=False)
    dist.barrier()
    if rank == 0:
        run.write_record(step)
        run.prune(keep_last)
    dist.barrier()


def resume(engine, run: RunDir) -> int:
    """Load the latest complete checkpoint if there is one; return its step (0: a fresh start)."""
    step = run.latest_step()
    if step is None:
        return 0
    # Rank 0 checks the files; every rank learns the verdict, so a bad checkpoint fails all ranks
    # at once instead of leaving the others waiting in a collective.
    verdict = [None]
    if dist.get_rank() == 0:
        try:
            run.verify(step)
        except UserError as e:
            verdict[0] = str(e)
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise UserError(verdict[0])
    engine.load_checkpoint(str(run.checkpoints), tag=tag_for(step))
    return step
