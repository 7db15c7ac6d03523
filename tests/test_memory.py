"""Memory-related guarantees that a CPU can check: in bf16 the weights are bf16 and only trained
parameters get an fp32 master copy and Adam moments; activation checkpointing changes nothing
but memory; the plan's per-stage estimate counts exactly the parameters each stage holds, and
its activations are what autograd saves in the pipeline's own layers."""

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
    setup = ft.shared_setup(tmp_path_factory)
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


def test_the_estimate_counts_each_stage_exactly(tmp_path, tmp_path_factory):
    """weights = every parameter the stage's layers hold, in the training dtype; state = trained ones."""
    setup = ft.shared_setup(tmp_path_factory)
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
            assert m["total"] == m["weights"] + m["gradients"] + m["optimizer"] + m["activations"] + m["backward"]
            # chat: the stage below the format group only runs forward, so it keeps no activations
            assert (m["activations"] > 0) == (s == plan.num_stages - 1), (s, m)
        assert "per rank at peak" in plan.layer_map() and "in flight" in plan.layer_map()


def test_the_activation_estimate_is_what_autograd_saves(tmp_path, tmp_path_factory):
    """stage_activations counts, per token, what each kind of layer keeps for backward: here every
    tensor autograd saves in the pipeline's own layers is counted (saved_tensors_hooks, each storage
    once, weights left out) and compared with the plan's per-layer figure."""
    from pipeline.training.model import DecoderLayerPipe, StageLoader
    from pipeline.training.plan import BACKPROP, FORWARD, TRAINED, activation_kind, layer_activation_values

    setup = ft.shared_setup(tmp_path_factory)
    plan = build_plan(
        load_config(
            ft.write_config(tmp_path / "c.yaml", setup, "raw", tmp_path / "run", micro_batch_size=2, seq_len=16)
        ),
        1,
        use_gpu=False,
    )
    loader = StageLoader(plan)
    L, tokens = plan.groups.num_layers, 2 * 16
    layers = [DecoderLayerPipe(i, loader) for i in range(L)]
    weights = {p.untyped_storage().data_ptr() for layer in layers for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    h = torch.randint(0, plan.hf_config["vocab_size"], (2, 16))
    kinds = [activation_kind(plan.groups, i) for i in range(L)]
    assert set(kinds) == {TRAINED, BACKPROP, FORWARD}  # raw: frozen below, trained raw, frozen format above
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for i, layer in enumerate(layers):
            before = sum(seen.values())
            h = layer(h)
            first = i == plan.groups.first_trained_layer
            expect = layer_activation_values(plan.hf_config, kinds[i], tokens, 16, first=first, last=i == L - 1)
            assert sum(seen.values()) - before == 4 * expect, (i, kinds[i])


def test_the_last_stage_drops_its_logits_before_backward():
    """DeepSpeed's last stage kept every micro-batch's logits until the next step; the engine drops
    them once the loss exists (backward starts from the loss) and after a validation."""
    from deepspeed.runtime.pipe import schedule

    from pipeline.training.engine import free_logits_before_backward

    seen = []

    class Fake:
        _INSTRUCTION_MAP = {
            schedule.BackwardPass: lambda self, buffer_id: seen.append(self.pipe_buffers["outputs"][buffer_id])
        }

        def __init__(self):
            self.pipe_buffers = {"outputs": ["logits0", "logits1"]}

        def eval_batch(self, data_iter):
            self.pipe_buffers["outputs"][:] = ["eval0", "eval1"]
            return 1.5

    eng = Fake()
    free_logits_before_backward(eng)
    eng._INSTRUCTION_MAP[schedule.BackwardPass](eng, buffer_id=1)
    assert seen == [None] and eng.pipe_buffers["outputs"] == ["logits0", None]
    assert Fake._INSTRUCTION_MAP[schedule.BackwardPass] is not eng._INSTRUCTION_MAP[schedule.BackwardPass]
    assert eng.eval_batch(data_iter=None) == 1.5 and eng.pipe_buffers["outputs"] == [None, None]


def test_the_optimizer_is_torch_adamw_fused_with_the_json_settings(tmp_path, tmp_path_factory):
    """The engine builds torch's AdamW itself (fused: no temporaries) exactly when the DeepSpeed JSON
    asks for torch's AdamW; the fused update is the per-tensor one up to float rounding."""
    from pipeline.training.engine import torch_adamw

    setup = ft.shared_setup(tmp_path_factory)
    plan = build_plan(
        load_config(ft.write_config(tmp_path / "c.yaml", setup, "raw", tmp_path / "run")), 1, use_gpu=False
    )
    kw = torch_adamw(plan)
    adam = plan.ds_config["optimizer"]["params"]
    assert kw == dict(
        lr=plan.cfg.optim.lr,
        betas=tuple(adam["betas"]),
        eps=adam["eps"],
        weight_decay=plan.cfg.optim.weight_decay,
        fused=True,
    )
    for extra in ({"foreach": True}, {"amsgrad": True}):  # set in the JSON: DeepSpeed builds it as written
        plan.ds_config["optimizer"]["params"] = {**adam, **extra}
        assert torch_adamw(plan) is None
    plan.ds_config["optimizer"] = {"type": "AdamW", "params": {k: v for k, v in adam.items() if k != "torch_adam"}}
    assert torch_adamw(plan) is None  # DeepSpeed's own Adam

    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(300, 70)) for _ in range(3)]
    fused = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opts = [torch.optim.AdamW(ref, **{**kw, "fused": False, "foreach": False}), torch.optim.AdamW(fused, **kw)]
    for _ in range(5):
        for a, b in zip(ref, fused):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        for o in opts:
            o.step()
    assert max((a - b).abs().max().item() for a, b in zip(ref, fused)) < 1e-6
