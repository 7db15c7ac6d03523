"""pipeline.chat_vector: θ_raw + ratio × (θ_chat − θ_base), streamed, with provenance."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_prep.errors import UserError
from pipeline.convert.chat_vector import chat_vector
from pipeline.convert.transplant import transplant
from tests.kit.oracles import greedy_chat, load_dir_tensors
from tests.kit.runs import base_tensors, make_base, make_run, make_tokenizer


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def world(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("cv")
    base = make_base(d / "base", tied=request.param)
    tok = make_tokenizer(d / "chat-tok", chat_template=True)
    raw = make_run(d / "a-raw", base, "raw", raw_start=1, format_start=2, seed=1)
    chat = make_run(d / "a-chat", base, "chat", raw_start=1, format_start=2, seed=2, tokenizer=tok)
    return {"dir": d, "base": base, "tok": tok, "raw": raw, "chat": chat}


def test_disjoint_trained_sets_make_the_chat_vector_the_transplant(world, tmp_path):
    raw, chat = world["raw"].path, world["chat"].path
    rec = chat_vector(raw, chat, world["base"], tmp_path / "cv")
    transplant(raw, chat, tmp_path / "t")
    got, want = load_dir_tensors(tmp_path / "cv"), load_dir_tensors(tmp_path / "t")
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    # and it is not the base: both halves changed something
    base = base_tensors(world["base"])
    assert not torch.equal(got["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
    assert not torch.equal(got["model.layers.3.mlp.up_proj.weight"], base["model.layers.3.mlp.up_proj.weight"])
    assert rec["ratio"] == 1.0 and json.loads((tmp_path / "cv" / "chat_vector.json").read_text()) == rec
    e = {t["name"]: t for t in rec["tensors"]}["model.layers.3.mlp.up_proj.weight"]["source"]
    assert e["raw"]["path"] == str(raw.resolve()) and e["chat"]["path"] == str(chat.resolve())
    assert e["base"]["path"] == str(world["base"].resolve())


def test_overlapping_changes_follow_the_formula(world, tmp_path):
    """A full continued pretraining (every tensor changed) plus half the chat vector."""
    cpt = make_run(tmp_path / "cpt", world["base"], "full", raw_start=1, format_start=2, seed=5)
    chat_vector(cpt.path, world["chat"].path, world["base"], tmp_path / "cv", ratio=0.5)
    got, base, chat = load_dir_tensors(tmp_path / "cv"), base_tensors(world["base"]), world["chat"].tensors[5]
    for name, t in got.items():
        want = cpt.tensors[5][name].double() + 0.5 * (chat[name].double() - base[name].double())
        assert torch.allclose(t.double(), want, rtol=0, atol=1e-6), name
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "cv")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "cv"))
    assert tok.chat_template and len(greedy_chat(model, tok)) == 6


def test_refusals_write_nothing(world, tmp_path):
    raw, chat, base = world["raw"].path, world["chat"].path, world["base"]
    deep = make_base(tmp_path / "deep", num_layers=6)
    other = make_base(
        tmp_path / "other",
        seed=7,
        tied=world["base"].joinpath("config.json").read_text().count('"tie_word_embeddings": true') > 0,
    )
    cases = [
        (dict(chat=deep), r"--raw and --chat are different models: config.json num_hidden_layers"),
        (dict(base=other), r"--raw .* was trained from .*not from --base"),
        (dict(ratio=float("nan")), r"--ratio nan"),
        (dict(chat_step=9), r"--chat-step 9: .*available: 5"),
    ]
    for kw, pattern in cases:
        args = {"raw": raw, "chat": chat, "base": base, **kw}
        with pytest.raises(UserError, match=pattern):
            chat_vector(args.pop("raw"), args.pop("chat"), args.pop("base"), tmp_path / "out", **args)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-out*"))
    with pytest.raises(UserError, match="overlaps the input"):
        chat_vector(raw, chat, base, raw / "inside")
