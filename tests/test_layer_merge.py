"""Layer-aware merges (pipeline.chat_vector --raw-weights/--chat-weights/--transition/--layer-weights):
θ = base + a_l·(raw − base) + b_l·(chat − base). The two ends of the family are the product's own
merges (group-selecting weights: the transplant; uniform weights: the chat vector), and real
mergekit runs the written YAML of a blended merge to bitwise the same tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from pipeline.convert.chat_vector import chat_vector
from pipeline.convert.mergekit import list_position_exact
from pipeline.convert.transplant import transplant
from pipeline.names import EMBED_WEIGHT
from tests.kit.oracles import checkpoint_tensors, load_dir_tensors
from tests.kit.runs import base_tensors, make_base, make_run, make_tokenizer
from tests.test_bad_inputs import call, names, nothing_in

TRANSPLANT = dict(raw_weights="frozen=1,raw=1,format=0", chat_weights="frozen=0,raw=0,format=1")


def changed_copy(base: Path, out: Path, seed: int, chat_template: bool = False) -> Path:
    """An HF model of `base`'s shape with every tensor changed except the embeddings (which a
    transplant needs equal on both sides): a continued pretraining or an instruct model, as HF dirs."""
    shutil.copytree(base, out)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        n: (t if n == EMBED_WEIGHT else t + 0.05 * torch.randn(t.shape, generator=gen)).contiguous()
        for n, t in base_tensors(base).items()
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if chat_template:
        make_tokenizer(out, chat_template=True)
    return out


def assert_same_tensors(a: Path, b: Path) -> dict:
    got, want = load_dir_tensors(a), load_dir_tensors(b)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    return got


def differs(a: dict, b: dict) -> set[str]:
    return {n for n in a if not torch.equal(a[n], b[n])}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf(request, tmp_path_factory):
    """Base + two HF models that changed every tensor but the embeddings (format_start must be given)."""
    d = tmp_path_factory.mktemp("lm-hf")
    base = make_base(d / "base", tied=request.param)
    return {
        "base": base,
        "raw": changed_copy(base, d / "raw", seed=1),
        "chat": changed_copy(base, d / "chat", seed=2, chat_template=True),
        "tied": request.param,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two full fine-tunes of a 4-layer base (frozen [0,1), raw [1,2), format [2,4)): every tensor,
    the embeddings included, changed on both sides."""
    d = tmp_path_factory.mktemp("lm-runs")
    base = make_base(d / "base")
    tok = make_tokenizer(d / "chat-tok", chat_template=True)
    cpt = make_run(d / "cpt", base, "full", raw_start=1, format_start=2, seed=1)
    chat = make_run(d / "chat", base, "full", raw_start=1, format_start=2, seed=2, tokenizer=tok)
    return {"dir": d, "base": base, "raw": cpt.path, "chat": chat.path}


# ------------------------------------------------------------------------------------------ 1.


def test_weights_that_select_whole_groups_are_the_transplant(hf, tmp_path):
    raw, chat, base = hf["raw"], hf["chat"], hf["base"]
    rec = chat_vector(raw, chat, base, tmp_path / "lw", format_start=2, **TRANSPLANT)
    transplant(raw, chat, tmp_path / "t", format_start=2)
    got = assert_same_tensors(tmp_path / "lw", tmp_path / "t")
    # The inputs make this a real test: the plain chat vector is not the transplant here (both sides
    # changed every layer), and the merge took each half from its side.
    chat_vector(raw, chat, base, tmp_path / "cv")
    plain = load_dir_tensors(tmp_path / "cv")
    assert {"model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight", "model.norm.weight"} <= differs(
        got, plain
    )
    r, c = load_dir_tensors(raw), load_dir_tensors(chat)
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], r["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], c["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(got["model.norm.weight"], c["model.norm.weight"])
    # provenance: the table and each tensor's own weights
    w = rec["weights"]
    assert [(l["raw"], l["chat"]) for l in w["layers"]] == [(1.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.0, 1.0)]
    assert w["embed"] == {"raw": 1.0, "chat": 0.0} and w["norm"] == {"raw": 0.0, "chat": 1.0}
    assert w["groups"]["format_start"] == 2 and w["given"]["transition"] == 0
    assert w["head"] == ("tied: the embedding matrix (embed)" if hf["tied"] else {"raw": 0.0, "chat": 1.0})
    src = {e["name"]: e["source"] for e in rec["tensors"]}
    assert src["model.layers.3.self_attn.q_proj.weight"]["weights"] == {"raw": 0.0, "chat": 1.0}
    assert src[EMBED_WEIGHT]["weights"] == {"raw": 1.0, "chat": 0.0}
    assert json.loads((tmp_path / "lw" / "chat_vector.json").read_text()) == rec


def test_group_weights_follow_the_runs_groups(runs, tmp_path):
    """With runs, the frozen group has layers (run.json raw_start 1): layer 0 and the embeddings take
    `frozen`'s weights, the final norm and head `format`'s, each layer its group's."""
    rec = chat_vector(
        runs["raw"],
        runs["chat"],
        runs["base"],
        tmp_path / "lw",
        raw_weights="frozen=0.5,raw=1,format=0",
        chat_weights="frozen=0,raw=0.25,format=1",
    )
    w = rec["weights"]
    assert [(l["raw"], l["chat"]) for l in w["layers"]] == [(0.5, 0.0), (1.0, 0.25), (0.0, 1.0), (0.0, 1.0)]
    assert w["embed"] == {"raw": 0.5, "chat": 0.0}
    assert w["norm"] == w["head"] == {"raw": 0.0, "chat": 1.0}
    got, base = load_dir_tensors(tmp_path / "lw"), base_tensors(runs["base"])
    raw = checkpoint_tensors(runs["raw"])
    chat = checkpoint_tensors(runs["chat"])
    for name, (a, b) in (
        (EMBED_WEIGHT, (0.5, 0.0)),
        ("model.layers.1.mlp.up_proj.weight", (1.0, 0.25)),
        ("lm_head.weight", (0.0, 1.0)),
    ):
        want = (
            base[name].double()
            + a * (raw[name].double() - base[name].double())
            + b * (chat[name].double() - base[name].double())
        )
        assert torch.allclose(got[name].double(), want, rtol=0, atol=1e-6), name


# ------------------------------------------------------------------------------------------ 2.


def test_uniform_weights_are_the_chat_vector(runs, tmp_path):
    raw, chat, base = runs["raw"], runs["chat"], runs["base"]
    rec = chat_vector(raw, chat, base, tmp_path / "cv")  # today's default, no new flag
    assert rec["ratio"] == 1.0 and "weights" not in rec
    mk = yaml.safe_load((tmp_path / "cv" / "mergekit.yaml").read_text())
    assert [m["parameters"]["weight"] for m in mk["models"]] == [1.0, 1.0]  # the scalar config, as before
    chat_vector(
        raw,
        chat,
        base,
        tmp_path / "groups",
        raw_weights="frozen=1,raw=1,format=1",
        chat_weights="frozen=1,raw=1,format=1",
        transition=1,
    )
    got = assert_same_tensors(tmp_path / "groups", tmp_path / "cv")
    ones = tmp_path / "ones.yaml"
    ones.write_text(
        "raw: [1, 1, 1, 1]\nchat: [1.0, 1.0, 1.0, 1.0]\nembed: {raw: 1, chat: 1}\n"
        "norm: {raw: 1, chat: 1}\nhead: {raw: 1, chat: 1}\n"
    )
    chat_vector(raw, chat, base, tmp_path / "file", layer_weights=ones)
    assert_same_tensors(tmp_path / "file", tmp_path / "cv")
    # --ratio is the default chat weight of the groups not named
    chat_vector(raw, chat, base, tmp_path / "cv05", ratio=0.5)
    chat_vector(raw, chat, base, tmp_path / "g05", ratio=0.5, raw_weights="raw=1")
    assert_same_tensors(tmp_path / "g05", tmp_path / "cv05")
    # and it is neither input: both deltas are in every tensor
    assert differs(got, checkpoint_tensors(raw)) == set(got) == differs(got, checkpoint_tensors(chat))


# ------------------------------------------------------------------------------------------ 3.


def test_mergekit_reads_some_list_entries_off_by_a_hair(tmp_path):
    """Why the YAML pins some layers with a filter: mergekit's own gradient reader, at the t its
    planner gives layer 13 of 24, mixes in layer 12's weight."""
    from mergekit.config import evaluate_setting

    assert all(list_position_exact(i, 4) for i in range(4)) and all(list_position_exact(i, 32) for i in range(32))
    assert [i for i in range(24) if not list_position_exact(i, 24)] == [13]
    values = [0.0] * 12 + [0.1, 0.3, 0.7] + [1.0] * 9
    got = [evaluate_setting("x", values, i / 23, validate=float) for i in range(24)]
    assert got[13] != values[13] and [g for i, g in enumerate(got) if i != 13] == values[:13] + values[14:]


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["runs-24-layers", "hf-tied"])
def test_blended_merge_runs_in_mergekit_offline_and_matches(case, tmp_path):
    """A transition zone (non-0/1 weights) written as mergekit.yaml and run by the real mergekit,
    offline: bitwise the same tensors. runs-24-layers: runs (so the YAML's export commands run too),
    a frozen group with layers, and 24 layers, where one layer needs its own filter; hf-tied: tied
    embeddings, where the head is the embedding matrix and the YAML has no head entry."""
    from tests.test_mergekit import run_yaml_as_written

    if case == "runs-24-layers":
        # float64 weights, so the result shows a weight that is off by one ulp (float32 would round it away)
        base = make_base(tmp_path / "base", num_layers=24, hidden=16, dtype=torch.float64)
        tok = make_tokenizer(tmp_path / "chat-tok", chat_template=True)
        raw = make_run(tmp_path / "cpt", base, "full", raw_start=4, format_start=13, seed=1).path
        chat = make_run(tmp_path / "chat", base, "full", raw_start=4, format_start=13, seed=2, tokenizer=tok).path
        kw = dict(raw_weights="frozen=0.5,raw=1,format=0.125", chat_weights="frozen=0,raw=0.1,format=1", transition=3)
        blended = range(10, 16)
    else:
        base = make_base(tmp_path / "base", tied=True)
        raw = changed_copy(base, tmp_path / "raw", seed=1)
        chat = changed_copy(base, tmp_path / "chat", seed=2, chat_template=True)
        kw = dict(raw_weights="raw=1,format=0", chat_weights="frozen=0.5,raw=0,format=1", transition=1, format_start=2)
        blended = range(1, 3)
    out = tmp_path / "lw"
    rec = chat_vector(raw, chat, base, out, **kw)
    rows = rec["weights"]["layers"]
    assert [r["layer"] for r in rows if "transition" in r["decided_by"]] == list(blended)
    assert all(0 < r["raw"] < 1 and 0 < r["chat"] < 1 for r in rows if r["layer"] in blended)
    # It is a merge of its own: neither the transplant's weights nor the chat vector's.
    sel = dict(TRANSPLANT, format_start=kw["format_start"]) if "format_start" in kw else TRANSPLANT
    chat_vector(raw, chat, base, tmp_path / "select", **sel)
    chat_vector(raw, chat, base, tmp_path / "cv")
    ours = load_dir_tensors(out)
    some_layer = f"model.layers.{blended[0]}.mlp.down_proj.weight"
    assert some_layer in differs(ours, load_dir_tensors(tmp_path / "select"))
    assert some_layer in differs(ours, load_dir_tensors(tmp_path / "cv"))
    text = (out / "mergekit.yaml").read_text()
    mk = yaml.safe_load(text)
    assert mk["merge_method"] == "task_arithmetic" and mk["dtype"] == "float64"
    filters = [e.get("filter") for e in mk["models"][0]["parameters"]["weight"]]
    if case == "runs-24-layers":
        assert "model.layers.13." in filters and "lm_head." in filters  # the pinned layer; an untied head
    else:
        assert "lm_head." not in filters and not any(f and f.startswith("model.layers.") for f in filters)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_yaml_as_written(out / "mergekit.yaml", tmp_path / "mk", cwd=elsewhere)
    theirs = load_dir_tensors(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert theirs[name].dtype == t.dtype and torch.equal(theirs[name], t), name
    if case == "runs-24-layers":
        # The pin is what makes it exact: without layer 13's filter entry, mergekit reads that layer's
        # weights a hair off the list's entry, and exactly that layer's tensors differ.
        bare = tmp_path / "no-pin.yaml"
        bare.write_text(
            "".join(
                l
                for l in text.splitlines(keepends=True)  # (the exports exist already)
                if '"model.layers.13."' not in l and "python -m pipeline.export" not in l
            )
        )
        run_yaml_as_written(bare, tmp_path / "mk-no-pin", cwd=elsewhere)
        off = differs(ours, load_dir_tensors(tmp_path / "mk-no-pin"))
        assert off and {n.split(".")[2] for n in off} == {"13"}, sorted(off)


# ------------------------------------------------------------------------------------------ 4.


def test_bad_weights_are_refused_naming_the_flag(runs, hf, capsys, tmp_path):
    raw, chat, base = runs["raw"], runs["chat"], runs["base"]
    out = tmp_path / "out"
    argv = ["--raw", raw, "--chat", chat, "--base", base, "--out", out]
    short = tmp_path / "short.yaml"
    short.write_text(
        "raw: [1, 1, 0]\nchat: [0, 0, 1, 1]\nembed: {raw: 1, chat: 0}\nnorm: {raw: 0, chat: 1}\n"
        "head: {raw: 0, chat: 1}\n"
    )
    nohead = tmp_path / "nohead.yaml"
    nohead.write_text("raw: [1, 1, 0, 0]\nchat: [0, 0, 1, 1]\nembed: {raw: 1, chat: 0}\nnorm: {raw: 0, chat: 1}\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text(nohead.read_text() + "head: {raw: 0, chat: 1}\nnrom: {raw: 0, chat: 1}\n")
    badval = tmp_path / "badval.yaml"
    badval.write_text(nohead.read_text().replace("[0, 0, 1, 1]", "[0, 0, .nan, 1]") + "head: {raw: 0, chat: 1}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("raw: [1, 1\nchat: 0\n")
    cases = [
        (["--layer-weights", short], ["--layer-weights", str(short), "`raw` has 3 value(s)", "4 decoder layers"]),
        (["--layer-weights", nohead], ["--layer-weights", "`head` is missing"]),
        (["--layer-weights", typo], ["--layer-weights", f"{typo}:6", "unknown key `nrom`"]),
        (["--layer-weights", badval], ["--layer-weights", "`chat[2]`", "finite"]),
        (["--layer-weights", broken], ["--layer-weights", str(broken), "invalid YAML"]),
        (["--layer-weights", tmp_path / "absent.yaml"], ["--layer-weights", "no such file"]),
        (["--raw-weights", "fromat=0"], ["--raw-weights", "unknown group 'fromat'", "frozen, raw, format"]),
        (["--chat-weights", "raw=0,raw=1"], ["--chat-weights", "'raw' is given twice"]),
        (["--raw-weights", "format"], ["--raw-weights", "is not GROUP=WEIGHT"]),
        (["--raw-weights", "format=inf"], ["--raw-weights", "finite"]),
        (["--raw-weights", "format=zero"], ["--raw-weights", "not a number"]),
        (["--raw-weights", "format=0", "--transition", "-1"], ["--transition -1", ">= 0"]),
        (["--raw-weights", "format=0", "--transition", "1.5"], ["--transition", "whole number"]),
        (["--raw-weights", "format=0", "--transition", "2"], ["--transition 2", "[0, 4)", "raw group [1, 2)"]),
        (["--transition", "1"], ["--transition 1", "--raw-weights"]),
        (["--format-start", "2"], ["--format-start 2", "--raw-weights"]),
        (["--chat-weights", "format=1", "--ratio", "0.5"], ["--ratio 0.5", "--chat-weights"]),
        (["--layer-weights", nohead, "--raw-weights", "format=0"], ["--layer-weights", "drop --raw-weights"]),
        (["--raw-weights", "format=0", "--format-start", "3"], ["--format-start 3", "run.json"]),
    ]
    for extra, parts in cases:
        err = call(capsys, "pipeline.chat_vector", [*argv, *extra])
        names(err, *parts)
        nothing_in(out)
    # HF inputs record no boundary; a tied model has no head of its own
    hf_argv = ["--raw", hf["raw"], "--chat", hf["chat"], "--base", hf["base"], "--out", out]
    names(call(capsys, "pipeline.chat_vector", [*hf_argv, "--raw-weights", "format=0"]), "--format-start")
    nothing_in(out)
    if hf["tied"]:
        tied = tmp_path / "tied.yaml"
        tied.write_text(typo.read_text().replace("nrom: {raw: 0, chat: 1}\n", ""))
        names(
            call(capsys, "pipeline.chat_vector", [*hf_argv, "--layer-weights", tied]),
            "--layer-weights",
            "`head`",
            "tie_word_embeddings",
        )
        nothing_in(out)


def test_the_command_prints_the_weights_it_used(runs, capsys, tmp_path):
    from pipeline.chat_vector import main

    main(
        [
            str(a)
            for a in [
                "--raw",
                runs["raw"],
                "--chat",
                runs["chat"],
                "--base",
                runs["base"],
                "--out",
                tmp_path / "o",
                "--raw-weights",
                "format=0",
                "--chat-weights",
                "frozen=0,raw=0",
                "--transition",
                "1",
            ]
        ]
    )
    text = capsys.readouterr().out
    assert "layer-aware chat vector" in text
    assert "layer 1 (raw, transition 0.25 of the way from raw to format): raw 0.75, chat 0.25" in text
    assert "final norm: raw 0, chat 1" in text
