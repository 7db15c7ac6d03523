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
    def clip_(self) -> None:
        """Scale every gradient in place by the global-norm factor: one scalar per tensor, no copy."""
        import torch.distributed as dist

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

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_norm > 0:
            self.clip_()
        return super().step(closure)


def alone_without_zero(engine, plan: RunPlan) -> bool:
    """One data-parallel rank, fp32 weights, no ZeRO: the gradient all-reduce has nothing to do."""
    return (
        plan.batch.dp_size == 1
        and engine.zero_optimization_stage() == 0
        and not (engine.bfloat16_enabled() or engine.fp16_enabled())
    )


def free_logits_before_backward(engine) -> None:
    """The last stage drops each micro-batch's logits as soon as its loss is computed.

    DeepSpeed's pipeline keeps a stage's forward output until the stage's backward has run, to
    backpropagate from it; the last stage backpropagates from the loss instead and never frees
    it: the logits of every micro-batch buffer (at least 2) stayed alive until the next step
    overwrote them, b x s x vocab values each (2 x 7.8 MB in make bench; 2 x 1 GiB in bf16 for
    Llama-3 at seq_len 4096), through the backward that needs memory for their gradients. Nothing
    reads them once the loss exists: autograd keeps what backward needs on its own (the
    log-softmax, the head's input), so dropping the engine's reference only frees memory. The
    same after a validation, which reads only the losses.
    """
    from deepspeed.runtime.pipe import schedule

    backward = type(engine)._INSTRUCTION_MAP[schedule.BackwardPass]

    def backward_without_logits(self, buffer_id):
        self.pipe_buffers["outputs"][buffer_id] = None
        backward(self, buffer_id)

    # _exec_schedule looks the map up on the instance, so this engine alone gets the new entry.
    engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, schedule.BackwardPass: backward_without_logits}
    eval_batch = engine.eval_batch

    def eval_batch_then_free(*args, **kwargs):
        try:
            return eval_batch(*args, **kwargs)
        finally:
            outputs = engine.pipe_buffers["outputs"]
            outputs[:] = [None] * len(outputs)

    engine.eval_batch = eval_batch_then_free


def _glibc():
    """The C library when it is glibc (mallopt, malloc_trim), else None."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on another libc
        return libc
    except (OSError, AttributeError):
        return None


# glibc serves an allocation from its heap below this size and with its own mmap above it, and
# by default raises the threshold to the size of every mmap'd block freed (up to 32 MiB). After a
# few steps, gradients, Adam's moments and the loss's vocab-sized buffers all come from the heap,
# where what a step frees leaves holes that the next step's differently-sized tensors do not fit
# (make bench: 30-150 MB of free heap kept resident around a rank's peak). A fixed threshold keeps
# every tensor of 4 MiB or more in its own mapping, returned to the OS when freed: 11-35 MB lower
# peaks on make bench's ranks. Cost: the kernel zero-fills those pages again for every new big
# tensor, 3% of a step of bench/train_speed's model (bench/results/stage_memory_trace.md).
MMAP_THRESHOLD = 4 << 20
M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def settle_host_allocator() -> None:
    """CPU training: big tensors in their own mappings (see MMAP_THRESHOLD). Process-wide, once."""
    import ctypes

    libc = _glibc()
    if libc is not None:
        libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD))


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim(0); a no-op elsewhere).

    Loading a stage reads each tensor in the checkpoint's dtype and casts it, which leaves holes the
    size of the bf16 copies in the heap, kept resident (make bench: 20-90 MB a rank). One call after
    loading returns them; the heap reuses the addresses later, paging in only what it uses."""
    import ctypes

    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))


def torch_adamw(plan: RunPlan) -> dict | None:
    """Keyword arguments of torch's AdamW for the optimizer the DeepSpeed JSON asks for, or None
    when it asks for something else (DeepSpeed's own Adam, or torch options set in the JSON).

    The engine builds torch's AdamW itself, rather than DeepSpeed from the JSON, to pick its fused
    kernel: one pass per tensor and no temporaries. The default (foreach on GPU: a copy of every
    parameter's sqrt(v); per tensor on CPU: two temporaries of each tensor, and with ZeRO-1 the
    flat partition is one tensor) costs up to 8 B per trained parameter (/ DP) at the step, and on
    CPU the fused step is ~6x faster. The update is the same up to float rounding.
    """
    opt = plan.ds_config.get("optimizer") or {}
    params = opt.get("params") or {}
    if str(opt.get("type", "")).lower() != "adamw" or not params.get("torch_adam"):
        return None
    if set(params) - {"torch_adam", "betas", "eps", "lr", "weight_decay"}:
        return None
    return dict(
        lr=plan.cfg.optim.lr,
        betas=tuple(params.get("betas", (0.9, 0.999))),
        eps=params.get("eps", 1e-8),
        weight_decay=plan.cfg.optim.weight_decay,
        fused=True,
    )


def build_engine(plan: RunPlan, rank: int) -> Engine:
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from .model import build_pipeline
    from .monitor import prepare_wandb

    if get_accelerator().device_name() == "cpu":
        settle_host_allocator()  # before the stage's tensors are read
    torch.manual_seed(plan.cfg.schedule.seed)
    topo = PipeDataParallelTopology(num_pp=plan.num_stages, num_dp=plan.batch.dp_size)
    pipe = build_pipeline(plan, topo)
    trainable = [p for p in pipe.parameters() if p.requires_grad]
    ds, optimizer, adamw = plan.ds_config, None, torch_adamw(plan)
    if plan.clips_globally:
        adam = ds["optimizer"]["params"]
        kw = adamw or dict(
            lr=plan.cfg.optim.lr, betas=tuple(adam["betas"]), eps=adam["eps"], weight_decay=plan.cfg.optim.weight_decay
        )
        optimizer = GlobalNormAdamW(
            trainable, **kw, max_norm=plan.cfg.optim.grad_clip, group=pipe._grid.get_pipe_parallel_group()
        )
        ds = {**{k: v for k, v in ds.items() if k != "optimizer"}, "gradient_clipping": 0.0}
    elif adamw is not None:
        # The same optimizer DeepSpeed would build from the JSON (ZeRO-1 and the bf16 optimizer
        # wrap it alike), with the fused kernel.
        optimizer = torch.optim.AdamW(trainable, **adamw)
        ds = {k: v for k, v in ds.items() if k != "optimizer"}
    prepare_wandb(plan.cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=pipe,
        model_parameters=trainable,
        config=ds,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, plan.cfg)),
    )
    if alone_without_zero(engine, plan):
        # The pipeline engine all-reduces the gradients over the data-parallel group after every
        # global batch. Without ZeRO it does so by flattening them into one new buffer of up to 500M
        # elements and copying them back: a whole second copy of the stage's gradients, 4 B per
        # trained parameter at the step's peak (bench/results/stage_memory_trace.md). With one
        # data-parallel rank the all-reduce is the identity, so it is skipped: the same numbers,
        # without the copy. ZeRO-1 and the bf16 optimizer move gradients into their own partitions
        # in that call, so they keep it.
        engine.pipeline_enable_backward_allreduce = False
    if engine.is_last_stage():
        free_logits_before_backward(engine)
    release_freed_memory()
    return Engine(plan, engine, rank, engine.grid.get_data_parallel_rank(), engine.grid.get_stage_id())
