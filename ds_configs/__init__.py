"""The DeepSpeed JSONs, shipped as package data (found through pipeline.shipped).

cpu_fp32_zero1.json  fp32 on CPU ranks (gloo), ZeRO-1: what the tests and the demo run.
gpu_bf16_zero1.json  bf16 weights with fp32 master weights and Adam moments, ZeRO-1: GPU runs.

Each holds only what DeepSpeed alone knows (precision, the ZeRO stage, Adam's betas and eps);
everything a run config owns is refused here (pipeline/training/deepspeed_json.py).
"""
