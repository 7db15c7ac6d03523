"""The DeepSpeed pipeline engine of a plan: topology, this rank's stage, optimizer, LR schedule."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import RunPlan
from .schedule import lr_factor


@dataclass
class Engine:
    plan: RunPlan
    engine: object      # deepspeed.runtime.pipe.engine.PipelineEngine
    rank: int
    dp_rank: int
    stage: int


def build_engine(plan: RunPlan, rank: int) -> Engine:
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from .model import build_pipeline

    torch.manual_seed(plan.cfg.schedule.seed)
    topo = PipeDataParallelTopology(num_pp=plan.num_stages, num_dp=plan.batch.dp_size)
    pipe = build_pipeline(plan, topo)
    trainable = [p for p in pipe.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, model_parameters=trainable, config=plan.ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, plan.cfg)))
    return Engine(plan, engine, rank, engine.grid.get_data_parallel_rank(), engine.grid.get_stage_id())
