"""Everything about ranks: batch arithmetic, the DeepSpeed config, the pipeline engine.

Kept apart from the model (pipeline/model.py) and the loop (pipeline/loop.py), as torchtitan
does, so the training loop reads the same on 1 process or 64 ranks.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from data_prep.common import UserError

from .config import RunConfig, load_ds_config
from .groups import Groups, make_groups, partition
from .hf import check_architecture, load_causal_lm, read_config


@dataclass
class BatchPlan:
    global_batch: int
    micro_batch: int
    dp_size: int
    grad_accum: int

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = micro {self.micro_batch} x accumulation {self.grad_accum} "
                f"x data-parallel {self.dp_size}")


def batch_plan(cfg: RunConfig, world_size: int) -> BatchPlan:
    P = cfg.parallel.pipeline_stages
    if world_size % P:
        raise UserError(f"world size {world_size} is not a multiple of `pipeline_stages` ({P})")
    dp = world_size // P
    G, m = cfg.data.global_batch_size, cfg.data.micro_batch_size
    if G % (m * dp):
        raise UserError(f"`global_batch_size` ({G}) must be a multiple of micro_batch_size x data-parallel size "
                        f"({m} x {dp} = {m * dp}) so every step sees the same {G} sequences on any world size")
    return BatchPlan(G, m, dp, G // (m * dp))


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warmup then cosine decay to min_lr, as a factor of `lr` (for LambdaLR)."""
    o, total = cfg.optim, max(1, cfg.schedule.steps)
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    floor = o.min_lr / o.lr if o.lr else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def merged_ds_config(cfg: RunConfig, plan: BatchPlan, use_gpu: bool) -> dict:
    ds, _ = load_ds_config(cfg, use_gpu)
    ds = copy.deepcopy(ds)
    ds["train_batch_size"] = plan.global_batch
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds["gradient_clipping"] = cfg.optim.grad_clip
    zero = ds.setdefault("zero_optimization", {})
    if plan.dp_size == 1 and cfg.parallel.pipeline_stages == 1 and zero.get("stage", 0) == 1:
        # ZeRO-1 shards optimizer state across data-parallel ranks; on a single process it shards
        # nothing but still flattens gradients and steps a flat fp32 copy: ~10% of a CPU step
        # (make bench). Only for one process: with 2 stages and no ZeRO the chat-phase loss left the
        # reference loop by 1e-2 within 3 steps (tests/test_parity.py), so pipelines keep ZeRO-1.
        zero["stage"] = 0
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("params", {}).update(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    if cfg.parallel.activation_checkpoint_interval:
        ds.setdefault("pipeline", {}).update(
            activation_checkpoint_interval=cfg.parallel.activation_checkpoint_interval, use_reentrant=False)
    return ds


@dataclass
class Job:
    cfg: RunConfig
    engine: object
    groups: Groups
    bounds: list[int]
    plan: BatchPlan
    hf_config: dict
    tied: bool
    rank: int
    world_size: int
    dp_rank: int
    stage: int
    ds_config: dict
    param_counts: dict


def check_model(cfg: RunConfig) -> tuple[dict, Groups, bool]:
    hf_cfg = read_config(cfg.model.model)
    check_architecture(hf_cfg, cfg.model.model)
    L = hf_cfg["num_hidden_layers"]
    max_pos = hf_cfg.get("max_position_embeddings")
    if max_pos and cfg.data.seq_len > max_pos:
        raise UserError(f"{cfg.where.get('seq_len', 'config')}: `seq_len` ({cfg.data.seq_len}) exceeds the model's max_position_embeddings ({max_pos}) "
                        f"in {cfg.model.model}/config.json")
    g = cfg.groups
    groups = make_groups(g.raw_start, g.format_start, L, g.phase, g.raw_trains_format, cfg.where)
    tied = bool(hf_cfg.get("tie_word_embeddings", False))
    if tied and g.phase == "full" and cfg.parallel.pipeline_stages > 1:
        raise UserError("`phase: full` with tied embeddings needs `pipeline_stages: 1`: the shared matrix would "
                        "live on the first and last stage and train in two places")
    if cfg.parallel.pipeline_stages > L:
        raise UserError(f"{cfg.where.get('pipeline_stages', 'config')}: `pipeline_stages` ({cfg.parallel.pipeline_stages}) is more than the model's {L} layers")
    return hf_cfg, groups, tied


def build_job(cfg: RunConfig, rank: int, world_size: int) -> Job:
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from .model import build_pipeline

    hf_cfg, groups, tied = check_model(cfg)
    plan = batch_plan(cfg, world_size)
    bounds = partition(groups, cfg.parallel.pipeline_stages)
    use_gpu = torch.cuda.is_available()
    ds = merged_ds_config(cfg, plan, use_gpu)

    torch.manual_seed(cfg.schedule.seed)
    hf_model = load_causal_lm(cfg.model.model)
    topo = PipeDataParallelTopology(num_pp=cfg.parallel.pipeline_stages, num_dp=plan.dp_size)
    pipe = build_pipeline(hf_model, groups, bounds, {"topology": topo}, tied,
                          cfg.parallel.activation_checkpoint_interval, cfg.groups.anchor_weight, plan.grad_accum,
                          cfg.parallel.compile_layers)
    n = lambda m: sum(p.numel() for p in m.parameters())
    counts = {"embed": n(hf_model.model.embed_tokens), "layers": [n(l) for l in hf_model.model.layers],
              "norm": n(hf_model.model.norm), "head": n(hf_model.lm_head)}
    del hf_model  # the pipeline holds this rank's layers; the rest is freed
    trainable = [p for p in pipe.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, model_parameters=trainable, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg)))
    return Job(cfg, engine, groups, bounds, plan, hf_cfg, tied, rank, world_size,
               engine.grid.get_data_parallel_rank(), engine.grid.get_stage_id(), ds, counts)


def layer_map(job: Job) -> str:
    """The table printed at the start of training: what trains, where."""
    g, counts = job.groups, job.param_counts
    stage_of = {i: s for s in range(len(job.bounds) - 1) for i in range(job.bounds[s], job.bounds[s + 1])}
    rows = [f"{'layers':<16}{'group':<8}{'stage':<7}{'params':>12}  state"]
    state = "trained" if job.cfg.groups.phase == "full" else "frozen"
    rows.append(f"{'embeddings':<16}{'frozen':<8}{stage_of[0]:<7}{counts['embed']:>12,}  {state}")
    # consecutive layers with the same group and stage share one row
    i = 0
    while i < g.num_layers:
        j = i
        while j + 1 < g.num_layers and g.group_of_layer(j + 1) == g.group_of_layer(i) and stage_of[j + 1] == stage_of[i]:
            j += 1
        rng = f"{i}" if i == j else f"{i}-{j}"
        st = "trained" if g.layer_trained(i) else "frozen"
        rows.append(f"{'layers.' + rng:<16}{g.group_of_layer(i):<8}{stage_of[i]:<7}{sum(counts['layers'][i:j + 1]):>12,}  {st}")
        i = j + 1
    last = g.num_layers - 1
    fmt_state = "trained" if g.layer_trained(last) else "frozen"
    rows.append(f"{'norm':<16}{'format':<8}{stage_of[last]:<7}{counts['norm']:>12,}  {fmt_state}")
    if job.tied:
        head_state = "trained" if job.cfg.groups.phase == "full" else "frozen (tied to the embeddings)"
        rows.append(f"{'lm_head':<16}{'frozen':<8}{stage_of[last]:<7}{'(tied)':>12}  {head_state}")
    else:
        rows.append(f"{'lm_head':<16}{'format':<8}{stage_of[last]:<7}{counts['head']:>12,}  {fmt_state}")
    rows.append(job.plan.describe() + f"; {len(job.bounds) - 1} pipeline stage(s), bounds {job.bounds}")
    return "\n".join(rows)
