"""The main job end to end (tiny size): every step runs through the real entry points, the report
holds every model and metric, its numbers are what a user's own `pipeline.evaluate` command gives,
and the transplant is built from the runs the demo says."""

import json
import re
import subprocess
import sys

import pytest

from pipeline.groups import FORMAT, LayerGroups
from pipeline.training.metrics_log import read_metrics
from tests.kit import train as ft

MODELS = {
    "base",
    "a_chat",
    "a_raw",
    "transplant",
    "naive",
    "qa_upper",
    "chat_vector",
    "sequential",
    "donor",
    "instruct_vector",
    "recipe_rtf_instruct_vector",
}
METRICS = {
    "format_adherence",
    "knowledge_accuracy",
    "knowledge_rank",
    "heldout_known_rank",
    "raw_rank_new",
    "ppl_raw_new",
    "ppl_raw_known",
    "chance_rank",
}


def _demo(out, *extra, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.demo", "--size", "tiny", "--out", str(out), "--threads", "1", *extra],
        cwd=ft.REPO,
        env=ft.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """One tiny demo for the module (it is the slow part): what it wrote is read here, before the
    sweep test adds its own runs to the same folder."""
    out = tmp_path_factory.mktemp("tiny") / "demo"
    p = _demo(out)
    assert p.returncode == 0, p.stderr[-4000:]
    return {
        "out": out,
        "results": json.loads((out / "results.json").read_text())["models"],
        "md": (out / "results.md").read_text(),
        "runs": {r.name for r in (out / "runs").iterdir()},
    }


@pytest.mark.multiproc
def test_tiny_demo_end_to_end(tiny_demo):
    out, results = tiny_demo["out"], tiny_demo["results"]
    assert set(results) == MODELS
    assert all(METRICS <= set(m) for m in results.values())

    # The demo's row for the transplant is what the documented evaluate command measures on it.
    w = out / "world"
    mine = out / "check.json"
    e = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            "--model",
            str(out / "models" / "transplant"),
            "--name",
            "transplant",
            "--no-progress",
            "--max-new-tokens",
            "6",
            "--chat-eval",
            str(w / "chat_eval_format.jsonl"),
            "--chat-eval",
            str(w / "chat_eval_new.jsonl"),
            "--chat-eval",
            f"heldout_known={w / 'chat_eval_heldout.jsonl'}",
            "--raw-eval",
            f"new={w / 'raw_eval_new.jsonl'}",
            "--raw-eval",
            f"known={w / 'raw_eval_known.jsonl'}",
            "--probe",
            f"new={w / 'probe_new.jsonl'}",
            "--out",
            str(mine),
        ],
        cwd=ft.REPO,
        env=ft.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert e.returncode == 0, e.stderr[-3000:]
    assert json.loads(mine.read_text())["models"]["transplant"] == pytest.approx(results["transplant"], rel=1e-9)

    # The transplant took the format group from A-Chat's run and everything else from A-Raw's.
    rec = json.loads((out / "models" / "transplant" / "transplant.json").read_text())
    groups = LayerGroups.from_record(rec["inputs"]["raw"]["groups"], "transplant.json")
    for t in rec["tensors"]:
        want = "a_chat" if groups.group_of(t["name"]) == FORMAT else "a_raw"
        assert t["source"]["path"].endswith(f"/runs/{want}"), (t["name"], t["source"]["path"])

    md = tiny_demo["md"]
    held, chance = results["a_chat"]["heldout_known_rank"], results["a_chat"]["chance_rank"]
    assert "| transplant |" in md and f"at {held:.1f} (chance {chance:.1f}," in md and "**Verdict:" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "runs" / "a_raw" / "loss.png").is_file()
    # A-Raw and naive validated on the new people's held-out text and on the base's corpus, from
    # the model as loaded to their last step; the report plots and tabulates both.
    for run in ("a_raw", "naive"):
        rows = [r for r in read_metrics(out / "runs" / run / "metrics.jsonl") if "eval_time_s" in r]
        assert [r["step"] for r in rows][:: len(rows) - 1] == [0, 3], (run, rows)
        assert all({"val_loss_new_heldout", "val_loss_base_corpus"} <= set(r) for r in rows)
    assert (out / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| naive (every layer) | the base's pretraining corpus (forgetting) |" in md
    # A rerun finds every step done and only rewrites the report.
    p2 = _demo(out, timeout=300)
    assert p2.returncode == 0, p2.stderr[-2000:]
    steps, done = map(int, re.search(r"(\d+) steps \((\d+) done already\)", p2.stdout).groups())
    assert done == steps - 1 and "start report" in p2.stdout and "start eval" not in p2.stdout, p2.stdout[-2000:]


@pytest.mark.multiproc
def test_seeds_run_in_their_own_folders_and_aggregate(tiny_demo, tmp_path):
    """`--seeds` runs each seed in OUT/seed-S (here seed 0 is the finished tiny demo, so nothing
    trains) and writes the aggregate; the recipe's tuning seed is reported apart, and with no
    held-out seed left the verdict cannot tell."""
    out = tmp_path / "seeds"
    out.mkdir()
    (out / "seed-0").symlink_to(tiny_demo["out"], target_is_directory=True)
    p = _demo(out, "--seeds", "0", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "about 0 min of work" in p.stdout
    agg = json.loads((out / "aggregate.json").read_text())
    every = agg["every_seed"]
    assert every["seeds"] == [0] and every["tuned_on"] == [0] and agg["held_out"]["seeds"] == []
    # A tiny world may fail the control: then the seed is listed as failed, not averaged.
    r = tiny_demo["results"]
    answers = (
        r["a_chat"]["heldout_known_rank"] <= 0.5 * r["a_chat"]["chance_rank"]
        and r["qa_upper"]["knowledge_accuracy"] >= 0.8
    )
    assert (every["answering"], every["failed"]) == (([0], []) if answers else ([], [0]))
    if answers:  # one seed: the means are that seed's own figures, with no interval
        a, q, t = (r[n]["knowledge_rank"] for n in ("a_chat", "qa_upper", "transplant"))
        share = every["table"]["transplant"]["share"]
        assert share["n"] == 1 and share["mean"] == pytest.approx((a - t) / (a - q))
    else:
        assert every["table"] == {} and "fails on seed(s) 0" in (out / "aggregate.md").read_text()
    md = (out / "aggregate.md").read_text()
    assert "chosen on seed(s) 0" in md and "**Verdict: cannot tell.**" in md
    assert (out / "aggregate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_made_with_another_seed_is_refused_not_reused(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text(json.dumps({"seed": 0, "size": "tiny", "world": {}, "base_steps": None}))
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.demo", "--size", "tiny", "--out", str(out), "--seed", "1"],
        cwd=ft.REPO,
        env=ft.env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "seed 0 -> 1" in p.stderr and "DEMO_OUT" in p.stderr
    assert sorted(x.name for x in out.iterdir()) == ["demo.json"]  # nothing was started


@pytest.mark.parametrize(
    "flag, value, says",
    [("--workers", "0", "must be >= 1"), ("--threads", "0", "must be >= 1"), ("--seed", "-1", "must be >= 0")],
)
def test_counts_out_of_range_are_refused_before_anything_runs(flag, value, says, tmp_path, capsys):
    from pipeline.demo.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--size", "tiny", "--out", str(tmp_path / "demo"), flag, value])
    assert e.value.code == 2 and f"argument {flag}: {says}" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_replay_recipes_train_their_a_raw_on_the_raw_text_mixed_with_what_they_replay(tmp_path, monkeypatch):
    """The plan alone (nothing trains): a replaying recipe's A-Raw reads the raw corpus with the
    pretraining text and A-Chat's chat data at the recipe's weights, for proportionally more steps,
    so the raw documents are seen as often as by the vanilla A-Raw; recipes that differ only after
    A-Raw share it, and one with other replay weights does not."""
    from pipeline.config import load_config
    from pipeline.demo.recipes import recipe_from
    from pipeline.demo.run import CONFIGS, Demo

    items = [
        {"name": "both", "replay": 0.25, "chat_replay": 0.5},
        {"name": "both_merged", "replay": 0.25, "chat_replay": 0.5, "merge": "chat_vector"},
        {"name": "chat_only", "chat_replay": 1},
    ]
    demo = Demo(tmp_path / "demo", recipes=[recipe_from(x, "test") for x in items])
    calls = []
    monkeypatch.setattr(demo, "train", lambda cfg, run, model, data, b=None, **kw: calls.append((run, data, kw)))
    monkeypatch.setattr(demo, "export", lambda run, name: None)
    steps = demo.steps()
    assert "model:a_raw_both_merged" not in steps and "model:a_raw_chat_only" in steps
    assert {"data:raw", "data:pretrain", "data:chat"} <= set(steps["model:a_raw_both"].needs)
    steps["model:a_raw_both"].run()
    steps["model:a_raw_chat_only"].run()
    vanilla = load_config(CONFIGS / "raw.yaml", {"model": "m", "data": "d", "out": "o"}).schedule.steps
    assert calls == [
        ("a_raw_both", [("raw", 1.0), ("pretrain", 0.25), ("chat", 0.5)], {"steps": round(vanilla * 1.75)}),
        ("a_raw_chat_only", [("raw", 1.0), ("chat", 1.0)], {"steps": vanilla * 2}),
    ]


def test_a_recipe_on_the_instruct_model_merges_its_a_raw_with_the_full_chat_tune(tmp_path, monkeypatch):
    """`chat_model: instruct` takes the chat delta from chat_full (trained even when no baseline
    needs it), not from A-Chat: A-Raw + (instruct - base), as the user with X-Instruct would."""
    from pipeline.demo.recipes import recipe_from
    from pipeline.demo.run import Demo

    item = {"name": "iv", "raw": {"raw_trains_format": True}, "merge": "chat_vector", "chat_model": "instruct"}
    demo = Demo(tmp_path / "demo", recipes=[recipe_from(item, "test")], baselines=("base", "a_chat"))
    merges = []
    monkeypatch.setattr(demo, "chat_vector", lambda raw, chat, name, extra=(): merges.append((raw, chat, name)))
    steps = demo.steps()
    assert steps["model:transplant_iv"].needs == ("model:a_raw_iv", "model:chat_full")
    assert "model:chat_full" in steps
    steps["model:transplant_iv"].run()
    assert merges == [("a_raw_iv", "chat_full", "transplant_iv")]


@pytest.mark.multiproc
def test_tiny_sweep_reuses_the_demo_and_writes_one_row_per_variant(tiny_demo, tmp_path):
    """A sweep in a demo's folder trains only what the demo has not, writes its table, plot and
    verdict, and a rerun trains nothing."""
    out = tiny_demo["out"]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "recipes:\n  - name: replay_half\n    replay: 0.5\n    chat_replay: 0.5\n"
        "  - name: reattach\n    reattach_steps: 2\n"
        "worlds:\n  - name: syllables\n    world: {names: syllables}\n"
    )
    p = _demo(out, "--sweep", str(sweep))
    assert p.returncode == 0, p.stderr[-3000:]
    new_runs = {r.name for r in (out / "runs").iterdir()} - tiny_demo["runs"]
    assert new_runs == {"a_raw_replay_half", "recipe_reattach"}  # base, A-Chat and A-Raw came from the demo
    result = json.loads((out / "sweep.json").read_text())
    assert {"transplant", "recipe_replay_half", "recipe_reattach"} <= set(result["recipes"])
    assert set(result["worlds"]) == {"syllables"}
    assert (out / "worlds" / "syllables" / "world" / "world.json").is_file()
    md = (out / "sweep.md").read_text()
    assert "| recipe_replay_half |" in md and "| syllables |" in md and "**Verdict:" in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = _demo(out, "--sweep", str(sweep), timeout=300)
    assert again.returncode == 0 and "about 0 min of work" in again.stdout, again.stdout[-2000:]
