"""The mergekit configs we write run in the real mergekit (a test extra), offline, as written, and
give the same tensors as our own merge."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.convert.transplant import transplant
from tests.kit import train as ft
from tests.kit.oracles import load_dir_tensors
from tests.kit.runs import make_base, make_run, make_tokenizer

MERGEKIT = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))


def offline_env() -> dict:
    # No hub: as on a cluster without internet. HF_HUB_OFFLINE makes any hub call fail at once.
    return {
        **ft.env(),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": os.environ.get("HF_HOME", "/tmp/hf-home"),
    }


def run_yaml_as_written(yaml_path: Path, out: Path, cwd: Path) -> None:
    """Run the export commands the YAML's header names, then mergekit-yaml on it."""
    assert MERGEKIT, "mergekit is a test extra (pyproject.toml); `make test` installs it"
    for cmd in re.findall(r"^#\s+(python -m pipeline\.export .+)$", yaml_path.read_text(), re.M):
        argv = shlex.split(cmd)
        subprocess.run(
            [sys.executable, *argv[1:]], cwd=ft.REPO, env=ft.env(), check=True, capture_output=True, timeout=300
        )
    p = subprocess.run(
        [MERGEKIT, str(yaml_path), str(out)], cwd=cwd, env=offline_env(), capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, f"mergekit-yaml failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"


@pytest.mark.multiproc
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transplant_yaml_runs_in_mergekit_offline_and_matches(tmp_path, tied):
    base = make_base(tmp_path / "base", tied=tied)
    tok = make_tokenizer(tmp_path / "chat-tok", chat_template=True)
    raw = make_run(tmp_path / "a-raw", base, "raw", raw_start=1, format_start=2, seed=1)
    chat = make_run(tmp_path / "a-chat", base, "chat", raw_start=1, format_start=2, seed=2, tokenizer=tok)
    out = tmp_path / "t"
    transplant(raw.path, chat.path, out)
    # From another directory than the one the paths were written for: they are absolute.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_yaml_as_written(out / "mergekit.yaml", tmp_path / "mk", cwd=elsewhere)
    ours, theirs = load_dir_tensors(out), load_dir_tensors(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert theirs[name].dtype == t.dtype and torch.equal(theirs[name], t), name


@pytest.mark.multiproc
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_chat_vector_yaml_runs_in_mergekit_offline_and_matches(tmp_path, ratio):
    from pipeline.convert.chat_vector import chat_vector

    base = make_base(tmp_path / "base")
    tok = make_tokenizer(tmp_path / "chat-tok", chat_template=True)
    # every tensor changed on both sides, so the arithmetic (not a copy) is what is compared
    cpt = make_run(tmp_path / "cpt", base, "full", raw_start=1, format_start=2, seed=1)
    chat = make_run(tmp_path / "chat", base, "full", raw_start=1, format_start=2, seed=2, tokenizer=tok)
    out = tmp_path / "cv"
    chat_vector(cpt.path, chat.path, base, out, ratio=ratio)
    run_yaml_as_written(out / "mergekit.yaml", tmp_path / "mk", cwd=tmp_path)
    ours, theirs = load_dir_tensors(out), load_dir_tensors(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert theirs[name].dtype == t.dtype and torch.equal(theirs[name], t), name
