"""Tokens/s of `python -m data_prep raw` against the tokenizer's ceiling and datasets.map.

Three ways to tokenize the same synthetic corpus (a parquet file of documents) with the same
byte-level BPE fast tokenizer (16k vocab), on the same 2 cores:

  ceiling   the Rust tokenizer's own batch encode (`encode_batch_fast`, both cores, batches
            of 1024 documents) over texts already in memory, writing nothing: no reading, no
            ids pulled into Python, no files.
  baseline  `datasets.map(batched=True)` calling the same tokenizer (both cores), then the
            ids flattened into one numpy array and written with tofile. The dataset is
            loaded into memory before the clock starts (generous to the baseline).
  data_prep the real code path, `data_prep.raw.run` with --workers 2: reads the parquet,
            tokenizes, appends EOD, splits train/val, writes MMIDIDX shards (fsync'd), hashes
            them, writes the manifest. Tokenizer loading is inside the clock.

All three count the same tokens (the tokenizer's output, EOD not counted). Each round runs
the three back to back in a rotating order and we take the ratio within the round, then the
median over rounds: the machine is shared, so absolute speeds drift but neighbours in time
see the same drift. `spread` is the half-range of those per-round ratios.

    python -m bench.dataprep            # size=small: ~19 MB of text (~4M tokens), 5 rounds
    python -c "from bench.dataprep import run; print(run('full'))"   # ~76 MB
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

# size -> (documents, rounds); "tiny" only checks that the bench runs (its figures mean nothing)
SIZES = {"tiny": (600, 2), "small": (12_000, 5), "full": (48_000, 5)}
CORES = 2
BATCH = 1024  # documents per encode call, for the ceiling and data_prep's --batch-docs alike
GOAL_CEILING, GOAL_BASELINE = 0.90, 1.0


def make_corpus(d: Path, n_docs: int) -> tuple[Path, list[str]]:
    """Zipf-distributed pseudo-words in sentences and paragraphs: BPE sees realistic merges."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    syll = np.array("ka to ri men sa lo vi tra pe qu an el or is un de ba zo fi ne st ch ar ou".split())
    lex = np.array(["".join(rng.choice(syll, rng.integers(1, 5))) for _ in range(30_000)])
    cdf = np.cumsum(1.0 / np.arange(1, len(lex) + 1))
    cdf /= cdf[-1]
    punct = np.array([" ", " ", " ", " ", " ", " ", " ", " ", ", ", ". ", ". ", "; ", "? ", "\n\n"])
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(60, 400))
        words = lex[np.minimum(np.searchsorted(cdf, rng.random(n)), len(lex) - 1)]
        seps = punct[rng.integers(0, len(punct), n)]
        nums = rng.random(n) < 0.02
        words = np.where(nums, rng.integers(0, 10_000, n).astype(str), words)
        docs.append("".join(np.char.add(words, seps)).capitalize())
    path = d / "corpus.parquet"
    pq.write_table(pa.table({"text": docs}), path, row_group_size=4096)
    return path, docs


def make_tokenizer(d: Path, docs: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=16_384,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(docs[:3000], trainer)
    out = d / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def _ceiling(tok, docs: list[str], batch: int = BATCH) -> None:
    # In batches, results dropped as it goes: one call over the whole corpus would hold
    # every Encoding (ids, token strings, offsets...) at once and run slower, a weak ceiling.
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    encode = tok.backend_tokenizer.encode_batch_fast
    for i in range(0, len(docs), batch):
        encode(docs[i : i + batch], add_special_tokens=False)


def _baseline(tok, ds, out: Path) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    mapped = ds.map(
        lambda b: tok(b["text"], add_special_tokens=False), batched=True, remove_columns=["text"], keep_in_memory=True
    )
    ids = mapped.data.column("input_ids").combine_chunks().flatten().to_numpy()
    ids.astype(np.uint16).tofile(out)


def _data_prep(corpus: Path, tokenizer: Path, out: Path) -> None:
    from data_prep import raw

    args = raw.parser().parse_args(
        [
            str(corpus),
            "--tokenizer",
            str(tokenizer),
            "--output-prefix",
            str(out / "bench"),
            "--workers",
            str(CORES),
            "--batch-docs",
            str(BATCH),
        ]
    )
    with contextlib.redirect_stdout(io.StringIO()):
        raw.run(args, argv=[])


def _fresh(d: Path) -> Path:
    """An empty output dir (outside the clock): a user's run writes to a new prefix."""
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


def run(size: str = "small") -> list[dict]:
    n_docs, rounds = SIZES[size]
    # The same 2 cores for everything, whatever machine this runs on.
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > CORES:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:CORES])
    os.environ["RAYON_NUM_THREADS"] = str(CORES)  # before the tokenizer's pool starts
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    datasets.disable_caching()
    with tempfile.TemporaryDirectory(prefix="bench-dataprep-") as tmp:
        tmp = Path(tmp)
        corpus, docs = make_corpus(tmp, n_docs)
        tok_dir = make_tokenizer(tmp, docs)
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        n_tokens = sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch_fast(docs, add_special_tokens=False))
        ds = datasets.Dataset.from_parquet(str(corpus), keep_in_memory=True)
        out = tmp / "out"
        methods = {
            "ceiling": lambda: _ceiling(tok, docs),
            "baseline": lambda: _baseline(tok, ds, tmp / "flat.bin"),
            "data_prep": lambda: _data_prep(corpus, tok_dir, out),
        }
        secs: dict[str, list[float]] = {k: [] for k in methods}
        cpu: dict[str, list[float]] = {k: [] for k in methods}
        load = [os.getloadavg()[0]]
        for f in methods.values():  # warm-up: imports, page cache, thread pool
            _fresh(out)
            f()
        order = list(methods)
        for r in range(rounds):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                _fresh(out)
                t, c = time.perf_counter(), time.process_time()
                methods[name]()
                secs[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)  # all threads of this process
        load.append(os.getloadavg()[0])
        _fresh(out)
        _data_prep(corpus, tok_dir, out)
        saved = (out / "bench.manifest.json").read_text()
    m = json.loads(saved)
    stored = m["totals"]["train"]["tokens"] + m["totals"]["val"]["tokens"]
    assert stored == n_tokens + n_docs, "data_prep stored a different number of tokens"

    note = (
        f"{n_docs} docs, {n_tokens:,} tokens, {CORES} cores, load average "
        f"{min(load):.1f}-{max(load):.1f} during the rounds (> {CORES} means other work shared the cores)"
    )

    def figure(name, num, den, goal, clock=secs, unit="tokens/s"):
        # ratio = value / baseline (medians over rounds); spread = half-range of the ratios
        # taken within each round, i.e. how much the busy machine moved the comparison.
        value, base = (n_tokens / statistics.median(clock[k]) for k in (num, den))
        per_round = [clock[den][i] / clock[num][i] for i in range(rounds)]
        ratio = value / base
        return {
            "name": name,
            "value": round(value),
            "baseline": round(base),
            "ratio": round(round(value) / round(base), 4),
            "goal": goal,
            "met": None if goal is None else ratio >= goal,
            "unit": unit,
            "spread": round((max(per_round) - min(per_round)) / 2, 3),
            "notes": note,
        }

    return [
        figure("dataprep_raw_vs_tokenizer_ceiling", "data_prep", "ceiling", GOAL_CEILING),
        figure("dataprep_raw_vs_datasets_map", "data_prep", "baseline", GOAL_BASELINE),
        figure("datasets_map_vs_tokenizer_ceiling (reference)", "baseline", "ceiling", None),
        # CPU seconds (all threads) per token: blind to idle cores, but steady on a busy machine.
        figure(
            "dataprep_raw_vs_tokenizer_ceiling_cpu_time (reference)",
            "data_prep",
            "ceiling",
            None,
            clock=cpu,
            unit="tokens per CPU-second",
        ),
    ]


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "small"), indent=2))
