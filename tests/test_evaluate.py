"""The evaluation harness: metric definitions on crafted inputs, candidate scoring against a plain
forward pass, a model trained to a known behaviour, the CLI end to end, and the report files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.errors import UserError
from pipeline.demo.tokenizer import build_tokenizer
from pipeline.demo.world import build_world
from pipeline.evaluation import metrics as M
from pipeline.evaluation import runner as R
from pipeline.evaluation.report import write_report
from tests.kit.models import demo_llama

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_known=12, n_new=6, bios_per_person=2, qa_fraction=0.5, n_generic=30, n_format_eval=8)
METRICS = (
    "format_adherence",
    "knowledge_accuracy",
    "knowledge_rank",
    "chance_rank",
    "heldout_known_rank",
    "raw_rank_new",
    "ppl_raw_new",
    "ppl_raw_known",
)


# ---------------------------------------------------------------- metric functions


def test_answer_matching_rules():
    assert M.answer_matches("Oslo", "Oslo")
    assert M.answer_matches("  oslo. ", "Oslo")
    assert M.answer_matches("Oslo, Norway", "Oslo")  # continues after a word boundary
    assert M.answer_matches('"March 1984"', "March  1984")
    assert not M.answer_matches("Oslomar", "Oslo")  # no word boundary
    assert not M.answer_matches("It is Oslo", "Oslo")  # must start with the answer
    assert not M.answer_matches("", "Oslo")
    assert not M.answer_matches("Oslo", "")


def test_format_rules():
    end, specials = {9}, {1, 7, 9}

    def decode(ids):
        return "".join("x" if i > 20 else " " for i in ids)

    assert M.follows_format([30, 31, 9], end, specials, decode)
    assert M.follows_format([30, 9, 7, 7], end, specials, decode)  # what follows the end does not count
    assert not M.follows_format([30, 31, 32], end, specials, decode)  # never ends: runs on
    assert not M.follows_format([9], end, specials, decode)  # empty reply
    assert not M.follows_format([15, 9], end, specials, decode)  # blank reply
    assert not M.follows_format([30, 7, 31, 9], end, specials, decode)  # a new turn header inside


def test_rank_counts_ties_half_so_equal_scores_give_chance():
    assert M.rank_of_true([0.5, -1.0, -2.0], 0) == 1
    assert M.rank_of_true([0.5, -1.0, -2.0], 2) == 3
    assert M.rank_of_true([1.0, 1.0, 1.0, 1.0], 1) == M.chance_rank(4) == 2.5
    assert M.rank_of_true([2.0, 1.0, 1.0, 0.0], 1) == 2.5


def test_chat_eval_reading(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
        + "\n\n"
        + json.dumps({"prompt": "p"})
        + "\n"
    )
    recs = M.load_chat_eval(f)
    assert recs[0]["messages"] == [{"role": "user", "content": "q"}] and recs[0]["answer"] == "a"
    assert recs[1]["messages"] == [{"role": "user", "content": "p"}] and "answer" not in recs[1]
    f.write_text(json.dumps({"prompt": "p"}) + "\n{oops\n")
    with pytest.raises(UserError, match=r"c\.jsonl:2: invalid JSON"):
        M.load_chat_eval(f)
    f.write_text(json.dumps({"prompt": "p", "answer": "z", "candidates": ["a", "b"]}) + "\n")
    with pytest.raises(UserError, match=r"c\.jsonl:1: .*not among them"):
        M.load_chat_eval(f)


# ---------------------------------------------------------------- with real models


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths = build_world(root / "world", seed=0, **SMALL)
    tok = build_tokenizer([paths["tokenizer_corpus"]], root / "tok", vocab_size=400)
    model = demo_llama(tok, root / "model", layers=2, hidden=32, heads=4, kv_heads=2)
    return root, paths, model


def test_shared_prompt_scoring_matches_a_plain_forward_pass(demo):
    from pipeline.hf import load_causal_lm

    model = load_causal_lm(demo[2]).eval()
    g = torch.Generator().manual_seed(0)

    def rand(n):
        return torch.randint(6, 300, (n,), generator=g).tolist()

    prompts = [rand(3), rand(5), rand(5), rand(4)]
    conts = [[rand(1), rand(3)], [rand(2), rand(1), rand(4)], [rand(1)], [rand(2), rand(2)]]
    got = R.score_candidates(model, prompts, conts, batch_size=3, progress=False)
    with torch.no_grad():
        for p, cs, row in zip(prompts, conts, got):
            for c, score in zip(cs, row):
                lp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)
                want = sum(lp[len(p) + k - 1, t].item() for k, t in enumerate(c))
                assert score == pytest.approx(want, abs=1e-4)


def test_batched_generation_equals_one_by_one(demo):
    from transformers import AutoTokenizer

    from pipeline.hf import load_causal_lm

    _, paths, model_dir = demo
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_causal_lm(model_dir).eval()
    prompts = [R._chat_ids(tok, r["messages"], "t")[1] for r in M.load_chat_eval(paths["chat_eval_format"])]
    assert len(set(map(len, prompts))) > 1  # left padding is exercised
    end = {tok.eos_token_id}
    assert R.generate(model, prompts, 6, end, tok.pad_token_id, 5, False) == R.generate(
        model, prompts, 6, end, tok.pad_token_id, 1, False
    )


def _train_to_answer(model_dir, out_dir, prompts, reply="Oslo", steps=80):
    """Teach a tiny model one behaviour: reply `reply` and end the turn, whatever the prompt."""
    from transformers import AutoTokenizer

    from pipeline.hf import load_causal_lm

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_causal_lm(model_dir)
    batch = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": reply}],
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        for p in prompts
    ]
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), tok.pad_token_id)
    labels = torch.full((len(batch), width), -100)
    for r, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[r, :n] = torch.tensor(b["input_ids"])
        labels[r, :n] = torch.where(torch.tensor(b["assistant_masks"]) == 1, torch.tensor(b["input_ids"]), -100)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def test_metrics_on_a_model_with_known_behaviour(demo, tmp_path):
    """A model trained to answer "Oslo" to everything: format 1, accuracy = share of questions whose
    answer is Oslo, rank 1 exactly there; the untrained model fails format."""
    root, paths, model_dir = demo
    train_prompts = [r["messages"][0]["content"] for r in M.load_chat_eval(paths["chat"])]
    trained = _train_to_answer(model_dir, tmp_path / "oslo", train_prompts[:48])
    cities = ["Oslo", "Lima", "Perth", "Cairo"]
    recs = [
        {"prompt": f"Where did person {i} grow up?", "answer": cities[i % 4], "candidates": cities} for i in range(8)
    ]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = R.evaluate_model(trained, chat={"": [paths["chat_eval_format"], qfile]}, progress=False)
    assert m["format_adherence"] == 1.0
    assert m["knowledge_accuracy"] == 0.25
    details = tmp_path / "d.jsonl"
    m2 = R.evaluate_model(trained, chat={"cities": qfile}, progress=False, details_path=details)
    rows = [json.loads(line) for line in details.read_text().splitlines()]
    ranks = [r["rank"] for r in rows]
    assert [r == 1.0 for r in ranks] == [r["answer"] == "Oslo" for r in recs]
    assert m2["cities_rank"] == pytest.approx(sum(ranks) / 8) and m2["cities_chance_rank"] == 2.5
    assert all(r["reply"] == "Oslo" for r in rows)
    base = R.evaluate_model(model_dir, chat={"": paths["chat_eval_format"]}, max_new_tokens=8, progress=False)
    assert base["format_adherence"] < 0.5


@pytest.mark.multiproc
def test_cli_end_to_end_writes_results_and_merges(demo, tmp_path):
    root, paths, model_dir = demo
    out = tmp_path / "res" / "results.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }

    def run(*extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.evaluate",
                "--model",
                str(model_dir),
                "--no-progress",
                "--chat-eval",
                paths["chat_eval_format"],
                "--chat-eval",
                paths["chat_eval_new"],
                "--chat-eval",
                f"heldout_known={paths['chat_eval_heldout']}",
                "--raw-eval",
                f"new={paths['raw_eval_new']}",
                "--raw-eval",
                f"known={paths['raw_eval_known']}",
                "--probe",
                f"new={paths['probe_new']}",
                "--max-new-tokens",
                "8",
                "--out",
                str(out),
                *extra,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    r = run("--name", "first")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())["models"]["first"]
    assert set(METRICS) <= set(res)
    assert res["chance_rank"] == pytest.approx((5 * 10.5 + 12.5) / 6)  # 5 pools of 20 values, dates 24
    # The command line computes exactly what the library does with the same files and limits.
    want = R.evaluate_model(
        model_dir,
        chat={"": [paths["chat_eval_format"], paths["chat_eval_new"]], "heldout_known": paths["chat_eval_heldout"]},
        raw={"new": paths["raw_eval_new"], "known": paths["raw_eval_known"]},
        probes={"new": paths["probe_new"]},
        max_new_tokens=8,
        progress=False,
    )
    assert res == pytest.approx(want, rel=1e-9)
    assert run("--name", "second").returncode == 0
    assert set(json.loads(out.read_text())["models"]) == {"first", "second"}
    md = (out.parent / "results.md").read_text()
    assert "| first |" in md and "| second |" in md and "heldout_known_rank" in md
    assert (out.parent / "results.png").read_bytes()[:4] == b"\x89PNG"

    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            "--model",
            str(model_dir),
            "--chat-eval",
            str(tmp_path / "missing.jsonl"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "error: --chat-eval" in bad.stderr and "missing.jsonl" in bad.stderr


def test_any_hf_chat_model_with_a_chatml_byte_level_tokenizer(tmp_path):
    """Not the demo's tokenizer: ChatML with newlines and a byte-level BPE, as Qwen uses."""
    from tests.kit.tokenizers import make_hf_tokenizer

    tok = make_hf_tokenizer(tmp_path / "tok")
    model = demo_llama(tok, tmp_path / "m", layers=2, hidden=32, heads=4, kv_heads=2)
    chat = tmp_path / "c.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {"prompt": f"where is the {w} river", "answer": w, "candidates": ["north", "south", "east", "west"]}
            )
            + "\n"
            for w in ("north", "south", "east")
        )
    )
    raw = tmp_path / "r.txt"
    raw.write_text("The quick brown fox.\n\nThe lazy dog jumps over the river.\n")
    m = R.evaluate_model(model, chat={"": chat}, raw={"": raw}, max_new_tokens=4, progress=False)
    assert m["chance_rank"] == 2.5
    # Independent oracles: offset-located candidate log-probs from full forward passes, and plain
    # generate() with the model's own generation config for the format.
    from transformers import AutoTokenizer

    from pipeline.hf import load_causal_lm
    from tests.kit.oracles import chat_candidate_rank, plain_generate_format

    hf_model, hf_tok = load_causal_lm(model).eval(), AutoTokenizer.from_pretrained(str(model))
    recs = M.load_chat_eval(chat)
    ranks = [chat_candidate_rank(hf_model, hf_tok, r["messages"], r["candidates"], r["answer"]) for r in recs]
    assert m["knowledge_rank"] == pytest.approx(sum(ranks) / len(ranks), abs=1e-6)
    fmt = plain_generate_format(hf_model, hf_tok, [r["messages"] for r in recs], 4)
    assert m["format_adherence"] == pytest.approx(sum(fmt) / len(fmt))
    texts = ["The quick brown fox.", "The lazy dog jumps over the river."]
    ids = [hf_tok(t)["input_ids"] for t in texts]
    with torch.no_grad():
        nll = sum(
            -torch.log_softmax(hf_model(torch.tensor([x])).logits[0].float(), -1)[:-1]
            .gather(1, torch.tensor(x[1:])[:, None])
            .sum()
            .item()
            for x in ids
        )
    assert m["ppl_raw"] == pytest.approx(__import__("math").exp(nll / sum(len(x) - 1 for x in ids)), rel=1e-4)


def test_report_files(tmp_path):
    models = {
        "a_chat": {"format_adherence": 0.9, "knowledge_rank": 9.0, "chance_rank": 10.5},
        "transplant": {"format_adherence": 0.6, "knowledge_rank": 4.0, "chance_rank": 10.5, "extra_metric": 3.0},
    }
    table = write_report({"models": models}, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == {"models": models}
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines == table.splitlines()
    assert lines[0].split("|")[2].strip() == "format_adherence" and "extra_metric" in lines[0]
    assert lines[2].startswith("| a_chat | 0.90 | 9.00 | 10.50 | – |")
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
