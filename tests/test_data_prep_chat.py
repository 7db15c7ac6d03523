"""`python -m data_prep chat`: loss masks token by token, templates, bad records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.__main__ import main
from data_prep.tokenizer import load_tokenizer
from tests.kit import tokenizers as F
from tests.kit.tokenizers import read_shard


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return {"hf": F.make_hf_tokenizer(d / "hf"), "bare": F.make_hf_tokenizer(d / "bare", chat_template=None)}


def run_cli(*argv) -> None:
    main([str(a) for a in argv])


def stored(manifest: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, mask) of every stored conversation, train then val, read by hand."""
    m = json.loads(manifest.read_text())
    out = []
    for split in ("train", "val"):
        for r in m["shards"]:
            if r["split"] == split:
                _, toks = read_shard(manifest.parent, r["tokens_file"]["bin"][:-4])
                dt, masks = read_shard(manifest.parent, r["mask_file"]["bin"][:-4])
                assert dt == np.uint8 and [len(t) for t in toks] == [len(x) for x in masks]
                out += list(zip(toks, masks))
    return out


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of 1s."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def chatml(msgs: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)


def check_masks(manifest: Path, convs: list[list[dict]], tok, render, eot: str) -> None:
    got = stored(manifest)
    assert len(got) == len(convs)
    by_text = {render(c): c for c in convs}
    for tokens, mask in got:
        text = tok.decode(tokens)
        assert text in by_text, "a stored conversation is not the template's rendering"
        c = by_text.pop(text)
        answers = [m["content"] + eot for m in c if m["role"] == "assistant"]
        # Exactly one run of masked tokens per assistant turn, decoding to its content and
        # end-of-turn token: nothing of the header before it, nothing of what follows.
        assert [tok.decode(tokens[a:b]) for a, b in runs(mask)] == answers
        # And the unmasked tokens are exactly everything else.
        rest = text
        for ans in answers:
            rest = rest.replace(ans, "", 1)
        assert tok.decode(tokens[mask == 0]) == rest
    assert not by_text


@pytest.mark.parametrize("sharegpt", [False, True])
def test_mask_marks_exactly_assistant_tokens(tmp_path, toks, sharegpt):
    records = F.conversations(40, seed=4, sharegpt=sharegpt)
    F.write_jsonl(tmp_path / "c.jsonl", records)
    out = tmp_path / "chat"
    run_cli(
        "chat",
        tmp_path / "c.jsonl",
        "--tokenizer",
        toks["hf"],
        "--output-prefix",
        out,
        "--val-fraction",
        "0.2",
        "--shard-tokens",
        "800",
    )
    convs = [r["messages"] for r in F.conversations(40, seed=4)]  # the OpenAI form of the same
    tok = load_tokenizer(toks["hf"])
    check_masks(tmp_path / "chat.manifest.json", convs, tok, chatml, "<|im_end|>")
    m = json.loads((tmp_path / "chat.manifest.json").read_text())
    assert m["kind"] == "chat" and m["skipped_records"] == 0 and m["totals"]["train"]["shards"] > 1
    assert all("mask_file" in r for r in m["shards"]) and m["totals"]["val"]["documents"] > 0
    total_mask = sum(int(x.sum()) for _, x in stored(tmp_path / "chat.manifest.json"))
    assert m["assistant_tokens"] == total_mask


TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' %}### Assistant:\n"
    "{{ m.content }}{{ eos_token }}\n{% else %}### {{ m.role|capitalize }}:\n{{ m.content }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def plain(msgs: list[dict]) -> str:
    out = ""
    for m in msgs:
        if m["role"] == "assistant":
            out += f"### Assistant:\n{m['content']}<|endoftext|>\n"
        else:
            out += f"### {m['role'].capitalize()}:\n{m['content']}\n"
    return out


def test_chat_template_file(tmp_path, toks):
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    records = F.conversations(15, seed=6)
    F.write_jsonl(tmp_path / "c.jsonl", records)
    # The tokenizer without a template of its own: --chat-template supplies it.
    run_cli(
        "chat",
        tmp_path / "c.jsonl",
        "--tokenizer",
        toks["bare"],
        "--chat-template",
        tmp_path / "t.jinja",
        "--output-prefix",
        tmp_path / "chat",
        "--val-fraction",
        "0",
    )
    tok = load_tokenizer(toks["bare"])
    check_masks(tmp_path / "chat.manifest.json", [r["messages"] for r in records], tok, plain, "<|endoftext|>")


def test_no_template_is_a_clear_error(tmp_path, toks, capsys):
    F.write_jsonl(tmp_path / "c.jsonl", F.conversations(2))
    with pytest.raises(SystemExit):
        run_cli("chat", tmp_path / "c.jsonl", "--tokenizer", toks["bare"], "--output-prefix", tmp_path / "o" / "chat")
    err = capsys.readouterr().err
    assert str(toks["bare"]) in err and "--chat-template" in err
    assert not (tmp_path / "o").exists()


BAD = [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    (
        '{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
        "unknown role 'wizard'",
    ),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}', "empty content"),
]


@pytest.mark.parametrize("line, why", BAD)
def test_bad_record_names_file_and_line(tmp_path, toks, capsys, line, why):
    good = json.dumps(F.conversations(1)[0])
    (tmp_path / "c.jsonl").write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(SystemExit) as e:
        run_cli("chat", tmp_path / "c.jsonl", "--tokenizer", toks["hf"], "--output-prefix", tmp_path / "o" / "chat")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "c.jsonl:3: " in err and why in err and "--skip-bad" in err
    assert not (tmp_path / "o").exists()  # not even an empty folder


def test_skip_bad_counts_in_manifest(tmp_path, toks):
    goods = F.conversations(5, seed=8)
    lines = [json.dumps(g) for g in goods[:3]] + [b for b, _ in BAD] + [json.dumps(g) for g in goods[3:]]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    run_cli(
        "chat",
        tmp_path / "c.jsonl",
        "--tokenizer",
        toks["hf"],
        "--output-prefix",
        tmp_path / "chat",
        "--skip-bad",
        "--val-fraction",
        "0",
    )
    m = json.loads((tmp_path / "chat.manifest.json").read_text())
    assert m["skipped_records"] == 4 and m["totals"]["train"]["documents"] == 5
    assert [e.split(": ", 1)[0].rsplit(":", 1)[1] for e in m["skipped_examples"]] == ["4", "5", "6", "7"]
    check_masks(
        tmp_path / "chat.manifest.json",
        [g["messages"] for g in goods],
        load_tokenizer(toks["hf"]),
        chatml,
        "<|im_end|>",
    )


GENERATION_CHATML = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_mask_agrees_with_generation_markers(tmp_path, toks):
    """Cross-check against transformers' own {% generation %} assistant mask."""
    (tmp_path / "t.jinja").write_text(GENERATION_CHATML)
    records = F.conversations(25, seed=13)
    F.write_jsonl(tmp_path / "c.jsonl", records)
    run_cli(
        "chat",
        tmp_path / "c.jsonl",
        "--tokenizer",
        toks["bare"],
        "--chat-template",
        tmp_path / "t.jinja",
        "--output-prefix",
        tmp_path / "chat",
        "--val-fraction",
        "0",
    )
    tok = load_tokenizer(toks["bare"])
    tok.chat_template = GENERATION_CHATML
    got = stored(tmp_path / "chat.manifest.json")
    for rec, (tokens, mask) in zip(records, got):
        ref = tok.apply_chat_template(
            rec["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert list(tokens) == list(ref["input_ids"])
        assert list(mask) == list(ref["assistant_masks"])
    assert len(got) == len(records)


def test_content_as_a_list_of_text_parts(tmp_path, toks):
    """The OpenAI format allows content as parts; the text parts are one message's text."""
    plain = [{"role": "user", "content": "Where is Oslo?\nIn the north?"}, {"role": "assistant", "content": "Norway."}]
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Where is Oslo?"}, {"type": "text", "text": "In the north?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Norway."}]},
    ]
    for name, msgs in (("plain", plain), ("parts", parts)):
        f = F.write_jsonl(tmp_path / f"{name}.jsonl", [{"messages": msgs}] * 3)
        run_cli("chat", f, "--tokenizer", toks["hf"], "--output-prefix", tmp_path / name, "--val-fraction", "0")
    a, b = stored(tmp_path / "plain.manifest.json"), stored(tmp_path / "parts.manifest.json")
    assert len(a) == len(b) == 3 and all((x[0] == y[0]).all() and (x[1] == y[1]).all() for x, y in zip(a, b))
    img = F.write_jsonl(
        tmp_path / "img.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                    {"role": "assistant", "content": "a cat"},
                ]
            }
        ],
    )
    with pytest.raises(SystemExit):
        run_cli("chat", img, "--tokenizer", toks["hf"], "--output-prefix", tmp_path / "img")


def _masked_turns(manifest: Path, tok) -> list[list[str]]:
    """Per stored conversation, the decoded text of each masked run (each assistant turn)."""
    return [[tok.decode(t[a:b]) for a, b in runs(m)] for t, m in stored(manifest)]


def test_a_qwen3_template_trains_each_turn_as_it_renders(tmp_path):
    """Qwen3 gives only the final assistant turn a think block and (enable_thinking=False) adds one to
    its generation prompt: an earlier turn's prompt and its last-turn form are not prefixes of the
    whole. Each turn is still located and trains `content<|im_end|>`: for the last one the think
    block is part of the generation prompt, as at inference."""
    tok_dir = F.make_hf_tokenizer(tmp_path / "qwen3", chat_template=F.QWEN3)
    convs = [
        [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "green river"},
        ],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "three"},
            {"role": "assistant", "content": "blue"},
        ],
    ]
    F.write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs])
    run_cli(
        "chat",
        tmp_path / "c.jsonl",
        "--tokenizer",
        tok_dir,
        "--output-prefix",
        tmp_path / "out/chat",
        "--val-fraction",
        "0",
    )
    tok = load_tokenizer(tok_dir)
    got = sorted(_masked_turns(tmp_path / "out/chat.manifest.json", tok))
    assert got == sorted([["red<|im_end|>", "green river<|im_end|>"], ["blue<|im_end|>"]])
    texts = sorted(tok.decode(t) for t, _ in stored(tmp_path / "out/chat.manifest.json"))
    assert texts[1].count("<think>") == 1 and "assistant\nred<|im_end|>" in texts[1]  # as the template renders


def test_a_llama3_template_with_a_dated_system_message(tmp_path):
    """Llama 3.2 opens every conversation with a system header dated through strftime_now: the
    shards hold the packing day's date, and each turn trains its trimmed `content<|eot_id|>`."""
    import datetime

    tok_dir = F.make_hf_tokenizer(
        tmp_path / "llama", chat_template=F.LLAMA3, extra_specials=F.LLAMA3_SPECIALS, bos_token="<|begin_of_text|>"
    )
    convs = [
        [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": " red "},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "green"},
        ]
    ] * 3
    F.write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs])
    run_cli(
        "chat",
        tmp_path / "c.jsonl",
        "--tokenizer",
        tok_dir,
        "--output-prefix",
        tmp_path / "out/chat",
        "--val-fraction",
        "0",
    )
    tok = load_tokenizer(tok_dir)
    assert _masked_turns(tmp_path / "out/chat.manifest.json", tok) == [["red<|eot_id|>", "green<|eot_id|>"]] * 3
    texts = {tok.decode(t) for t, _ in stored(tmp_path / "out/chat.manifest.json")}
    assert len(texts) == 1 and f"Today Date: {datetime.date.today():%d %b %Y}" in texts.pop()
    m = json.loads((tmp_path / "out/chat.manifest.json").read_text())
    assert m["end_of_turn_ids"] == [tok.convert_tokens_to_ids("<|eot_id|>")]


def test_a_template_that_rewrites_history_names_the_record_and_the_message(tmp_path, capsys):
    # Renders only the last two messages: earlier turns vanish from the whole conversation.
    last_two = (
        "{% for m in messages[-2:] %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    (tmp_path / "t.jinja").write_text(last_two)
    ok = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    F.write_jsonl(tmp_path / "c.jsonl", [{"messages": ok}, {"messages": ok + ok}])
    with pytest.raises(SystemExit) as e:
        run_cli(
            "chat",
            tmp_path / "c.jsonl",
            "--tokenizer",
            F.make_hf_tokenizer(tmp_path / "tok"),
            "--chat-template",
            tmp_path / "t.jinja",
            "--output-prefix",
            tmp_path / "out/chat",
        )
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"{tmp_path / 'c.jsonl'}:2:" in err and "message 3 (assistant)" in err and "t.jinja" in err, err
