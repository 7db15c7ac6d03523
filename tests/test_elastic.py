"""Elastic resume: a run resumed on another data-parallel size continues as the uninterrupted run
on that size would, ZeRO-1 optimizer state included; a resume on other pipeline stages is refused
at preflight, before anything in the run directory changes.

A run "stopped after step K" is a copy of an uninterrupted run with its later checkpoints removed:
exactly what a job ended after step K's save leaves behind. Every file of the final checkpoint
(weights, each rank's optimizer partition or the whole optimizer state, LR schedule and step
counters) must then match the uninterrupted run on the new size, and so must every logged loss.
A continuation that started Adam afresh would fail here: its optimizer step counter would be
N - K instead of N, and its moments and weights would differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.rundir import RunDir
from pipeline.training.metrics_log import read_metrics
from tests.kit import train as ft

N, K = 6, 3  # steps of the run, and the step it was stopped after
TOL = 1e-5  # fp32: a different accumulation order may round differently


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return ft.shared_setup(tmp_path_factory)


def config(setup, run: Path, **overrides) -> Path:
    return ft.write_config(
        run.parent / f"{run.name}.yaml",
        setup,
        "raw",
        run,
        steps=N,
        save_every=K,
        keep_last=0,
        log_every=1,
        **overrides,
    )


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """(ranks, ds_config) -> the run directory of the same config trained from 0 to N without a
    stop on that many data-parallel ranks (1 pipeline stage); each trained once, when first asked."""
    runs = {}

    def get(ranks: int, ds_config: str = "auto") -> Path:
        if (ranks, ds_config) not in runs:
            run = setup["root"] / f"uninterrupted_{ranks}_{ds_config.removesuffix('.json')}"
            ft.run_train([str(config(setup, run, ds_config=ds_config))], ranks=ranks)
            runs[ranks, ds_config] = run
        return runs[ranks, ds_config]

    return get


def stopped_after(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` as a job stopped after `step`'s save leaves it."""
    shutil.copytree(src, dst)
    rd = RunDir(dst)
    for s in rd.complete_steps():
        if s > step:
            shutil.rmtree(rd.tag_dir(s))
    assert rd.latest_step() == step
    return dst


def assert_same(got, want, where: str) -> None:
    """Nested checkpoint contents equal: tensors within TOL (relative for the tiny Adam moments),
    everything else exactly (floats to rounding)."""
    if torch.is_tensor(want):
        assert torch.is_tensor(got) and got.shape == want.shape and got.dtype == want.dtype, where
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL * 1e-3, msg=lambda m: f"{where}: {m}")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-12), f"{where}: {got} != {want}"
    elif want is None or isinstance(want, (int, str, bool)) or dataclasses.is_dataclass(want):
        assert got == want, f"{where}: {got!r} != {want!r}"
    else:  # DeepSpeed's loss scaler and the like: the same kind of object
        assert type(got) is type(want), where


def optimizer_steps(tag_dir: Path) -> set[float]:
    """Adam's step counters in a checkpoint, from either form of its optimizer state."""
    out = set()
    for f in tag_dir.glob("*_states.pt"):
        if f.name.startswith("layer_"):
            continue
        sd = torch.load(f, map_location="cpu", weights_only=False)
        sd = sd.get("optimizer_state_dict", {}).get("base_optimizer_state") or sd.get("optimizer")
        if sd:
            out |= {float(s["step"]) for s in sd["state"].values()}
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "before,after,ds_config",
    [(1, 2, "auto"), (2, 1, "auto"), (1, 2, "gpu_bf16_zero1.json")],
    # fp32 on 1 process trains without ZeRO (torch's per-parameter Adam state) and with ZeRO-1 on
    # 2 ranks (a slice each); bf16 keeps ZeRO-1 on 1 process too, and its fp32 master weights differ
    # from the bf16 weights saved in the layer files, so they must come from the optimizer files.
    ids=["1to2", "2to1", "bf16_1to2"],
)
def test_a_resume_on_another_data_parallel_size_continues_as_the_uninterrupted_run(
    setup, uninterrupted, tmp_path, before, after, ds_config
):
    run = stopped_after(uninterrupted(before, ds_config), tmp_path / "run", K)
    p = ft.run_train([str(config(setup, run, ds_config=ds_config))], ranks=after)
    assert f"resuming from {RunDir(run).tag_dir(K)}" in p.stdout
    want = uninterrupted(after, ds_config)

    got_rows, want_rows = read_metrics(run / "metrics.jsonl"), read_metrics(want / "metrics.jsonl")
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows] == list(range(1, N + 1))
    for g, w in zip(got_rows, want_rows):
        assert abs(g["loss"] - w["loss"]) < TOL and g["lr"] == w["lr"], f"step {g['step']}: {g} vs {w}"

    # Every file of the final checkpoint: weights, the optimizer state in the new size's form,
    # LR schedule, DeepSpeed's step and sample counters.
    got_tag, want_tag = RunDir(run).tag_dir(N), RunDir(want).tag_dir(N)
    got_files = set(RunDir(run).read_record(N)["files"])
    assert got_files == set(RunDir(want).read_record(N)["files"])
    for name in sorted(got_files):
        assert_same(
            torch.load(got_tag / name, map_location="cpu", weights_only=False),
            torch.load(want_tag / name, map_location="cpu", weights_only=False),
            name,
        )
    # What a fresh optimizer would get wrong, said plainly: Adam counted every step since 0.
    assert optimizer_steps(got_tag) == {float(N)}
    # The weights moved after the resume, so matching them means something.
    layer = "layer_01-model_states.pt"
    k_w = torch.load(RunDir(run).tag_dir(K) / layer, weights_only=True)
    n_w = torch.load(got_tag / layer, weights_only=True)
    assert any((n_w[k] - k_w[k]).abs().max() > 100 * TOL for k in k_w)


def snapshot(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.mark.multiproc
def test_another_number_of_pipeline_stages_is_refused_at_preflight_and_changes_nothing(setup, uninterrupted, tmp_path):
    from data_prep.errors import UserError
    from pipeline.config import load_config
    from pipeline.training.plan import build_plan

    run = stopped_after(uninterrupted(1), tmp_path / "run", K)
    before = snapshot(run)
    with pytest.raises(UserError) as e:
        build_plan(load_config(config(setup, run, pipeline_stages=2)), world_size=2)
    msg = str(e.value)
    for part in ("1 pipeline stage(s)", "this job has 2", "pipeline_stages: 1", "pipeline.export"):
        assert part in msg, f"{part!r} not in: {msg}"
    assert snapshot(run) == before
    # The data-parallel size alone may change: 1 stage on 2 ranks passes the same preflight.
    build_plan(load_config(config(setup, run)), world_size=2)
    assert snapshot(run) == before


def test_another_partition_of_layers_into_stages_is_refused(tmp_path):
    """Same number of stages, other layer bounds: each stage's checkpoint holds its own layers'
    optimizer state, so the resume is refused, naming both partitions."""
    from data_prep.errors import UserError
    from pipeline.training.plan import RESUMABLE
    from tests.kit.runs import make_base, make_run

    run = make_run(tmp_path / "run", make_base(tmp_path / "base"), "raw").path
    old = json.loads((run / "run.json").read_text())
    old.update(stages=[[0, 2], [2, 4]], world_size=2)
    (run / "run.json").write_text(json.dumps(old))
    record = {k: old[k] for k in ("config", "base_model", "stages", "world_size")}
    RunDir(run).check_resume({**record, "world_size": 4}, RESUMABLE)  # only the data-parallel size: fine
    with pytest.raises(UserError, match=r"\[\[0, 2\], \[2, 4\]\].*\[\[0, 1\], \[1, 4\]\]"):
        RunDir(run).check_resume({**record, "stages": [[0, 1], [1, 4]]}, RESUMABLE)
