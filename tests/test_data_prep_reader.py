"""data_prep.reader.TokenWindows: windows, shuffle determinism, rank sharding, resume, checks."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.__main__ import main
from data_prep.errors import UserError
from data_prep.mmidx import read_index
from data_prep.reader import TokenWindows, micro_batches
from tests.kit import tokenizers as F

S = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A raw set (several shards per split) and a chat set, made by the real CLI."""
    d = tmp_path_factory.mktemp("reader")
    tok = F.make_hf_tokenizer(d / "tok")
    F.write_jsonl(d / "c.jsonl", [{"text": t} for t in F.documents(150, seed=11)])
    F.write_jsonl(d / "chat.jsonl", F.conversations(30, seed=12))
    main(
        [
            "raw",
            str(d / "c.jsonl"),
            "--tokenizer",
            str(tok),
            "--output-prefix",
            str(d / "raw"),
            "--shard-tokens",
            "700",
            "--val-fraction",
            "0.1",
        ]
    )
    main(
        [
            "chat",
            str(d / "chat.jsonl"),
            "--tokenizer",
            str(tok),
            "--output-prefix",
            str(d / "chat"),
            "--shard-tokens",
            "600",
            "--val-fraction",
            "0",
        ]
    )
    return d


def stream(manifest: Path, split: str, suffix: str = "") -> np.ndarray:
    """The split's whole token (or mask) stream, concatenated from the .bin files by hand."""
    m = json.loads(manifest.read_text())
    parts = []
    for r in m["shards"]:
        if r["split"] == split:
            f = r["mask_file" if suffix else "tokens_file"]["bin"]
            parts.append(np.fromfile(manifest.parent / f, dtype=np.uint8 if suffix else m["dtype"]))
    return np.concatenate(parts).astype(np.int64)


def test_windows_cover_the_stream_once_per_epoch(data):
    man = data / "raw.manifest.json"
    ds = TokenWindows(man, split="train", seq_len=S, seed=0)
    full = stream(man, "train")
    assert json.loads(man.read_text())["totals"]["train"]["shards"] > 2
    assert len(ds) == (len(full) - 1) // S and ds.num_tokens == len(full)
    assert ds.vocab_size == 512 and not ds.has_mask and ds.manifest["kind"] == "raw"
    seen = []
    for g in range(len(ds)):
        tokens, mask = ds.sample(g)
        assert tokens.dtype == np.int64 and tokens.shape == (S + 1,) and mask is None
        start = next(i for i in range(0, len(full) - S, S) if (full[i : i + S + 1] == tokens).all())
        seen.append(start // S)
    assert sorted(seen) == list(range(len(ds))), "an epoch must visit every window once"
    assert seen != sorted(seen), "windows must be shuffled"
    # Epoch 1 is another permutation of the same windows.
    e1 = [tuple(ds.sample(len(ds) + j)[0]) for j in range(len(ds))]
    e0 = [tuple(ds.sample(j)[0]) for j in range(len(ds))]
    assert sorted(e0) == sorted(e1) and e0 != e1


def test_same_seed_same_samples_other_seed_other_order(data):
    man = data / "raw.manifest.json"
    a, b = TokenWindows(man, seq_len=S, seed=3), TokenWindows(man, seq_len=S, seed=3)
    c = TokenWindows(man, seq_len=S, seed=4)
    ga = [a.sample(g)[0] for g in range(0, 3 * len(a), 7)]
    assert all((x == b.sample(g)[0]).all() for x, g in zip(ga, range(0, 3 * len(a), 7)))
    assert any((x != c.sample(g)[0]).any() for x, g in zip(ga, range(0, 3 * len(a), 7)))


def test_rank_sharding_and_resume(data):
    ds = TokenWindows(data / "raw.manifest.json", seq_len=S, seed=1)
    m, dp, start = 3, 4, 5
    ranks = [micro_batches(ds, m, dp_rank=r, dp_size=dp, start_sample=start) for r in range(dp)]
    for rnd in range(4):  # rounds of m*dp samples; rank r holds slice [r*m, (r+1)*m)
        for r, it in enumerate(ranks):
            tokens, mask = next(it)
            assert tokens.dtype == torch.int64 and tokens.shape == (m, S + 1) and mask is None
            first = start + rnd * m * dp + r * m
            want = np.stack([ds.sample(first + k)[0] for k in range(m)])
            assert (tokens.numpy() == want).all()
    # Resuming at sample 17 continues exactly where an uninterrupted single rank would be.
    whole = micro_batches(ds, 1)
    flat = [next(whole)[0][0] for _ in range(25)]
    resumed = micro_batches(ds, 1, start_sample=17)
    assert all((next(resumed)[0][0] == flat[g]).all() for g in range(17, 25))


def test_chat_masks_travel_with_tokens(data):
    man = data / "chat.manifest.json"
    ds = TokenWindows(man, seq_len=S, seed=0)
    toks, masks = stream(man, "train"), stream(man, "train", "mask")
    assert ds.has_mask and 0 < masks.sum() < len(masks)
    for g in range(len(ds)):
        tokens, mask = ds.sample(g)
        assert mask.dtype == np.uint8 and mask.shape == (S + 1,)
        i = next(
            i
            for i in range(0, len(toks) - S, S)
            if (toks[i : i + S + 1] == tokens).all() and (masks[i : i + S + 1] == mask).all()
        )
        assert i % S == 0
    t, mk = next(micro_batches(ds, 2))
    assert mk.dtype == torch.uint8 and mk.shape == t.shape


def test_pickle_reopens_instead_of_copying(data):
    ds = TokenWindows(data / "raw.manifest.json", seq_len=S, seed=2)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the maps are not serialized
    again = pickle.loads(blob)
    assert all((again.sample(g)[0] == ds.sample(g)[0]).all() for g in range(10))


def _copy(data: Path, tmp: Path) -> Path:
    for p in data.iterdir():
        if p.name.startswith("raw."):
            shutil.copy(p, tmp / p.name)
    return tmp / "raw.manifest.json"


def test_checksum_and_size_mismatch_detected(data, tmp_path):
    man = _copy(data, tmp_path)
    shard = tmp_path / json.loads(man.read_text())["shards"][1]["tokens_file"]["bin"]
    b = bytearray(shard.read_bytes())
    b[10] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(b))
    TokenWindows(man, seq_len=S, verify="size")  # a size check cannot see it...
    with pytest.raises(UserError, match=f"{shard.name}.*sha256"):
        TokenWindows(man, seq_len=S, verify="sha256")  # ...the checksum does
    shard.write_bytes(bytes(b[:-2]))
    with pytest.raises(UserError, match=f"{shard.name}.*bytes"):
        TokenWindows(man, seq_len=S)


def test_damaged_index_is_a_clear_error(data, tmp_path):
    man = _copy(data, tmp_path)
    idx = tmp_path / json.loads(man.read_text())["shards"][0]["tokens_file"]["idx"]
    good = idx.read_bytes()
    assert read_index(idx).num_tokens > 0
    for bad, why in [
        (b"NOTMAGIC!" + good[9:], "magic"),
        (good[:9] + b"\x02" + good[10:], "version"),
        (good[:-8], "truncated"),
        (good[:20], "truncated"),
    ]:
        idx.write_bytes(bad)
        with pytest.raises(UserError, match=why):
            read_index(idx)
    # Through the reader, the manifest's recorded size catches the truncation first.
    with pytest.raises(UserError, match=idx.name):
        TokenWindows(man, seq_len=S)


def test_split_too_short_and_bad_args(data):
    man = data / "raw.manifest.json"
    with pytest.raises(UserError, match=r"raw\.manifest\.json.*seq_len 100000"):
        TokenWindows(man, split="val", seq_len=100_000)
    with pytest.raises(UserError, match="split"):
        TokenWindows(man, split="test", seq_len=S)
    with pytest.raises(UserError, match="no such file"):
        TokenWindows(man.with_name("missing.manifest.json"), seq_len=S)
    with pytest.raises(ValueError):
        next(micro_batches(TokenWindows(man, seq_len=S), 2, dp_rank=2, dp_size=2))
