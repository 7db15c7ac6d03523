"""Golden loss curves: fixed tiny runs must reproduce the committed curves.

Parity tests compare the pipeline with a reference computed in the same session; these pin the
numbers across sessions, so a change that shifts both sides the same way (data order, masking,
the loss normalisation, the LR schedule, the tokenizer fixture) still shows up. One curve is raw
text (every token a target), one is chat data (targets only on assistant tokens, so windows
hold different numbers of them and the per-token normalisation matters).
Regenerate deliberately with `UPDATE_GOLDEN=1 make test PYTEST_ARGS=tests/test_golden.py`.
"""

import json
import os
from pathlib import Path

import pytest

from pipeline.training.metrics_log import read_metrics
from tests.kit import train as ft

GOLDEN = Path(__file__).parent / "golden"
# Cross-machine float differences (different BLAS kernels) stay far below this; a real change
# (one token shifted, a different mask, another LR) moves the curve by 1e-2 or more.
TOL = 2e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return ft.shared_setup(tmp_path_factory)


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "phase,compile_layers",
    [("raw", False), ("raw", True), ("chat", False)],
    ids=["raw-eager", "raw-compiled", "chat-eager"],
)
def test_loss_curve_matches_golden(setup, tmp_path, phase, compile_layers):
    """`compile_layers: true` (torch.compile per layer) must train to the same curve."""
    cfg = ft.write_config(
        tmp_path / "golden.yaml", setup, phase, tmp_path / "run", seq_len=32, steps=12, compile_layers=compile_layers
    )
    ft.run_train([str(cfg)])
    losses = [round(r["loss"], 6) for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    path = GOLDEN / f"{phase}_p1_loss.json"
    if os.environ.get("UPDATE_GOLDEN") == "1" and not compile_layers:
        path.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
    golden = json.loads(path.read_text())["losses"]
    assert len(losses) == len(golden) == 12
    assert golden[-1] < golden[0] - 0.05, "the golden curve must show learning"
    worst = max(abs(a - b) for a, b in zip(losses, golden))
    assert worst < TOL, f"loss curve {losses} drifted from golden {golden} (worst {worst:.2e})"
