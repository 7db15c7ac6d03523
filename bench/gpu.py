"""GPU figures in one short run: tokens/s and MFU of a ~1B Llama, bf16, 1 stage, pipeline vs plain PyTorch.

  1. builds a random-init ~1.1B Llama (hidden 2048, 22 layers, 16 heads / 8 KV heads, MLP 5632,
     vocab 32000) with save_pretrained, and random token shards through data_prep's writer;
  2. trains it with the real entry point, `python -m pipeline.train` (one process, phase full,
     ds_configs/gpu_bf16_zero1.json: bf16 weights, fp32 master + Adam moments, ZeRO-1);
  3. trains the same model on the same batches with a plain PyTorch loop in this process
     (fp32 weights under torch.autocast(bf16), torch AdamW, same clipping and accumulation);
  4. writes bench/results/gpu.json and gpu.md: tokens/s of both, their ratio, and MFU =
     6 x N x tokens/s / peak (N = parameters doing matmuls: all but the input embedding;
     peak 989 TFLOP/s = H100/H200 dense bf16; --peak-tflops for other cards).

Steady state only: the first --warmup steps of each side are dropped and the median step time
of the rest is used. About 3 minutes on an H100, most of it building, loading and the trainer's
final checkpoint (written to /dev/shm when it has room).

`--tiny` runs the same script end to end on CPU with a toy model (a smoke test, no figures worth
reading).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ~1.1B parameters. 16 heads of 128 (flash-attention friendly), GQA with 8 KV heads.
MODEL_1B = dict(vocab_size=32000, hidden=2048, layers=22, heads=16, kv_heads=8, intermediate=5632, max_position=2048)
MODEL_TINY = dict(vocab_size=512, hidden=64, layers=4, heads=4, kv_heads=2, intermediate=176, max_position=64)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0}  # dense bf16, SXM
GOAL_MFU, GOAL_SPEED = 0.45, 0.95
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gpu bench {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m bench.gpu",
        description=__doc__.splitlines()[0],
        epilog="examples:\n"
        "  python -m bench.gpu                         # H100/H200: ~3 min, writes runs/bench/gpu.*\n"
        "  python -m bench.gpu --micro-batch 8 --global-batch 32\n"
        "  python -m bench.gpu --tiny --out /tmp/g     # CPU smoke run of the whole script\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--tiny", action="store_true", help="toy model on CPU: checks the script, measures nothing")
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "runs" / "bench",
        help="where gpu.json and gpu.md go (default runs/bench, untracked; bench/results holds the "
        "committed reference copy)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="model, shards and run dir (default: a temp dir in /dev/shm if it has ~24 GB free, else $TMPDIR)",
    )
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (tiny: 32)")
    ap.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per forward/backward; 4 x 2048 tokens fits an 80 GB card without activation "
        "checkpointing (default 4; tiny: 2)",
    )
    ap.add_argument("--global-batch", type=int, default=None, help="sequences per step (default 16; tiny: 4)")
    ap.add_argument("--warmup", type=int, default=3, help="steps dropped from each side (default 3, at least 1)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per side (default 8)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="compile_layers: true for the pipeline, and the same per-layer torch.compile for the "
        "plain loop, so the ratio stays like for like (fuses the elementwise kernels)",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the card's dense bf16 peak for MFU (default: 989 for H100/H200; required for others)",
    )
    return ap.parse_args(argv)


def pick_workdir(requested: Path | None, need_gb: float) -> Path:
    if requested:
        requested.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=requested))
    # The trainer always checkpoints its last step (~15 GB for 1B with fp32 Adam state): RAM-backed
    # /dev/shm writes and hashes that in seconds instead of most of a minute on a network disk.
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need_gb * 1e9:
        return Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="gpu-bench-"))


def count_params(model_dir: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.names import tied_embeddings

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    total = sum(p.numel() for p in m.parameters())
    embed = m.model.embed_tokens.weight.numel()
    return {"total": total, "matmul": total - embed if not tied_embeddings(m.config.to_dict()) else total}


def run_pipeline(cfg_path: Path, metrics: Path, env: dict, timeout: float) -> list[float]:
    """`python -m pipeline.train CFG` in a child process; its output streams through, prefixed.

    Returns the wall-clock time at which each metrics.jsonl line appeared. The trainer's own
    step_time_s is host time around engine.train_batch; on a GPU, kernels still queued when it
    returns finish during the following float(loss), outside that window. The gap between two
    metrics lines covers the whole step, sync included, so it is the figure we report.
    """
    cmd = [sys.executable, "-m", "pipeline.train", str(cfg_path)]
    log(f"$ {' '.join(cmd)}")
    tail: deque[str] = deque(maxlen=60)
    stamps: list[float] = []
    done = threading.Event()

    def watch():  # 2 ms polling: negligible against ~0.5 s steps
        while not done.is_set():
            try:
                n = metrics.read_bytes().count(b"\n")
            except OSError:
                n = 0
            now = time.perf_counter()
            stamps.extend([now] * (n - len(stamps)))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    deadline = time.monotonic() + timeout
    try:
        for line in p.stdout:
            tail.append(line.rstrip())
            print(f"    | {line.rstrip()}", flush=True)
            if time.monotonic() > deadline:
                p.kill()
                raise RuntimeError(f"pipeline.train ran over {timeout:.0f}s; killed")
        if p.wait():
            raise RuntimeError(f"pipeline.train exited {p.returncode}; last lines:\n" + "\n".join(tail))
    finally:
        done.set()
        watcher.join()
    return stamps


def baseline_step_times(
    cfg_path: Path, steps: int, device: str, bf16: bool, compile_layers: bool = False
) -> tuple[list[float], dict]:
    """bench.baseline's plain loop on the GPU: same model, batches, optimizer settings.

    Mixed precision the way plain PyTorch does it (fp32 weights, autocast to bf16), the honest
    counterpart of DeepSpeed's bf16 weights + fp32 master copy. Returns step times and what
    attention kernel ran.
    """
    import torch

    from bench.baseline import PlainLoop
    from pipeline.config import load_config
    from pipeline.training.plan import build_plan

    cfg = load_config(cfg_path)
    loop = PlainLoop(build_plan(cfg, 1, use_gpu=device == "cuda"), device, bf16, compile_layers)
    info = {"attn_implementation": loop.model.config._attn_implementation}

    def first(k, seconds):
        if k == 0:
            log(f"  baseline first step {seconds:.2f}s")

    times = loop.step_times(steps, on_step=first)
    info["attention_kernels"] = attention_kernels(loop.model, device, cfg.data.seq_len, loop.autocast)
    if device == "cuda":
        info["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
    return times, info


def attention_kernels(model, device: str, seq: int, autocast) -> list[str]:
    """Which scaled-dot-product kernels one forward actually calls (flash, efficient, cudnn, math).

    The pipeline calls the same HF decoder layers with the same mask (none: `is_causal`), so the
    kernel seen here is the kernel it uses."""
    import torch
    from torch.profiler import profile

    x = torch.randint(0, model.config.vocab_size, (1, seq), device=device)
    with torch.no_grad(), autocast, profile() as prof:
        model(input_ids=x)
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "scaled_dot_product" in n or "flash" in n.lower() or "fmha" in n.lower())


def pipeline_mask_is_causal(model_dir: Path, device: str) -> bool:
    """True when the pipeline's layers get no mask tensor (sdpa then runs causal flash attention)."""
    import torch
    from transformers import AutoConfig
    from transformers.masking_utils import create_causal_mask

    cfg = AutoConfig.from_pretrained(str(model_dir))
    cfg._attn_implementation = "sdpa"
    h = torch.zeros(1, 16, cfg.hidden_size, device=device)
    pos = torch.arange(16, device=device).unsqueeze(0)
    return create_causal_mask(config=cfg, inputs_embeds=h, attention_mask=None, cache=None, position_ids=pos) is None


def to_markdown(res: dict) -> str:
    lines = [
        f"# GPU benchmark: {res['device']}",
        "",
        f"`{res['command']}`; {res['model_desc']}; {res.get('seconds', 0):.0f} s total.",
        "",
        "| figure | value | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for f in res.get("figures", []):
        met = {True: "yes", False: "**no**", None: "-"}[f["met"]]
        lines.append(
            f"| {f['name']} | {f['value']:,.1f} {f['unit']} | {f['baseline']:,.1f} | {f['ratio']} | "
            f"{f['goal']} | {met} |"
        )
    lines += ["", "```", json.dumps({k: v for k, v in res.items() if k not in ("figures",)}, indent=2), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tiny = args.tiny
    # The accelerator DeepSpeed uses is read from the environment at import; `make` exports cpu
    # for the CPU targets, so say which one explicitly, for us and the trainer's process.
    os.environ["DS_ACCELERATOR"] = "cpu" if tiny else "cuda"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")
    if tiny:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    bindir = str(Path(sys.executable).parent)  # the venv's `ninja` if DeepSpeed JIT-builds an op (bench.run)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    import torch

    from bench.kit import random_llama
    from bench.synth import write_random_shards

    if not tiny and not torch.cuda.is_available():
        print(
            "error: no CUDA device visible (torch.cuda.is_available() is False); this script measures a GPU. "
            "Use --tiny for a CPU smoke run.",
            file=sys.stderr,
        )
        return 2
    device = "cpu" if tiny else "cuda"
    dev_name = "cpu (--tiny smoke run)" if tiny else torch.cuda.get_device_name(0)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in dev_name), None)
    if peak is None:
        if not tiny:
            print(f"error: unknown peak bf16 TFLOP/s for {dev_name!r}: pass --peak-tflops", file=sys.stderr)
            return 2
        peak = 989.0
    m = MODEL_TINY if tiny else MODEL_1B
    S = args.seq_len or (32 if tiny else 2048)
    micro = args.micro_batch or (2 if tiny else 4)
    G = args.global_batch or (4 if tiny else 16)
    W, K = args.warmup, args.steps
    if W < 1 or K < 1:
        print("error: --warmup and --steps must be at least 1", file=sys.stderr)
        return 2
    if G % micro:
        print(f"error: --global-batch {G} must be a multiple of --micro-batch {micro}", file=sys.stderr)
        return 2
    work = pick_workdir(args.workdir, need_gb=0 if tiny else 24)
    res = {
        "device": dev_name,
        "command": "python -m bench.gpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "workdir": str(work),
        "seq_len": S,
        "micro_batch": micro,
        "global_batch": G,
        "warmup_steps": W,
        "timed_steps": K,
        "peak_tflops": peak,
        "compile_layers": args.compile,
    }
    try:
        _measure(res, work, m, S, micro, G, W, K, device, tiny, peak, random_llama, write_random_shards)
        code = 0
    except Exception as e:  # noqa: BLE001 - reported in gpu.json and on stderr, then a failing exit
        res["error"] = f"{type(e).__name__}: {e}"
        print(f"error: {res['error']}", file=sys.stderr)
        code = 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = round(time.perf_counter() - T0, 1)
    from data_prep.files import atomic_write_json, atomic_write_text

    atomic_write_json(args.out / "gpu.json", res)
    atomic_write_text(args.out / "gpu.md", to_markdown(res))
    print(to_markdown(res))
    log(f"wrote {args.out / 'gpu.json'} and gpu.md")
    return code


def _measure(res, work, m, S, micro, G, W, K, device, tiny, peak, random_llama, write_random_shards):
    import torch
    import yaml

    from bench.kit import make_tokenizer
    from pipeline.training.metrics_log import read_metrics

    log(f"device {res['device']}; work dir {work}")
    tok = make_tokenizer(work / "tok")
    model_dir = random_llama(
        work / "model", **m, dtype=None if tiny else torch.bfloat16, tokenizer_dir=tok, device="cpu" if tiny else "cuda"
    )
    if device == "cuda":
        torch.cuda.empty_cache()
    n = count_params(model_dir)
    res["params"] = n
    res["model_desc"] = (
        f"Llama {n['total'] / 1e9:.2f}B ({m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads / "
        f"{m['kv_heads']} KV, MLP {m['intermediate']}, vocab {m['vocab_size']}), seq {S}, "
        f"batch {G} (micro {micro}), bf16"
        if not tiny
        else "toy model on CPU (fp32)"
    )
    log(f"model: {res['model_desc']}")
    tokens = (W + K + 2) * G * (S + 1) * 2
    manifest = write_random_shards(work / "data" / "raw", m["vocab_size"], tokens, tok, seed=1)
    log(f"random token shards: {tokens:,} tokens")
    cfg = {
        "model": str(model_dir),
        "data": str(manifest),
        "phase": "full",
        "seq_len": S,
        "micro_batch_size": micro,
        "global_batch_size": G,
        "steps": W + K,
        "lr": 1e-4,
        "warmup_steps": 0,
        "out": str(work / "run"),
        "save_every": 100_000,
        "keep_last": 1,
        "seed": 1,
        "ds_config": str(REPO / "ds_configs" / ("cpu_fp32_zero1.json" if tiny else "gpu_bf16_zero1.json")),
        "activation_checkpoint_interval": 0,
        "compile_layers": res.get("compile_layers", False),
    }
    cfg_path = work / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    metrics = work / "run" / "metrics.jsonl"
    stamps = run_pipeline(cfg_path, metrics, env, timeout=420)
    own_times = [r["step_time_s"] for r in read_metrics(metrics)][W:]
    if len(stamps) != W + K:
        raise RuntimeError(f"{metrics}: saw {len(stamps)} lines appear, expected {W + K}")
    pipe_times = [b - a for a, b in zip(stamps, stamps[1:])][W - 1 :]  # step k+2 lies between lines k, k+1
    shutil.rmtree(work / "run" / "checkpoints", ignore_errors=True)  # frees /dev/shm before the baseline
    log(f"pipeline step times after warm-up (wall clock between metrics lines): {[round(t, 3) for t in pipe_times]}")
    log(f"  (the trainer's own step_time_s: {[round(t, 3) for t in own_times]})")

    log("plain PyTorch baseline on the same batches")
    base_all, info = baseline_step_times(
        cfg_path, W + K, device, bf16=not tiny, compile_layers=res.get("compile_layers", False)
    )
    base_times = base_all[W:]
    log(f"baseline step times after warm-up: {[round(t, 3) for t in base_times]}")
    res.update(info)
    res["pipeline_mask_is_causal"] = pipeline_mask_is_causal(model_dir, device)
    res["pipeline_step_times_s"] = [round(t, 4) for t in pipe_times]
    res["pipeline_own_step_time_s"] = [round(t, 4) for t in own_times]
    res["baseline_step_times_s"] = [round(t, 4) for t in base_times]

    tok = G * S
    tps_pipe, tps_base = tok / statistics.median(pipe_times), tok / statistics.median(base_times)
    flops_per_token = 6 * n["matmul"]
    tf_pipe, tf_base = flops_per_token * tps_pipe / 1e12, flops_per_token * tps_base / 1e12
    from bench.synth import figure

    res["figures"] = [
        figure(
            "GPU tokens/s, pipeline.train 1 stage bf16 vs plain PyTorch (autocast bf16, AdamW)",
            round(tps_pipe, 1),
            round(tps_base, 1),
            f">= {GOAL_SPEED}",
            tps_pipe / tps_base >= GOAL_SPEED,
            "tokens/s",
        ),
        figure(
            "MFU, pipeline.train: 6·N·tokens/s vs peak dense bf16",
            round(tf_pipe, 3),
            peak,
            f">= {GOAL_MFU}",
            tf_pipe / peak >= GOAL_MFU,
            "TFLOP/s",
            N=n["matmul"],
        ),
        figure(
            "MFU, plain PyTorch baseline (reference)",
            round(tf_base, 3),
            peak,
            "reference",
            None,
            "TFLOP/s",
            N=n["matmul"],
        ),
    ]
    for f in res["figures"]:
        log(f"{f['name']}: {f['value']} / {f['baseline']} = {f['ratio']} (goal {f['goal']})")


if __name__ == "__main__":
    sys.exit(main())
