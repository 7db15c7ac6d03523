"""Outputs and run directories that behave wherever and however they are used, through the real
entry points. Each case exited 0 with a wrong result, or failed with a traceback or late, before:

- a run directory works from any folder, whatever the spelling of its paths, and moved or copied;
- every tool checks that it can write its output before it starts work;
- every tool that writes a folder (or a results file, or shards) owns it while it writes;
- small results that were silently wrong: a negative --max-prompts, a NaN perplexity, a
  byte-order mark trained as a token, an empty train split.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.kit import train as ft
from tests.kit.cli import call
from tests.kit.runs import make_base, make_run
from tests.kit.tokenizers import write_jsonl

HELPERS = Path(__file__).resolve().parent / "helpers"


def ok(capsys, entry: str, argv: list) -> str:
    """An entry point's main(argv) in this process, which must succeed; returns its stdout."""
    import importlib

    try:
        importlib.import_module(entry).main([str(a) for a in argv])
    except SystemExit as e:
        raise AssertionError(f"{entry} {' '.join(map(str, argv))}: exit {e.code}\n{capsys.readouterr().err}") from None
    return capsys.readouterr().out


def names(err: str, *parts) -> None:
    for p in parts:
        assert str(p) in err, f"{p!r} not named in: {err}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny training setup (model with a ChatML tokenizer, raw and chat data), and hand-built
    runs of another tiny base to export, transplant and merge."""
    root = tmp_path_factory.mktemp("cluster")
    s = ft.build_setup(root / "proj")
    base = make_base(root / "base")
    s["base"] = base
    s["raw_run"] = make_run(root / "a-raw", base, "raw", format_start=2, steps=(1, 2)).path
    s["chat_run"] = make_run(root / "a-chat", base, "chat", format_start=2).path
    s["texts"] = write_jsonl(root / "texts.jsonl", [{"text": "the capital of france is paris"}] * 3)
    s["prompts"] = write_jsonl(root / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(4)])
    return s


# ---------------------------------------------------------------------------------------------
# 1. A run directory works from any folder, however its paths were spelled, and moved

CONFIG = {
    "raw_start": 1,
    "format_start": 3,
    "seq_len": 16,
    "micro_batch_size": 2,
    "global_batch_size": 4,
    "steps": 2,
    "lr": 3e-3,
    "warmup_steps": 1,
    "save_every": 1,
    "keep_last": 0,
    "seed": 1,
}


def _train(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.train", *args],
        cwd=cwd,
        env=ft.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's project folder, trained as the README says: from inside it, with relative paths
    (`--model=model --out=runs/raw`). Both phases train at once (one process each)."""
    root = tmp_path_factory.mktemp("user")
    proj = ft.build_setup(root / "proj")["root"]
    (proj / "phase.yaml").write_text(yaml.safe_dump(CONFIG))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.train",
                "phase.yaml",
                f"--phase={phase}",
                "--model=model",
                f"--data=data/{phase}.manifest.json",
                f"--out=runs/{phase}",
            ],
            cwd=proj,
            env=ft.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for phase in ("raw", "chat")
    ]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
    return {"root": root, "proj": proj}


@pytest.mark.multiproc
def test_run_json_records_absolute_paths_and_where_it_was_written(project):
    proj = project["proj"].resolve()
    run = json.loads((proj / "runs/raw/run.json").read_text())
    cfg = run["config"]
    assert cfg["model"] == cfg["tokenizer"] == str(proj / "model")
    assert cfg["data"] == str(proj / "data/raw.manifest.json") and cfg["out"] == str(proj / "runs/raw")
    assert run["run_dir"] == str(proj / "runs/raw")


@pytest.mark.multiproc
def test_a_run_exports_and_transplants_from_any_folder(project, tmp_path, capsys, monkeypatch):
    """Before: `error: .../run.json: config.tokenizer: directory model does not exist`."""
    proj = project["proj"]
    monkeypatch.chdir(tmp_path)
    ok(capsys, "pipeline.export", [proj / "runs/chat", "--out", "exported"])
    ok(capsys, "pipeline.transplant", ["--raw", proj / "runs/raw", "--chat", proj / "runs/chat", "--out", "t"])
    ok(
        capsys,
        "pipeline.chat_vector",
        ["--raw", proj / "runs/raw", "--chat", proj / "runs/chat", "--base", proj / "model", "--out", "cv"],
    )
    assert json.loads((tmp_path / "exported/export.json").read_text())["input"]["step"] == 2
    assert (tmp_path / "t/transplant.json").is_file() and (tmp_path / "cv/chat_vector.json").is_file()


@pytest.mark.multiproc
def test_a_resume_with_another_spelling_of_the_same_paths_is_the_same_run(project):
    """Before: `--out=$PWD/runs/raw` for a run started with `--out=runs/raw` was refused as
    "started with a different config (`out` 'runs/raw' -> '/.../runs/raw')"."""
    proj = project["proj"]
    p = _train(
        proj,
        "phase.yaml",
        "--phase=raw",
        "--model=./model/",
        "--data=data/../data/raw.manifest.json",
        f"--out={proj.resolve()}/runs/raw",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stdout
    # and a change that does matter is still refused, now before DeepSpeed starts
    p = _train(
        proj,
        "phase.yaml",
        "--phase=raw",
        "--model=model",
        "--data=data/raw.manifest.json",
        "--out=runs/raw",
        "--steps=3",
    )
    assert p.returncode == 2 and "`steps` 2 -> 3" in p.stderr, p.stderr[-3000:]
    assert "DeepSpeed" not in p.stdout


@pytest.mark.multiproc
def test_a_project_folder_moved_whole_still_exports_transplants_and_resumes(project, tmp_path, capsys, monkeypatch):
    """Before: the base model's recorded path was gone and config.model was relative to the old
    working directory: `config.model: directory /old/proj/model, model does not exist`."""
    proj, moved = project["proj"], project["root"] / "moved"
    os.rename(proj, moved)
    try:
        monkeypatch.chdir(tmp_path)
        ok(capsys, "pipeline.export", [moved / "runs/raw", "--step", 1, "--out", "e"])
        ok(capsys, "pipeline.transplant", ["--raw", moved / "runs/raw", "--chat", moved / "runs/chat", "--out", "t"])
        rec = json.loads((tmp_path / "e/export.json").read_text())
        assert rec["input"]["base_model"]["path"] == str(proj.resolve() / "model")  # as recorded
        p = _train(
            moved, "phase.yaml", "--phase=chat", "--model=model", "--data=data/chat.manifest.json", "--out=runs/chat"
        )
        assert p.returncode == 0 and "resuming from" in p.stdout, p.stderr[-3000:]
    finally:
        os.rename(moved, proj)


@pytest.mark.multiproc
def test_a_run_directory_copied_alone_finds_its_base_where_it_was(project, tmp_path, capsys, monkeypatch):
    shutil.copytree(project["proj"] / "runs/raw", tmp_path / "elsewhere/raw")
    monkeypatch.chdir(tmp_path / "elsewhere")
    ok(capsys, "pipeline.export", ["raw", "--out", "e"])
    assert json.loads((tmp_path / "elsewhere/e/export.json").read_text())["input"]["step"] == 2


# ---------------------------------------------------------------------------------------------
# 2. Every tool checks that it can write its output before it starts work


def _boom(what):
    def f(*a, **kw):
        raise AssertionError(f"{what}: the work started although the command should have been refused first")

    return f


def _unwritable(tmp_path: Path) -> Path:
    """A folder no file can be created in, even by root (CI runs as root, where permission bits do
    not stop writes, so a read-only folder would test nothing there): a path under a regular file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    return blocker / "sub"


TOOLS = [
    "data_prep raw",
    "data_prep chat",
    "pipeline.train",
    "pipeline.export",
    "pipeline.transplant",
    "pipeline.chat_vector",
    "pipeline.evaluate --out",
    "pipeline.evaluate --details",
    "pipeline.probe",
]


def _argv(tool: str, s: dict, where: Path, tmp_path: Path) -> tuple[str, list, Path]:
    """(entry module, argv, the output path it must name) for each tool writing under `where`."""
    if tool.startswith("data_prep"):
        kind = tool.split()[1]
        data = s["root"] / ("raw.jsonl" if kind == "raw" else "chat.jsonl")
        return (
            "data_prep.__main__",
            [kind, data, "--tokenizer", s["model"], "--output-prefix", where / "d"],
            where / "d",
        )
    if tool == "pipeline.train":
        cfg = ft.write_config(tmp_path / "cfg.yaml", s, "raw", where / "run")
        return "pipeline.train", [cfg], where / "run"
    if tool == "pipeline.export":
        return "pipeline.export", [s["raw_run"], "--out", where / "e"], where / "e"
    if tool == "pipeline.transplant":
        return (
            "pipeline.transplant",
            ["--raw", s["raw_run"], "--chat", s["chat_run"], "--out", where / "t"],
            where / "t",
        )
    if tool == "pipeline.chat_vector":
        return (
            "pipeline.chat_vector",
            ["--raw", s["raw_run"], "--chat", s["chat_run"], "--base", s["base"], "--out", where / "cv"],
            where / "cv",
        )
    if tool.startswith("pipeline.evaluate"):
        flag = tool.split()[1]
        out = where / ("results.json" if flag == "--out" else "details.jsonl")
        return "pipeline.evaluate", ["--model", s["model"], "--raw-eval", s["texts"], flag, out], out
    return "pipeline.probe", ["--base", s["model"], "--chat", s["model"], "--out", where / "p"], where / "p"


@pytest.mark.parametrize("tool", TOOLS)
def test_an_output_that_cannot_be_written_is_refused_before_the_work(setup, tmp_path, capsys, monkeypatch, tool):
    """Before: a traceback (NotADirectoryError, PermissionError) once the work was done or DeepSpeed
    was up; for pipeline.evaluate, after the whole evaluation."""
    import data_prep.chat
    import data_prep.raw
    import pipeline.convert.output
    import pipeline.evaluation.layer_probe
    import pipeline.hf
    import pipeline.training.dist

    # The work each tool would start: none of it may run.
    monkeypatch.setattr(data_prep.raw, "load_tokenizer", _boom("data_prep raw"))
    monkeypatch.setattr(data_prep.chat, "load_tokenizer", _boom("data_prep chat"))
    monkeypatch.setattr(pipeline.training.dist, "init", _boom("DeepSpeed"))
    monkeypatch.setattr(pipeline.convert.output, "stream_layers", _boom("the merge"))
    monkeypatch.setattr(pipeline.hf, "load_causal_lm", _boom("pipeline.evaluate"))
    monkeypatch.setattr(pipeline.evaluation.layer_probe, "weight_change", _boom("pipeline.probe"))
    where = _unwritable(tmp_path)
    entry, argv, out = _argv(tool, setup, where, tmp_path)
    err = call(capsys, entry, argv)
    names(err, out, "cannot be written")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 3. Every tool owns what it writes while it writes


def _paused(tmp_path: Path, target: str, entry: str, argv: list) -> tuple[subprocess.Popen, Path]:
    """Start the real `entry` with `target` made to wait: returns once it is inside, and the file
    whose creation lets it go on."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    p = subprocess.Popen(
        [sys.executable, str(HELPERS / "paused_writer.py"), str(ready), str(go), target, entry, *map(str, argv)],
        cwd=ft.REPO,
        env=ft.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    end = time.monotonic() + 120
    while not ready.exists():
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() < end, "the first writer never got to its work"
        time.sleep(0.05)
    return p, go


def _finish(p: subprocess.Popen, go: Path) -> None:
    go.touch()
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]


@pytest.mark.multiproc
def test_two_exports_of_different_steps_to_one_out(setup, tmp_path, capsys):
    """Before: both exited 0, and the folder held only the step of whichever renamed last."""
    out = tmp_path / "e"
    first, go = _paused(
        tmp_path,
        "pipeline.convert.output:stream_layers",
        "pipeline.export",
        [setup["raw_run"], "--step", 1, "--out", out],
    )
    try:
        err = call(capsys, "pipeline.export", [setup["raw_run"], "--step", 2, "--out", out])
        names(err, out, f"pid {first.pid}", "another process is writing it")
    finally:
        _finish(first, go)
    assert json.loads((out / "export.json").read_text())["input"]["step"] == 1


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "tool", ["pipeline.transplant", "pipeline.chat_vector", "pipeline.probe", "data_prep raw", "data_prep chat"]
)
def test_a_second_writer_of_the_same_output_is_refused_and_the_first_completes(setup, tmp_path, capsys, tool):
    """Before: the second ran to the end beside the first (exit 0 for both), the two writing the
    same folder or shard prefix."""
    target = {
        "pipeline.probe": "pipeline.evaluation.layer_probe:weight_change",
        "data_prep raw": "data_prep.raw:encode_batches",
        "data_prep chat": "data_prep.chat:val_mask",
    }.get(tool, "pipeline.convert.output:stream_layers")
    entry, argv, out = _argv(tool, setup, tmp_path / "out", tmp_path)
    first, go = _paused(tmp_path, target, entry, argv)
    try:
        names(call(capsys, entry, argv), out, f"pid {first.pid}", "another process is writing it")
    finally:
        _finish(first, go)
    done = {
        "pipeline.probe": out / "probe.json",
        "pipeline.transplant": out / "transplant.json",
        "pipeline.chat_vector": out / "chat_vector.json",
    }.get(tool, out.with_name("d.manifest.json"))
    assert done.is_file()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.multiproc
def test_a_second_training_is_refused_before_deepspeed_starts(setup, tmp_path, capsys, monkeypatch):
    """Before: the second training started every rank and DeepSpeed (seconds to minutes) before rank 0
    met the first one's lock."""
    import pipeline.training.dist
    from pipeline.rundir import RunDir

    monkeypatch.setattr(pipeline.training.dist, "init", _boom("DeepSpeed"))
    cfg = ft.write_config(tmp_path / "cfg.yaml", setup, "raw", tmp_path / "run")
    with RunDir(tmp_path / "run").lock():  # what the first training's rank 0 holds
        err = call(capsys, "pipeline.train", [cfg])
    names(err, tmp_path / "run", "in use by another training", f"pid {os.getpid()}")


@pytest.mark.multiproc
def test_an_evaluation_that_ends_during_another_keeps_its_row(setup, tmp_path, capsys, monkeypatch):
    """Two evaluations adding to one results file: before, the one that ended last wrote the file
    as it had read it at its start, and the other's model was gone."""
    from pipeline.evaluation import runner

    results = tmp_path / "results.json"
    real = runner.evaluate_model

    def while_b_runs(*a, **kw):
        monkeypatch.setattr(runner, "evaluate_model", real)
        ok(
            capsys,
            "pipeline.evaluate",
            ["--model", setup["model"], "--name", "a", "--raw-eval", setup["texts"], "--out", results, "--no-progress"],
        )
        return real(*a, **kw)

    monkeypatch.setattr(runner, "evaluate_model", while_b_runs)
    ok(
        capsys,
        "pipeline.evaluate",
        ["--model", setup["model"], "--name", "b", "--raw-eval", setup["texts"], "--out", results, "--no-progress"],
    )
    assert sorted(json.loads(results.read_text())["models"]) == ["a", "b"]
    assert "| a |" in results.with_suffix(".md").read_text()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------------------------------------
# 4. Small results that were silently wrong


@pytest.mark.parametrize("n", ["-3", "0"])
def test_probe_max_prompts_below_one_is_refused(setup, tmp_path, capsys, n):
    """Before: -3 used all prompts but the last 3 (exit 0), 0 was a traceback."""
    err = call(
        capsys,
        "pipeline.probe",
        [
            "--base",
            setup["model"],
            "--chat",
            setup["model"],
            "--prompts",
            setup["prompts"],
            "--max-prompts",
            n,
            "--out",
            tmp_path / "p",
        ],
    )
    names(err, f"--max-prompts {n}", ">= 1")
    assert not (tmp_path / "p").exists()


def test_raw_eval_texts_too_short_to_score_are_refused_not_nan(setup, tmp_path, capsys):
    """Before: `"ppl_raw": NaN`, exit 0."""
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "a"}, {"text": ""}])  # one token, none
    err = call(
        capsys, "pipeline.evaluate", ["--model", setup["model"], "--raw-eval", short, "--out", tmp_path / "r.json"]
    )
    names(err, "--raw-eval", short, "2 tokens")
    assert not (tmp_path / "r.json").exists()


def _tokens(prefix: Path) -> bytes:
    m = json.loads(prefix.with_name(prefix.name + ".manifest.json").read_text())
    return b"".join((prefix.parent / r["tokens_file"]["bin"]).read_bytes() for r in m["shards"])


def test_a_byte_order_mark_is_not_trained_as_a_token(setup, tmp_path):
    """Before: a .txt document saved with a BOM began with the BOM's token(s)."""
    from data_prep.__main__ import main as prep

    text = "the capital of france is paris"
    (tmp_path / "bom").mkdir()
    (tmp_path / "plain").mkdir()
    (tmp_path / "bom/a.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "plain/a.txt").write_bytes(text.encode())
    for name in ("bom", "plain"):
        prep(
            [
                "raw",
                str(tmp_path / name / "a.txt"),
                "--tokenizer",
                str(setup["model"]),
                "--val-fraction",
                "0",
                "--output-prefix",
                str(tmp_path / "out" / name),
            ]
        )
    assert _tokens(tmp_path / "out/bom") == _tokens(tmp_path / "out/plain")


def test_a_chat_json_array_with_a_byte_order_mark_is_read(setup, tmp_path):
    """Before: `c.json:1: invalid JSON (Expecting value: line 2 column 1 (char 2))`."""
    from data_prep.__main__ import main as prep

    conv = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}
    (tmp_path / "c.json").write_bytes(b"\xef\xbb\xbf[\n" + json.dumps(conv).encode() + b"\n]\n")
    (tmp_path / "p.jsonl").write_text(json.dumps(conv) + "\n")
    for name in ("c.json", "p.jsonl"):
        prep(
            [
                "chat",
                str(tmp_path / name),
                "--tokenizer",
                str(setup["model"]),
                "--val-fraction",
                "0",
                "--output-prefix",
                str(tmp_path / "out" / name),
            ]
        )
    assert _tokens(tmp_path / "out/c.json") == _tokens(tmp_path / "out/p.jsonl")


@pytest.mark.parametrize("kind", ["raw", "chat"])
def test_an_empty_train_split_is_refused(setup, tmp_path, capsys, kind):
    """Before: exit 0 with every document in the val split and a train split of nothing."""
    rec = (
        {"text": "words"}
        if kind == "raw"
        else {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    f = write_jsonl(tmp_path / "c.jsonl", [rec])
    # --val-fraction 0.99: the one document lands in val for (almost) every seed; find one
    from data_prep.shards import val_mask

    seed = next(s for s in range(100) if val_mask(0, 1, s, 0.99)[0])
    err = call(
        capsys,
        "data_prep.__main__",
        [
            kind,
            f,
            "--tokenizer",
            setup["model"],
            "--val-fraction",
            0.99,
            "--seed",
            seed,
            "--output-prefix",
            tmp_path / "out/d",
        ],
    )
    names(err, "--val-fraction 0.99", "train split is empty")
    assert not (tmp_path / "out").exists()


@pytest.mark.multiproc
def test_a_resume_on_other_pipeline_stages_is_refused_at_preflight_and_changes_nothing(setup, tmp_path):
    """A run made on 1 process, resumed on 2 pipeline stages: one line at preflight that names both
    layouts and the way out, with run.json untouched. Another data-parallel size alone passes
    (tests/test_elastic.py resumes it)."""
    from data_prep.errors import UserError
    from pipeline.config import load_config
    from pipeline.training.plan import build_plan

    run = tmp_path / "run"
    cfg = ft.write_config(tmp_path / "c.yaml", setup, "raw", run, steps=2, save_every=2)
    ft.run_train([str(cfg)])
    before = (run / "run.json").read_bytes()
    staged = ft.write_config(tmp_path / "p2.yaml", setup, "raw", run, steps=2, save_every=2, pipeline_stages=2)
    with pytest.raises(UserError, match=r"written with 1 pipeline stage\(s\).*this job has 2.*pipeline_stages: 1"):
        build_plan(load_config(staged), world_size=2)
    assert (run / "run.json").read_bytes() == before
    build_plan(load_config(cfg), world_size=1)  # the same layout still resumes
    build_plan(load_config(cfg), world_size=2)  # and so does another data-parallel size
    assert (run / "run.json").read_bytes() == before


def test_a_stale_deepspeed_build_lock_is_named_before_the_job_waits_on_it(tmp_path, monkeypatch, capsys):
    """A job killed while DeepSpeed built its ops leaves torch's build lock; the next job would wait
    on it forever in silence. Training names it (a lock younger than a build is left alone)."""
    import os

    import deepspeed

    from pipeline.training import dist

    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    built_at = lock.stat().st_mtime
    assert dist.stale_build_locks(env, built_at + 60) == []  # a build under way
    assert dist.stale_build_locks(env, built_at + dist.STALE_BUILD_LOCK_S + 60) == [
        (str(lock), dist.STALE_BUILD_LOCK_S + 60)
    ]

    class Started(Exception):
        pass

    def started(**kw):
        raise Started

    old = built_at - dist.STALE_BUILD_LOCK_S - 120
    os.utime(lock, (old, old))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(deepspeed, "init_distributed", started)
    with pytest.raises(Started):
        dist.init(info={"source": "single", "filled": {}})
    err = capsys.readouterr().err
    assert f"warning: {lock} is a build lock left" in err and "remove it" in err
