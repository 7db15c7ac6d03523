"""Parity: the DeepSpeed pipeline trains exactly like a plain PyTorch loop.

For each phase (chat, raw, full) the loss curve of P = 1, P = 2 and P = 2 x DP = 2 (4 CPU ranks)
must match `tests.kit.reference` (HF model + torch AdamW, no DeepSpeed) within 1e-4 for 10 steps,
and so must the validation losses (the run's own val split and the other kind of data, with and
without a loss mask) at steps 0, 5 and 10.
The same runs then show that frozen parameters are bit-identical and that optimizer state exists
only for the trained groups, read from the checkpoint files themselves.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.groups import LayerGroups
from pipeline.names import to_pipeline_name
from pipeline.rundir import RunDir
from pipeline.training.metrics_log import read_metrics
from pipeline.training.plan import build_plan
from tests.kit import train as ft
from tests.kit.oracles import checkpoint_tensors, optimizer_numel_per_stage
from tests.kit.reference import train_reference

PHASES = ("chat", "raw", "full", "raw_anchor")  # raw_anchor: `raw` with representation anchoring
EXTRA = {"raw_anchor": {"anchor_weight": 50.0}}
LAYOUTS = {"p1": (1, 1), "p2": (2, 2), "p2dp2": (4, 2)}  # name: (ranks, pipeline_stages)
TOL = 1e-4


def extra(setup, phase: str) -> dict:
    other = setup["raw" if phase.startswith("chat") else "chat"]
    return {**EXTRA.get(phase, {}), "eval_every": 5, "eval_batches": 2, "eval_data": {"other": str(other)}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return ft.shared_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(setup):
    curves = {}
    for phase in PHASES:
        cfg = load_config(
            ft.write_config(
                setup["root"] / f"ref_{phase}.yaml",
                setup,
                phase.split("_")[0],
                setup["root"] / "unused",
                seq_len=32,
                **extra(setup, phase),
            )
        )
        vals = {}
        curves[phase], _ = train_reference(build_plan(cfg, world_size=1), validations=vals)
        curves[f"{phase}/val"] = vals
    return curves


@pytest.fixture(scope="module")
def runs(setup):
    """Run every phase under every layout: one launch per layout, the three phases inside it."""
    out = {}
    for name, (ranks, stages) in LAYOUTS.items():
        cfgs = []
        for phase in PHASES:
            run = setup["root"] / "runs" / f"{phase}_{name}"
            cfgs.append(
                str(
                    ft.write_config(
                        setup["root"] / f"{phase}_{name}.yaml",
                        setup,
                        phase.split("_")[0],
                        run,
                        pipeline_stages=stages,
                        seq_len=32,
                        **extra(setup, phase),
                    )
                )
            )
            out[(phase, name)] = run
        helper = str(ft.REPO / "tests" / "helpers" / "train_phases.py")
        if ranks == 1:
            import subprocess
            import sys

            subprocess.run(
                [sys.executable, helper, *cfgs], cwd=ft.REPO, env=ft.env(), check=True, capture_output=True, timeout=400
            )
        else:
            ft.run_deepspeed_script(helper, cfgs, ranks)
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("phase", PHASES)
def test_loss_curve_matches_plain_pytorch(runs, reference, phase, layout):
    losses = [r["loss"] for r in read_metrics(runs[(phase, layout)] / "metrics.jsonl") if "loss" in r]
    ref = reference[phase]
    assert len(losses) == len(ref) == 10
    # The curve must actually move, or matching it would prove nothing.
    assert abs(ref[-1] - ref[0]) > 10 * TOL
    worst = max(abs(a - b) for a, b in zip(losses, ref))
    assert worst < TOL, f"{phase}/{layout}: pipeline {losses} vs reference {ref}"


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("phase", PHASES)
def test_validation_losses_match_plain_pytorch(runs, reference, phase, layout):
    got = {
        r["step"]: {k: v for k, v in r.items() if k.startswith("val_loss")}
        for r in read_metrics(runs[(phase, layout)] / "metrics.jsonl")
        if "eval_time_s" in r
    }
    ref = reference[f"{phase}/val"]
    assert sorted(got) == sorted(ref) == [0, 5, 10]
    assert all(set(v) == {"val_loss", "val_loss_other"} for v in ref.values())
    # Validation sees the weights of its step: the losses move as training goes.
    assert abs(ref[10]["val_loss"] - ref[0]["val_loss"]) > 10 * TOL
    worst = max(abs(got[s][k] - ref[s][k]) for s in ref for k in ref[s])
    assert worst < TOL, f"{phase}/{layout}: pipeline {got} vs reference {ref}"


def test_anchoring_changes_the_training(reference):
    """Otherwise the raw_anchor parity above would not show that anchoring is applied at all."""
    assert max(abs(a - b) for a, b in zip(reference["raw"], reference["raw_anchor"])) > 10 * TOL


@pytest.mark.multiproc
@pytest.mark.parametrize("phase", ["chat", "raw"])
def test_frozen_parameters_bit_identical_and_trained_ones_moved(setup, runs, phase):
    base = load_file(str(setup["model"] / "model.safetensors"))
    run = runs[(phase, "p2dp2")]
    groups = LayerGroups.from_record(json.loads((run / "run.json").read_text())["groups"], "run.json")
    final = checkpoint_tensors(run)
    assert set(final) == set(base)
    moved = 0
    for name, t in final.items():
        if groups.trains(name):
            moved += not torch.equal(t, base[name])
        else:
            assert torch.equal(t, base[name]), f"{phase}: frozen {name} changed"
    assert moved > 0


@pytest.mark.multiproc
@pytest.mark.parametrize("phase", ["chat", "raw"])
def test_optimizer_state_only_for_trained_groups(setup, runs, phase):
    """Each stage's ZeRO partitions hold exactly its trained parameters (or the 1-element anchor of a
    stage with nothing to train), split across the 2 data-parallel ranks."""
    run = runs[(phase, "p2dp2")]
    rec = json.loads((run / "run.json").read_text())
    groups = LayerGroups.from_record(rec["groups"], "run.json")
    base = load_file(str(setup["model"] / "model.safetensors"))
    expected = {}
    for s, (lo, hi) in enumerate(rec["stages"]):
        n = sum(
            t.numel()
            for name, t in base.items()
            if lo <= to_pipeline_name(name, groups.num_layers)[0] < hi and groups.trains(name)
        )
        expected[s] = n or 1  # the anchor
    got = optimizer_numel_per_stage(RunDir(run).tag_dir(RunDir(run).latest_step()))
    assert got == expected
