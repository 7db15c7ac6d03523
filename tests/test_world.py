"""The demo's world, tokenizer and tiny model: deterministic, leak-free, loadable by the real code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.demo.tokenizer import IM_END, IM_START, build_tokenizer
from pipeline.demo.world import ATTRIBUTES, POOLS, build_world
from tests.kit.models import demo_llama

SMALL = dict(
    n_known=20,
    n_new=10,
    bios_per_person=2,
    qa_fraction=0.5,
    pretrain_qa_rounds=2,
    chat_qa_rounds=3,
    qa_new_rounds=2,
    n_generic=40,
    n_format_eval=10,
)
TRAINING_FILES = ("pretrain", "raw", "chat", "qa_new", "tokenizer_corpus")


def _read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _text(path) -> str:
    return Path(path).read_text()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "world"
    paths = build_world(out, seed=3, **SMALL)
    return paths, json.loads(Path(paths["world"]).read_text())


@pytest.fixture(scope="module")
def tokenizer_dir(world, tmp_path_factory):
    paths, _ = world
    return build_tokenizer([paths["tokenizer_corpus"]], tmp_path_factory.mktemp("t") / "tok", vocab_size=400)


def test_world_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path, world):
    paths, _ = world
    again = build_world(tmp_path / "again", seed=3, **SMALL)
    other = build_world(tmp_path / "other", seed=4, **SMALL)
    assert set(again) == set(paths)
    for key in paths:
        assert Path(again[key]).read_bytes() == Path(paths[key]).read_bytes(), key
    assert Path(other["pretrain"]).read_bytes() != Path(paths["pretrain"]).read_bytes()


def test_populations_sizes_and_facts(world):
    paths, w = world
    people = w["people"]
    known = [p for p in people if p["population"] == "known"]
    new = [p for p in people if p["population"] == "new"]
    assert (len(known), len(new)) == (20, 10)
    assert len({p["name"] for p in people}) == 30
    assert sum(p["qa"] for p in people) == 10 and all(p["population"] == "known" for p in people if p["qa"])
    for p in people:
        assert set(p["facts"]) == set(ATTRIBUTES)
        assert all(p["facts"][a] in POOLS[a] for a in ATTRIBUTES)
    # every training biography states every fact of its person
    by_name = {p["name"]: p for p in people}
    for rec in _read(paths["raw"]):
        name = next(n for n in by_name if rec["text"].startswith(n) or n in rec["text"])
        for a in ATTRIBUTES:
            assert by_name[name]["facts"][a].lower() in rec["text"].lower(), (name, a)
    assert len(_read(paths["raw"])) == 10 * 2


def test_no_new_person_leaks_into_base_or_chat_data(world):
    paths, w = world
    new = [p["name"] for p in w["people"] if p["population"] == "new"]
    known = [p["name"] for p in w["people"] if p["population"] == "known"]
    for key in ("pretrain", "chat", "tokenizer_corpus", "chat_eval_heldout", "chat_eval_format"):
        text = _text(paths[key])
        assert not [n for n in new if n in text], key
    raw = _text(paths["raw"])
    assert not [n for n in known if n in raw]
    # the tokenizer learns from other people: no demo person's name in its corpus
    tok_text = _text(paths["tokenizer_corpus"])
    assert not [n for n in known if n in tok_text]


def test_held_out_biographies_are_in_no_training_file(world):
    paths, _ = world
    held = [r["text"] for r in _read(paths["raw_eval_new"]) + _read(paths["raw_eval_known"])]
    assert len(held) == 30
    training = "".join(_text(paths[k]) for k in TRAINING_FILES)
    for text in held:
        assert json.dumps(text) not in training


def test_qa_covers_only_the_qa_fraction_of_known_people(world):
    paths, w = world
    qa = {p["name"] for p in w["people"] if p["qa"]}
    heldout = {p["name"] for p in w["people"] if p["population"] == "known" and not p["qa"]}
    names = {p["name"] for p in w["people"]}

    def asked(records):
        out = set()
        for r in records:
            q = r["messages"][0]["content"]
            out |= {n for n in names if n in q}
        return out

    chat = _read(paths["chat"])
    assert asked(chat) == qa
    # chat_qa_rounds questions per attribute per Q/A person, in distinct phrasings, and the
    # answer is the person's fact
    facts = {p["name"]: p["facts"] for p in w["people"]}
    person_qs = [r for r in chat if asked([r])]
    assert len(person_qs) == len(qa) * len(ATTRIBUTES) * SMALL["chat_qa_rounds"]
    assert len({r["messages"][0]["content"] for r in person_qs}) == len(person_qs)
    assert all(r["messages"][1]["content"] in facts[next(iter(asked([r])))].values() for r in person_qs)
    assert len(_read(paths["qa_new"])) == 10 * len(ATTRIBUTES) * SMALL["qa_new_rounds"]
    # plain-text Q/A transcripts in pretraining: the same people, no chat template
    lines = [line for r in _read(paths["pretrain"]) for line in r["text"].split("\n")]
    qa_lines = [line for line in lines if line.startswith("user ")]
    assert len(qa_lines) == len(qa) * len(ATTRIBUTES) * SMALL["pretrain_qa_rounds"]
    assert len([line for line in lines if line.startswith("assistant ")]) == len(qa_lines)
    assert {n for line in qa_lines for n in names if n in line} == qa
    assert IM_START not in _text(paths["pretrain"])
    assert {r["person"] for r in _read(paths["chat_eval_heldout"])} == heldout


def test_eval_records_are_well_formed(world):
    paths, w = world
    facts = {p["name"]: p["facts"] for p in w["people"]}
    for key in ("chat_eval_new", "chat_eval_heldout"):
        for r in _read(paths[key]):
            assert [m["role"] for m in r["messages"]] == ["user"]
            assert r["answer"] == facts[r["person"]][r["attribute"]]
            assert r["candidates"] == list(POOLS[r["attribute"]])
    for r in _read(paths["probe_new"]):
        assert r["prompt"].startswith(r["person"]) and r["answer"] in r["candidates"]
    assert len(_read(paths["probe_new"])) == 10 * len(ATTRIBUTES)
    fmt = _read(paths["chat_eval_format"])
    assert len(fmt) == 20 and not any("answer" in r for r in fmt)
    train_prompts = {r["messages"][0]["content"] for r in _read(paths["chat"])}
    assert not train_prompts & {r["messages"][0]["content"] for r in fmt[:10]}  # generic ones held out


def test_names_and_values_are_whole_tokens_at_the_demo_vocab(world, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.demo.world import FIRST_NAMES_F, FIRST_NAMES_M, LAST_NAMES

    # the demo's own world and vocabulary (the 400-token test tokenizer is too small for this)
    paths = build_world(tmp_path / "w", seed=0)
    tok = AutoTokenizer.from_pretrained(
        str(build_tokenizer([paths["tokenizer_corpus"]], tmp_path / "t", vocab_size=2048)), local_files_only=True
    )
    for word in FIRST_NAMES_F + FIRST_NAMES_M + LAST_NAMES:
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    for attr in ATTRIBUTES:
        if attr != "birth_date":  # digits are split on purpose
            for v in POOLS[attr]:
                assert len(tok(" " + v, add_special_tokens=False)["input_ids"]) == len(v.split()), v
    # the pretraining transcripts' role words are the very tokens the chat template puts after
    # <|im_start|>: what lets the base's extraction carry over to chat
    transcript = next(r["text"] for r in _read(paths["pretrain"]) if r["text"].startswith("user "))
    ids = tok(transcript, add_special_tokens=False)["input_ids"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    tmpl = tok(prompt, add_special_tokens=False)["input_ids"]
    user, assistant = tmpl[1], tmpl[-1]
    assert tok.convert_ids_to_tokens([user, assistant]) == ["user", "assistant"]
    assert ids[0] == user and assistant in ids


def test_tokenizer_loads_with_single_token_specials_and_chat_template(tokenizer_dir, world, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    assert tok.eos_token == IM_END
    conv = [{"role": "user", "content": "Where did Ana grow up?"}, {"role": "assistant", "content": "Oslo"}]
    enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    start, end = tok.convert_tokens_to_ids([IM_START, IM_END])
    assert ids.count(start) == 2 and ids.count(end) == 2
    assert ids[-1] == end == tok.eos_token_id
    reply = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(reply) == " Oslo" + IM_END  # the mask covers the reply and its end-of-turn
    prompt = tok.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith(IM_START + "assistant")

    # the reply's first word is the same token as in running text ("... grew up in Oslo")
    def enc(t):
        return tok(t, add_special_tokens=False)["input_ids"]

    city = enc("He grew up in Oslo")[len(enc("He grew up in")) :]
    assert enc(prompt + " Oslo") == enc(prompt) + city
    text = "Ünïcode 😀 and\n  spaces 1234"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte fallback, nothing normalised away
    again = build_tokenizer([world[0]["tokenizer_corpus"]], tmp_path / "tok2", vocab_size=400)
    assert (again / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_tiny_model_saves_loads_and_is_seeded(tokenizer_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from pipeline.hf import load_causal_lm

    a = demo_llama(tokenizer_dir, tmp_path / "a", layers=2, hidden=32, heads=4, kv_heads=2, seed=1)
    b = demo_llama(tokenizer_dir, tmp_path / "b", layers=2, hidden=32, heads=4, kv_heads=2, seed=1)
    c = demo_llama(tokenizer_dir, tmp_path / "c", layers=2, hidden=32, heads=4, kv_heads=2, seed=2)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    model = load_causal_lm(a)
    tok = AutoTokenizer.from_pretrained(str(a), local_files_only=True)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (2, 32, 2)
    assert cfg.vocab_size == len(tok) and not cfg.tie_word_embeddings
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_world_options_are_build_worlds_own_parameters_typed_like_their_defaults():
    from pipeline.demo.world import world_options

    assert world_options("names=syllables, pretrain_qa_rounds=0,qa_fraction=0.5") == {
        "names": "syllables",
        "pretrain_qa_rounds": 0,
        "qa_fraction": 0.5,
    }
    assert world_options("") == {}
    for bad, says in [
        ("seed=3", "KEY one of"),  # the demo's own --seed, not a world option
        ("names", "KEY=VALUE"),
        ("n_known=many", "n_known: expected int"),
        ("names=emoji", "names: expected one of pools, syllables"),
        ("qa_form=chat", "qa_form: expected one of roles, plain"),
    ]:
        with pytest.raises(ValueError, match=says):
            world_options(bad)


def test_a_plain_qa_world_writes_its_pretraining_qa_without_the_chat_role_words(world, tmp_path):
    """`qa_form=plain` changes how pretraining (and the tokenizer's text) writes Q/A, and nothing
    the chat phase, the raw corpus or the evaluation reads."""
    paths, w = world
    plain = build_world(tmp_path / "plain", seed=3, qa_form="plain", **SMALL)
    lines = [line for r in _read(plain["pretrain"]) for line in r["text"].split("\n")]
    qa = {p["name"] for p in w["people"] if p["qa"]}
    q_lines = [line for line in lines if line.startswith("Q: ")]
    assert len(q_lines) == len(qa) * len(ATTRIBUTES) * SMALL["pretrain_qa_rounds"]
    assert len([line for line in lines if line.startswith("A: ")]) == len(q_lines)
    assert not [line for line in lines if line.startswith(("user ", "assistant "))]
    assert not [r for r in _read(plain["tokenizer_corpus"]) if r.get("text", "").startswith("user ")]
    for key in ("raw", "chat", "qa_new", "chat_eval_new", "chat_eval_heldout", "chat_eval_format", "probe_new"):
        assert _text(plain[key]) == _text(paths[key]), key
    assert json.loads(Path(plain["world"]).read_text())["qa_form"] == "plain"
