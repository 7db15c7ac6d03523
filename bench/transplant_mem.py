"""Peak memory of `python -m pipeline.transplant` on two model sizes with the same layer size.

The transplant streams one layer at a time and writes a shard as soon as it is full, so its peak
memory should be about one shard plus one layer, *not* the model. We build a 4-layer and a
16-layer Llama with identical layers (random bf16 weights), make an A-Raw and an A-Chat run of
each (real run directories, checkpoints as the trainer writes them), transplant them in a child
process, and read that child's own peak RSS (VmHWM). The baseline is the same command on a
tiny model: the Python + torch + transformers imports and bookkeeping that any run pays.

    python -m bench.transplant_mem            # size=small: 8 MB layers, 16 MB shards
    python -c "from bench.transplant_mem import run; print(run('full'))"   # 32 MB layers, 64 MB shards
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# hidden, intermediate, vocab, --max-shard-size. The shard is smaller than the small model, as it
# is on a real 70B merge (2 GB shards vs 140 GB), so the measurement shows the streaming bound.
SIZES = {"small": (512, 2048, 4096, "16MB"), "full": (1024, 4096, 8192, "64MB")}
LAYERS = (4, 16)
GOAL_GROWTH = 1.2  # peak above baseline may grow at most 20% while the model grows 4x


def build_base(out: Path, layers: int, hidden: int, inter: int, vocab: int) -> int:
    """A random bf16 Llama (the test kit's, through the product's model factory) with a tokenizer.
    Returns its weight bytes."""
    from tests.kit.models import tiny_llama
    from tests.kit.runs import make_tokenizer

    tiny_llama(
        out,
        vocab,
        seed=layers,
        dtype=torch.bfloat16,
        layers=layers,
        hidden=hidden,
        intermediate=inter,
        heads=hidden // 64,
        kv_heads=hidden // 64,
    )
    make_tokenizer(out, chat_template=False)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def make_runs(d: Path, layers: int, size: str) -> tuple[Path, Path, int]:
    from tests.kit.runs import make_run  # the run-directory contract, as the tests build it

    hidden, inter, vocab, _ = SIZES[size]
    base = d / f"base-{layers}"
    nbytes = build_base(base, layers, hidden, inter, vocab)
    f = layers // 2
    raw = make_run(d / f"raw-{layers}", base, "raw", raw_start=1, format_start=f, seed=1).path
    chat = make_run(d / f"chat-{layers}", base, "chat", raw_start=1, format_start=f, seed=2).path
    return raw, chat, nbytes


# The child reports its own high-water mark (VmHWM of its address space) when it is done. The
# kernel's rusage for a child is no good here: it also counts the pages the child inherited from
# this (large, model-building) process between fork and exec.
_CHILD = """
import sys
from pipeline.transplant import main
try:
    main(sys.argv[2:])
finally:
    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]
    open(sys.argv[1], 'w').write(hwm)
"""


def peak_rss_mb(raw: Path, chat: Path, out: Path, shard: str) -> float:
    """Peak RSS (MB) of `python -m pipeline.transplant ...` run in a fresh child process."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    report = out.with_suffix(".hwm")
    cmd = [
        sys.executable,
        "-c",
        _CHILD,
        str(report),
        "--raw",
        str(raw),
        "--chat",
        str(chat),
        "--out",
        str(out),
        "--max-shard-size",
        shard,
    ]
    p = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"transplant failed: {p.stderr[-2000:]}")
    return int(report.read_text()) / 1024  # kB -> MB


def run(size: str = "small") -> list[dict]:
    shard = SIZES[size][3]
    with tempfile.TemporaryDirectory(prefix="transplant-mem-") as tmp:
        tmp = Path(tmp)
        traw, tchat, _ = _tiny(tmp)
        baseline = peak_rss_mb(traw, tchat, tmp / "out-tiny", shard)
        results, peaks, sizes = [], {}, {}
        for layers in LAYERS:
            raw, chat, nbytes = make_runs(tmp, layers, size)
            t0 = time.time()
            peaks[layers] = peak_rss_mb(raw, chat, tmp / f"out-{layers}", shard) - baseline
            sizes[layers] = nbytes / 2**20
            results.append(
                {
                    "name": f"transplant_peak_rss_above_baseline_{layers}_layers",
                    "value": round(peaks[layers], 1),
                    "baseline": round(sizes[layers], 1),
                    "ratio": round(peaks[layers] / sizes[layers], 3),
                    "goal": f"about one shard ({shard}), not the model (baseline = model weights, MB)",
                    "met": None,
                    "unit": "MB",
                    "seconds": round(time.time() - t0, 1),
                }
            )
        growth = peaks[LAYERS[1]] / peaks[LAYERS[0]]
        results.append(
            {
                "name": "transplant_peak_rss_growth_16_vs_4_layers",
                "value": round(growth, 3),
                "baseline": round(sizes[LAYERS[1]] / sizes[LAYERS[0]], 2),
                "ratio": round(growth, 3),
                "goal": f"<= {GOAL_GROWTH} while the model grows {sizes[LAYERS[1]] / sizes[LAYERS[0]]:.1f}x",
                "met": growth <= GOAL_GROWTH,
                "unit": "x",
            }
        )
        results.append(
            {
                "name": "transplant_baseline_rss_tiny_model",
                "value": round(baseline, 1),
                "baseline": None,
                "ratio": None,
                "goal": "reference (python + torch + transformers)",
                "met": None,
                "unit": "MB",
            }
        )
        return results


def _tiny(tmp: Path) -> tuple[Path, Path, int]:
    """4 layers of hidden 64 (~1 MB of weights): what every transplant costs before any weights."""
    from tests.kit.runs import make_run

    base = tmp / "base-tiny"
    nbytes = build_base(base, 4, 64, 128, 256)  # hidden 64: one 64-wide head
    raw = make_run(tmp / "raw-tiny", base, "raw", raw_start=1, format_start=2, seed=1).path
    chat = make_run(tmp / "chat-tiny", base, "chat", raw_start=1, format_start=2, seed=2).path
    return raw, chat, nbytes


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "small"), indent=2))
