"""Installed the way a cluster installs it: a wheel built from the sources, into a fresh virtual
environment outside the repository, used from a folder of the user's with no PYTHONPATH.

The fresh environment borrows the test environment's dependencies (torch, DeepSpeed, transformers)
through a .pth line rather than installing 2 GB again; the package itself comes only from the
wheel, which the test checks by where `pipeline` is imported from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from pipeline.training.dist import without_launcher

from .kit.models import tiny_llama
from .kit.tokenizers import documents, make_hf_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multiproc

# What a source distribution of the project holds: the packages and the two files pyproject reads.
SOURCES = ("pyproject.toml", "README.md", "pipeline", "data_prep", "ds_configs")


def _run(cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert p.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    )
    return p


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (building in the checkout would leave build/
    and egg-info behind, and would not notice a file the build needs but the copy lacks)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(
            REPO / name, src / name, **({"ignore": skip} if (REPO / name).is_dir() else {})
        )
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", src])
    (whl,) = (root / "dist").glob("layer_aware-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir])
    py = env_dir / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # The dependencies, not the package: the test environment's site-packages holds layer-aware
    # only as an editable finder, which a plain path line does not activate.
    (site / "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel])
    return env_dir


def test_the_wheel_carries_the_configs_and_no_test_code(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.endswith((".yaml", ".json")) and not n.endswith("dist-info/RECORD")}
    on_disk = {
        p.relative_to(REPO).as_posix() for d in ("pipeline/configs", "ds_configs") for p in (REPO / d).rglob("*")
    }
    assert {n for n in on_disk if n.endswith((".yaml", ".json"))} <= shipped
    assert "pipeline/configs/demo/recipe.yaml" in names and "ds_configs/cpu_fp32_zero1.json" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "launch/"))]


def test_installed_wheel_prepares_trains_and_exports_from_any_folder(venv, tmp_path):
    """The README's first steps with the shipped `raw.yaml` (sizes overridden to fit a CPU test),
    from a user's folder: data_prep -> pipeline.train -> pipeline.export."""
    py = venv / "bin" / "python"
    user = tmp_path / "project"
    tok = make_hf_tokenizer(tmp_path / "tok", vocab_size=300)
    from transformers import AutoTokenizer

    tiny_llama(user / "models/base", len(AutoTokenizer.from_pretrained(str(tok))), tokenizer_dir=tok)
    write_jsonl(user / "docs.jsonl", [{"text": d} for d in documents(120, seed=5)])
    env = without_launcher(os.environ)
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"

    where = _run(
        [py, "-c", "import pipeline, data_prep, ds_configs; print(pipeline.__file__, ds_configs.__file__)"],
        cwd=user,
        env=env,
    ).stdout
    assert str(REPO) not in where and str(venv) in where, where

    _run(
        [
            py,
            "-m",
            "data_prep",
            "raw",
            "docs.jsonl",
            "--tokenizer",
            "models/base",
            "--output-prefix",
            "data/shards/raw",
            "--val-fraction",
            "0.05",
        ],
        cwd=user,
        env=env,
    )
    small = [
        "--pipeline_stages=1",
        "--seq_len=16",
        "--micro_batch_size=2",
        "--global_batch_size=4",
        "--steps=4",
        "--save_every=2",
        "--eval_every=2",
        "--eval_batches=1",
        "--lr=1e-3",
        "--raw_start=1",
        "--format_start=3",
    ]
    _run([py, "-m", "pipeline.train", "raw.yaml", *small], cwd=user, env=env)
    run = json.loads((user / "runs/raw/run.json").read_text())
    assert run["config"]["ds_config"] == "auto"
    assert Path(run["config"]["out"]) == (user / "runs/raw").resolve()
    assert len((user / "runs/raw/metrics.jsonl").read_text().splitlines()) >= 4

    _run([py, "-m", "pipeline.export", "runs/raw", "--out", "models/a-raw"], cwd=user, env=env)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(user / "models/base"))
    exported = AutoModelForCausalLM.from_pretrained(str(user / "models/a-raw"))
    moved = [n for n, p in exported.state_dict().items() if not p.equal(base.state_dict()[n])]
    assert moved and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in moved), moved

    # A shipped config the user's folder lacks is named with where it was looked for.
    p = subprocess.run([py, "-m", "pipeline.train", "nope.yaml"], cwd=user, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "nope.yaml" in p.stderr and "Traceback" not in p.stderr
