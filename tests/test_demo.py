"""The main job end to end (tiny size): every step runs through the real entry points and the
report has every model and metric the issue names."""
import json
import subprocess
import sys

import pytest

import fixtures_train as ft

MODELS = {"base", "a_chat", "a_raw", "transplant", "naive", "qa_upper", "transplant_reattach", "transplant_anchor"}
METRICS = {"format_adherence", "knowledge_accuracy", "knowledge_rank", "heldout_known_rank", "raw_rank_new",
           "ppl_raw_new", "ppl_raw_known", "chance_rank"}


@pytest.mark.multiproc
def test_tiny_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "pipeline.demo", "--size", "tiny", "--out", str(out), "--threads", "1"]
    p = subprocess.run(cmd, cwd=ft.REPO, env=ft.env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())["models"]
    assert set(results) == MODELS
    for name, metrics in results.items():
        assert METRICS <= set(metrics), name
        assert 0.0 <= metrics["format_adherence"] <= 1.0
        assert 1.0 <= metrics["knowledge_rank"] <= 2 * metrics["chance_rank"]
    md = (out / "results.md").read_text()
    assert "| transplant |" in md and "## What this run shows" in md and "Extraction" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each training run left its loss curve and metrics; the transplant its provenance.
    assert (out / "runs" / "a_raw" / "loss.png").is_file()
    assert json.loads((out / "models" / "transplant" / "transplant.json").read_text())
    # A rerun finds every step done and only rewrites the report.
    p2 = subprocess.run(cmd, cwd=ft.REPO, env=ft.env(), capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0 and p2.stdout.count("done already") >= 20
