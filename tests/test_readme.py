"""The README's "Your own model, step by step" runs as written, from a folder outside the
repository, on a tiny model of the user's own (with the overrides the README documents for a
first try on CPU), through the installed package: no PYTHONPATH, no repository paths. The numbers
the section quotes are the ones the code has: the shipped configs' values, data_prep's default, the
warm-up a shortened run gets, the layers A-Raw trains, and the losses the run writes."""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess

import pytest

from tests.kit import train as ft
from tests.kit.models import tiny_llama, tiny_llama_config
from tests.kit.tokenizers import conversations, documents, make_hf_tokenizer, write_jsonl

SECTION = "## Your own model, step by step"
TRY_ON_CPU = (
    "--seq_len=64 --steps=20 --micro_batch_size=2 --global_batch_size=4 --save_every=10 --eval_every=0 --lr=1e-3"
)


def section() -> str:
    text = (ft.REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end > 0 else None]


def commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", section(), re.S).group(1)
    assert TRY_ON_CPU in section(), "the README must document the overrides this test uses"
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def quoted(pattern: str) -> tuple[str, ...]:
    """The values a sentence of the section quotes (its prose reflowed onto one line)."""
    prose = " ".join(section().split())
    m = re.search(pattern, prose)
    assert m, f"the README's step-by-step section no longer says /{pattern}/"
    return m.groups()


def quoted_losses() -> dict[str, tuple[float, float]]:
    """`A-Chat 5.70 → 5.51 and A-Raw, ..., 5.72 → 5.65`: each run's first and last logged loss."""
    chat = quoted(r"A-Chat ([0-9.]+) → ([0-9.]+)")
    raw = quoted(r"A-Raw, [^0-9]*[0-9]+ of the [0-9]+ layers, ([0-9.]+) → ([0-9.]+)")
    return {"chat": tuple(map(float, chat)), "raw": tuple(map(float, raw))}


def train_commands() -> dict[str, list[str]]:
    """The section's pipeline.train commands by run name (`--out=runs/chat` -> chat)."""
    out = {}
    for cmd in commands():
        if "pipeline.train" in cmd:
            argv = shlex.split(cmd)
            run = next(a for a in argv if a.startswith("--out=")).split("/")[-1]
            out[run] = argv
    return out


def shipped_config(argv: list[str], tmp_path, monkeypatch, extra: str = ""):
    """The config a README command trains with, found as the command finds it from a user's folder,
    with its flags (and `extra`) applied."""
    from pipeline.config import load_config, parse_overrides, resolve_config_path

    monkeypatch.chdir(tmp_path)
    name = next(a for a in argv if a.endswith((".yaml", ".yml")))
    path = resolve_config_path(name)
    assert path.is_file(), f"{name}: no such shipped config"
    flags = [a for a in argv[argv.index(name) + 1 :] if a.startswith("--")] + extra.split()
    return load_config(path, parse_overrides(flags))


def test_the_numbers_the_readme_quotes_are_the_codes(tmp_path, monkeypatch):
    """Each value the section states about the shipped configs and the tools, against what the code
    reads or computes; a changed default (or a README left behind) fails here in a second."""
    from data_prep.raw import parser as raw_parser
    from pipeline.groups import LayerGroups
    from pipeline.training.schedule import warmup_steps

    runs = train_commands()
    assert set(runs) == {"chat", "raw"}
    cfgs = {run: shipped_config(argv, tmp_path, monkeypatch) for run, argv in runs.items()}
    tiny = {run: shipped_config(argv, tmp_path, monkeypatch, TRY_ON_CPU) for run, argv in runs.items()}

    # "the shipped configs set pipeline_stages: 2, so each run needs 2 ranks"
    stages, ranks = map(
        int, quoted(r"the shipped configs set pipeline_stages: ([0-9]+), so each run needs ([0-9]+) ranks")
    )
    for run, argv in runs.items():
        assert cfgs[run].parallel.pipeline_stages == stages == ranks, run
        assert argv[:3] == ["deepspeed", "--num_gpus", str(ranks)], argv

    # "warm up over their first 5% of steps (`warmup_steps: 0.05`), so 20 steps warm up for one"
    pct, fraction, steps, warm = quoted(
        r"warm up over their first ([0-9]+)% of steps \(`warmup_steps: ([0-9.]+)`\), "
        r"so ([0-9]+) steps warm up for (\w+)"
    )
    warm = {"one": 1, "two": 2}.get(warm) or int(warm)
    for run in runs:
        assert cfgs[run].optim.warmup_steps == float(fraction) == int(pct) / 100, run
        assert tiny[run].schedule.steps == int(steps) and warmup_steps(tiny[run]) == warm, run
    (tiny_lr,) = quoted(r"`--lr=([0-9.e-]+)` suits a tiny model")
    assert all(c.optim.lr == float(tiny_lr) for c in tiny.values())

    # "(the shipped 2e-5 suits a real one" -- A-Chat's, the run the section trains first
    (lr,) = quoted(r"the shipped ([0-9.e-]+) suits a real one")
    assert cfgs["chat"].optim.lr == float(lr)

    # "The shipped configs validate every 200 steps ... (`--val-fraction`, 1% by default)"
    (every,) = quoted(r"The shipped configs validate every ([0-9]+) steps")
    assert all(c.eval.eval_every == int(every) for c in cfgs.values())
    assert all(c.eval.eval_every == 0 for c in tiny.values())  # "`--eval_every=0` turns validation off"
    (share,) = quoted(r"\(`--val-fraction`, ([0-9]+)% by default\)")
    assert raw_parser().parse_args(["x", "--tokenizer", "t", "--output-prefix", "o"]).val_fraction == int(share) / 100

    # "on the test's 4-layer model, ... A-Raw, which trains 2 of the 4 layers"
    trained, layers = map(int, quoted(r"A-Raw, which trains ([0-9]+) of the ([0-9]+) layers"))
    g = tiny["raw"].groups
    raw_groups = LayerGroups.resolve(g.raw_start, g.format_start, layers, tied=False, phase="raw")
    assert sum(raw_groups.layer_trained(i) for i in range(layers)) == trained
    assert tiny_llama_config(300).num_hidden_layers == layers  # the test's model: tiny_llama's default depth
    assert quoted_losses()  # the figures the run below must reproduce are there to read


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
    # What the README says this first try shows, in the numbers the runs wrote: the losses it quotes
    # (to the 2 decimals it prints), one warm-up step then the cosine to min_lr, and A-Raw training
    # the layers it names.
    from pipeline.groups import LayerGroups
    from pipeline.training.metrics_log import read_metrics

    trained, layers = map(int, quoted(r"A-Raw, which trains ([0-9]+) of the ([0-9]+) layers"))
    lr, steps = 1e-3, 20  # TRY_ON_CPU: --lr=1e-3 --steps=20, one of them warm-up
    for run, quoted_first_last in quoted_losses().items():
        rows = [r for r in read_metrics(home / "runs" / run / "metrics.jsonl") if "loss" in r]
        assert [r["step"] for r in rows] == list(range(1, steps + 1)), (run, rows)
        first_last = (rows[0]["loss"], rows[-1]["loss"])
        assert first_last == pytest.approx(quoted_first_last, abs=0.01), (run, [round(r["loss"], 3) for r in rows])
        record = json.loads((home / "runs" / run / "run.json").read_text())
        floor = record["config"]["min_lr"]
        cosine = [floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * k / (steps - 1))) for k in range(steps - 1)]
        assert [r["lr"] for r in rows] == pytest.approx([lr, *cosine], rel=1e-6), run
        groups = LayerGroups.from_record(record["groups"], run)
        assert groups.num_layers == layers
        if run == "raw":
            assert sum(groups.layer_trained(i) for i in range(layers)) == trained
    results = json.loads((home / "runs/eval/results.json").read_text())["models"]
    assert set(results) == {"a-chat", "transplant"}
    assert (home / "runs/eval/results.md").is_file() and (home / "models/transplant/transplant.json").is_file()
