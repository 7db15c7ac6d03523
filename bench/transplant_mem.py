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
    """A random bf16 Llama (bench.kit, through the product's model factory) with a tokenizer
    (no chat template: a base model's). Returns its weight bytes."""
    from bench.kit import make_tokenizer, random_llama

    random_llama(
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
    make_tokenizer(out)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def make_run(run_dir: Path, base_dir: Path, phase: str, raw_start: int, format_start: int, seed: int, step: int = 5):
    """A run directory as the trainer leaves it, for what transplant reads (pipeline/rundir.py):
    run.json, and one complete checkpoint of the base weights with the phase's trained groups
    moved (Gaussian noise, std 0.05): a layer_NN-model_states.pt of pipeline keys per layer, the
    engine's file, record.json and `latest`. Built by hand, without training:
    the transplant's memory depends on the tensors' sizes, not on how they were trained."""
    import json

    from safetensors.torch import load_file

    from pipeline.groups import LayerGroups
    from pipeline.hf import model_identity, read_config
    from pipeline.names import ANCHOR, layer_file, to_pipeline_name
    from pipeline.rundir import RunDir

    cfg = read_config(base_dir)
    L, tied = cfg["num_hidden_layers"], bool(cfg.get("tie_word_embeddings", False))
    groups = LayerGroups.resolve(raw_start, format_start, L, tied, phase)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "config": {
                    "model": str(base_dir),
                    "phase": phase,
                    "raw_start": raw_start,
                    "format_start": format_start,
                },
                "phase": phase,
                "groups": groups.to_record(),
                "base_model": model_identity(base_dir),
                "stages": [[0, L]],
            },
            indent=2,
        )
    )
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    per_layer: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(L)}
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            if groups.trains(name):
                t = (t.float() + 0.05 * torch.randn(t.shape, generator=gen)).to(t.dtype)
            i, key = to_pipeline_name(name, L)
            per_layer[i][key] = t
    if tied:  # DeepSpeed saves the shared matrix again as the last layer's lm_head
        per_layer[L - 1]["lm_head.weight"] = per_layer[0]["embed_tokens.weight"].clone()
    per_layer[0][ANCHOR] = torch.zeros(1)
    rd = RunDir(run_dir)
    tag = rd.tag_dir(step)
    tag.mkdir(parents=True)
    for i, state in per_layer.items():
        torch.save(state, tag / layer_file(i))
    torch.save({"global_steps": step}, tag / "mp_rank_00_model_states.pt")
    rd.write_record(step)  # record.json (every file's sha256), then `latest`, as the trainer marks it complete
    return run_dir


def make_runs(d: Path, layers: int, size: str) -> tuple[Path, Path, int]:
    hidden, inter, vocab, _ = SIZES[size]
    base = d / f"base-{layers}"
    nbytes = build_base(base, layers, hidden, inter, vocab)
    f = layers // 2
    raw = make_run(d / f"raw-{layers}", base, "raw", raw_start=1, format_start=f, seed=1)
    chat = make_run(d / f"chat-{layers}", base, "chat", raw_start=1, format_start=f, seed=2)
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
                # ratio = value / baseline, as for every figure: the share of the model's growth
                # that shows in the peak (1.0 would be a peak that grows with the model).
                "ratio": round(growth / (sizes[LAYERS[1]] / sizes[LAYERS[0]]), 3),
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
    base = tmp / "base-tiny"
    nbytes = build_base(base, 4, 64, 128, 256)  # hidden 64: one 64-wide head
    raw = make_run(tmp / "raw-tiny", base, "raw", raw_start=1, format_start=2, seed=1)
    chat = make_run(tmp / "chat-tiny", base, "chat", raw_start=1, format_start=2, seed=2)
    return raw, chat, nbytes


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "small"), indent=2))
