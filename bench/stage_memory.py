"""Peak host memory of every rank of a pipeline run, against what its stage holds, on a bf16 checkpoint.

Each rank builds only its own stage (pipeline/training/model.py) and reads only that stage's
tensors, so its memory should follow the stage, not the model. For P = 1, 2 and 4 stages, phase
raw (format group = the last quarter of the layers), a 16-layer x 768 Llama saved in bf16 trains
2 steps on CPU ranks, and every rank reports its own peak RSS (VmHWM). The baseline for a rank is
the same run on a tiny model with the same layer count (hidden 64): what a rank costs before any
weights (Python, torch, DeepSpeed, the data, the engine). A rank's peak above that baseline is
compared to its share, the plan's estimate of what its stage holds (its weights in the training
dtype, plus gradients and optimizer state for its trained parameters: RunPlan.memory_per_stage).

    python -m bench.stage_memory            # ~4 min on 2 CPU cores
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    "small": dict(layers=16, hidden=768, intermediate=3072, heads=12, kv_heads=4, vocab_size=32000),
    "tiny": dict(layers=8, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab_size=4096),  # tests
}
IDLE = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab_size=512)
STAGES = (1, 2, 4)
GOAL = 1.2

# Each rank writes its own high-water mark when it is done (the launcher's rusage would mix ranks),
# and what it holds then: the bytes of every live tensor storage, each counted once (weights,
# gradients, every buffer of the optimizer), with the engine kept alive until it is counted.
_CHILD = """
import gc, json, os, sys
import torch
from pipeline.training import loop
engines, train = [], loop.train
loop.train = lambda eng: (engines.append(eng), train(eng))[1]
from pipeline.train import main
try:
    main(sys.argv[2:])
finally:
    gc.collect()
    seen, held = set(), 0
    for o in gc.get_objects():
        if torch.is_tensor(o) and not o.is_meta and o.device.type == 'cpu':
            s = o.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                held += s.nbytes()
    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]
    with open(os.path.join(sys.argv[1], 'rank%s.json' % os.environ.get('RANK', '0')), 'w') as f:
        json.dump({'hwm_mb': int(hwm) / 1024, 'held_mb': held / 2**20}, f)
"""


def _model(root: Path, name: str, tok: Path, **shape) -> Path:
    import torch

    from tests.kit.models import tiny_llama

    return tiny_llama(root / name, tokenizer_dir=tok, dtype=torch.bfloat16, max_position=128, **shape)


def _config(root: Path, name: str, model: Path, data: Path, layers: int, P: int) -> Path:
    cfg = {
        "model": str(model),
        "data": str(data),
        "phase": "raw",
        "raw_start": layers // 4,
        "format_start": layers - layers // 4,
        "pipeline_stages": P,
        "seq_len": 64,
        "micro_batch_size": 1,
        "global_batch_size": 2,
        "steps": 2,
        "lr": 1e-4,
        "out": str(root / "runs" / name),
        "save_every": 2,
        "keep_last": 1,
        "ds_config": str(REPO / "ds_configs" / "cpu_fp32_zero1.json"),
        "verify_data": "size",
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def peak_rss_per_rank(cfg: Path, P: int, out: Path) -> list[dict]:
    """{hwm_mb, held_mb} of each rank for `python -m pipeline.train cfg` on P CPU ranks."""
    from tests.kit.train import env, free_port

    out.mkdir(parents=True)
    child = out / "child.py"
    child.write_text(_CHILD)
    e = {**env(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    if P == 1:
        cmd = [sys.executable, str(child), str(out), str(cfg)]
    else:
        cmd = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            str(P),
            "--master_port",
            str(free_port()),
            "--no_local_rank",
            str(child),
            str(out),
            str(cfg),
        ]
    p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=1200)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(P)]


def run(size: str = "small") -> list[dict]:
    from bench.synth import figure, write_random_shards
    from pipeline.config import load_config
    from pipeline.training.plan import build_plan
    from tests.kit.tokenizers import make_hf_tokenizer

    shape = SIZES[size]
    L = shape["layers"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="stage-memory-") as tmp:
        root = Path(tmp)
        tok = make_hf_tokenizer(root / "tok", vocab_size=300)
        model = _model(root, "model", tok, **shape)
        idle = _model(root, "idle", tok, layers=L, **IDLE)
        whole_fp32 = 2 * sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20  # bf16 on disk x 2
        data = {
            v: write_random_shards(root / f"data{v}" / "raw", v, 20_000, tok, seed=1)
            for v in (shape["vocab_size"], IDLE["vocab_size"])
        }
        for P in STAGES:
            cfg = _config(root, f"p{P}", model, data[shape["vocab_size"]], L, P)
            base_cfg = _config(root, f"idle{P}", idle, data[IDLE["vocab_size"]], L, P)
            plan = build_plan(load_config(cfg), P, use_gpu=False)
            shares = [m["total"] / 2**20 for m in plan.memory_per_stage()]
            peaks = peak_rss_per_rank(cfg, P, root / f"rss{P}")
            idle_peaks = peak_rss_per_rank(base_cfg, P, root / f"idle-rss{P}")
            for r in range(P):  # data-parallel size 1: rank r holds stage r
                above = peaks[r]["hwm_mb"] - idle_peaks[r]["hwm_mb"]
                held = peaks[r]["held_mb"] - idle_peaks[r]["held_mb"]
                lo, hi = plan.stages[r], plan.stages[r + 1]
                trains = "trains" if any(plan.groups.layer_trained(i) for i in range(lo, hi)) else "frozen"
                rows.append(
                    figure(
                        f"peak RSS above an idle rank, P={P}, rank {r} (layers {lo}-{hi - 1}, {trains})",
                        round(above, 1),
                        round(held, 1),
                        f"<= {GOAL} x what the stage holds",
                        above <= GOAL * held,
                        "MB",
                        notes=f"peak {peaks[r]['hwm_mb']:.0f} MB, idle rank {idle_peaks[r]['hwm_mb']:.0f} MB; "
                        f"the stage "
                        f"holds {held:.0f} MB of tensors (the plan estimated {shares[r]:.0f} MB); whole "
                        f"model in fp32 {whole_fp32:.0f} MB (x{above / whole_fp32:.2f} of it)",
                        whole_model_fp32_mb=round(whole_fp32, 1),
                        idle_rank_mb=round(idle_peaks[r]["hwm_mb"], 1),
                        plan_estimate_mb=round(shares[r], 1),
                    )
                )
    return rows


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "small"), indent=2))
