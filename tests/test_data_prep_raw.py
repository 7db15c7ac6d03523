"""`python -m data_prep raw`: round trip, MMIDIDX bytes, dtype, determinism, crash safety, errors."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.__main__ import main
from data_prep.mmidx import token_dtype
from data_prep.tokenizer import load_tokenizer, tokenizer_identity
from tests.kit import tokenizers as F
from tests.kit.tokenizers import read_shard

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return {"sp": F.make_sp_model(d / "sp"), "hf": F.make_hf_tokenizer(d / "hf")}


def run_cli(*argv) -> None:
    """Run the real entry point in-process (a subprocess would spend seconds importing)."""
    main([str(a) for a in argv])


def split_docs(manifest: Path, split: str) -> list[np.ndarray]:
    m = json.loads(manifest.read_text())
    out = []
    for r in m["shards"]:
        if r["split"] == split:
            _, docs = read_shard(manifest.parent, r["tokens_file"]["bin"][: -len(".bin")])
            assert len(docs) == r["documents"] and sum(map(len, docs)) == r["tokens"]
            out += docs
    return out


def make_corpus(root: Path, n: int = 120, seed: int = 0) -> tuple[list[str], list[Path]]:
    """The same kind of documents in every input format; returns (texts in order, inputs)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = F.documents(n, seed=seed)
    parts = [texts[: n // 4], texts[n // 4 : n // 2], texts[n // 2 : 3 * n // 4], texts[3 * n // 4 :]]
    F.write_jsonl(root / "a.jsonl", [{"id": i, "body": t} for i, t in enumerate(parts[0])])
    pq.write_table(pa.table({"body": parts[1]}), root / "b.parquet")
    datasets.Dataset.from_dict({"body": parts[2], "n": list(range(len(parts[2])))}).save_to_disk(str(root / "c_saved"))
    (root / "d_txt").mkdir()
    for i, t in enumerate(parts[3]):
        (root / "d_txt" / f"{i:03d}.txt").write_text(t)
    return texts, [root / "a.jsonl", root / "b.parquet", root / "c_saved", root / "d_txt"]


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_round_trip_every_format(tmp_path, toks, kind):
    texts, inputs = make_corpus(tmp_path)
    # A .txt file is a whole document whatever its key; the others are read under --text-key.
    out = tmp_path / "out" / "corpus"
    run_cli(
        "raw",
        *inputs,
        "--text-key",
        "body",
        "--tokenizer",
        toks[kind],
        "--output-prefix",
        out,
        "--val-fraction",
        "0.2",
        "--shard-tokens",
        "1500",
    )
    manifest = out.with_name("corpus.manifest.json")
    m = json.loads(manifest.read_text())
    tok = load_tokenizer(toks[kind])
    eos = tok.eos_token_id
    expected = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]

    train, val = split_docs(manifest, "train"), split_docs(manifest, "val")
    assert 0 < len(val) < len(texts) and len(train) + len(val) == len(texts)
    # Each split keeps input order: merging them back must give every document, in order.
    i = j = 0
    for e in expected:
        if i < len(train) and list(train[i]) == e:
            i += 1
        else:
            assert j < len(val) and list(val[j]) == e, "a document was lost or changed"
            j += 1
    if kind == "hf":  # byte-level BPE is lossless: decoding gives the very text back
        assert tok.decode(train[0][:-1]) in texts

    assert m["totals"]["train"]["shards"] > 1, "--shard-tokens should have split train"
    assert m["dtype"] == "uint16" and m["vocab_size"] == len(tok) and m["eod_token_id"] == eos
    assert m["tokenizer"] == json.loads(json.dumps(tokenizer_identity(toks[kind])))
    for r in m["shards"]:  # paths are relative to the manifest, sizes and sums are right
        f = r["tokens_file"]
        assert "/" not in f["bin"] and (manifest.parent / f["bin"]).stat().st_size == f["bin_bytes"]
        import hashlib

        assert hashlib.sha256((manifest.parent / f["idx"]).read_bytes()).hexdigest() == f["idx_sha256"]
    assert "--shard-tokens 1500" in m["command"] and m["command"].startswith("python -m data_prep raw")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_no_append_eod(tmp_path, toks):
    texts = F.documents(10)
    F.write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    run_cli(
        "raw",
        tmp_path / "c.jsonl",
        "--tokenizer",
        toks["hf"],
        "--output-prefix",
        tmp_path / "o",
        "--val-fraction",
        "0",
        "--no-append-eod",
    )
    tok = load_tokenizer(toks["hf"])
    got = [list(d) for d in split_docs(tmp_path / "o.manifest.json", "train")]
    assert got == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_dtype_choice_and_int32_header(tmp_path):
    assert token_dtype(65_499) == np.uint16 and token_dtype(65_500) == np.int32
    # A word-level tokenizer with 70,000 words: ids above 65,535 must survive in int32 shards.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        tmp_path / "big"
    )
    F.write_jsonl(tmp_path / "c.jsonl", [{"text": "w69999 w3 w65535"}, {"text": "w70"}])
    run_cli(
        "raw",
        tmp_path / "c.jsonl",
        "--tokenizer",
        tmp_path / "big",
        "--output-prefix",
        tmp_path / "o",
        "--val-fraction",
        "0",
    )
    idx = (tmp_path / "o.train.00000.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<QBQQ", idx, 9) == (1, 4, 2, 3)  # version, int32 code, n, n+1
    dtype, docs = read_shard(tmp_path, "o.train.00000")
    assert dtype == np.int32 and [list(d) for d in docs] == [[70_001, 5, 65_537, 0], [72, 0]]
    assert json.loads((tmp_path / "o.manifest.json").read_text())["dtype"] == "int32"


def test_uint16_header_bytes(tmp_path, toks):
    F.write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in F.documents(3)])
    run_cli(
        "raw", tmp_path / "c.jsonl", "--tokenizer", toks["hf"], "--output-prefix", tmp_path / "o", "--val-fraction", "0"
    )
    idx = (tmp_path / "o.train.00000.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00" and idx[9:17] == (1).to_bytes(8, "little")
    assert idx[17] == 8  # Megatron's code for uint16
    assert struct.unpack_from("<QQ", idx, 18) == (3, 4)


def _outputs(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.endswith(".json")}


def _manifest_wo_command(d: Path) -> dict:
    m = json.loads(next(d.glob("*.manifest.json")).read_text())
    m.pop("command")
    m["tokenizer"].pop("path")
    return m


@pytest.mark.multiproc
def test_workers_byte_identical(tmp_path, toks):
    F.write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in F.documents(600)])
    common = [
        tmp_path / "c.jsonl",
        "--tokenizer",
        toks["hf"],
        "--val-fraction",
        "0.1",
        "--shard-tokens",
        "5000",
        "--batch-docs",
        "37",
    ]
    run_cli("raw", *common, "--output-prefix", tmp_path / "w1" / "d", "--workers", "1")
    # --workers 2 in a fresh process: the tokenizer's thread pool is sized there, for real.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "raw",
            *map(str, common),
            "--output-prefix",
            str(tmp_path / "w2" / "d"),
            "--workers",
            "2",
            "--batch-docs",
            "600",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout.strip().splitlines()[-1]
    a, b = _outputs(tmp_path / "w1"), _outputs(tmp_path / "w2")
    assert len(a) >= 6 and a == b
    assert _manifest_wo_command(tmp_path / "w1") == _manifest_wo_command(tmp_path / "w2")


@pytest.mark.multiproc
def test_kill_mid_run_leaves_nothing_finished(tmp_path, toks):
    texts = F.documents(16_000, seed=3)
    F.write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    args = [
        "raw",
        str(tmp_path / "c.jsonl"),
        "--tokenizer",
        str(toks["sp"]),
        "--shard-tokens",
        "20000",
        "--batch-docs",
        "64",
        "--val-fraction",
        "0.1",
    ]
    out = tmp_path / "killed"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep", *args, "--output-prefix", str(out / "d")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Wait until it is writing (temp shards exist), then kill it at a random moment.
    deadline = time.time() + 120
    while not any(out.iterdir()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill: grow the corpus"
    names = [p.name for p in out.iterdir()]
    assert names and all(n.startswith(".tmp-") for n in names), names
    assert not (out / "d.manifest.json").exists()

    run_cli(*args, "--output-prefix", out / "d")  # the rerun cleans up and succeeds
    clean = tmp_path / "clean"
    run_cli(*args, "--output-prefix", clean / "d")
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert _outputs(out) == _outputs(clean) and len(_outputs(out)) >= 4
    assert _manifest_wo_command(out) == _manifest_wo_command(clean)


def _bad_utf8(root: Path) -> list:
    (root / "ok.txt").write_text("fine")
    (root / "bad.txt").write_bytes(b"caf\xe9 au lait")
    return [root / "ok.txt", root / "bad.txt"]


def _bad_json(root: Path) -> list:
    (root / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    return [root / "bad.jsonl"]


def _missing_key(root: Path) -> list:
    (root / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    return [root / "bad.jsonl"]


def _missing_key_everywhere(root: Path) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x", "y"]}), root / "bad.parquet")
    return [root / "bad.parquet"]


def _empty(root: Path) -> list:
    (root / "empty.jsonl").write_text("")
    (root / "empty_dir").mkdir()
    return [root / "empty.jsonl", root / "empty_dir"]


def _unknown_ext(root: Path) -> list:
    (root / "data.csv").write_text("text\nhello\n")
    return [root / "data.csv"]


@pytest.mark.parametrize(
    "make, expect",
    [
        (_bad_utf8, ["bad.txt", "UTF-8"]),
        (_bad_json, ["bad.jsonl:3", "invalid JSON"]),
        (_missing_key, ["bad.jsonl:2", "'text'", "--text-key"]),
        (_missing_key_everywhere, ["bad.parquet", "'text'", "--text-key"]),
        (_empty, ["empty"]),
        (_unknown_ext, ["data.csv", "unknown extension"]),
        (lambda root: [root / "nope.jsonl"], ["nope.jsonl", "no such file"]),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, toks, capsys, make, expect):
    (tmp_path / "in").mkdir()
    inputs = make(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_cli("raw", *inputs, "--tokenizer", toks["sp"], "--output-prefix", out / "d")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for word in expect:
        assert word in err, err
    assert not out.exists()  # not even an empty folder


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--workers", "0"], "--workers"),
        (["--shard-tokens", "0"], "--shard-tokens"),
    ],
)
def test_bad_flags(tmp_path, toks, capsys, flags, expect):
    F.write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    with pytest.raises(SystemExit):
        run_cli("raw", tmp_path / "c.jsonl", "--tokenizer", toks["sp"], "--output-prefix", tmp_path / "o" / "d", *flags)
    assert expect in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(tmp_path, toks, capsys):
    F.write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in F.documents(5)])
    args = ["raw", tmp_path / "c.jsonl", "--tokenizer", toks["sp"], "--output-prefix", tmp_path / "d"]
    run_cli(*args)
    before = (tmp_path / "d.manifest.json").read_bytes()
    with pytest.raises(SystemExit):
        run_cli(*args)
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "d.manifest.json").read_bytes() == before
    run_cli(*args, "--force", "--no-append-eod")
    assert json.loads((tmp_path / "d.manifest.json").read_text())["append_eod"] is False


def test_sentencepiece_model_matches_sentencepiece(toks):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(toks["sp"]))
    tok = load_tokenizer(toks["sp"])
    assert tok.is_fast and len(tok) == sp.vocab_size() and tok.eos_token_id == sp.eos_id()
    for text in F.documents(30, seed=9):
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_help_teaches():
    r = subprocess.run([sys.executable, "-m", "data_prep", "raw", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "examples:" in r.stdout and "--output-prefix" in r.stdout


def test_saved_truncation_does_not_cut_documents(tmp_path, toks):
    # A tokenizer.json saved with truncation (common for models with a short context).
    tj = json.loads((toks["hf"] / "tokenizer.json").read_text())
    tj["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    shutil.copytree(toks["hf"], tmp_path / "trunc")
    (tmp_path / "trunc" / "tokenizer.json").write_text(json.dumps(tj))
    assert load_tokenizer(tmp_path / "trunc").backend_tokenizer.truncation is not None
    texts = F.documents(6, seed=4)
    F.write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    run_cli(
        "raw",
        tmp_path / "c.jsonl",
        "--tokenizer",
        tmp_path / "trunc",
        "--output-prefix",
        tmp_path / "o",
        "--val-fraction",
        "0",
    )
    tok = load_tokenizer(toks["hf"])
    got = [list(d) for d in split_docs(tmp_path / "o.manifest.json", "train")]
    assert got == [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    assert max(map(len, got)) > 9


def test_stale_temp_files_of_a_live_run_are_left_alone(tmp_path, toks, capsys):
    F.write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in F.documents(5)])
    other = subprocess.Popen(["sleep", "60"])  # stands for a concurrent run of the same prefix
    try:
        stale = tmp_path / f".tmp-d.train.00000.bin.{other.pid}"
        stale.write_bytes(b"half")
        args = ["raw", tmp_path / "c.jsonl", "--tokenizer", toks["sp"], "--output-prefix", tmp_path / "d"]
        with pytest.raises(SystemExit):
            run_cli(*args)
        assert "another run" in capsys.readouterr().err and stale.exists()
    finally:
        other.kill()
        other.wait()
    run_cli(*args)  # its writer is gone: the leftover is removed and the run completes
    assert not stale.exists() and (tmp_path / "d.manifest.json").exists()


def test_blank_documents_are_skipped_and_counted(tmp_path, toks, capsys):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("A real document about rivers.")
    (d / "b.txt").write_text("")
    (d / "c.txt").write_text("  \n\t\n")
    (d / "d.txt").write_text("Another one, about mountains.")
    run_cli("raw", d, "--tokenizer", toks["hf"], "--output-prefix", tmp_path / "out" / "c", "--val-fraction", "0")
    m = json.loads((tmp_path / "out" / "c.manifest.json").read_text())
    assert m["totals"]["train"]["documents"] == 2 and m["blank_documents_skipped"] == 2
    assert "2 blank skipped" in capsys.readouterr().out
