"""What a real run needs per GPU and per node, computed (not measured) from the published configs of
Llama-3-8B and Llama-3-70B with the trainer's own estimate (RunPlan.memory_per_stage's
stage_memory) and the stage partition it would use (pipeline.training.plan.partition).

    python -m bench.memory_table        # prints the markdown table the README shows

Per GPU, for the most loaded stage:
  weights     every parameter of the stage in bf16 (2 B)
  gradients   trained parameters, fp32 (4 B)
  optimizer   trained parameters: fp32 master + Adam's two moments (12 B), split over DP by ZeRO-1
  activations the trainer's estimate (plan.stage_activations): what autograd saves in transformers'
              Llama layer with sdpa attention (no s² term), counted on CPU: per token, a trained layer
              4·i + 8·h + 2·kv values, a frozen one gradients pass through 3·i + 4·h + 2·kv, bf16;
              1F1B keeps up to P - s micro-batches in flight on stage s; with activation checkpointing
              every layer, one hidden state per layer instead, plus one layer while it is recomputed.
              Forward-only frozen layers keep none. The last stage adds the loss (vocab x 10 B per
              token) and every trained stage the weight gradients of the micro-batch being accumulated
              (plan.accumulation_buffers).
Host RAM per node: each rank reads only its stage's tensors (bf16) before they move to its GPU,
plus ~3 GB of process (torch, DeepSpeed, CUDA context): 8 ranks per node. Before stage-only loading,
every rank loaded the whole model in fp32 first.
"""

from __future__ import annotations

import math

import torch

from pipeline.groups import LayerGroups
from pipeline.training.plan import accumulation_buffers, activation_kind, partition, stage_activations, stage_memory

MODELS = {
    "Llama-3-8B": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "Llama-3-70B": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}
# (model, GPUs, pipeline stages P): one node of 8 GPUs for 8B, two for 70B
LAYOUTS = [("Llama-3-8B", 8, 2), ("Llama-3-8B", 8, 4), ("Llama-3-70B", 16, 8), ("Llama-3-70B", 16, 16)]
SEQ, MICRO, PROCESS_GB, GPUS_PER_NODE = 4096, 1, 3.0, 8


def layer_params(cfg: dict) -> tuple[int, int, int]:
    """(per decoder layer, embeddings, head) parameter counts of a Llama config."""
    h, i, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    hd = h // cfg["num_attention_heads"]
    layer = h * h * 2 + 2 * h * kv * hd + 3 * h * i + 2 * h
    emb = cfg["vocab_size"] * h
    return layer, emb, emb + h  # the head plus the final norm


def row(name: str, gpus: int, P: int, phase: str, checkpointing: bool) -> dict:
    cfg = MODELS[name]
    L = cfg["num_hidden_layers"]
    g = LayerGroups.resolve(0.25, 0.75, L, False, phase)
    bounds = partition(g, P)
    dp = gpus // P
    per_layer, emb, head = layer_params(cfg)
    worst = None
    for s in range(P):
        lo, hi = bounds[s], bounds[s + 1]
        params = per_layer * (hi - lo) + (emb if lo == 0 else 0) + (head if hi == L else 0)
        trained = per_layer * sum(g.layer_trained(i) for i in range(lo, hi)) + (
            head if hi == L and g.layer_trained(L - 1) else 0
        )
        m = stage_memory(params, trained, torch.bfloat16, 1, dp)
        # The trainer's own activation estimate; 1F1B keeps up to P - s micro-batches in flight on stage s
        # (a step has at least P micro-batches, or the pipeline never fills).
        kinds = [(activation_kind(g, i), i == g.first_trained_layer) for i in range(lo, hi)]
        act = stage_activations(
            cfg,
            kinds,
            last=hi == L,
            tokens=SEQ * MICRO,
            positions=SEQ,
            in_flight=P - s,
            dtype=torch.bfloat16,
            checkpoint_interval=1 if checkpointing else 0,
        )
        act += accumulation_buffers(cfg, trained > 0, P, torch.bfloat16)
        total = m["total"] + act
        if worst is None or total > worst["total"]:
            worst = {**m, "activations": act, "total": total, "stage": s, "layers": (lo, hi - 1), "host": params * 2}
    host_node = min(GPUS_PER_NODE, gpus) * (worst["host"] / 2**30 + PROCESS_GB)
    whole_fp32 = (per_layer * L + emb + head) * 4 / 2**30
    return {
        "model": name,
        "gpus": gpus,
        "P": P,
        "dp": dp,
        "phase": phase,
        "checkpointing": checkpointing,
        "stage": worst["stage"],
        "layers": worst["layers"],
        "gpu_gb": worst["total"] / 2**30,
        "weights_gb": worst["weights"] / 2**30,
        "state_gb": (worst["gradients"] + worst["optimizer"]) / 2**30,
        "act_gb": worst["activations"] / 2**30,
        "host_node_gb": host_node,
        "host_node_before_gb": min(GPUS_PER_NODE, gpus) * (whole_fp32 + PROCESS_GB),
    }


def table() -> str:
    lines = [
        "| model | GPUs | P x DP | phase | act. ckpt | worst stage (layers) | per GPU: weights + grad/optim + "
        "activations = total | host RAM per node (was) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, gpus, P in LAYOUTS:
        for phase in ("chat", "raw"):
            for ckpt in (False, True):
                r = row(name, gpus, P, phase, ckpt)
                lines.append(
                    f"| {name} | {gpus} | {P} x {r['dp']} | {phase} | {'yes' if ckpt else 'no'} | {r['stage']} "
                    f"({r['layers'][0]}-{r['layers'][1]}) | {r['weights_gb']:.1f} + {r['state_gb']:.1f} + "
                    f"{r['act_gb']:.1f} = **{r['gpu_gb']:.1f} GB** | {r['host_node_gb']:.0f} GB "
                    f"({r['host_node_before_gb']:.0f} GB) |"
                )
    return "\n".join(lines) + f"\n\nseq_len {SEQ}, micro batch {MICRO}, bf16 weights, ZeRO-1; GB = 2^30 bytes.\n"


if __name__ == "__main__":
    assert math.isfinite(row("Llama-3-8B", 8, 2, "raw", False)["gpu_gb"])
    print(table())
