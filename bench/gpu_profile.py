"""Where a GPU training step's time goes (the profile behind bench/gpu.py's MFU figure).

Profiles one step of the plain loop on the same ~1.1B Llama (bf16 autocast, torch AdamW) and
groups CUDA kernel time into matmul, attention, elementwise/norm, optimizer and other.
`python -m bench.gpu_profile [--micro-batch 4] [--out DIR]` -> gpu_profile.md. GPU only.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from bench.gpu import MODEL_1B  # same model as the benchmark

CATEGORIES = [
    ("attention", ("flash", "sdpa", "fmha", "attention")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "wgmma")),
    ("optimizer", ("multi_tensor", "foreach", "adam")),
    ("elementwise/norm/rotary", ("elementwise", "vectorized", "reduce", "softmax", "cat", "copy", "fill")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def main(argv=None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args(argv)
    m = MODEL_1B
    from bench.kit import llama_config

    model = LlamaForCausalLM(llama_config(**m)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, m["vocab_size"], (a.micro_batch, a.seq_len), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 3
    n = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    tflops = 6 * n * a.micro_batch * a.seq_len / dt / 1e12
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_cat, total = defaultdict(float), 0.0
    top = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t <= 0 or e.key.startswith(("aten::", "Optimizer", "ProfilerStep", "autograd")):
            continue
        by_cat[category(e.key)] += t
        total += t
        top.append((t, e.key))
    lines = [
        f"# GPU step profile: {torch.cuda.get_device_name()}",
        "",
        f"micro batch {a.micro_batch} x seq {a.seq_len}: {dt * 1e3:.0f} ms/step, {tflops:.0f} TFLOP/s (6N), "
        f"MFU {tflops / 989:.2f}",
        "",
        "| kernels | share of GPU time |",
        "|---|---|",
    ]
    lines += [f"| {c} | {t / total:.1%} |" for c, t in sorted(by_cat.items(), key=lambda kv: -kv[1])]
    lines += ["", "top kernels:", ""] + [f"- {t / total:.1%} {k[:110]}" for t, k in sorted(top, reverse=True)[:12]]
    text = "\n".join(lines) + "\n"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"gpu_profile_mb{a.micro_batch}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
