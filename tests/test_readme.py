"""The README's "Your own model, step by step" runs as written, from a folder outside the
repository, on a tiny model of the user's own (with the overrides the README documents for a
first try on CPU), through the installed package: no PYTHONPATH, no repository paths."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest

from tests.kit import train as ft
from tests.kit.models import tiny_llama
from tests.kit.tokenizers import conversations, documents, make_hf_tokenizer, write_jsonl

SECTION = "## Your own model, step by step"
TRY_ON_CPU = (
    "--seq_len=64 --steps=20 --micro_batch_size=2 --global_batch_size=4 --save_every=10 --eval_every=0 --lr=1e-3"
)


def commands() -> list[str]:
    text = (ft.REPO / "README.md").read_text()
    section = text[text.index(SECTION) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert TRY_ON_CPU in section, "the README must document the overrides this test uses"
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.multiproc
def test_step_by_step_runs_verbatim_outside_the_repository(tmp_path):
    home = tmp_path / "my-project"  # nowhere near the repository
    (home / "docs").mkdir(parents=True)
    for i, d in enumerate(documents(60, seed=3)):
        (home / "docs" / f"{i:03d}.txt").write_text(d)
    write_jsonl(home / "chats.jsonl", conversations(80, seed=4))
    write_jsonl(
        home / "my_questions.jsonl",
        [
            {"prompt": f"where is the {w} river", "answer": w, "candidates": ["north", "south", "east", "west"]}
            for w in ("north", "south", "east", "west")
        ],
    )
    tok = make_hf_tokenizer(tmp_path / "tok", vocab_size=300)
    from transformers import AutoTokenizer

    tiny_llama(home / "models" / "base", len(AutoTokenizer.from_pretrained(str(tok))), tokenizer_dir=tok)
    env = {k: v for k, v in ft.env().items() if k != "PYTHONPATH"}
    env["DS_ACCELERATOR"] = "cpu"
    for cmd in commands():
        if "pipeline.train" in cmd:
            cmd = f"{cmd} {TRY_ON_CPU}"
        argv = shlex.split(cmd)
        if argv[0] == "deepspeed":  # a free port per launch, as two concurrent users would pick
            argv[1:1] = ["--master_port", str(ft.free_port())]
        p = subprocess.run(argv, cwd=home, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    # The first try learns something a user can see: both runs leave their warm-up and the loss falls.
    from pipeline.training.metrics_log import read_metrics

    for run in ("chat", "raw"):
        rows = [r for r in read_metrics(home / "runs" / run / "metrics.jsonl") if "loss" in r]
        assert rows[-1]["lr"] < rows[1]["lr"] == pytest.approx(1e-3, rel=0.05), (run, rows)  # warm-up: 1 step
        assert rows[-1]["loss"] < rows[0]["loss"] - 0.05, (
            run,
            [r["loss"] for r in rows],
        )  # measured: chat 5.70 -> 5.51, raw 5.72 -> 5.65
    results = json.loads((home / "runs/eval/results.json").read_text())["models"]
    assert set(results) == {"a-chat", "transplant"}
    assert (home / "runs/eval/results.md").is_file() and (home / "models/transplant/transplant.json").is_file()
