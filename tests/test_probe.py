"""pipeline.probe: per-layer change between a base and a chat model, and the suggested boundary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from pipeline.evaluation.layer_probe import run_probe, suggest
from tests.kit import train as ft
from tests.kit.runs import base_tensors, make_base, make_tokenizer
from tests.kit.tokenizers import write_jsonl


def chat_tuned(base, out, changed_from: int, big: float = 0.05, small: float = 1e-4, layers: int = 6):
    """A copy of `base` whose layers >= changed_from moved by `big`, the rest by `small`."""
    import shutil

    shutil.copytree(base, out)
    make_tokenizer(out, chat_template=True)
    g = torch.Generator().manual_seed(1)
    t = base_tensors(base)
    for name, x in t.items():
        i = (
            int(name.split(".")[2])
            if name.startswith("model.layers.")
            else (layers if "norm" in name or "lm_head" in name else -1)
        )
        scale = big if i >= changed_from else small
        t[name] = x + scale * torch.randn(x.shape, generator=g) * x.std()
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_the_suggestion_lands_where_chat_tuning_changed_the_model(tmp_path):
    base = make_base(tmp_path / "base", num_layers=6)
    chat = chat_tuned(base, tmp_path / "chat", changed_from=4)
    prompts = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "what is the capital of france"},
            {"messages": [{"role": "user", "content": "hello"}], "answer": "a b c"},
        ],
    )
    r = run_probe(base, chat, tmp_path / "probe", prompts)
    assert r["suggested_format_start"] == 4 and r["step_explains"] > 0.9
    w, cos = r["weight_change"], r["hidden_cosine"]
    assert max(w[:4]) < 0.01 < min(w[4:])
    assert min(cos[:4]) > 0.999 and cos[5] < cos[3]  # the outputs part where the weights did
    assert (tmp_path / "probe" / "probe.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 4 ← format_start |" in (tmp_path / "probe" / "probe.md").read_text()


def test_no_step_no_suggestion():
    assert suggest([0.3, 0.2, 0.1, 0.05]) == (None, 0.0)  # the bottom changed most: no format group on top
    k, explained = suggest([0.01, 0.02, 0.01, 0.5, 0.6])
    assert k == 3 and explained > 0.95


@pytest.mark.multiproc
def test_cli(tmp_path):
    base = make_base(tmp_path / "base", num_layers=6)
    chat = chat_tuned(base, tmp_path / "chat", changed_from=3)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.probe",
            "--base",
            str(base),
            "--chat",
            str(chat),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=ft.REPO,
        env=ft.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "o" / "probe.json").read_text())["suggested_format_start"] == 3
    assert "suggested format_start: 3" in p.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.probe",
            "--base",
            str(base),
            "--chat",
            str(make_base(tmp_path / "deep", num_layers=4)),
            "--out",
            str(tmp_path / "x"),
        ],
        cwd=ft.REPO,
        env=ft.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "num_hidden_layers" in bad.stderr and not (tmp_path / "x").exists()
