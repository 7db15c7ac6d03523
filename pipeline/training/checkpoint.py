"""Saving and resuming through the engine: DeepSpeed writes the tensors, the run directory
(pipeline/rundir.py) decides what counts as complete and which step is the latest.

Both functions are collectives: every rank calls them. The cost: rank 0 hashes every file of
each checkpoint, so a checkpoint that disagrees with its record is caught when opened.

Elastic resume: a checkpoint resumes on another data-parallel size (the pipeline stages stay;
rundir.check_resume refuses other stages at preflight). The weights are in per-layer files, the
LR schedule and step counters in each stage's mp_rank file: neither depends on the size. The
optimizer state does: with ZeRO-1 each data-parallel rank saved its slice of the stage's flat
fp32 master weights and Adam moments (`zero_pp_rank_D_mp_rank_S_optim_states.pt`), and without
ZeRO (one rank, fp32) the stage saved torch's whole per-parameter state in its mp_rank file.
DeepSpeed refuses to load either onto another partitioning (ZeRORuntimeException), so the resume
loads everything else through DeepSpeed with `load_optimizer_states=False` (which also resets the
fp32 masters from the loaded weights, never from another rank's slice), then rebuilds each trained
parameter's state from the slices that DeepSpeed's `param_slice_mappings` name, and writes this
rank's new slice (or the whole per-parameter state) into the optimizer: masters, moments, step
and the parameter groups' hyperparameters (the learning rate of the next step among them).
Cost, on an elastic resume only: each rank reads the saved slices of the parameters its own
slice touches (memory-mapped), about 1/DP of its stage's optimizer state.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.errors import UserError

from ..rundir import RunDir, tag_for

# One data-parallel rank's slice of one pipeline stage's optimizer state (bf16_: saved by a bf16 engine).
_PARTITION = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


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
    verdict = [None, None]
    if dist.get_rank() == 0:
        try:
            verdict[1] = run.verify(step)["files"]
            for stage in {int(m.group(2)) for name in verdict[1] if (m := _PARTITION.match(name))}:
                saved_partitions(verdict[1], stage, run.tag_dir(step))  # every stage's, complete
        except UserError as e:
            verdict[0] = str(e)
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise UserError(verdict[0])
    saved = saved_partitions(verdict[1], engine.checkpoint_mp_rank, run.tag_dir(step))
    if len(saved) == partitions(engine):  # the layout it was saved with: DeepSpeed loads it all
        engine.load_checkpoint(str(run.checkpoints), tag=tag_for(step))
        return step
    _, client_state = engine.load_checkpoint(str(run.checkpoints), tag=tag_for(step), load_optimizer_states=False)
    error = None
    try:
        load_repartitioned(engine, [run.tag_dir(step) / name for name in saved], client_state or {})
    except UserError as e:
        error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if any(errors):
        raise UserError(next(e for e in errors if e))
    return step


def partitions(engine) -> int:
    """How many slices this engine's optimizer state is cut into: its data-parallel size with
    ZeRO-1 (or DeepSpeed's BF16_Optimizer), 0 for a plain torch optimizer holding it whole. The
    same test DeepSpeed's save uses to write the per-rank optimizer files."""
    group = getattr(engine.optimizer, "dp_process_group", None)
    return 0 if group is None else dist.get_world_size(group=group)


def saved_partitions(files, mp_rank: int, tag_dir: Path) -> list[str]:
    """The optimizer files of pipeline stage `mp_rank` in a checkpoint's record, in data-parallel
    rank order; empty for a checkpoint saved without ZeRO."""
    by_rank = {}
    for name in files:
        if (m := _PARTITION.match(name)) and int(m.group(2)) == mp_rank:
            by_rank[int(m.group(1))] = name
    if sorted(by_rank) != list(range(len(by_rank))):
        raise UserError(
            f"{tag_dir}: the optimizer files of pipeline stage {mp_rank} are for data-parallel ranks "
            f"{sorted(by_rank)}, not 0..{len(by_rank) - 1} (checkpoint incomplete?)"
        )
    return [by_rank[d] for d in range(len(by_rank))]


def load_repartitioned(engine, saved: list[Path], client_state: dict) -> None:
    """Rebuild this stage's optimizer state, saved on another data-parallel size, into this
    engine's optimizer. `saved`: the stage's per-rank optimizer files (empty: saved without ZeRO,
    the state is the torch optimizer's, which DeepSpeed returned unread in `client_state`)."""
    named = {id(p): n for n, p in engine.module.named_parameters()}
    sliced = partitions(engine) > 0
    if sliced:
        engine.optimizer.refresh_fp32_params()  # masters from the loaded weights, where none are saved
        # Only the parameters this rank's slice touches (each saved slice is read memory-mapped).
        wanted = {named[id(p)] for p in engine.module.parameters() if getattr(p, "_hp_mapping", None) is not None}
    else:
        wanted = {named[id(p)] for g in engine.optimizer.param_groups for p in g["params"]}
    if saved:
        state, keys, scalars, hyper = merge_saved_slices(saved, wanted)
    elif client_state.get("optimizer") is not None:
        state, keys, scalars, hyper = from_torch_state(client_state["optimizer"], engine)
    else:
        raise UserError(f"checkpoint of pipeline stage {engine.checkpoint_mp_rank}: holds no optimizer state")
    missing = sorted(wanted - set(state))
    if missing:
        raise UserError(
            f"checkpoint of pipeline stage {engine.checkpoint_mp_rank}: no optimizer state for "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (saved by another model or stage layout?)"
        )
    base = engine.optimizer.optimizer if sliced else engine.optimizer
    if hyper is None:  # DeepSpeed's elastic_checkpoint form keeps no parameter groups: the schedule's rate
        hyper = [
            {**{k: v for k, v in g.items() if k != "params"}, "lr": lr}
            for g, lr in zip(base.param_groups, engine.lr_scheduler.get_last_lr())
        ]
    if len(hyper) != len(base.param_groups):
        raise UserError(
            f"checkpoint of pipeline stage {engine.checkpoint_mp_rank}: {len(hyper)} optimizer parameter "
            f"group(s), this engine has {len(base.param_groups)}"
        )
    ids = base.state_dict()["param_groups"]  # torch's numbering of the parameters
    new = {}
    if sliced:
        # base's groups each hold one flat fp32 tensor: this rank's slice of the group's masters.
        for i, group in enumerate(base.param_groups):
            # Every slice gets the moments and the step, even one that holds only padding.
            flat = group["params"][0]
            moments = {key: torch.zeros_like(flat.data) for key in keys}
            for p in engine.module.parameters():
                frag = getattr(p, "_hp_mapping", None)
                if frag is None or frag.param_group_index != i:
                    continue
                hp, lp = frag.hp_fragment_address, frag.lp_fragment_address
                for key, value in state[named[id(p)]].items():
                    dst = flat.data if key == "fp32" else moments[key]
                    dst.narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))
            if moments:  # else the checkpoint holds no state yet: the optimizer starts it
                new[ids[i]["params"][0]] = {**fresh(scalars), **moments}
    else:
        for group, numbered in zip(base.param_groups, ids):
            for p, pid in zip(group["params"], numbered["params"]):
                saved_state = state[named[id(p)]]
                if "fp32" in saved_state:  # the saved master copy: the weights themselves here
                    p.data.copy_(saved_state["fp32"].reshape(p.shape))
                moments = {k: v.reshape(p.shape) for k, v in saved_state.items() if k != "fp32"}
                if moments:
                    new[pid] = {**fresh(scalars), **moments}
    base.load_state_dict({"state": new, "param_groups": [{**h, "params": g["params"]} for h, g in zip(hyper, ids)]})
    if sliced:
        engine.optimizer._link_all_hp_params()  # as DeepSpeed's own load does after loading the state


def fresh(scalars: dict) -> dict:
    """Each parameter's own copy of the shared scalars: torch keeps a loaded `step` tensor as it is
    and its Adam adds 1 to it in place, so one tensor shared by all would count every parameter."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()}


def merge_saved_slices(paths: list[Path], wanted: set[str]):
    """From a stage's per-rank optimizer files, joined in rank order: {name: {"fp32": master,
    key: moment}} (flat) of the wanted parameters, the moments' keys, the scalars every parameter
    shares (Adam's step) and the parameter groups' hyperparameters (None: the files hold none)."""
    pieces: dict[str, dict[str, list]] = {}
    keys, scalars, hyper = set(), {}, None
    for path in paths:
        osd = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
        base, masters = osd["base_optimizer_state"], osd["single_partition_of_fp32_groups"]
        if isinstance(base, dict):  # torch's state_dict of this rank's flat slice, padding included
            groups = [base["state"].get(g["params"][0], {}) for g in base["param_groups"]]
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in base["param_groups"]]
        else:  # elastic_checkpoint: per group {key: slice without padding}, the step apart
            groups = base
            if "base_optimizer_state_step" in osd:
                scalars.setdefault("step", osd["base_optimizer_state_step"])
        for i, mapping in enumerate(osd["param_slice_mappings"]):
            sliced = {}
            for key, value in groups[i].items():
                if torch.is_tensor(value) and value.dim() == 1 and value.numel() >= masters[i].numel():
                    sliced[key] = value
                else:
                    scalars.setdefault(key, value)
            keys |= set(sliced)
            for name, at in mapping.items():
                if name in wanted:
                    own = pieces.setdefault(name, {})
                    for key, value in {"fp32": masters[i], **sliced}.items():
                        own.setdefault(key, []).append(value.narrow(0, at.start, at.numel))
    state = {name: {k: torch.cat(v) for k, v in own.items()} for name, own in pieces.items()}
    return state, keys, scalars, hyper


def from_torch_state(sd: dict, engine):
    """The same from a torch optimizer's state_dict, saved without ZeRO. Its parameters are
    numbered in the order the engine was built with, this stage's trained parameters in module
    order (engine.build_engine); the shapes are checked against them."""
    trained = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    numbered = [pid for g in sd["param_groups"] for pid in g["params"]]
    if len(numbered) != len(trained):
        raise UserError(
            f"checkpoint of pipeline stage {engine.checkpoint_mp_rank}: optimizer state for {len(numbered)} "
            f"parameter(s), this stage trains {len(trained)}"
        )
    state, keys, scalars = {}, set(), {}
    for pid, (name, p) in zip(numbered, trained):
        own = state.setdefault(name, {})
        for key, value in sd["state"].get(pid, {}).items():
            if torch.is_tensor(value) and value.shape == p.shape:
                own[key] = value
            elif torch.is_tensor(value) and value.dim() > 0:
                raise UserError(
                    f"checkpoint of pipeline stage {engine.checkpoint_mp_rank}: optimizer state `{key}` of "
                    f"{name} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}"
                )
            else:
                scalars.setdefault(key, value)
        keys |= set(own)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return state, keys, scalars, hyper
