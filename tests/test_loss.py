"""The loss is per token over the global batch, so how the batch is cut changes nothing.

A chat corpus is built so that windows hold very different numbers of assistant tokens (long
questions with one-word answers beside short questions with long answers). With one global batch
of 8, the real entry point trains it with micro_batch_size 1, 2 and 4 on one process and with
micro_batch_size 1 and 2 on 2 data-parallel ranks; the step-1 loss, every logged loss and the
final weights must agree with each other and with `tests.kit.reference` (which shares no loss or
label code with the product). Per-micro-batch normalisation (each micro-batch's mean, averaged)
fails this: its step-1 loss at micro_batch_size 1 is 7e-5 off (measured), seven times the tolerance.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from pipeline.config import load_config
from pipeline.training.metrics_log import read_metrics
from pipeline.training.plan import build_plan
from tests.kit import train as ft
from tests.kit.oracles import checkpoint_tensors
from tests.kit.reference import IGNORE, shift, summed_ce, train_reference
from tests.kit.tokenizers import sentence, write_jsonl

TOL = 1e-5
STEPS = 4
SINGLE = (1, 2, 4)  # micro_batch_size on one process
DP2 = (1, 2)  # micro_batch_size on 2 data-parallel ranks (G = 8 = m x 2 x accumulation)


def uneven_conversations(n: int, seed: int) -> list[dict]:
    """Half long questions with one-word answers, half one-word questions with long answers."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        if k % 2:
            msgs = [
                {"role": "user", "content": " ".join(sentence(rng) for _ in range(4))},
                {"role": "assistant", "content": "yes"},
            ]
        else:
            msgs = [
                {"role": "user", "content": "why"},
                {"role": "assistant", "content": " ".join(sentence(rng) for _ in range(5))},
            ]
        out.append({"messages": msgs})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data_prep.__main__ import main as data_prep_main

    s = ft.shared_setup(tmp_path_factory)
    root = s["root"]
    src = write_jsonl(root / "uneven.jsonl", uneven_conversations(120, seed=7))
    data_prep_main(["chat", str(src), "--tokenizer", str(s["model"]), "--output-prefix", str(root / "data/uneven")])
    s["uneven"] = root / "data/uneven.manifest.json"
    return s


def _config(setup, name: str, micro: int):
    return ft.write_config(
        setup["root"] / f"{name}.yaml",
        setup,
        "chat",
        setup["root"] / "runs" / name,
        data=str(setup["uneven"]),
        seq_len=32,
        micro_batch_size=micro,
        global_batch_size=8,
        steps=STEPS,
        save_every=STEPS,
        warmup_steps=0,
        lr=1e-2,
    )


@pytest.fixture(scope="module")
def runs(setup):
    helper = str(ft.REPO / "tests" / "helpers" / "train_phases.py")
    single = {f"p1_m{m}": _config(setup, f"p1_m{m}", m) for m in SINGLE}
    subprocess.run(
        [sys.executable, helper, *map(str, single.values())],
        cwd=ft.REPO,
        env=ft.env(),
        check=True,
        capture_output=True,
        timeout=400,
    )
    dp = {f"dp2_m{m}": _config(setup, f"dp2_m{m}", m) for m in DP2}
    ft.run_deepspeed_script(helper, [str(c) for c in dp.values()], 2)
    return {name: setup["root"] / "runs" / name for name in {**single, **dp}}


@pytest.fixture(scope="module")
def reference(setup):
    cfg = load_config(_config(setup, "ref", 2))
    losses, model = train_reference(build_plan(cfg, world_size=1))
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def test_corpus_windows_differ_in_targets(setup):
    """Otherwise the micro-batch test below could not tell the two normalisations apart."""
    plan = build_plan(load_config(_config(setup, "probe", 1)), world_size=1)
    counts = [
        int((shift(*[torch.as_tensor(x)[None] for x in plan.data.sample(g)])[1] != IGNORE).sum())
        for g in range(8 * STEPS)
    ]
    assert max(counts) >= 3 * max(1, min(counts)), counts


@pytest.mark.multiproc
def test_loss_and_weights_do_not_depend_on_micro_batch_or_data_parallel_size(runs, reference):
    ref_losses, ref_weights = reference
    assert abs(ref_losses[-1] - ref_losses[0]) > 100 * TOL  # it trains, so agreeing means something
    for name, run in runs.items():
        losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
        assert len(losses) == STEPS
        assert abs(losses[0] - ref_losses[0]) < TOL, f"{name}: step-1 loss {losses[0]} vs reference {ref_losses[0]}"
        worst = max(abs(a - b) for a, b in zip(losses, ref_losses))
        assert worst < TOL, f"{name}: losses {losses} vs reference {ref_losses}"
        weights = checkpoint_tensors(run)
        moved = [k for k in weights if not torch.equal(weights[k], ref_weights[k])]
        for k in moved:
            assert torch.allclose(weights[k], ref_weights[k], atol=TOL, rtol=0), (
                f"{name}: {k} differs by {(weights[k] - ref_weights[k]).abs().max():.2e}"
            )


def test_a_window_without_targets_changes_nothing():
    """The product's loss on hand-made tensors: adding a window with no target to the global batch
    changes neither the loss nor the gradient (the per-token rule), while a per-micro-batch mean
    would halve its micro-batch's weight."""
    from pipeline.training.data import global_targets
    from pipeline.training.loss import causal_lm_loss, micro_batch_norm, to_inputs_labels

    torch.manual_seed(0)
    S, V = 6, 11
    tokens = torch.randint(0, V, (3, S + 1))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1], [0] * (S + 1)], dtype=torch.uint8)

    class Data:  # the reader's interface: sample g -> (tokens, mask)
        has_mask = True

        def __init__(self, rows):
            self.rows = rows

        def sample(self, g):
            return tokens[self.rows[g]].numpy(), mask[self.rows[g]].numpy()

    logits = torch.randn(3, S, V, requires_grad=True)

    def step_loss(rows):  # one micro-batch per sample, as the engine averages them
        n = global_targets(Data(rows), 0, len(rows), S)
        norm = micro_batch_norm(n, len(rows))
        return sum(
            causal_lm_loss(logits[r : r + 1], (to_inputs_labels(tokens[r : r + 1], mask[r : r + 1])[1], norm))
            for r in rows
        ) / len(rows)

    with_empty, without = step_loss([0, 1, 2]), step_loss([0, 1])
    (g1,) = torch.autograd.grad(with_empty, logits)
    (g2,) = torch.autograd.grad(without, logits)
    _, labels = shift(tokens[:2], mask[:2])
    expected = summed_ce(logits[:2], labels) / (labels != IGNORE).sum()
    assert torch.allclose(with_empty, expected) and torch.allclose(without, expected)
    assert torch.allclose(g1, g2)
    # A global batch with no target at all: zero loss and no NaN.
    none = step_loss([2])
    assert none.item() == 0.0
