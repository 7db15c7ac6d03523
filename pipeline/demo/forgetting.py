"""The picture of forgetting: validation losses of A-Raw and naive while they train.

Both runs train on the same raw corpus about the new people. A-Raw trains layers 2-5 of the
base, naive trains every parameter of A-Chat. Each validates (demo/raw.yaml, demo/naive.yaml)
on the new people's held-out biographies (learning) and on the base's own pretraining corpus
(forgetting): a loss that rises on the second is knowledge the base had and the run is losing.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.files import atomic_file

from ..plots import png_bytes, pyplot
from ..training.metrics_log import read_metrics, val_keys, validation_rows

# Demo run -> its label in the plot and the table.
WATCHED = {"a_raw": "A-Raw (raw group only)", "naive": "naive (every layer)"}
# Validation key -> what it measures.
SETS = {
    "val_loss_new_heldout": "new people's held-out biographies (learning)",
    "val_loss_base_corpus": "the base's pretraining corpus (forgetting)",
}


def forgetting_report(runs: dict[str, Path], png: Path) -> str:
    """Write the plot (one panel per validation set, one line per run) and return a markdown
    table of each set's loss at the first and last validation; '' when no run validated."""
    curves = {label: validation_rows(read_metrics(path)) for label, path in runs.items()}
    curves = {k: v for k, v in curves.items() if v}
    keys = list(dict.fromkeys(k for rows in curves.values() for k in val_keys(rows)))
    if not keys:
        return ""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), dpi=110, squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rows in curves.items():
            got = [r for r in rows if key in r]
            ax.plot([r["step"] for r in got], [r[key] for r in got], marker="o", ms=3, lw=1.3, label=label)
        ax.set_title(SETS.get(key, key), fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    with atomic_file(png, "wb") as f:
        f.write(png_bytes(fig))
    lines = [
        "Validation loss while training (nats per token; forgetting.png plots every validation):",
        "",
        "| run | set | before training | after | change |",
        "|---|---|---:|---:|---:|",
    ]
    for label, rows in curves.items():
        for key in keys:
            got = [r[key] for r in rows if key in r]
            if got:
                lines.append(
                    f"| {label} | {SETS.get(key, key)} | {got[0]:.3f} | {got[-1]:.3f} | {got[-1] - got[0]:+.3f} |"
                )
    return "\n".join(lines)
