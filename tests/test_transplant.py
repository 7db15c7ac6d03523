"""pipeline.transplant: A-Raw's layers below format_start + A-Chat's format group -> one HF model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_prep.errors import UserError
from pipeline.convert.export import export_run
from pipeline.convert.shards import tensor_bytes
from pipeline.convert.transplant import transplant
from tests.kit.oracles import greedy_chat, load_dir_tensors, reference_model
from tests.kit.runs import base_tensors, make_base, make_run, make_tokenizer

F = 2  # format_start of every run below (4 layers: frozen [0,1), raw [1,2), format [2,4))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base model, a chat tokenizer, and an A-Raw and A-Chat run trained from the base."""
    d = tmp_path_factory.mktemp("world")
    base = make_base(d / "base")
    tok = make_tokenizer(d / "chat-tok", chat_template=True)
    raw = make_run(d / "a-raw", base, "raw", raw_start=1, format_start=F, seed=1)
    chat = make_run(d / "a-chat", base, "chat", raw_start=1, format_start=F, seed=2, tokenizer=tok)
    return {"dir": d, "base": base, "tok": tok, "raw": raw, "chat": chat}


def expected_transplant(raw_tensors: dict, chat_tensors: dict, base: dict, f: int = F) -> dict:
    want = {}
    for name in base:
        if name.startswith("model.layers."):
            want[name] = (raw_tensors if int(name.split(".")[2]) < f else chat_tensors)[name]
        elif name.startswith("model.embed_tokens."):
            want[name] = base[name]
        else:  # final norm, lm_head
            want[name] = chat_tensors[name]
    return want


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".tmp-{out.name}*"))


def test_every_tensor_equals_its_source_bitwise(world, tmp_path):
    raw, chat, base = world["raw"], world["chat"], base_tensors(world["base"])
    rec = transplant(raw.path, chat.path, tmp_path / "out")
    out = tmp_path / "out"
    got = load_dir_tensors(out)
    want = expected_transplant(raw.tensors[5], chat.tensors[5], base)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    # the fixture really changed what each half brings (else the check above proves little)
    assert not torch.equal(got["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
    assert not torch.equal(
        got["model.layers.1.mlp.up_proj.weight"], chat.tensors[5]["model.layers.1.mlp.up_proj.weight"]
    )
    assert not torch.equal(got["model.norm.weight"], raw.tensors[5]["model.norm.weight"])
    assert rec["format_start"] == F and rec["num_layers"] == 4


def test_provenance_and_mergekit_config(world, tmp_path):
    raw, chat = world["raw"], world["chat"]
    rec = transplant(raw.path, chat.path, tmp_path / "out")
    out = tmp_path / "out"
    assert json.loads((out / "transplant.json").read_text()) == rec
    got = load_dir_tensors(out)
    src = {e["name"]: e for e in rec["tensors"]}
    assert sorted(src) == sorted(got)
    for name, e in src.items():
        assert e["sha256"] == hashlib.sha256(tensor_bytes(got[name])).hexdigest(), name
        assert e["source"]["kind"] == "run" and e["source"]["step"] == 5
    assert src["model.layers.1.self_attn.q_proj.weight"]["source"]["path"] == str(raw.path.resolve())
    assert (
        src["model.layers.1.self_attn.q_proj.weight"]["source"]["file"]
        == "checkpoints/step_00000005/layer_01-model_states.pt"
    )
    assert src["model.layers.2.self_attn.q_proj.weight"]["source"]["path"] == str(chat.path.resolve())
    assert src["lm_head.weight"]["source"]["file"].endswith("layer_03-model_states.pt")
    assert src["lm_head.weight"]["source"]["path"] == str(chat.path.resolve())
    for f, sha in rec["files"].items():
        assert hashlib.sha256((out / f).read_bytes()).hexdigest() == sha
    mk = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert mk["merge_method"] == "passthrough" and mk["dtype"] == "float32"
    assert [s["sources"][0]["layer_range"] for s in mk["slices"]] == [[0, F], [F, 4]]
    assert mk["base_model"] == mk["slices"][1]["sources"][0]["model"]
    text = (out / "mergekit.yaml").read_text()
    assert f"python -m pipeline.export {raw.path.resolve()} --step 5" in text


def test_output_loads_and_answers_with_the_chat_template(world, tmp_path):
    raw, chat = world["raw"], world["chat"]
    transplant(raw.path, chat.path, tmp_path / "out")
    out = tmp_path / "out"
    # tokenizer and template come from A-Chat's tokenizer, not from the base (which has none)
    assert (out / "chat_template.jinja").read_bytes() == (world["tok"] / "chat_template.jinja").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    want = expected_transplant(raw.tensors[5], chat.tensors[5], base_tensors(world["base"]))
    assert greedy_chat(model, tok) == greedy_chat(reference_model(world["base"], want), tok)
    # The logits are the transplant's own: equal to the model holding exactly the expected tensors,
    # and different from A-Chat's and from A-Raw's (each half really changed the computation).
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        logits = lambda m: m(ids).logits[0, -1]
        got = logits(model)
        assert torch.allclose(got, logits(reference_model(world["base"], want)), atol=1e-6)
        assert not torch.allclose(got, logits(reference_model(world["base"], chat.tensors[5])), atol=1e-3)
        assert not torch.allclose(got, logits(reference_model(world["base"], raw.tensors[5])), atol=1e-3)


def test_hf_directories_need_format_start_and_give_the_same_result(world, tmp_path):
    raw, chat = world["raw"], world["chat"]
    export_run(raw.path, tmp_path / "raw-hf")
    export_run(chat.path, tmp_path / "chat-hf")
    with pytest.raises(UserError, match="--format-start"):
        transplant(tmp_path / "raw-hf", tmp_path / "chat-hf", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
    rec = transplant(tmp_path / "raw-hf", tmp_path / "chat-hf", tmp_path / "out", format_start=F, max_shard_size="10KB")
    transplant(raw.path, chat.path, tmp_path / "from-runs")
    got, want = load_dir_tensors(tmp_path / "out"), load_dir_tensors(tmp_path / "from-runs")
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert (tmp_path / "out/model.safetensors.index.json").is_file()
    assert all(e["source"]["kind"] == "hf" for e in rec["tensors"])
    mk = yaml.safe_load((tmp_path / "out/mergekit.yaml").read_text())
    assert mk["slices"][0]["sources"][0]["model"] == str((tmp_path / "raw-hf").resolve())
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))  # sharded output loads
    assert torch.equal(
        model.state_dict()["model.layers.1.mlp.down_proj.weight"], raw.tensors[5]["model.layers.1.mlp.down_proj.weight"]
    )


def test_a_run_and_an_hf_directory_mix(world, tmp_path):
    raw, chat = world["raw"], world["chat"]
    export_run(chat.path, tmp_path / "chat-hf")
    transplant(raw.path, tmp_path / "chat-hf", tmp_path / "out")  # boundary from the raw run
    want = expected_transplant(raw.tensors[5], chat.tensors[5], base_tensors(world["base"]))
    got = load_dir_tensors(tmp_path / "out")
    assert all(torch.equal(got[n], t) for n, t in want.items())


def _other_runs(world, tmp: Path) -> dict:
    """Inputs that must each be refused."""
    return {
        "layers": lambda: make_run(tmp / "deep", make_base(tmp / "base6", num_layers=6), "chat", format_start=F),
        "base": lambda: make_run(tmp / "other-base", make_base(tmp / "base-b", seed=7), "raw", format_start=F),
        "boundary": lambda: make_run(tmp / "f3", world["base"], "chat", format_start=3),
        "full": lambda: make_run(tmp / "full", world["base"], "full", format_start=F),
    }


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("layers", "num_hidden_layers"),
        ("base", "different base models"),
        ("boundary", r"disagree on the boundary.*has 2.*has 3"),
        ("full", r"trained the embeddings .*embeddings_trained"),
    ],
)
def test_incompatible_runs_are_refused(world, tmp_path, case, pattern):
    other = _other_runs(world, tmp_path)[case]()
    raw, chat = (other.path, world["chat"].path) if case in ("base", "full") else (world["raw"].path, other.path)
    with pytest.raises(UserError, match=pattern):
        transplant(raw, chat, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_hf_inputs_with_different_embeddings_are_refused(world, tmp_path):
    other = make_base(tmp_path / "base-b", seed=7)  # same config, other weights
    with pytest.raises(UserError, match=r"model\.embed_tokens\.weight differs between --raw .* --chat"):
        transplant(other, world["base"], tmp_path / "out", format_start=F)
    assert_nothing_written(tmp_path / "out")


def test_flag_and_input_errors_write_nothing(world, tmp_path):
    raw, chat = world["raw"].path, world["chat"].path
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"--format-start 3 disagrees with --raw run\.json"):
        transplant(raw, chat, out, format_start=3)
    with pytest.raises(UserError, match=r"--chat-step 9: .*available: 5\)"):
        transplant(raw, chat, out, chat_step=9)
    with pytest.raises(UserError, match="swapped"):
        transplant(chat, raw, out)
    with pytest.raises(UserError, match="--raw-step applies to a run directory"):
        transplant(world["base"], chat, out, raw_step=5)
    with pytest.raises(UserError, match=r"--raw .*neither a run directory"):
        transplant(tmp_path, chat, out)
    assert_nothing_written(out)
    out.mkdir()
    (out / "x").write_text("keep")
    with pytest.raises(UserError, match="--force"):
        transplant(raw, chat, out)
    assert [p.name for p in out.iterdir()] == ["x"]


def test_a_corrupt_checkpoint_file_is_named(world, tmp_path):
    chat = tmp_path / "a-chat"
    shutil.copytree(world["chat"].path, chat)
    f = chat / "checkpoints/step_00000005/layer_03-model_states.pt"
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UserError, match=r"layer_03-model_states\.pt: sha256 .* disagrees with .*record\.json"):
        transplant(world["raw"].path, chat, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_tied_embeddings(tmp_path):
    base = make_base(tmp_path / "base", tied=True)
    tok = make_tokenizer(tmp_path / "tok", chat_template=True)
    raw = make_run(tmp_path / "raw", base, "raw", format_start=F, seed=1)
    chat = make_run(tmp_path / "chat", base, "chat", format_start=F, seed=2, tokenizer=tok)
    transplant(raw.path, chat.path, tmp_path / "out")
    got = load_dir_tensors(tmp_path / "out")
    want = expected_transplant(raw.tensors[5], chat.tensors[5], base_tensors(base))
    assert "lm_head.weight" not in got and sorted(got) == sorted(want)
    assert all(torch.equal(got[n], t) for n, t in want.items())
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert torch.equal(model.lm_head.weight, base_tensors(base)["model.embed_tokens.weight"])
    assert len(greedy_chat(model, AutoTokenizer.from_pretrained(str(tmp_path / "out")))) == 6
    # a chat run that trained the tied head (= the embeddings) makes the choice ambiguous: refused
    bad = make_run(tmp_path / "chat-head", base, "chat", format_start=F, embeddings_trained=True, tokenizer=tok)
    with pytest.raises(UserError, match="tie_word_embeddings the LM head"):
        transplant(raw.path, bad.path, tmp_path / "out2")
    assert_nothing_written(tmp_path / "out2")


@pytest.mark.multiproc
def test_a_real_training_run_exports_and_transplants(tmp_path):
    """The trainer's own checkpoint (pipeline.train, 2 steps on CPU), not a hand-built one."""
    from pipeline.names import layer_file, to_hf_name
    from tests.kit.train import build_setup, run_train, write_config

    setup = build_setup(tmp_path / "setup")
    cfg = write_config(tmp_path / "chat.yaml", setup, "chat", tmp_path / "a-chat", steps=2, save_every=2)
    run_train([str(cfg)])
    chat = tmp_path / "a-chat"
    export_run(chat, tmp_path / "chat-hf")
    stored = {}
    for i in range(4):
        for key, t in torch.load(chat / "checkpoints/step_00000002" / layer_file(i)).items():
            if (name := to_hf_name(i, key)) is not None:
                stored[name] = t
    got, base = load_dir_tensors(tmp_path / "chat-hf"), base_tensors(setup["model"])
    assert sorted(got) == sorted(base) == sorted(stored)
    assert all(torch.equal(got[n], stored[n]) for n in stored)
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
    assert not torch.equal(got["model.layers.3.mlp.up_proj.weight"], base["model.layers.3.mlp.up_proj.weight"])

    raw = make_run(tmp_path / "a-raw", setup["model"], "raw", raw_start=1, format_start=3)  # same base
    transplant(raw.path, chat, tmp_path / "t")
    want = expected_transplant(raw.tensors[5], stored, base, f=3)
    got = load_dir_tensors(tmp_path / "t")
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], t) for n, t in want.items())
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "t")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert tok.chat_template
    assert greedy_chat(model, tok, "hello") == greedy_chat(reference_model(setup["model"], want), tok, "hello")


# ---------------------------------------------------------------------------------------------
# An instruct model as the format donor


def make_donor(d: Path, num_layers: int = 4, vocab_words=None, seed: int = 3) -> Path:
    """An "instruct" model of the base's family: same shapes, every tensor moved (a full chat
    fine-tune; its chat-token rows trained, unlike the base's), with a chat template."""
    from tests.kit import runs

    make_base(d, num_layers=num_layers, seed=seed)
    words = runs.WORDS
    runs.WORDS = vocab_words or words  # another vocabulary of the same size, when asked
    try:
        make_tokenizer(d, chat_template=True)
    finally:
        runs.WORDS = words
    return d


def test_donor_transplant_tensor_by_tensor(tmp_path):
    from safetensors.torch import save_file

    from pipeline.convert.transplant import chat_token_ids, donor_transplant

    base = make_base(tmp_path / "base")
    b = base_tensors(base)
    chat_ids = [3, 4]  # <|user|>, <|assistant|> in the kit's word-level tokenizer (</s> is the base's own eos)
    b["model.embed_tokens.weight"][chat_ids] = 0.0  # the base never trained its chat tokens
    save_file(b, str(base / "model.safetensors"), metadata={"format": "pt"})
    raw = make_run(tmp_path / "a-raw", base, "raw", raw_start=1, format_start=F, seed=1)
    donor = make_donor(tmp_path / "instruct")
    assert sorted(chat_token_ids(donor, base)) == chat_ids
    rec = donor_transplant(raw.path, donor, tmp_path / "out")
    got, d = load_dir_tensors(tmp_path / "out"), base_tensors(donor)
    for name, t in got.items():
        if name == "model.embed_tokens.weight":
            want = raw.tensors[5][name].clone()
            want[chat_ids] = d[name][chat_ids]
        elif name.startswith("model.layers.") and int(name.split(".")[2]) < F:
            want = raw.tensors[5][name]
        else:  # the format group, the final norm and the head
            want = d[name]
        assert torch.equal(t, want), name
    assert rec["donor_layers_not_used"] == [0, F] and set(rec["embedding_rows_from_donor"]) == {"3", "4"}
    assert rec["inputs"]["donor"]["path"] == str(donor.resolve())
    # the template and the stop come from the donor; the result loads and answers in transformers
    assert (tmp_path / "out" / "chat_template.jinja").read_bytes() == (donor / "chat_template.jinja").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert len(greedy_chat(model, AutoTokenizer.from_pretrained(str(tmp_path / "out")))) == 6


def test_mismatched_donors_are_refused(tmp_path):
    from pipeline.convert.transplant import donor_transplant

    base = make_base(tmp_path / "base")
    raw = make_run(tmp_path / "a-raw", base, "raw", raw_start=1, format_start=F, seed=1)
    deep = make_donor(tmp_path / "deep", num_layers=6)
    with pytest.raises(UserError, match=r"--raw and --donor are different models: config.json num_hidden_layers"):
        donor_transplant(raw.path, deep, tmp_path / "out")
    from tests.kit.runs import WORDS

    other = make_donor(tmp_path / "other-vocab", vocab_words=WORDS[:5] + list(reversed(WORDS[5:])))
    with pytest.raises(UserError, match=r"--raw and --donor have different vocabularies"):
        donor_transplant(raw.path, other, tmp_path / "out")
    full = make_run(tmp_path / "full", base, "full", raw_start=1, format_start=F, seed=2)
    with pytest.raises(UserError, match="did not train the raw group|trained the embeddings"):
        donor_transplant(full.path, make_donor(tmp_path / "instruct"), tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
