"""Turning checkpoints into Hugging Face models (`python -m pipeline.export`, `pipeline.transplant`).

Owns: reading weights one layer at a time from run directories and HF directories (sources.py),
writing safetensors shards as they stream by (shards.py), the side files of a written model
(hf_files.py: config, tokenizer, a generation config that stops at the end of turn), the atomic
output directory with its provenance record (output.py), and the merges themselves (export.py,
transplant.py) with their mergekit equivalents (mergekit.py).

May import: the shared modules of `pipeline` (groups, names, rundir, hf) and `data_prep.common`.
Never imports `pipeline.training` (no DeepSpeed needed to convert), `pipeline.evaluation` or the demo.
"""
