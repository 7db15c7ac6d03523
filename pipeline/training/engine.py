"""The DeepSpeed pipeline engine of a plan: topology, this rank's stage, optimizer, LR schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import RunPlan
from .schedule import lr_factor


@dataclass
class Engine:
    plan: RunPlan
    engine: object  # deepspeed.runtime.pipe.engine.PipelineEngine
    rank: int
    dp_rank: int
    stage: int


class GlobalNormAdamW(torch.optim.AdamW):
    """torch's AdamW, clipping the gradients first by their norm over every pipeline stage.

    DeepSpeed's own clipping without ZeRO takes each stage's norm alone, so each half of a 2-stage
    run was scaled by a different factor. Here the norm is the one a single process would see:
    sqrt(sum over stages of ||g||^2), then torch's rule (max_norm / (norm + 1e-6), at most 1).
    """

    def __init__(self, params, *, max_norm: float, group, **kw):
        super().__init__(params, **kw)
        self.max_norm, self.group = max_norm, group

    @torch.no_grad()
    def step(self, closure=None):
        import torch.distributed as dist

        if self.max_norm > 0:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            sq = (
                torch.stack([torch.linalg.vector_norm(x, 2.0) for x in grads]).square().sum()
                if grads
                else torch.zeros((), dtype=torch.float32)
            )
            dist.all_reduce(sq, group=self.group)
            coef = torch.clamp(self.max_norm / (sq.sqrt() + 1e-6), max=1.0)
            for x in grads:
                x.mul_(coef)
        return super().step(closure)


def build_engine(plan: RunPlan, rank: int) -> Engine:
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from .model import build_pipeline
    from .monitor import prepare_wandb

    torch.manual_seed(plan.cfg.schedule.seed)
    topo = PipeDataParallelTopology(num_pp=plan.num_stages, num_dp=plan.batch.dp_size)
    pipe = build_pipeline(plan, topo)
    trainable = [p for p in pipe.parameters() if p.requires_grad]
    ds, optimizer = plan.ds_config, None
    if plan.clips_globally:
        adam = ds["optimizer"]["params"]
        optimizer = GlobalNormAdamW(
            trainable,
            lr=plan.cfg.optim.lr,
            betas=tuple(adam["betas"]),
            eps=adam["eps"],
            weight_decay=plan.cfg.optim.weight_decay,
            max_norm=plan.cfg.optim.grad_clip,
            group=pipe._grid.get_pipe_parallel_group(),
        )
        ds = {**{k: v for k, v in ds.items() if k != "optimizer"}, "gradient_clipping": 0.0}
    prepare_wandb(plan.cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=pipe,
        model_parameters=trainable,
        config=ds,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, plan.cfg)),
    )
    return Engine(plan, engine, rank, engine.grid.get_data_parallel_rank(), engine.grid.get_stage_id())
