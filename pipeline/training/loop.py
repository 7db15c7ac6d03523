"""The training loop: own the run directory, resume, step, log, checkpoint, plot."""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as dist

from data_prep.errors import EXIT_DIVERGED, UserError

from ..rundir import RunDir
from . import checkpoint, monitor
from .data import step_micro_batches
from .engine import Engine
from .metrics_log import MetricsLog, plot_loss, val_keys
from .plan import RESUMABLE
from .progress import Progress
from .schedule import lr_factor
from .validation import due, validate


class Diverged(UserError):
    """Training produced a non-finite loss, gradient norm or weight: one line naming the step, exit 4,
    and the last good checkpoint stays the latest. Not exit 2: the input may be fine (an unlucky
    learning rate, bad data deep in a corpus), and a scheduler can tell the two apart."""

    exit_code = EXIT_DIVERGED


def train(eng: Engine) -> dict:
    plan, engine, cfg = eng.plan, eng.engine, eng.plan.cfg
    run = RunDir(cfg.schedule.out)
    is_main = eng.rank == 0
    # Rank 0 owns the directory for the whole run; a second training on the same `out` stops here.
    with run.lock() if is_main else contextlib.nullcontext():
        if is_main:
            run.write_run(plan.record(), RESUMABLE)
            print(plan.layer_map(), flush=True)
        dist.barrier()
        start = checkpoint.resume(engine, run)
        if is_main and start:
            print(f"resuming from {run.tag_dir(start)}", flush=True)
        metrics = MetricsLog(run.metrics, start, enabled=is_main)
        G, S, steps = plan.batch.global_batch, cfg.data.seq_len, cfg.schedule.steps
        batches = step_micro_batches(
            plan.data, G, plan.batch.micro_batch, eng.dp_rank, plan.batch.dp_size, S, start_sample=start * G
        )
        last, shown, every = {}, {}, cfg.eval.eval_every if plan.evals else 0
        if start == 0 and due(0, every, steps):  # the model as loaded: where the curves start
            metrics.log({"step": 0, **validate(eng)})
        # A context manager: the bar is closed before an error or Ctrl-C message is printed.
        with Progress(cfg.groups.phase, steps, start, enabled=is_main) as bar:
            for step in range(start + 1, steps + 1):
                t0 = time.perf_counter()
                # float() waits for the device, so the step time includes kernels still queued on a GPU.
                loss = float(engine.train_batch(data_iter=batches))
                dt = time.perf_counter() - t0
                check_finite(engine, step, loss, run, saving=step % cfg.schedule.save_every == 0 or step == steps)
                last = {
                    "step": step,
                    "loss": loss,
                    "lr": cfg.optim.lr * lr_factor(step - 1, cfg),
                    "tokens_per_s": G * S / dt,
                    "step_time_s": dt,
                }
                if due(step, every, steps):
                    last.update(validate(eng))
                    shown = {k: last[k] for k in val_keys([last])}
                # A validated step is always logged: its losses exist nowhere else.
                if step % cfg.schedule.log_every == 0 or step == steps or due(step, every, steps):
                    metrics.log(last)
                bar.update(
                    step,
                    loss=f"{last['loss']:.4f}",
                    tok_s=f"{last['tokens_per_s']:.0f}",
                    **({"val": f"{next(iter(shown.values())):.4f}"} if every and shown else {}),
                )
                if step % cfg.schedule.save_every == 0 or step == steps:
                    checkpoint.save(engine, run, step, cfg.schedule.keep_last)
        metrics.close()
        monitor.close(engine)
        if is_main and run.metrics.stat().st_size:
            plot_loss(run.metrics, run.loss_png, f"{cfg.groups.phase}: {run.path.name}")
            print(f"run directory: {run.path} (metrics.jsonl, loss.png, checkpoints/)", flush=True)
    return last


def check_finite(engine, step: int, loss: float, run: RunDir, saving: bool) -> None:
    """Stop at the first non-finite loss or gradient norm, and before saving a checkpoint whose
    weights are not all finite, so the last good checkpoint stays the latest. Every rank sees the
    same loss (the engine broadcasts it along the pipeline) and the weight check is all-reduced,
    so every rank stops at the same step. The weight check costs one pass over the stage's trained
    parameters per save, against a save that writes them all anyway."""
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    bad = [] if math.isfinite(loss) else [f"loss {loss}"]
    if isinstance(norm, (int, float, torch.Tensor)) and not math.isfinite(float(norm)):
        bad.append(f"gradient norm {float(norm)}")
    if saving and not bad:
        ok = torch.tensor(
            [float(all(bool(torch.isfinite(p).all()) for p in engine.module.parameters() if p.requires_grad))]
        )
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1:
            bad.append("non-finite weights")
    if bad:
        last = run.latest_step()
        keep = f"the last good checkpoint (step {last}) stays the latest" if last else "no checkpoint was saved"
        raise Diverged(
            f"step {step}: {' and '.join(bad)}; training stopped, {keep}. Rerunning the same command "
            f"resumes from it and meets the same step again: check the data, or start a new `out` with a "
            f"lower `lr` or more `warmup_steps`."
        )
