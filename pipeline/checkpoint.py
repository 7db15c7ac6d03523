"""Checkpoints that resume: DeepSpeed writes the tensors, we decide what counts as complete.

A tag directory `step_{N:08d}` is complete only once rank 0 has written its `record.json`
(after every rank finished saving). `latest` names the newest complete tag and is replaced
atomically. A kill mid-save leaves a tag without a record, which resume ignores and the next
save of that step replaces. The cost: rank 0 hashes every file of each checkpoint (so a
checkpoint that disagrees with its record is caught when opened).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from data_prep.common import UserError, atomic_write_json, atomic_write_text, sha256_file

TAG_RE = re.compile(r"^step_(\d{8})$")
RECORD = "record.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir()
                  if (m := TAG_RE.match(p.name)) and (p / RECORD).is_file())


def latest_step(ckpt_dir: Path) -> int | None:
    steps = complete_steps(ckpt_dir)
    return steps[-1] if steps else None


def verify(tag_dir: Path) -> dict:
    """Check every file of a complete checkpoint against its record; return the record."""
    record_path = tag_dir / RECORD
    if not record_path.is_file():
        raise UserError(f"{tag_dir}: checkpoint is incomplete (no {RECORD})")
    record = json.loads(record_path.read_text())
    for name, digest in record["files"].items():
        f = tag_dir / name
        if not f.is_file():
            raise UserError(f"{f}: listed in {record_path} but missing")
        if sha256_file(f) != digest:
            raise UserError(f"{f}: sha256 disagrees with {record_path} (corrupted or replaced checkpoint file)")
    return record


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int) -> None:
    """Collective: every rank calls it."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # an incomplete leftover from a killed save of the same step
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if rank == 0:
        # Test hook (tests/test_reliability.py): hold the tag dir in its incomplete state (every
        # file written, no record.json yet) so a test can kill the job exactly there.
        time.sleep(float(os.environ.get("LAYER_AWARE_TEST_PAUSE_IN_SAVE", 0)))
        files = {p.name: sha256_file(p) for p in sorted(tag_dir.iterdir()) if p.is_file()}
        atomic_write_json(tag_dir / RECORD, {"step": step, "files": files})
        atomic_write_text(ckpt_dir / "latest", tag + "\n")
        if keep_last > 0:
            for old in complete_steps(ckpt_dir)[:-keep_last]:
                shutil.rmtree(ckpt_dir / tag_for(old), ignore_errors=True)
    dist.barrier()


def resume(engine, ckpt_dir: Path) -> tuple[int, dict]:
    """Load the newest complete checkpoint if there is one; return (step, client_state)."""
    step = latest_step(ckpt_dir)
    if step is None:
        return 0, {}
    # Rank 0 checks the files; every rank learns the verdict, so a bad checkpoint fails all ranks
    # at once instead of leaving the others waiting in a collective.
    verdict = [None]
    if dist.get_rank() == 0:
        try:
            verify(ckpt_dir / tag_for(step))
        except UserError as e:
            verdict[0] = str(e)
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise UserError(verdict[0])
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag_for(step))
    return step, client_state or {}


def optimizer_numel_per_stage(tag_dir: Path) -> dict[int, int]:
    """Parameters that have optimizer state, per pipeline stage, summed over the data-parallel
    ZeRO-1 partitions (padding excluded). Frozen parameters must contribute nothing."""
    import torch

    out: dict[int, int] = {}
    for f in sorted(Path(tag_dir).glob("zero_pp_rank_*_mp_rank_*_optim_states.pt")):
        stage = int(f.stem.split("_mp_rank_")[1].split("_")[0])
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        # param_slice_mappings: per param group, {param name: (numel, start)} of this rank's slice.
        n = sum(frag.numel for group in osd["param_slice_mappings"] for frag in group.values())
        out[stage] = out.get(stage, 0) + n
    return out
