"""TensorBoard, W&B and CSV through DeepSpeed's own monitor: the run config's `report_to` decides.

The switch lives in the run config, not in the DeepSpeed JSON, and the JSON's `tensorboard`,
`wandb` and `csv_monitor` sections are refused (deepspeed_json.OWNED). Two reasons. Where the
monitors write is the run directory, and `out` is the run config's, so a JSON section would
either repeat it or scatter one run's logs over two places. And logging is switched per run
(`--report_to=tensorboard`), while a DeepSpeed JSON is shared by every run of a cluster.

DeepSpeed writes its own events (`Train/Samples/train_loss`, `Train/Samples/lr`) at the samples
seen; the validation losses go through the same monitor on the same x axis (`Val/Samples/KEY`),
because W&B drops any point whose step is behind the run's latest.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..config import MONITORS, RunConfig, report_to

# report_to name -> the DeepSpeed JSON section that switches it on (deepspeed_json refuses these).
SECTIONS = {"tensorboard": "tensorboard", "wandb": "wandb", "csv": "csv_monitor"}
assert set(SECTIONS) == set(MONITORS)


def ds_sections(cfg: RunConfig, monitors: list[str]) -> dict:
    """The JSON sections that switch DeepSpeed's monitors on, writing under the run directory."""
    sections = {}
    for name in monitors:
        section = {"enabled": True}
        if name == "wandb":  # W&B finds its folder and run name in the environment (prepare_wandb)
            section["project"] = cfg.monitor.wandb_project
        else:  # DeepSpeed writes to output_path/job_name: OUT/tensorboard/, OUT/csv/
            section.update(output_path=str(Path(cfg.schedule.out)), job_name=name)
        sections[SECTIONS[name]] = section
    return sections


def prepare_wandb(cfg: RunConfig) -> None:
    """W&B names its run and puts its files where its environment says; unless the user said
    otherwise there, the run is named after the run directory and its files live inside it.
    Must run before DeepSpeed starts the monitor (wandb.init reads the environment then)."""
    if "wandb" in report_to(cfg.monitor.report_to):
        out = Path(cfg.schedule.out)
        out.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_DIR", str(out.resolve()))
        os.environ.setdefault("WANDB_NAME", out.resolve().name)


@contextlib.contextmanager
def muted(engine):
    """DeepSpeed writes every eval_batch under one tag (`Train/Samples/eval_loss`), which would mix
    the sets and the batches of one validation; while validating, its own write is off and
    `write` logs one event per set instead."""
    monitor = engine.monitor
    was = monitor.enabled
    monitor.enabled = False
    try:
        yield
    finally:
        monitor.enabled = was


def write(engine, values: dict[str, float]) -> None:
    """Validation losses as monitor events at the samples seen so far (rank 0 writes)."""
    if engine.monitor.enabled:
        engine.monitor.write_events([(f"Val/Samples/{k}", v, engine.global_samples) for k, v in values.items()])


def close(engine) -> None:
    """Finish the W&B run now, so its files are complete when training says it is done."""
    if getattr(engine.monitor, "wandb_monitor", None) is not None:
        import wandb

        wandb.finish()
