"""Measuring a Hugging Face chat model (`python -m pipeline.evaluate`).

Owns: the metrics and their exact definitions, and the eval-file formats (metrics.py), running
a model over them (runner.py: greedy generation with the model's own generation config, candidate
scoring, perplexity) and the results files (report.py: results.json, a markdown table, a chart).

May import: `pipeline.hf` and `data_prep.common`. Never imports training or conversion: it
evaluates any local HF directory, whoever made it.
"""
