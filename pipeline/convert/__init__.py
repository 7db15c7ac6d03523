"""Turning checkpoints into Hugging Face models (`python -m pipeline.export`, `pipeline.transplant`).

Owns: reading weights one layer at a time from run directories and HF directories (sources.py),
writing safetensors shards as they stream by (shards.py), the side files of a written model
(hf_files.py: config, tokenizer, a generation config that stops at the end of turn), which chat
template a written model ships and whether a merge's inputs agree on it (template.py), the atomic
output directory with its provenance record (output.py), and the merges themselves (export.py,
transplant.py, chat_vector.py) with their mergekit equivalents (mergekit.py).

May import: the shared modules of `pipeline` (groups, names, rundir, hf) and `data_prep` (common;
tokenizer and template, for the tokenizer files and the chat template rules).
Never imports `pipeline.training` (no DeepSpeed needed to convert), `pipeline.evaluation` or the demo.
"""
