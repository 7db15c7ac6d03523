"""The results of a set of models: results.json, a markdown table and a format-vs-knowledge chart.

results.json is {"models": {NAME: {METRIC: value}}}; the table has one row per model and one
column per metric; the chart puts every model at (knowledge, format adherence) so the trade-off
the method is about is one picture: top right is good, a transplant that lost format drops, one
that gained no knowledge stays left.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from data_prep.errors import UserError
from data_prep.files import atomic_file, atomic_write_json, atomic_write_text

from ..plots import png_bytes, pyplot

# Column order of the table: the standard metrics first, anything else after in first-seen order.
STANDARD_METRICS = (
    "format_adherence",
    "knowledge_accuracy",
    "knowledge_rank",
    "chance_rank",
    "heldout_known_rank",
    "raw_rank_new",
    "ppl_raw_new",
    "ppl_raw_known",
)
# Ranks and perplexities: lower is better; the table says so in the header.
_LOWER_IS_BETTER = ("rank", "ppl")


def _columns(models: dict, columns) -> list[str]:
    if columns:
        return list(columns)
    seen = [m for m in STANDARD_METRICS if any(m in v for v in models.values())]
    for metrics in models.values():
        seen += [k for k in metrics if k not in seen]
    return seen


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(models: dict, columns=None) -> str:
    cols = _columns(models, columns)
    head = [c + (" ↓" if any(w in c for w in _LOWER_IS_BETTER) else "") for c in cols]
    lines = ["| model | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, metrics in models.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def knowledge_axis(models: dict) -> tuple[str, dict]:
    """The chart's x: rank gain over chance when ranks exist (smooth, works for tiny models),
    else exact-match accuracy."""
    if any("knowledge_rank" in m and "chance_rank" in m for m in models.values()):
        return "knowledge: chance rank − rank of true value (new people, chat)", {
            n: m["chance_rank"] - m["knowledge_rank"]
            for n, m in models.items()
            if "knowledge_rank" in m and "chance_rank" in m
        }
    return "knowledge accuracy (new people, chat)", {
        n: m["knowledge_accuracy"] for n, m in models.items() if "knowledge_accuracy" in m
    }


def chart_png(models: dict, title: str = "format adherence vs knowledge") -> bytes:
    plt = pyplot()

    xlabel, xs = knowledge_axis(models)
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    markers = "osD^vP*Xh<>p"
    for i, (name, x) in enumerate(xs.items()):
        y = models[name].get("format_adherence")
        if y is None:
            continue
        # A legend rather than text labels: the interesting models sit close together, where
        # labels on the points would overlap into an unreadable smear.
        ax.scatter([x], [y], s=45, marker=markers[i % len(markers)], label=name)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.axvline(0, color="grey", lw=0.8, ls="--")  # chance (rank axis) or zero accuracy
    ax.set_xlabel(xlabel)
    ax.set_ylabel("format adherence")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def write_report(results: dict, out_dir, columns=None, stem: str = "results") -> str:
    """Write STEM.json, STEM.md and STEM.png into out_dir (each atomically); return the table.

    `results` is {"models": {...}} or the bare {NAME: {METRIC: value}} mapping.
    """
    models = results["models"] if "models" in results else results
    out_dir = Path(out_dir)
    table = markdown_table(models, columns)
    atomic_write_json(out_dir / f"{stem}.json", {"models": models})
    atomic_write_text(out_dir / f"{stem}.md", table)
    with atomic_file(out_dir / f"{stem}.png", "wb") as f:
        f.write(chart_png(models))
    return table


def load_results(path) -> dict:
    """The {"models": ...} of an existing results file, or an empty one."""
    path = Path(path)
    if not path.is_file():
        return {"models": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f'{path}: not a results file (expected {{"models": {{...}}}})')
    return data if isinstance(data.get("models"), dict) else {"models": {}}
