"""`make bench` machinery on a toy size: the figures' schema, ratio = value / baseline, the files
written, a crashed part recorded as a failed figure, and bench/gpu.py end to end on CPU (--tiny).

The tiny figures measure nothing worth reading; what must hold at any size is checked: optimizer
state exists only for trained parameters (read from real checkpoint files of a P=2 run).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.kit import train as ft

KEYS = {"name", "value", "baseline", "ratio", "goal", "met"}


def check_schema(figures: list[dict]) -> None:
    assert isinstance(figures, list) and figures
    for f in figures:
        assert KEYS <= set(f), f"{f.get('name')}: missing {KEYS - set(f)}"
        assert f["met"] in (True, False, None)
        if isinstance(f["value"], (int, float)) and isinstance(f["baseline"], (int, float)) and f["baseline"]:
            assert f["ratio"] == pytest.approx(f["value"] / f["baseline"], rel=1e-3, abs=1e-4), f["name"]


@pytest.mark.multiproc
def test_bench_run_tiny(tmp_path):
    out = tmp_path / "results"
    p = subprocess.run(
        [sys.executable, "-m", "bench.run", "--size", "tiny", "--parts", "train", "--out", str(out)],
        cwd=ft.REPO,
        env=ft.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    figures = json.loads((out / "latest.json").read_text())
    check_schema(figures)
    assert not any(f["name"].endswith("failed") for f in figures), [f.get("notes") for f in figures]
    names = [f["name"] for f in figures]
    for expect in ("tokens/s, pipeline.train", "step time, chat phase", "loader time", "optimizer bytes"):
        assert any(n.startswith(expect) for n in names), (expect, names)
    by = {f["name"]: f for f in figures}
    chat = next(f for n, f in by.items() if n.startswith("step time, chat phase"))
    assert 0.3 < chat["flop_ratio"] < 0.8  # last 25% of 4 layers + head trained: ~0.57
    # Optimizer state: trained stages hold exactly Adam's 12 B/param (+ the step counter), fully
    # frozen stages only the anchor scalar. Frozen parameters with state would break both.
    opt = [f for n, f in by.items() if n.startswith("optimizer bytes per rank")]
    assert len(opt) == 4  # raw and chat phases x 2 stages
    for f in opt:
        assert f["met"] is True, f
        if f["baseline"]:
            assert 1.0 <= f["ratio"] <= 1.05
        else:
            assert 0 < f["value"] <= 64
    speed = by["tokens/s, pipeline.train 1 stage (phase full) vs plain PyTorch loop"]
    assert speed["met"] or "Where the time goes" in speed["profile"]  # a missed goal carries its profile
    md = (out / "latest.md").read_text()
    assert all(n in md for n in names) and md in p.stdout
    meta = json.loads((out / "latest.meta.json").read_text())
    assert meta["machine"]["cpu_count"] >= 1 and meta["machine"]["torch"] and meta["size"] == "tiny"


def test_crashed_part_is_a_failed_figure(monkeypatch):
    from bench import run as bench_run

    def boom(part, size):
        raise RuntimeError(f"{part} exploded")

    monkeypatch.setattr(bench_run, "run_part", boom)
    figures = bench_run.collect("tiny", ["dataprep", "transplant"])
    assert [f["part"] for f in figures] == ["dataprep", "transplant"]
    for f in figures:
        assert f["met"] is False and "exploded" in f["notes"] and f["value"] is None
    check_schema(figures)
    md = bench_run.to_markdown(
        figures,
        {
            "size": "tiny",
            "command": "x",
            "seconds": 0,
            "load_average_at_end": None,
            "machine": {
                "cpu": "c",
                "usable_cores": 2,
                "omp_num_threads": "1",
                "torch": "t",
                "deepspeed": "d",
                "transformers": "tr",
                "load_average_at_start": None,
            },
        },
    )
    assert "dataprep: failed" in md and "**no**" in md


@pytest.mark.multiproc
def test_gpu_script_tiny_on_cpu(tmp_path):
    """The GPU script, end to end on CPU: model + shards built, pipeline.train run, baseline timed."""
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu",
            "--tiny",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--out",
            str(tmp_path),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=ft.REPO,
        env=ft.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert "error" not in res and res["device"].startswith("cpu")
    check_schema(res["figures"])
    assert len(res["pipeline_step_times_s"]) == len(res["baseline_step_times_s"]) == 2
    assert res["pipeline_mask_is_causal"] is True and res["attention_kernels"]
    assert (tmp_path / "gpu.md").read_text().startswith("# GPU benchmark")
    assert not any((tmp_path / "work").iterdir())  # the work dir is cleaned up


@pytest.mark.multiproc
def test_stage_memory_child_reports_every_phase(tmp_path):
    """bench.stage_memory's rank report on one tiny P=1 run: the peak, the tensors held at the optimizer
    step, the activations, and a phase record for each part of a step; then the figure and the trace."""
    from bench import stage_memory as sm
    from bench.synth import write_random_shards
    from pipeline.config import load_config
    from pipeline.training.plan import build_plan
    from tests.kit.tokenizers import make_hf_tokenizer

    shape = sm.SIZES["tiny"]
    tok = make_hf_tokenizer(tmp_path / "tok", vocab_size=300)
    model = sm._model(tmp_path, "model", tok, **shape)
    data = write_random_shards(tmp_path / "data" / "raw", shape["vocab_size"], 5_000, tok, seed=1)
    cfg = sm._config(tmp_path, "p1", model, data, shape["layers"], 1)
    plan = build_plan(load_config(cfg), 1, use_gpu=False)
    (rank,) = sm.peak_rss_per_rank(cfg, 1, tmp_path / "rss", trace=True)
    est = plan.memory_per_stage()[0]
    assert rank["hwm_mb"] > rank["tensors_mb"] > est["weights"] / 2**20  # weights, gradients and moments
    assert rank["activations_mb"] > 0
    phases = {p["phase"] for p in rank["phases"]}
    assert {"forward", "backward", "optimizer_step", "clip", "adam", "zero_grad", "save"} <= phases, phases
    assert all(p["peak"] >= p["rss_in"] - 1 and "live_in" in p for p in rank["phases"])
    rec = {
        "P": 1,
        "rank": 0,
        "layers": (0, shape["layers"] - 1),
        "trains": True,
        "run": rank,
        "idle": rank,
        "whole_fp32_mb": 1.0,
        "estimate": {k: v / 2**20 for k, v in est.items()},
    }
    rec["idle"] = {**rank, "hwm_mb": 0.0, "tensors_mb": 0.0, "activations_mb": 0.0}
    (fig,) = sm.figures([rec])
    check_schema([fig])
    assert fig["baseline"] == pytest.approx(rank["tensors_mb"] + rank["activations_mb"], abs=0.1)
    assert "| 2 | backward |" in sm.trace_markdown([rec], "t")
