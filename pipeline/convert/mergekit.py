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
    donor_note = (
        []
        if not donor_rows
        else [
            "# DONOR TRANSPLANT: pipeline.transplant also took the embedding rows of the donor's chat tokens",
            f"# ({', '.join(donor_rows.values())}) from the donor; mergekit keeps A-Raw's whole embedding matrix,",
            "# so those rows differ. Every other tensor is the same.",
        ]
    )
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


# ----------------------------------------------------------------------------- layer-aware weights
#
# How mergekit 0.1.5 gives a tensor its `weight` (mergekit/config.py evaluate_setting, plan.py
# MergePlanner, parameter_resolver.py), which decides how the YAML below is written:
#   - a list of entries `{filter: TEXT, value: V}`: the first entry whose TEXT occurs in the tensor's
#     name wins (a substring test); an entry without a filter matches every tensor;
#   - a scalar V is used as it is; a list V of numbers is a gradient over the decoder layers: with
#     `models:` every input is one slice of all L layers, layer i is planned at t = i / (L - 1)
#     (t = 1 when L = 1), read at position p = t * (len(V) - 1), and the value is
#     (1 - frac) * V[floor(p)] + frac * V[floor(p) + 1], frac = p - floor(p);
#   - the embeddings (pre-weights) and the final norm and lm_head (post-weights) are planned outside
#     the slice, at t = 0: a gradient gives them V[0], whatever their group.
# So a list of L values gives layer i exactly V[i] only when t * (L - 1) comes back to exactly i in
# floating point. It does for L = 4 or 32, not for L = 24 (layer 13), 48 (six layers) or 80 (seven):
# there p lands a hair below i and the value mixes in the weight of layer i - 1. Such a layer gets a
# filter entry of its own, `model.layers.i.` (a scalar: no interpolation); so do the embeddings, the
# final norm and the head. Every weight is then exactly the product's, and task_arithmetic computes
# base + sum_k w_k * (model_k - base) in float64 as pipeline.chat_vector does: bitwise the same.


def list_position_exact(i: int, num_layers: int) -> bool:
    """Whether mergekit reads entry i of a weight list of length L for decoder layer i (of L) exactly."""
    t = i / (num_layers - 1) if num_layers > 1 else 1
    return t * (num_layers - 1) == i


def _num(x: float) -> str:
    """A float as YAML reads it back as exactly that float (PyYAML wants a '.' before an exponent)."""
    import yaml

    text = repr(float(x))
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    back = yaml.safe_load(text)
    if not isinstance(back, float) or back != x:
        raise AssertionError(f"weight {x!r} does not survive YAML as {text!r}")
    return text


def _weight_entries(w, side: int, indent: str) -> list[str]:
    """The `weight:` of one input (side 0: A-Raw's a, side 1: the chat model's b)."""
    from ..names import EMBED, HEAD, NORM, layer_prefix

    q = json.dumps
    L = w.num_layers
    per_layer = (w.raw, w.chat)[side]
    lines = [
        f"{indent}- {{filter: {q(EMBED)}, value: {_num(w.embed[side])}}}   # embeddings"
        + (" (and the tied LM head)" if w.head is None else ""),
        f"{indent}- {{filter: {q(NORM)}, value: {_num(w.norm[side])}}}   # final norm",
    ]
    if w.head is not None:
        lines.append(f"{indent}- {{filter: {q(HEAD)}, value: {_num(w.head[side])}}}   # LM head")
    for i in range(L):
        if not list_position_exact(i, L):
            lines.append(
                f"{indent}- {{filter: {q(layer_prefix(i))}, value: {_num(per_layer[i])}}}   # layer {i}: "
                f"mergekit would read the list at {i / (L - 1) * (L - 1)!r}, not {i}"
            )
    lines.append(f"{indent}- value:   # decoder layers: layer i takes entry i")
    for i in range(L):
        label = w.labels[i] if w.labels and w.labels[i] else ""
        lines.append(f"{indent}    - {_num(per_layer[i])}   # layer {i}" + (f" ({label})" if label else ""))
    return lines


def layer_arithmetic(raw, chat, base, weights, dtype: str, out: Path) -> str:
    """The layer-aware chat vector (layer_weights.LayerWeights) as a task_arithmetic config."""
    raw_path, raw_cmd = _where(raw, "a-raw", out)
    chat_path, chat_cmd = _where(chat, "chat", out)
    q = json.dumps
    L = weights.num_layers
    pinned = [i for i in range(L) if not list_position_exact(i, L)]
    lines = _header("The same layer-aware chat vector as a mergekit config", [c for c in (raw_cmd, chat_cmd) if c]) + [
        "# task_arithmetic computes base + w_raw * (A-Raw - base) + w_chat * (chat - base) for each tensor,",
        "# in float64 (dtype), cast to out_dtype: the arithmetic pipeline.chat_vector does, with each tensor's",
        "# weights from its table (chat_vector.json `weights`), so the tensors are bitwise the same",
        "# (tests/test_layer_merge.py runs mergekit). How the weights reach each tensor in mergekit:",
        "#   - the first `filter:` entry whose text occurs in the tensor's name wins;",
        f"#   - the last entry's list has one value per decoder layer (L = {L}): mergekit reads layer i at",
        "#     position i/(L-1)*(L-1) of the list, interpolating between neighbours;",
        "#   - the embeddings, final norm and LM head would read the list's first value, so they have filters;",
        (
            "#   - for this L every layer's position is exact, so no layer needs a filter of its own."
            if not pinned
            else f"#   - for this L layer(s) {', '.join(map(str, pinned))} would be read a hair off their entry "
            "(mixing in"
            "\n#     a neighbour's weight), so each has a filter of its own with its exact weight."
        ),
        "# Differences: mergekit copies config.json and the tokenizer from base_model (pipeline.chat_vector from",
        "# the chat model, with the chat template it was trained with and a generation config that stops at",
        "# the end of turn), and writes no provenance.",
        "merge_method: task_arithmetic",
        f"base_model: {q(str(base.path.resolve()))}",
        "dtype: float64",
        f"out_dtype: {dtype}",
        "models:",
        f"  - model: {q(raw_path)}",
        "    parameters:",
        "      weight:   # a: how much of A-Raw's change (A-Raw - base)",
        *_weight_entries(weights, 0, "        "),
        f"  - model: {q(chat_path)}",
        "    parameters:",
        "      weight:   # b: how much of the chat model's change (chat - base)",
        *_weight_entries(weights, 1, "        "),
    ]
    return "\n".join(lines) + "\n"
