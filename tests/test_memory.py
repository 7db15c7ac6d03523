"""Memory-related guarantees that a CPU can check: in bf16 the weights are bf16 and only trained
parameters get an fp32 master copy and Adam moments; activation checkpointing changes nothing
but memory; the plan's per-stage estimate counts exactly the parameters each stage holds."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import load_config
from pipeline.rundir import RunDir
from pipeline.training.metrics_log import read_metrics
from pipeline.training.plan import build_plan
from tests.kit import train as ft
from tests.kit.oracles import checkpoint_tensors, optimizer_numel_per_stage


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    setup = ft.build_setup(tmp_path_factory.mktemp("mem"))
    root = setup["root"]
    common = dict(pipeline_stages=2, seq_len=32, steps=6, save_every=6)
    cfgs = {
        "bf16": ft.write_config(
            root / "bf16.yaml", setup, "raw", root / "runs/bf16", ds_config="gpu_bf16_zero1.json", **common
        ),
        "fp32": ft.write_config(root / "fp32.yaml", setup, "raw", root / "runs/fp32", **common),
        "ckpt": ft.write_config(
            root / "ckpt.yaml", setup, "raw", root / "runs/ckpt", activation_checkpoint_interval=1, **common
        ),
    }
    ft.run_deepspeed_script(str(ft.REPO / "tests/helpers/train_phases.py"), [str(c) for c in cfgs.values()], ranks=2)
    return {"setup": setup, "cfgs": cfgs, "root": root}


@pytest.mark.multiproc
def test_bf16_weights_with_fp32_master_copies_only_for_trained_parameters(runs):
    run = runs["root"] / "runs/bf16"
    rec = json.loads((run / "run.json").read_text())
    assert rec["ds_config"]["bf16"]["enabled"] is True
    assert {t.dtype for t in checkpoint_tensors(run).values()} == {torch.bfloat16}
    plan = build_plan(load_config(runs["cfgs"]["bf16"]), 2, use_gpu=False)
    tag = RunDir(run).tag_dir(6)
    got = optimizer_numel_per_stage(tag)
    for s in range(2):
        names = [n for i in range(plan.stages[s], plan.stages[s + 1]) for n in plan.layer_names(i)]
        trained = plan.numel([n for n in names if plan.groups.trains(n)])
        assert got[s] == (trained or 1), (s, got, trained)  # the frozen stage holds only the anchor
    for f in tag.glob("*zero_pp_rank_*_optim_states.pt"):
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        assert all(t.dtype == torch.float32 for t in osd["single_partition_of_fp32_groups"])


@pytest.mark.multiproc
def test_activation_checkpointing_trains_the_same(runs):
    curve = lambda name: [r["loss"] for r in read_metrics(runs["root"] / "runs" / name / "metrics.jsonl")]
    plain, ckpt = curve("fp32"), curve("ckpt")
    assert len(plain) == 6 and abs(plain[0] - plain[-1]) > 1e-3
    assert max(abs(a - b) for a, b in zip(plain, ckpt)) < 1e-5
    a, b = checkpoint_tensors(runs["root"] / "runs/fp32"), checkpoint_tensors(runs["root"] / "runs/ckpt")
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_the_estimate_counts_each_stage_exactly(tmp_path):
    """weights = every parameter the stage's layers hold, in the training dtype; state = trained ones."""
    setup = ft.build_setup(tmp_path)
    cfg = load_config(ft.write_config(tmp_path / "c.yaml", setup, "chat", tmp_path / "run", pipeline_stages=2))
    from safetensors.torch import load_file

    from pipeline.names import to_pipeline_name

    base = load_file(str(setup["model"] / "model.safetensors"))
    # fp32 on one data-parallel rank: ZeRO-0 and torch's AdamW, 8 B of moments per trained parameter;
    # on two, ZeRO-1: an fp32 master copy and the moments (12 B), split over the 2 ranks.
    for world, optimizer_bytes in ((2, 8), (4, 6)):
        plan = build_plan(cfg, world, use_gpu=False)
        for s, m in enumerate(plan.memory_per_stage()):
            held = [n for n in base if plan.stages[s] <= to_pipeline_name(n, 4)[0] < plan.stages[s + 1]]
            trained = [n for n in held if plan.groups.trains(n)]
            assert m["weights"] == 4 * sum(base[n].numel() for n in held)
            assert m["gradients"] == 4 * sum(base[n].numel() for n in trained)
            assert m["optimizer"] == optimizer_bytes * sum(base[n].numel() for n in trained), (world, s)
        assert "per rank before activations" in plan.layer_map()
