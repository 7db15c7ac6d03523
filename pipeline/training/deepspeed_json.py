"""The DeepSpeed JSON: read from ds_configs/ (or the user's file), refuse what the run config owns, merge the run in.

The JSON owns what only DeepSpeed knows about (precision, the ZeRO stage and its buckets, Adam's
betas and eps, torch_adam). Everything the run config decides is refused in the JSON, with the
key and the file, so no value lives in two places: a JSON `lr` silently overridden by the YAML's
would train at a rate its reader never sees.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from data_prep.errors import UserError

from .. import shipped
from ..config import RunConfig
from .monitor import SECTIONS as MONITOR_SECTIONS
from .monitor import ds_sections

# JSON path -> the run-config key that owns it.
OWNED = {
    ("train_batch_size",): "global_batch_size",
    ("train_micro_batch_size_per_gpu",): "micro_batch_size",
    ("gradient_accumulation_steps",): "global_batch_size",
    ("gradient_clipping",): "grad_clip",
    ("optimizer", "params", "lr"): "lr",
    ("optimizer", "params", "weight_decay"): "weight_decay",
    ("scheduler",): "lr, min_lr, warmup_steps",
    ("pipeline", "activation_checkpoint_interval"): "activation_checkpoint_interval",
    # Monitors write into the run directory and are switched per run (pipeline/training/monitor.py).
    **{
        (section,): "report_to, wandb_project" if name == "wandb" else "report_to"
        for name, section in MONITOR_SECTIONS.items()
    },
}


def resolve_path(cfg: RunConfig, use_gpu: bool) -> Path:
    name = cfg.parallel.ds_config
    if name == "auto":  # always the shipped file, whatever lies in the working directory
        return shipped.ds_config_dir() / ("gpu_bf16_zero1.json" if use_gpu else "cpu_fp32_zero1.json")
    return shipped.find(name, shipped.ds_config_dir())


def load(cfg: RunConfig, use_gpu: bool) -> tuple[dict, Path]:
    """The JSON as written, checked: ZeRO stage, owned keys. Returns (json, path)."""
    path = resolve_path(cfg, use_gpu)
    where = cfg.where.get("ds_config", "`ds_config`")
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{where}: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(ds, dict):
        raise UserError(f"{path}: a DeepSpeed config must be a JSON object")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage > 1:
        raise UserError(
            f"{path}: `zero_optimization.stage` is {stage}, but DeepSpeed pipelines support only ZeRO stage 0 or 1 "
            "(stages 2 and 3 partition gradients/parameters, which the pipeline engine refuses)"
        )
    for keys, owner in OWNED.items():
        node = ds
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            raise UserError(
                f"{path}: `{'.'.join(keys)}` is decided by the run config (`{owner}`); "
                f"remove it from the DeepSpeed JSON and set it in the YAML"
            )
    return ds, path


def _fp32():
    import torch

    return torch.float32


def training_dtype(ds: dict):
    import torch

    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def merged(
    ds: dict,
    cfg: RunConfig,
    global_batch: int,
    micro_batch: int,
    grad_accum: int,
    dp_size: int,
    monitors: list[str] = (),
) -> dict:
    """The JSON of the run: the file's keys plus the run's (never a second copy)."""
    ds = copy.deepcopy(ds)
    ds.update(ds_sections(cfg, list(monitors)))
    ds["train_batch_size"] = global_batch
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = grad_accum
    ds["gradient_clipping"] = cfg.optim.grad_clip
    zero = ds.setdefault("zero_optimization", {})
    if dp_size == 1 and zero.get("stage", 0) == 1 and training_dtype(ds) == _fp32():
        # ZeRO-1 shards optimizer state across data-parallel ranks; with one data-parallel rank it
        # shards nothing but still keeps a flat fp32 copy of the trained weights and of their
        # gradients (1.5-2x a trained stage's memory, make bench) and costs ~10% of a CPU step.
        # Without ZeRO, DeepSpeed clips each pipeline stage by its own gradient norm (1e-2 off the
        # reference within 3 steps), so on several stages the engine clips by the global norm itself
        # (pipeline/training/engine.py). With bf16 the fp32 master copy is needed: ZeRO-1 stays.
        zero["stage"] = 0
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("params", {}).update(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    if cfg.parallel.activation_checkpoint_interval:
        ds.setdefault("pipeline", {}).update(
            activation_checkpoint_interval=cfg.parallel.activation_checkpoint_interval, use_reentrant=False
        )
    return ds
