"""Measuring a Hugging Face chat model (`python -m pipeline.evaluate`).

Owns: the metrics and their exact definitions, and the eval-file formats (metrics.py), running
a model over them (runner.py: greedy generation with the model's own generation config, candidate
scoring, perplexity), the results files (report.py: results.json, a markdown table, a chart), and
the layer probe (layer_probe.py: where chat tuning changed a model, and a suggested format_start).

May import: `pipeline.hf`, `pipeline.convert.sources` (the probe reads weights one layer at a time,
as conversion does) and `data_prep`. Never imports training: it evaluates any local model
directory, whoever made it.
"""
