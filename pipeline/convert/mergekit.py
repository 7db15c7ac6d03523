"""The same merges as mergekit configs, so a user can rebuild (or audit) them with the field's tool.

mergekit reads Hugging Face directories, so a pipeline run must be exported first; the YAML's
header names the commands. Every path is absolute: mergekit's model-card writer takes a relative
path with one slash (`exports/a-raw`) for a hub repository id and asks the hub, which fails
offline after the tensors are written.
"""
from __future__ import annotations

import json
from pathlib import Path


def _where(src, label: str, out: Path) -> tuple[str, str | None]:
    """(absolute HF directory mergekit reads, the export command that makes it, or None)."""
    if src.kind == "hf":
        return str(src.path.resolve()), None
    path = out.resolve().parent / "exports" / f"{label}-step{src.step}"
    return str(path), f"python -m pipeline.export {src.path.resolve()} --step {src.step} --out {path}"


def _header(title: str, cmds: list[str]) -> list[str]:
    lines = [f"# {title}: mergekit-yaml mergekit.yaml OUT_DIR"]
    if cmds:
        lines += ["# mergekit reads Hugging Face directories; export the pipeline runs first:"]
        lines += [f"#   {c}" for c in cmds]
    return lines


def passthrough(raw, chat, f: int, L: int, dtype: str, out: Path, donor_rows: dict | None = None) -> str:
    raw_path, raw_cmd = _where(raw, "a-raw", out)
    chat_path, chat_cmd = _where(chat, "a-chat", out)
    donor_note = [] if not donor_rows else [
        "# DONOR TRANSPLANT: pipeline.transplant also took the embedding rows of the donor's chat tokens",
        f"# ({', '.join(donor_rows.values())}) from the donor; mergekit keeps A-Raw's whole embedding matrix,",
        "# so those rows differ. Every other tensor is the same."]
    q = json.dumps  # a JSON string is a valid YAML scalar, whatever the path contains
    lines = _header("The same transplant as a mergekit config", [c for c in (raw_cmd, chat_cmd) if c]) + [
        "# How mergekit builds it (its planner takes pre-layer weights from the first slice's model and",
        "# post-layer weights from the last slice's; config.json and tokenizer files from base_model):",
        f"#   layers [0, {f}) from A-Raw, [{f}, {L}) from A-Chat        -> same as pipeline.transplant",
        "#   embeddings from A-Raw (first slice)                  -> same tensor: the transplant checked that",
        "#                                                           both inputs' embeddings are bitwise equal",
        "#   final norm + lm_head from A-Chat (last slice)        -> same",
        "#   config.json, tokenizer, chat template from base_model (A-Chat; exported, it carries the template",
        "#   its chat data was rendered with)                     -> same files",
        "# Differences: mergekit re-serialises config.json and generation_config.json (pipeline.transplant",
        "# adds the chat template's end-of-turn token to eos_token_id), shards and names files its own way",
        "# and writes no provenance; it does not check that the inputs share a base model, a boundary and",
        "# their embeddings. The tensors are bitwise the same (tests/test_mergekit.py runs mergekit).",
        *donor_note,
        "merge_method: passthrough",
        f"base_model: {q(chat_path)}",
        f"dtype: {dtype}",
        "slices:",
        "  - sources:",
        f"      - model: {q(raw_path)}",
        f"        layer_range: [0, {f}]",
        "  - sources:",
        f"      - model: {q(chat_path)}",
        f"        layer_range: [{f}, {L}]",
    ]
    return "\n".join(lines) + "\n"


def task_arithmetic(raw, chat, base, ratio: float, dtype: str, out: Path) -> str:
    raw_path, raw_cmd = _where(raw, "a-raw", out)
    chat_path, chat_cmd = _where(chat, "chat", out)
    q = json.dumps
    lines = _header("The same chat vector as a mergekit config", [c for c in (raw_cmd, chat_cmd) if c]) + [
        "# task_arithmetic computes base + sum_i weight_i * (model_i - base); with these weights that is",
        f"#   base + 1.0 * (A-Raw - base) + {ratio} * (chat - base)  = A-Raw + {ratio} * (chat - base),",
        "# in float64 (dtype), cast to out_dtype: the arithmetic pipeline.chat_vector does, so the tensors",
        "# are bitwise the same (tests/test_mergekit.py runs mergekit). Differences: mergekit copies",
        "# config.json and the tokenizer from base_model (pipeline.chat_vector from the chat model, with the",
        "# chat template it was trained with and a generation config that stops at the end of turn), and",
        "# writes no provenance.",
        "merge_method: task_arithmetic",
        f"base_model: {q(str(base.path.resolve()))}",
        "dtype: float64",
        f"out_dtype: {dtype}",
        "models:",
        f"  - model: {q(raw_path)}",
        "    parameters:",
        "      weight: 1.0",
        f"  - model: {q(chat_path)}",
        "    parameters:",
        f"      weight: {ratio}",
    ]
    return "\n".join(lines) + "\n"
