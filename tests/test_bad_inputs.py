"""Bad inputs, through the real entry points: each is refused with one `error: ...` line that names
the file (and line), config key or flag at fault, exit status 2, no traceback, and nothing written.

Every case calls an entry point's `main([...])` in this process (tests.kit.cli.call), so the suite
takes seconds: pipeline.train runs its checks (`preflight`) before it starts any rank, so none of
these needs DeepSpeed to run. Every `python -m` tool of the product has at least one case here
(test_every_command_line_has_a_bad_input_case).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.kit import train as ft
from tests.kit.cli import call
from tests.kit.runs import make_base, make_run
from tests.kit.tokenizers import make_hf_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """The tiny training setup, data packed with a bigger tokenizer, and runs to transplant/export."""
    from data_prep.__main__ import main as prep

    root = tmp_path_factory.mktemp("bad")
    s = ft.build_setup(root)
    big = make_hf_tokenizer(root / "bigtok", vocab_size=600)
    prep(["raw", str(root / "raw.jsonl"), "--tokenizer", str(big), "--output-prefix", str(root / "big/raw")])
    s["big"] = root / "big/raw.manifest.json"
    prep(
        [
            "raw",
            str(root / "raw.jsonl"),
            "--tokenizer",
            str(s["model"]),
            "--output-prefix",
            str(root / "noval/raw"),
            "--val-fraction",
            "0",
        ]
    )
    s["noval"] = root / "noval/raw.manifest.json"
    s["bare_tok"] = make_hf_tokenizer(root / "baretok", chat_template=None)
    base = make_base(root / "base")
    s["base"] = base
    s["raw_run"] = make_run(root / "a-raw", base, "raw", format_start=2).path
    s["chat_run"] = make_run(root / "a-chat", base, "chat", format_start=2).path
    # Same shapes, other weights: a different base model (run.json base_model fingerprint differs).
    s["other_base_raw"] = make_run(root / "b-raw", make_base(root / "base-b", seed=7), "raw", format_start=2).path
    s["deeper_chat"] = make_run(root / "c-chat", make_base(root / "base-6", num_layers=6), "chat", format_start=2).path
    return s


def names(err: str, *parts: str) -> None:
    for p in parts:
        assert p in err, f"{p!r} not named in: {err}"


def nothing_in(path: Path) -> None:
    """Nothing written: not even an empty output folder."""
    assert not path.exists(), sorted(p.name for p in path.iterdir())


# ---------------------------------------------------------------------------------------------
# data_prep: corpora, conversations, tokenizers


def prep_raw(capsys, tmp_path, files, tokenizer):
    out = tmp_path / "out"
    err = call(capsys, "data_prep.__main__", ["raw", *files, "--tokenizer", tokenizer, "--output-prefix", out / "d"])
    nothing_in(out)
    return err


def prep_chat(capsys, tmp_path, files, tokenizer):
    out = tmp_path / "out"
    err = call(capsys, "data_prep.__main__", ["chat", *files, "--tokenizer", tokenizer, "--output-prefix", out / "c"])
    nothing_in(out)
    return err


def test_malformed_jsonl(w, tmp_path, capsys):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "broken\n')
    names(prep_raw(capsys, tmp_path, [f], w["model"]), "c.jsonl:2", "JSON")


def test_non_utf8_text(w, tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    names(prep_raw(capsys, tmp_path, [f], w["model"]), "latin1.txt", "UTF-8")


def test_empty_corpus(w, tmp_path, capsys):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    names(prep_raw(capsys, tmp_path, [f], w["model"]), "empty.jsonl")


def test_chat_record_without_assistant_turn(w, tmp_path, capsys):
    f = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "anyone?"}]},
        ],
    )
    names(prep_chat(capsys, tmp_path, [f], w["model"]), "c.jsonl:2", "assistant")


def test_unknown_role(w, tmp_path, capsys):
    f = write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
    )
    names(prep_chat(capsys, tmp_path, [f], w["model"]), "c.jsonl:1", "wizard")


def test_tokenizer_without_chat_template(w, tmp_path, capsys):
    f = write_jsonl(
        tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    )
    names(prep_chat(capsys, tmp_path, [f], w["bare_tok"]), "--tokenizer", str(w["bare_tok"]), "chat template")


def test_data_prep_output_exists(w, tmp_path, capsys):
    from data_prep.__main__ import main as prep

    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "some words here"}] * 20)
    prep(["raw", str(f), "--tokenizer", str(w["model"]), "--output-prefix", str(tmp_path / "o/d")])
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    err = call(capsys, "data_prep.__main__", ["raw", f, "--tokenizer", w["model"], "--output-prefix", tmp_path / "o/d"])
    names(err, "--force")
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before


# ---------------------------------------------------------------------------------------------
# pipeline.train: config, model, layout, data (all refused before any rank starts)


def train_err(capsys, w, tmp_path, phase="raw", extra_argv=(), **overrides) -> str:
    out = tmp_path / "run"
    cfg = ft.write_config(tmp_path / "cfg.yaml", w, phase, out, **overrides)
    err = call(capsys, "pipeline.train", [cfg, *extra_argv])
    assert not out.exists(), "a refused run wrote its run directory"
    return err


def line_of(cfg: Path, key: str) -> str:
    n = next(i for i, l in enumerate(cfg.read_text().splitlines(), 1) if l.startswith(f"{key}:"))
    return f"{cfg}:{n}"


def test_unknown_config_key_is_a_typo(w, tmp_path, capsys):
    err = train_err(capsys, w, tmp_path, save_evry=2)
    names(err, line_of(tmp_path / "cfg.yaml", "save_evry"), "`save_evry`", "did you mean `save_every`")


def test_unknown_command_line_flag(w, tmp_path, capsys):
    names(train_err(capsys, w, tmp_path, extra_argv=["--stpes=5"]), "--stpes", "did you mean `steps`")


def test_wrong_value_type(w, tmp_path, capsys):
    err = train_err(capsys, w, tmp_path, lr="fast")
    names(err, line_of(tmp_path / "cfg.yaml", "lr"), "`lr`")


def test_invalid_yaml(w, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {w['model']}\nphase: [raw\nout: {tmp_path / 'run'}\n")
    names(call(capsys, "pipeline.train", [cfg]), f"{cfg}:", "invalid YAML")
    assert not (tmp_path / "run").exists()


def test_raw_start_not_below_format_start(w, tmp_path, capsys):
    names(train_err(capsys, w, tmp_path, raw_start=3, format_start=2), "`raw_start`", "`format_start`")


def test_boundary_beyond_layer_count(w, tmp_path, capsys):
    names(train_err(capsys, w, tmp_path, format_start=9), "`format_start`", "layer count (4)")


def test_more_pipeline_stages_than_layers(w, tmp_path, capsys):
    names(train_err(capsys, w, tmp_path, pipeline_stages=5), "`pipeline_stages`", "4 layers")


def test_world_size_not_divisible_by_stages(w, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # what `deepspeed --num_gpus 3` or torchrun sets
    names(train_err(capsys, w, tmp_path, pipeline_stages=2), "world size 3", "`pipeline_stages`")


def test_zero_stage_2_with_a_pipeline(w, tmp_path, capsys):
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {}}}))
    names(train_err(capsys, w, tmp_path, ds_config=str(ds)), str(ds), "zero_optimization.stage")


def test_seq_len_above_model_maximum(w, tmp_path, capsys):
    names(
        train_err(capsys, w, tmp_path, seq_len=512), "`seq_len`", "max_position_embeddings", f"{w['model']}/config.json"
    )


def test_data_from_a_larger_tokenizer(w, tmp_path, capsys):
    names(train_err(capsys, w, tmp_path, data=str(w["big"])), "`data`", str(w["big"]), "vocab")


def test_chat_phase_on_raw_shards(w, tmp_path, capsys):
    names(train_err(capsys, w, tmp_path, phase="chat", data=str(w["raw"])), "`data`", "loss mask")


def test_missing_manifest(w, tmp_path, capsys):
    missing = tmp_path / "nope.manifest.json"
    names(train_err(capsys, w, tmp_path, data=str(missing)), str(missing))


def test_truncated_shard(w, tmp_path, capsys):
    """A shard cut short (a copy interrupted, a full disk) is caught when the data is opened."""
    data = tmp_path / "data"
    shutil.copytree(Path(w["raw"]).parent, data)
    shard = sorted(data.glob("raw*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-6])
    names(train_err(capsys, w, tmp_path, data=str(data / "raw.manifest.json")), shard.name, "bytes")


def test_hostfile_that_does_not_parse(tmp_path, capsys):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("node01 slots=4\nnode02 slots four\n")
    names(call(capsys, "pipeline.training.dist", ["check-hostfile", hosts]), f"{hosts}:2", "slots=N")


# ---------------------------------------------------------------------------------------------
# transplant and export


def test_transplant_of_models_with_different_shapes(w, tmp_path, capsys):
    out = tmp_path / "t"
    err = call(capsys, "pipeline.transplant", ["--raw", w["raw_run"], "--chat", w["deeper_chat"], "--out", out])
    names(err, "--raw", "--chat", "num_hidden_layers")
    assert not out.exists()


def test_transplant_of_different_base_models(w, tmp_path, capsys):
    out = tmp_path / "t"
    err = call(capsys, "pipeline.transplant", ["--raw", w["other_base_raw"], "--chat", w["chat_run"], "--out", out])
    names(err, "--raw", "--chat", "different base models", "base_model")
    assert not out.exists()


def test_transplant_into_a_non_empty_out_dir(w, tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = call(capsys, "pipeline.transplant", ["--raw", w["raw_run"], "--chat", w["chat_run"], "--out", out])
    names(err, str(out), "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_export_of_a_missing_checkpoint_step(w, tmp_path, capsys):
    out = tmp_path / "e"
    names(call(capsys, "pipeline.export", [w["chat_run"], "--step", 99, "--out", out]), "--step 99")
    assert not out.exists()


def test_checkpoint_file_that_disagrees_with_its_record(w, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(w["chat_run"], run)
    f = run / "checkpoints/step_00000005/layer_02-model_states.pt"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01  # one flipped bit, same size
    f.write_bytes(bytes(b))
    out = tmp_path / "e"
    names(call(capsys, "pipeline.export", [run, "--out", out]), "layer_02-model_states.pt", "sha256", "record.json")
    assert not out.exists()


def test_chat_vector_of_a_missing_checkpoint_step(w, tmp_path, capsys):
    out = tmp_path / "cv"
    argv = ["--raw", w["raw_run"], "--chat", w["chat_run"], "--base", w["base"], "--chat-step", 9, "--out", out]
    names(call(capsys, "pipeline.chat_vector", argv), "--chat-step 9", "available: 5")
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_probe_with_no_prompts_to_use(w, tmp_path, capsys):
    out = tmp_path / "p"
    f = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "where?"}])
    argv = ["--base", w["base"], "--chat", w["chat_run"], "--prompts", f, "--max-prompts", 0, "--out", out]
    names(call(capsys, "pipeline.probe", argv), "--max-prompts 0", ">= 1")
    assert not out.exists()


def test_demo_recipe_file_with_a_typo(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("recipes:\n  - name: x\n    replay_share: 0.5\n")
    out = tmp_path / "demo"
    err = call(capsys, "pipeline.demo.__main__", ["--recipe", recipe, "--out", out, "--size", "tiny"])
    names(err, f"{recipe}: recipes[0]", "replay_share")
    nothing_in(out)


def test_a_config_name_that_is_neither_a_file_nor_shipped(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the launch scripts ask from the user's folder
    err = call(capsys, "pipeline.shipped", ["demo/chta.yaml"])
    names(err, "demo/chta.yaml", "not found", str(tmp_path), "demo/chat.yaml")  # what there is to pick from
    assert list(tmp_path.iterdir()) == []


def cli_entry_points() -> set[str]:
    """The product's command lines: every module of the installed packages (pipeline, data_prep) that
    runs as `python -m`, by the name its `main` is imported from (a package's `X.__main__` as `X`)."""
    import data_prep
    import pipeline

    found = set()
    for pkg in (pipeline, data_prep):
        root = Path(pkg.__file__).parent
        for py in root.rglob("*.py"):
            if py.name == "__main__.py" or 'if __name__ == "__main__":' in py.read_text():
                parts = py.relative_to(root.parent).with_suffix("").parts
                found.add(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
    return found


def entry_points_with_a_case() -> set[str]:
    """Every entry point this file's cases send a bad input to: the literal second argument of each
    `call(capsys, "<entry>", ...)` in this module (in a test or in the helper a test goes through)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(Path(__file__).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "call" and len(node.args) >= 2:
            arg = node.args[1]
            assert isinstance(arg, ast.Constant), f"line {node.lineno}: name the entry point literally"
            found.add(arg.value.removesuffix(".__main__"))
    return found


def test_every_command_line_has_a_bad_input_case():
    """A new `python -m` tool (or one that lost its case) fails here until its error path is exercised."""
    product = cli_entry_points()
    assert {"data_prep", "pipeline.train", "pipeline.transplant", "pipeline.export"} <= product, product
    assert product - entry_points_with_a_case() == set()


# ---------------------------------------------------------------------------------------------
# What a new user hits (each was a traceback, or a silent success, before)


def test_data_prep_output_prefix_naming_a_folder(w, tmp_path, capsys):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "some words here"}] * 5)
    err = call(
        capsys, "data_prep.__main__", ["raw", f, "--tokenizer", w["model"], "--output-prefix", f"{tmp_path}/out/"]
    )
    names(err, "--output-prefix", "not a directory")
    nothing_in(tmp_path / "out")
    assert not list(tmp_path.glob("out.*"))  # nothing written next to the folder either


@pytest.mark.parametrize("kind", ["raw", "chat"])
def test_data_prep_same_input_twice(w, tmp_path, capsys, kind):
    rec = (
        {"text": "words"}
        if kind == "raw"
        else {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    d = tmp_path / "in"
    f = write_jsonl(d / "a.jsonl", [rec] * 5)
    err = call(
        capsys, "data_prep.__main__", [kind, f, d, "--tokenizer", w["model"], "--output-prefix", tmp_path / "out/d"]
    )
    names(err, "a.jsonl", "given twice")
    nothing_in(tmp_path / "out")


def test_data_prep_broken_chat_template_leaves_no_folder(w, tmp_path, capsys):
    f = write_jsonl(
        tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    )
    tpl = tmp_path / "broken.jinja"
    tpl.write_text("{% for m in messages %}{{ m['content'] }")
    err = call(
        capsys,
        "data_prep.__main__",
        [
            "chat",
            f,
            "--tokenizer",
            w["model"],
            "--chat-template",
            tpl,
            "--output-prefix",
            tmp_path / "out" / "deeper" / "c",
        ],
    )
    names(err, "broken.jinja", "syntax")
    nothing_in(tmp_path / "out")


def test_a_key_given_twice_in_the_run_config(w, tmp_path, capsys):
    cfg = ft.write_config(tmp_path / "cfg.yaml", w, "raw", tmp_path / "run")
    cfg.write_text(cfg.read_text() + "lr: 1.0\n")
    err = call(capsys, "pipeline.train", [cfg])
    names(err, f"{cfg}:{len(cfg.read_text().splitlines())}", "`lr` is given twice")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flag,key",
    [
        ("--lr=-1", "lr"),
        ("--steps=0", "steps"),
        ("--min_lr=5", "min_lr"),
        ("--lr=inf", "lr"),
        ("--lr=nan", "lr"),
        ("--weight_decay=nan", "weight_decay"),
        ("--grad_clip=inf", "grad_clip"),
        ("--min_lr=-inf", "min_lr"),
        # tracebacks before: NumPy's seed, a collective that times out at once
        ("--seed=-1", "seed"),
        ("--dist_timeout_s=0", "dist_timeout_s"),
    ],
)
def test_out_of_range_flags(w, tmp_path, capsys, flag, key):
    names(train_err(capsys, w, tmp_path, extra_argv=[flag]), f"--{key}", f"`{key}`")


def test_model_directory_with_a_config_but_no_weights(w, tmp_path, capsys):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_bytes((Path(w["model"]) / "config.json").read_bytes())
    names(train_err(capsys, w, tmp_path, model=str(m)), "`model`", str(m), "no *.safetensors")


def test_model_directory_without_a_tokenizer(w, tmp_path, capsys):
    m = tmp_path / "m"
    m.mkdir()
    for f in ("config.json", "model.safetensors"):
        (m / f).write_bytes((Path(w["model"]) / f).read_bytes())
    names(train_err(capsys, w, tmp_path, model=str(m)), "`model`", str(m), "no tokenizer files", "`tokenizer:`")


def test_out_naming_an_existing_file(w, tmp_path, capsys):
    f = tmp_path / "run"
    f.write_text("mine")
    cfg = ft.write_config(tmp_path / "cfg.yaml", w, "raw", f)
    names(call(capsys, "pipeline.train", [cfg]), "`out`", str(f), "not a directory")
    assert f.read_text() == "mine"
    names(call(capsys, "pipeline.export", [w["chat_run"], "--out", f]), "--out", "not a directory")


def test_data_packed_with_another_tokenizer_of_the_same_size(w, tmp_path, capsys):
    """Only the vocabulary size used to be compared, so this trained (rc 0) on meaningless ids."""
    from data_prep.__main__ import main as prep

    other = make_hf_tokenizer(tmp_path / "other-tok", vocab_size=300, corpus_seed=9)
    prep(["raw", str(w["root"] / "raw.jsonl"), "--tokenizer", str(other), "--output-prefix", str(tmp_path / "o/raw")])
    manifest = tmp_path / "o/raw.manifest.json"
    err = train_err(capsys, w, tmp_path, data=str(manifest))
    names(err, "`data`", str(manifest), "other-tok", str(w["model"]), "Repack")
    # ...and in a weighted mix with the right one
    mix = [{"path": str(w["raw"]), "weight": 3}, {"path": str(manifest), "weight": 1}]
    names(train_err(capsys, w, tmp_path, data=mix), "`data`", str(manifest), "encodes text differently")


def test_chat_manifest_for_phase_raw(w, tmp_path, capsys):
    names(
        train_err(capsys, w, tmp_path, phase="raw", data=str(w["chat"])),
        "`data`",
        str(w["chat"]),
        "phase `raw`",
        "data_prep raw",
    )


def test_chat_data_mixed_with_raw_text_in_phase_raw_is_replay(w, tmp_path):
    """Not a mix-up: the plan accepts it, and only the chat samples carry a partial loss mask."""
    from pipeline.config import load_config
    from pipeline.training.plan import build_plan

    mix = [{"path": str(w["raw"]), "weight": 1}, {"path": str(w["chat"]), "weight": 1}]
    data = build_plan(load_config(ft.write_config(tmp_path / "cfg.yaml", w, "raw", tmp_path / "run", data=mix)), 1).data
    masks = [data.sample(g)[1] for g in range(40)]
    assert data.has_mask and {m.all() for m in masks} == {True, False}


def test_pipeline_stages_on_one_process_says_both_ways_out(w, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    err = train_err(capsys, w, tmp_path, pipeline_stages=2)
    names(
        err,
        line_of(tmp_path / "cfg.yaml", "pipeline_stages"),
        "1 process",
        "--pipeline_stages=1",
        "deepspeed --num_gpus 2",
    )


def test_evaluate_on_a_run_directory_says_export_it_first(w, tmp_path, capsys):
    err = call(capsys, "pipeline.evaluate", ["--model", w["chat_run"], "--chat-eval", w["root"] / "chat.jsonl"])
    names(err, "--model", str(w["chat_run"]), "export it first", "python -m pipeline.export")


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--batch-size", "--score-batch-size"])
def test_evaluate_count_flags_below_one(w, tmp_path, capsys, flag):
    # Before: argparse's usage block and a `python -m pipeline.evaluate: error:` line, not the project's one line.
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "some words"}])
    names(call(capsys, "pipeline.evaluate", ["--model", w["base"], "--raw-eval", f, flag, 0]), f"{flag} 0", ">= 1")


def test_eval_candidates_listed_twice(w, tmp_path, capsys):
    f = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "where?", "answer": "a", "candidates": ["a", "b", "b"]}])
    names(
        call(capsys, "pipeline.evaluate", ["--model", w["base"], "--chat-eval", f]), "q.jsonl:1", "'b'", "listed twice"
    )


# ---------------------------------------------------------------------------------------------
# Validation and monitors: refused at preflight, like the rest of the run config


def test_a_val_split_too_small_for_one_eval_batch_names_the_manifest(w, tmp_path, capsys):
    # The tiny setup's val split holds a few dozen windows of 16 tokens: fewer than one batch of 256.
    err = train_err(capsys, w, tmp_path, eval_every=2, micro_batch_size=2, global_batch_size=256)
    names(err, str(w["raw"]), "'val' split", "global_batch_size 256", "--val-fraction", "`eval_every: 0`")


def test_an_eval_set_too_small_names_its_key_and_manifest(w, tmp_path, capsys):
    err = train_err(
        capsys,
        w,
        tmp_path,
        eval_every=2,
        micro_batch_size=2,
        global_batch_size=256,
        eval_data={"forget": {"path": str(w["chat"]), "split": "val"}},
        data=str(w["noval"]),
    )
    names(err, "`eval_data`.forget", str(w["chat"]), "global_batch_size 256")


def test_an_eval_set_from_another_tokenizer(w, tmp_path, capsys):
    err = train_err(capsys, w, tmp_path, eval_every=2, eval_data={"other": {"path": str(w["big"]), "split": "train"}})
    names(err, "`eval_data`.other", str(w["big"]), "vocabulary of")


@pytest.mark.parametrize(
    "value,hint",
    [
        ({"forget": 3}, "`eval_data.forget` must be a manifest path"),
        ({"for-get": "x.json"}, "letters, digits and `_`"),
        ({"forget": {"path": "x.json", "split": "test"}}, "`train` or `val`"),
    ],
)
def test_a_malformed_eval_data_names_the_line(w, tmp_path, capsys, value, hint):
    err = train_err(capsys, w, tmp_path, eval_data=value)
    names(err, line_of(tmp_path / "cfg.yaml", "eval_data"), hint)


def test_a_misspelt_monitor(w, tmp_path, capsys):
    err = train_err(capsys, w, tmp_path, report_to=["tensorbord"])
    names(err, line_of(tmp_path / "cfg.yaml", "report_to"), "did you mean `tensorboard`")


def test_a_monitor_whose_package_is_missing(w, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    err = train_err(capsys, w, tmp_path, report_to=["tensorboard", "wandb"])
    names(err, line_of(tmp_path / "cfg.yaml", "report_to"), "`wandb` package is not installed", "layer-aware[monitor]")


def test_a_deepspeed_json_with_its_own_tensorboard_section(w, tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 1},\n "tensorboard": {"enabled": true, "output_path": "tb"}}\n')
    names(train_err(capsys, w, tmp_path, ds_config=str(ds)), str(ds), "`tensorboard`", "`report_to`")


def test_a_non_finite_mixture_weight_names_the_config_line(w, tmp_path, capsys):
    err = train_err(capsys, w, tmp_path, data=[{"path": str(w["raw"]), "weight": float("inf")}])
    assert "`data[0].weight` must be a positive number" in err and "cfg.yaml" in err
