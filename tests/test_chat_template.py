"""One chat template from data_prep to the shipped model: the template that rendered the chat shards is
the one export, transplant (with --chat or --donor) and chat vector ship, and its end-of-turn token
stops plain `generate()`. Templates that disagree are resolved by the documented rule or refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList

from data_prep.errors import UserError
from pipeline.convert.chat_vector import chat_vector
from pipeline.convert.export import export_run
from pipeline.convert.transplant import donor_transplant, transplant
from tests.kit.runs import CHAT_TEMPLATE, make_base, make_run, make_tokenizer
from tests.kit.tokenizers import CHATML, read_shard
from tests.kit.train import build_template_setup, run_train, write_config

sha = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The reported situation: a base without a chat template, chat data packed with a ChatML file,
    a short chat run (4 steps of the real trainer), and a hand-built A-Raw of the same base."""
    root = tmp_path_factory.mktemp("template")
    setup = build_template_setup(root / "setup")
    cfg = write_config(root / "chat.yaml", setup, "chat", root / "a-chat", steps=4, save_every=4)
    run_train([str(cfg)])
    raw = make_run(root / "a-raw", setup["model"], "raw", raw_start=1, format_start=3)
    return {**setup, "chat_run": root / "a-chat", "raw_run": raw.path, "out": root / "out"}


@pytest.fixture(scope="module")
def shipped(trained):
    """Every way a chat model leaves the pipeline, each built once: {name: output directory}."""
    out, chat, raw = trained["out"], trained["chat_run"], trained["raw_run"]
    export_run(chat, out / "export")
    transplant(raw, chat, out / "transplant")
    chat_vector(raw, chat, trained["model"], out / "chat_vector")
    donor_transplant(raw, out / "export", out / "donor")  # the exported A-Chat as an instruct donor
    return {name: out / name for name in ("export", "transplant", "chat_vector", "donor")}


def conversations(setup: dict) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in setup["conversations"].read_text().splitlines()]


def shard_documents(manifest: Path) -> list[tuple[int, ...]]:
    """Every stored conversation's token ids, read from the shards by hand."""
    out = []
    for r in json.loads(manifest.read_text())["shards"]:
        _, docs = read_shard(manifest.parent, r["tokens_file"]["bin"][:-4])
        out += [tuple(int(t) for t in d) for d in docs]
    return out


class Script(LogitsProcessor):
    """Makes the model emit `ids`, one per step, whatever it would have said: a model that writes
    an assistant reply, its end-of-turn token, and then goes on (as an untrained one would)."""

    def __init__(self, prompt_len: int, ids: list[int]):
        self.prompt_len, self.ids = prompt_len, ids

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[input_ids.shape[1] - self.prompt_len]] = 0.0
        return forced


def test_the_chat_run_records_the_template_its_data_was_rendered_with(trained):
    manifest = json.loads(trained["chat"].read_text())
    assert manifest["chat_template"] == CHATML and manifest["chat_template_sha256"] == sha(CHATML)
    rec = json.loads((trained["chat_run"] / "run.json").read_text())["chat_template"]
    assert rec["text"] == CHATML and rec["sha256"] == sha(CHATML)
    assert rec["manifest"] == str(trained["chat"].resolve()) and str(trained["template"].resolve()) in rec["from"]
    assert AutoTokenizer.from_pretrained(str(trained["model"])).chat_template is None  # the base has none


@pytest.mark.parametrize("name", ["export", "transplant", "chat_vector", "donor"])
def test_the_shipped_tokenizer_renders_the_training_data_byte_for_byte(shipped, trained, name):
    tok = AutoTokenizer.from_pretrained(str(shipped[name]))
    assert tok.chat_template == CHATML, f"{name} ships {tok.chat_template!r}, not the data's template"
    convs = conversations(trained)
    want = [tuple(tok.apply_chat_template(c, tokenize=True)["input_ids"]) for c in convs]
    assert sorted(shard_documents(trained["chat"])) == sorted(want)
    texts = sorted(tok.decode(list(d)) for d in shard_documents(trained["chat"]))
    assert texts == sorted(tok.apply_chat_template(c, tokenize=False) for c in convs)


@pytest.mark.parametrize("name", ["export", "transplant", "chat_vector", "donor"])
def test_plain_generate_stops_at_the_end_of_the_assistant_turn(shipped, trained, name):
    out = shipped[name]
    tok = AutoTokenizer.from_pretrained(str(out))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    conv = next(c for c in conversations(trained) if c[0]["role"] == "user" and len(c) >= 4)
    # Rendered with the data's template itself, so this checks the stop, not the shipped template.
    prompt = tok.apply_chat_template(conv[:1], chat_template=CHATML, add_generation_prompt=True)["input_ids"]
    full = tok.apply_chat_template(conv, chat_template=CHATML)["input_ids"]
    assert full[: len(prompt)] == prompt
    script = full[len(prompt) :]  # the reply, <|im_end|>, then the next turns
    end = script.index(im_end)
    assert len(script) > end + 5
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # with out/generation_config.json
    ids = torch.tensor([prompt])
    with torch.no_grad():
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=len(script),
            logits_processor=LogitsProcessorList([Script(len(prompt), script)]),
            pad_token_id=tok.pad_token_id,
        )
    new = gen[0, len(prompt) :].tolist()
    assert new == script[: end + 1], f"{name}: generate() ran past <|im_end|>: {tok.decode(new)!r}"
    assert tok.decode(new) == conv[1]["content"] + "<|im_end|>"
    eos = GenerationConfig.from_pretrained(str(out)).eos_token_id  # read by transformers, not the product
    eos = eos if isinstance(eos, list) else [eos]
    assert im_end in eos and tok.eos_token_id in eos  # the turn's end, and still the text's end


def test_the_manifest_records_the_template_and_its_end_of_turn_token(trained):
    m = json.loads(trained["chat"].read_text())
    tok = AutoTokenizer.from_pretrained(str(trained["tokenizer"]))
    assert m["end_of_turn_ids"] == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert m["chat_template_from"] == f"--chat-template {trained['template'].resolve()}"


def test_a_template_without_an_end_of_turn_token_is_warned_about(trained, tmp_path, capsys):
    from data_prep.__main__ import main as data_prep_main

    (tmp_path / "plain.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    data_prep_main(
        [
            "chat",
            str(trained["conversations"]),
            "--tokenizer",
            str(trained["tokenizer"]),
            "--chat-template",
            str(tmp_path / "plain.jinja"),
            "--output-prefix",
            str(tmp_path / "chat"),
            "--val-fraction",
            "0",
        ]
    )
    assert "ends an assistant turn with no special token" in capsys.readouterr().err
    assert json.loads((tmp_path / "chat.manifest.json").read_text())["end_of_turn_ids"] == []


# ---------------------------------------------------------------------------------------------
# Conflicts. The kit's word-level tokenizer: CHAT_TEMPLATE ends a turn with </s> (its eos), OTHER
# ends an assistant turn with <|user|> (id 3), so the shipped stop token shows which one shipped.

OTHER = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% if m['role'] == 'assistant' %}<|user|> "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
USER_ID = 3


def gen_eos(out: Path) -> list[int]:
    eos = GenerationConfig.from_pretrained(str(out)).eos_token_id
    return eos if isinstance(eos, list) else [eos]


def assert_nothing_written(out: Path):
    assert not out.exists() and not list(out.parent.glob(f".tmp-{out.name}*"))


@pytest.mark.parametrize("layout", ["chat_template.jinja", "tokenizer_config.json"])
def test_the_data_template_replaces_the_tokenizer_template_and_says_so(tmp_path, capsys, layout):
    base = make_base(tmp_path / "base")
    tok_dir = make_tokenizer(tmp_path / "chat-tok", chat_template=True)
    if layout == "tokenizer_config.json":  # the older layout: the template inside the config
        cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
        cfg["chat_template"] = (tok_dir / "chat_template.jinja").read_text()
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
        (tok_dir / "chat_template.jinja").unlink()
    assert AutoTokenizer.from_pretrained(str(tok_dir)).chat_template == CHAT_TEMPLATE
    make_run(tmp_path / "run", base, "chat", tokenizer=tok_dir, chat_template=OTHER)
    rec = export_run(tmp_path / "run", tmp_path / "out")
    out = tmp_path / "out"
    err = capsys.readouterr().err
    assert "was trained with (its chat data" in err and f"the tokenizer's own template ({tok_dir}, sha256" in err
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == OTHER
    if layout == "tokenizer_config.json":  # every reader sees the same template
        assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == OTHER
    assert rec["chat_template"]["sha256"] == sha(OTHER) and rec["chat_template"]["trained"]
    assert rec["chat_template"]["tokenizer_template"] == f"replaced (sha256 {sha(CHAT_TEMPLATE)})"
    assert rec["chat_template"]["written_to"] == [layout] and "chat template replaced by" in rec["copied"][layout]
    assert USER_ID in gen_eos(out) and 2 in gen_eos(out)  # the shipped template's end of turn, and eos
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


def test_a_run_without_chat_data_ships_its_tokenizer_template_unchanged(tmp_path, capsys):
    base = make_base(tmp_path / "base")
    tok_dir = make_tokenizer(tmp_path / "chat-tok", chat_template=True)
    make_run(tmp_path / "run", base, "raw", tokenizer=tok_dir)
    rec = export_run(tmp_path / "run", tmp_path / "out")
    assert "note:" not in capsys.readouterr().err
    assert (tmp_path / "out/chat_template.jinja").read_bytes() == (tok_dir / "chat_template.jinja").read_bytes()
    assert rec["chat_template"]["tokenizer_template"] == "kept" and not rec["chat_template"]["trained"]


def _merge(tool: str, tmp: Path, raw: Path, fmt: Path, base: Path, out: Path, **kw):
    if tool == "transplant":
        return transplant(raw, fmt, out, **kw)
    if tool == "chat_vector":
        return chat_vector(raw, fmt, base, out, **kw)
    return donor_transplant(raw, fmt, out, **kw)


@pytest.mark.parametrize("tool", ["transplant", "chat_vector", "donor"])
def test_a_merge_of_models_trained_with_different_templates_is_refused_unless_chosen(tmp_path, tool):
    base = make_base(tmp_path / "base")
    tok_dir = make_tokenizer(tmp_path / "chat-tok", chat_template=True)
    raw = make_run(tmp_path / "a-raw", base, "raw", raw_start=1, format_start=2, chat_template=OTHER)
    if tool == "donor":  # an instruct model: its own template, no record; it ships that one
        fmt = make_tokenizer(make_base(tmp_path / "instruct", seed=3), chat_template=True)
        fmt_file, side = fmt, "donor"
    else:
        fmt = make_run(
            tmp_path / "a-chat",
            base,
            "chat",
            raw_start=1,
            format_start=2,
            tokenizer=tok_dir,
            chat_template=CHAT_TEMPLATE,
        ).path
        fmt_file, side = fmt / "run.json", "chat"
    with pytest.raises(UserError) as e:
        _merge(tool, tmp_path, raw.path, fmt, base, tmp_path / "out")
    msg = str(e.value)
    assert str(raw.path / "run.json") in msg and str(fmt_file) in msg
    assert f"--chat-template-from {side}" in msg and "another chat template" in msg
    assert_nothing_written(tmp_path / "out")
    with pytest.raises(UserError, match="--chat-template-from nope: this merge's inputs are"):
        _merge(tool, tmp_path, raw.path, fmt, base, tmp_path / "out", chat_template_from="nope")

    rec = _merge(tool, tmp_path, raw.path, fmt, base, tmp_path / "fmt", chat_template_from=side)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "fmt")).chat_template == CHAT_TEMPLATE
    assert f"chosen by --chat-template-from {side}" in rec["chat_template"]["from"]
    assert USER_ID not in gen_eos(tmp_path / "fmt")
    rec = _merge(tool, tmp_path, raw.path, fmt, base, tmp_path / "raw", chat_template_from="raw")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "raw")).chat_template == OTHER
    assert rec["chat_template"]["sha256"] == sha(OTHER) and USER_ID in gen_eos(tmp_path / "raw")


def test_an_exported_model_remembers_its_trained_template_in_later_merges(tmp_path):
    """export.json records the template the weights were trained with, so an exported A-Raw that
    trained on chat counts in a merge like its run would (an HF directory says nothing else)."""
    base = make_base(tmp_path / "base")
    tok_dir = make_tokenizer(tmp_path / "chat-tok", chat_template=True)
    raw = make_run(tmp_path / "a-raw", base, "raw", raw_start=1, format_start=2, chat_template=OTHER)
    export_run(raw.path, tmp_path / "raw-hf")
    chat = make_run(
        tmp_path / "a-chat", base, "chat", raw_start=1, format_start=2, tokenizer=tok_dir, chat_template=CHAT_TEMPLATE
    )
    with pytest.raises(UserError, match=r"--raw .*raw-hf was trained with another chat template .*raw-hf/export\.json"):
        transplant(tmp_path / "raw-hf", chat.path, tmp_path / "out")
    # A base model's tokenizer template (no record of training on it) never conflicts.
    plain_raw = make_run(tmp_path / "plain-raw", base, "raw", raw_start=1, format_start=2, tokenizer=tok_dir)
    export_run(plain_raw.path, tmp_path / "plain-raw-hf")
    transplant(tmp_path / "plain-raw-hf", chat.path, tmp_path / "out", format_start=2)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).chat_template == CHAT_TEMPLATE


def test_chat_data_rendered_with_two_templates_is_refused_before_training(trained, tmp_path):
    from data_prep.__main__ import main as data_prep_main
    from pipeline.config import load_config
    from pipeline.training.plan import build_plan

    (tmp_path / "other.jinja").write_text(CHATML.replace("'\\n' }}{% endfor %}", "'\\n\\n' }}{% endfor %}"))
    data_prep_main(
        [
            "chat",
            str(trained["conversations"]),
            "--tokenizer",
            str(trained["model"]),
            "--chat-template",
            str(tmp_path / "other.jinja"),
            "--output-prefix",
            str(tmp_path / "other"),
            "--val-fraction",
            "0",
        ]
    )
    other = tmp_path / "other.manifest.json"
    cfg = write_config(
        tmp_path / "c.yaml",
        trained,
        "chat",
        tmp_path / "run",
        data=[{"path": str(trained["chat"]), "weight": 1}, {"path": str(other), "weight": 1}],
    )
    with pytest.raises(UserError, match="were rendered with different chat templates") as e:
        build_plan(load_config(cfg), world_size=1, use_gpu=False)
    assert str(trained["chat"]) in str(e.value) and str(other) in str(e.value)
    # The same template twice is one format: fine, and recorded once.
    cfg = write_config(
        tmp_path / "d.yaml",
        trained,
        "chat",
        tmp_path / "run",
        data=[{"path": str(trained["chat"]), "weight": 1}, {"path": str(trained["chat"]), "weight": 2}],
    )
    plan = build_plan(load_config(cfg), world_size=1, use_gpu=False)
    assert plan.record()["chat_template"]["sha256"] == sha(CHATML)
    assert "chat template: the one chat.manifest.json was rendered with" in plan.layer_map()


def test_resuming_after_the_data_was_repacked_with_another_template_is_refused(tmp_path):
    from pipeline.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    rec = {"config": {}, "base_model": {"fingerprint": "f"}, "chat_template": {"sha256": "a" * 64}}
    rd.write_run(rec, set())
    rd.write_run(rec, set())  # unchanged: resumes
    with pytest.raises(UserError, match=r"run\.json: the chat data's template has changed since this run started"):
        rd.write_run({**rec, "chat_template": {"sha256": "b" * 64}}, set())


@pytest.mark.multiproc
def test_the_cli_refuses_a_template_conflict_with_exit_2_and_the_flag_chooses(tmp_path):
    import subprocess
    import sys

    from tests.kit.train import REPO, env

    base = make_base(tmp_path / "base")
    tok_dir = make_tokenizer(tmp_path / "chat-tok", chat_template=True)
    raw = make_run(tmp_path / "a-raw", base, "raw", raw_start=1, format_start=2, chat_template=OTHER)
    chat = make_run(
        tmp_path / "a-chat", base, "chat", raw_start=1, format_start=2, tokenizer=tok_dir, chat_template=CHAT_TEMPLATE
    )
    cmd = [
        sys.executable,
        "-m",
        "pipeline.transplant",
        "--raw",
        str(raw.path),
        "--chat",
        str(chat.path),
        "--out",
        str(tmp_path / "out"),
    ]
    run = lambda *extra: subprocess.run(cmd + list(extra), cwd=REPO, env=env(), capture_output=True, text=True)  # noqa: E731
    p = run()
    assert p.returncode == 2 and p.stderr.startswith("error: --raw ") and "Traceback" not in p.stderr
    assert str(raw.path / "run.json") in p.stderr and str(chat.path / "run.json") in p.stderr
    assert_nothing_written(tmp_path / "out")
    p = run("--chat-template-from", "donor")
    assert p.returncode == 2 and "--chat-template-from donor: there is no --donor" in p.stderr
    p = run("--chat-template-from", "chat")
    assert p.returncode == 0, p.stderr
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).chat_template == CHAT_TEMPLATE
