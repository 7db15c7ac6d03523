"""metrics.jsonl (one line per logged step) and the loss-curve PNG."""
from __future__ import annotations

import json
from pathlib import Path

from data_prep.common import atomic_file, atomic_write_text

from ..plots import png_bytes, pyplot


class MetricsLog:
    """Append-only JSONL on rank 0. On resume, lines after the resumed step are dropped, so the
    file of a resumed run reads exactly like an uninterrupted one."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= resume_step:
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


def plot_loss(metrics_path: Path, png_path: Path, title: str) -> None:
    rows = read_metrics(metrics_path)
    if not rows:
        return
    fig, ax = pyplot().subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    with atomic_file(png_path, "wb") as f:
        f.write(png_bytes(fig))
