"""The training loop: resume, step, log, checkpoint, plot."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from data_prep.common import UserError, atomic_write_json

from . import checkpoint
from .config import RunConfig, data_sources
from .data import micro_batches, open_data
from .hf import model_identity
from .metrics import MetricsLog, plot_loss
from .parallel import Job, layer_map, lr_factor

# Keys that may change between a run and its resumption without changing what it computes.
RESUMABLE_CHANGES = {"steps", "save_every", "keep_last", "log_every", "dist_timeout_s"}


def run_record(job: Job) -> dict:
    cfg = job.cfg
    flat = cfg.flat()
    flat["tokenizer"] = cfg.model.tokenizer or cfg.model.model
    return {
        "format_version": 1,
        "config": flat,
        "phase": cfg.groups.phase,
        "groups": job.groups.as_record(job.tied),
        "base_model": model_identity(cfg.model.model),
        "stages": [[job.bounds[s], job.bounds[s + 1]] for s in range(len(job.bounds) - 1)],
        "batch": vars(job.plan),
        "ds_config": job.ds_config,
    }


def write_or_check_record(job: Job, out: Path) -> None:
    import json

    rec = run_record(job)
    path = out / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old["config"]) | set(rec["config"])
                         if old["config"].get(k) != rec["config"].get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            raise UserError(f"{path}: this run directory was started with a different config "
                            f"({', '.join(f'`{k}`' for k in changed)} differ); use a new `out` or restore them")
    atomic_write_json(path, rec)


def data_check(cfg: RunConfig, hf_config: dict, data) -> None:
    for (path, _), w in zip(data_sources(cfg.data.data), data.sources):
        vocab = w.vocab_size
        if vocab > hf_config["vocab_size"]:
            raise UserError(f"`data`: {path} was tokenized "
                            f"with a vocabulary of {vocab}, larger than the model's vocab_size "
                            f"{hf_config['vocab_size']} ({cfg.model.model}/config.json)")
    if cfg.groups.phase == "chat" and not data.has_mask:
        raise UserError("`data`: phase `chat` needs chat shards with a loss mask (made by `python -m data_prep chat`)")


def _test_death(rank: int) -> int | None:
    """Test hook (tests/test_reliability.py): LAYER_AWARE_TEST_DIE_RANK=r LAYER_AWARE_TEST_DIE_STEP=n
    makes rank r SIGKILL itself after step n, as the OOM killer or a lost node would."""
    if os.environ.get("LAYER_AWARE_TEST_DIE_RANK") == str(rank):
        return int(os.environ["LAYER_AWARE_TEST_DIE_STEP"])
    return None


def train(job: Job) -> dict:
    cfg, engine = job.cfg, job.engine
    out = Path(cfg.schedule.out)
    ckpt_dir = out / "checkpoints"
    is_main = job.rank == 0
    data = open_data(data_sources(cfg.data.data), cfg.data.seq_len, cfg.schedule.seed, cfg.data.verify_data)
    data_check(cfg, job.hf_config, data)

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_or_check_record(job, out)
        print(layer_map(job), flush=True)
    dist.barrier()

    start, _ = checkpoint.resume(engine, ckpt_dir)
    if is_main and start:
        print(f"resuming from {ckpt_dir / checkpoint.tag_for(start)}", flush=True)
    metrics = MetricsLog(out / "metrics.jsonl", start, enabled=is_main)
    G, S = job.plan.global_batch, cfg.data.seq_len
    batches = micro_batches(data, job.plan.micro_batch, job.dp_rank, job.plan.dp_size, start_sample=start * G)
    steps = cfg.schedule.steps
    bar = tqdm(total=steps, initial=start, disable=not is_main, desc=f"{cfg.groups.phase}", unit="step",
               mininterval=0.5 if sys.stderr.isatty() else 10.0, dynamic_ncols=True)
    last = {}
    die_at = _test_death(job.rank)
    for step in range(start + 1, steps + 1):
        t0 = time.perf_counter()
        # float() waits for the device, so the step time includes kernels still queued on a GPU.
        loss = float(engine.train_batch(data_iter=batches))
        dt = time.perf_counter() - t0
        last = {"step": step, "loss": loss, "lr": cfg.optim.lr * lr_factor(step - 1, cfg),
                "tokens_per_s": G * S / dt, "step_time_s": dt}
        if step % cfg.schedule.log_every == 0 or step == steps:
            metrics.log(last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if step == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step % cfg.schedule.save_every == 0 or step == steps:
            checkpoint.save(engine, ckpt_dir, step, {"step": step}, cfg.schedule.keep_last)
    bar.close()
    if checkpoint.latest_step(ckpt_dir) is None:
        # steps: 0 still leaves a checkpoint (the model as loaded), so export works on any run.
        checkpoint.save(engine, ckpt_dir, 0, {"step": 0}, cfg.schedule.keep_last)
    metrics.close()
    if is_main and (out / "metrics.jsonl").stat().st_size:
        plot_loss(out / "metrics.jsonl", out / "loss.png", f"{cfg.groups.phase}: {out.name}")
        print(f"run directory: {out} (metrics.jsonl, loss.png, checkpoints/)", flush=True)
    return last
