"""Validation during training, and the monitors it reports to.

- Validating changes nothing: a 2-stage run on 2 CPU ranks with validation every 3 steps, an extra
  set and TensorBoard + CSV on ends with the same loss curve and bit-identical final weights as
  the same run without them. (Its values against a plain PyTorch loop: tests/test_parity.py.)
- TensorBoard: the event file, read back with tensorboard's own reader, holds DeepSpeed's training
  loss and our validation losses at the samples seen, equal to metrics.jsonl, and no mixed
  `eval_loss` tag. The CSV monitor holds the same numbers.
- W&B, offline: the run lives in the run directory, is named after it, and its transaction log
  holds the validation losses.
- Data without a val split: the run's own set is skipped with a note in the layer map, the named
  sets are still validated, and the run ends normally.
"""

from __future__ import annotations

import csv

import pytest
import torch

from pipeline.training.metrics_log import read_metrics
from tests.kit import train as ft
from tests.kit.oracles import checkpoint_tensors, tensorboard_scalars, wandb_offline_history

STEPS, EVERY, G = 12, 3, 4
RUN = dict(pipeline_stages=2, steps=STEPS, save_every=6, global_batch_size=G)
WATCH = dict(eval_every=EVERY, eval_batches=2, report_to=["tensorboard", "csv"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return ft.shared_setup(tmp_path_factory)


def train(setup, name: str, ranks: int = 2, env: dict | None = None, **overrides):
    run = setup["root"] / "runs" / name
    cfg = ft.write_config(setup["root"] / f"{name}.yaml", setup, "raw", run, **{**RUN, **overrides})
    p = ft.run_train([str(cfg)], ranks=ranks, env=env)
    return run, p


@pytest.fixture(scope="module")
def pair(setup):
    off, _ = train(setup, "off")
    on, p = train(setup, "on", eval_data={"chat": str(setup["chat"])}, **WATCH)
    return off, on, p.stdout


def val_rows(run):
    return [r for r in read_metrics(run / "metrics.jsonl") if "eval_time_s" in r]


@pytest.mark.multiproc
def test_validation_changes_nothing_in_the_curve_or_the_final_weights(pair):
    off, on, _ = pair
    got, want = checkpoint_tensors(on, STEPS), checkpoint_tensors(off, STEPS)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs with validation on"
    curve = lambda run: [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert curve(on) == curve(off) and len(curve(off)) == STEPS
    assert curve(off)[0][1] != curve(off)[-1][1]  # it trains, so equal weights mean something
    rows = val_rows(on)
    assert [r["step"] for r in rows] == [0, 3, 6, 9, 12]
    assert all(set(r) >= {"val_loss", "val_loss_chat"} for r in rows)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # raw training lowers the loss on held-out raw text
    assert not val_rows(off)


@pytest.mark.multiproc
def test_the_layer_map_names_each_validation_set(pair):
    out = pair[2]
    assert f"validation every {EVERY} steps" in out
    assert "val_loss: 2 x 4 sequences of the val split of raw.manifest.json" in out
    assert "val_loss_chat:" in out and "chat.manifest.json" in out


@pytest.mark.multiproc
def test_tensorboard_event_file_holds_the_same_losses(pair):
    _, on, _ = pair
    scalars = tensorboard_scalars(on / "tensorboard")
    rows = read_metrics(on / "metrics.jsonl")
    train_loss = [(r["step"] * G, r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in scalars["Train/Samples/train_loss"]] == [s for s, _ in train_loss]
    # TensorBoard keeps float32.
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(scalars["Train/Samples/train_loss"], train_loss))
    for key in ("val_loss", "val_loss_chat"):
        want = [(r["step"] * G, r[key]) for r in val_rows(on)]
        got = scalars[f"Val/Samples/{key}"]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(got, want))
    assert "Train/Samples/lr" in scalars
    assert "Train/Samples/eval_loss" not in scalars  # DeepSpeed's own per-batch eval event stays muted


@pytest.mark.multiproc
def test_csv_monitor_holds_the_same_validation_losses(pair):
    _, on, _ = pair
    with open(on / "csv" / "Val_Samples_val_loss.csv") as f:
        got = [(int(r["step"]), float(r["val_loss"])) for r in csv.DictReader(f)]
    assert got == [(r["step"] * G, r["val_loss"]) for r in val_rows(on)]


@pytest.mark.multiproc
def test_wandb_offline_keeps_its_run_in_the_run_directory(setup):
    # Offline, and where and how the run is named left to the trainer, whatever the caller's shell says.
    offline = {"WANDB_MODE": "offline", "WANDB_DIR": None, "WANDB_NAME": None, "WANDB_RUN_ID": None}
    run, _ = train(
        setup,
        "wandb",
        ranks=1,
        env=offline,
        pipeline_stages=1,
        eval_every=4,
        eval_batches=1,
        report_to=["wandb"],
        wandb_project="tests",
    )
    [log] = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    history, run_name = wandb_offline_history(log)
    assert run_name == "wandb"  # named after the run directory
    want = [(r["step"] * G, r["val_loss"]) for r in val_rows(run)]
    got = [(h["_step"], h["Val/Samples/val_loss"]) for h in history if "Val/Samples/val_loss" in h]
    assert len(want) == 4 and [s for s, _ in got] == [s for s, _ in want]
    assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(got, want))


@pytest.mark.multiproc
def test_data_without_a_val_split_validates_the_named_sets_only(setup):
    from data_prep.__main__ import main as prep

    root = setup["root"]
    prep(
        [
            "raw",
            str(root / "raw.jsonl"),
            "--tokenizer",
            str(setup["model"]),
            "--output-prefix",
            str(root / "noval/raw"),
            "--val-fraction",
            "0",
        ]
    )
    run, p = train(
        setup,
        "noval",
        ranks=1,
        pipeline_stages=1,
        steps=4,
        data=str(root / "noval/raw.manifest.json"),
        eval_every=2,
        eval_batches=1,
        eval_data={"chat": str(setup["chat"])},
    )
    assert "the data has no val split, so the run's own set is not validated" in p.stdout
    rows = val_rows(run)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all("val_loss_chat" in r and "val_loss" not in r for r in rows)


def test_a_set_with_fewer_windows_than_eval_batches_uses_what_it_has(setup):
    from pipeline.config import load_config
    from pipeline.training.plan import build_plan

    cfg = ft.write_config(
        setup["root"] / "many.yaml", setup, "raw", setup["root"] / "runs" / "many", eval_every=5, eval_batches=1000
    )
    plan = build_plan(load_config(cfg), world_size=1, use_gpu=False)
    [own] = plan.evals
    assert own.key == "val_loss" and own.batches == len(own.data) // G < 1000
    assert f"{own.batches} of the 1000 batches asked for" in plan.layer_map()


def test_the_own_set_of_a_mix_is_the_mix_of_its_val_splits(setup):
    """Two sources with equal weights: the own set mixes their val splits half and half, and its
    size is what the smaller split allows before it would repeat a window."""
    from data_prep.reader import Mixture
    from pipeline.config import load_config
    from pipeline.training.plan import build_plan

    mix = [{"path": str(setup["raw"]), "weight": 1}, {"path": str(setup["raw"]), "weight": 1}]
    cfg = ft.write_config(
        setup["root"] / "mix.yaml",
        setup,
        "raw",
        setup["root"] / "runs" / "mix",
        data=mix,
        eval_every=5,
        eval_batches=1000,
    )
    plan = build_plan(load_config(cfg), world_size=1, use_gpu=False)
    [own] = plan.evals
    assert isinstance(own.data, Mixture) and [s.split for s in own.data.sources] == ["val", "val"]
    n = len(own.data.sources[0])
    assert own.batches == (2 * n) // G


TIMING = ("tokens_per_s", "step_time_s", "eval_time_s")


ONE_PROCESS = dict(pipeline_stages=1, eval_every=3, eval_batches=2)


@pytest.fixture(scope="module")
def whole(setup):
    return train(setup, "whole_1p", ranks=1, eval_data={"chat": str(setup["chat"])}, **ONE_PROCESS)[0]


@pytest.mark.multiproc
@pytest.mark.parametrize("die_after,resumes_at", [(8, 6), (2, None)])
def test_a_killed_and_resumed_run_validates_exactly_like_an_uninterrupted_one(setup, whole, die_after, resumes_at):
    """kill -9 after step 8 (checkpoint at 6), or after step 2 (no checkpoint yet: a fresh start that
    must not keep the first try's step-0 validation), then the same command: metrics.jsonl,
    validation rows included, and the final weights are those of the uninterrupted run."""
    import subprocess
    import sys

    name = f"killed_1p_{die_after}"
    run = setup["root"] / "runs" / name
    cfg = ft.write_config(
        setup["root"] / f"{name}.yaml",
        setup,
        "raw",
        run,
        **{**RUN, **ONE_PROCESS, "eval_data": {"chat": str(setup["chat"])}},
    )
    helper = str(ft.REPO / "tests" / "helpers" / "train_with_faults.py")
    p = subprocess.run(
        [sys.executable, helper, str(cfg)],
        cwd=ft.REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**ft.env(), "LAYER_AWARE_TEST_DIE_RANK": "0", "LAYER_AWARE_TEST_DIE_STEP": str(die_after)},
    )
    assert p.returncode == -9, p.stderr[-2000:]
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == die_after - 1
    p = ft.run_train([str(cfg)])
    if resumes_at:
        assert f"step_{resumes_at:08d}" in p.stdout and "resuming from" in p.stdout
    else:
        assert "resuming from" not in p.stdout

    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}
    got, want = (
        [strip(r) for r in read_metrics(run / "metrics.jsonl")],
        [strip(r) for r in read_metrics(whole / "metrics.jsonl")],
    )
    assert got == want and [r["step"] for r in want if "val_loss" in r] == [0, 3, 6, 9, 12]
    a, b = checkpoint_tensors(run, STEPS), checkpoint_tensors(whole, STEPS)
    assert all(torch.equal(a[k], b[k]) for k in b)
