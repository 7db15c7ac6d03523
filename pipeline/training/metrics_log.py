"""metrics.jsonl (one line per logged step) and the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.files import atomic_file, atomic_write_text

from ..plots import png_bytes, pyplot


class MetricsLog:
    """Append-only JSONL on rank 0. On resume, lines after the resumed step are dropped, so the
    file of a resumed run reads exactly like an uninterrupted one; a fresh start (step 0) keeps
    nothing, not even a step-0 validation, which it writes again."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip() and resume_step and json.loads(line)["step"] <= resume_step:
                    kept.append(line)
        atomic_write_text(path, "".join(k + "\n" for k in kept))
        self.f = open(path, "a")

    def log(self, row: dict) -> None:
        if self.enabled:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.enabled:
            self.f.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def val_keys(rows: list[dict]) -> list[str]:
    """The validation losses a metrics file holds (val_loss, val_loss_NAME), in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r if k.startswith("val_loss")))


def validation_rows(rows: list[dict]) -> list[dict]:
    """The rows of validated steps (each carries `eval_time_s`, with or without a set's loss)."""
    return [r for r in rows if "eval_time_s" in r]


def plot_loss(metrics_path: Path, png_path: Path, title: str) -> None:
    """Training loss, and each validation loss beside it on the same axes (both are mean
    cross-entropy per target token, so the gap between them is the overfitting)."""
    rows = read_metrics(metrics_path)
    if not rows:
        return
    fig, ax = pyplot().subplots(figsize=(6, 3.5), dpi=120)
    train = [r for r in rows if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2, label="training loss")
    for key in val_keys(rows):
        got = [r for r in rows if key in r]
        ax.plot([r["step"] for r in got], [r[key] for r in got], marker="o", ms=3, lw=1.2, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per target token)")
    ax.set_title(title, fontsize=10)
    if len(ax.get_lines()) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    with atomic_file(png_path, "wb") as f:
        f.write(png_bytes(fig))
