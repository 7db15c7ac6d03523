"""Stable layer names: decoder layer i is `model.layers.i` everywhere. The one owner of HF tensor
names: every other module asks here instead of spelling a name or a pattern.

The pipeline has exactly one entry per HF decoder layer, so DeepSpeed's checkpoint file
`layer_{i:02d}-model_states.pt` holds HF layer i. The embeddings ride on layer 0 and the
final norm and LM head on layer L-1, instead of being entries of their own, because an
extra entry would shift every index by one and break "layer i is layers.i".

Keys inside pipeline layer i and their HF names:
    decoder.X        -> model.layers.{i}.X
    embed_tokens.X   -> model.embed_tokens.X      (layer 0 only)
    norm.X           -> model.norm.X              (layer L-1 only)
    lm_head.X        -> lm_head.X                 (layer L-1 only; dropped when tied)
    anchor           -> (none) a 1-element trainable scalar that lets a stage with nothing
                        to train join backward; it multiplies by zero and is never exported.
"""

from __future__ import annotations

import re

ANCHOR = "anchor"
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
EMBED = "model.embed_tokens."  # prefix of the embedding matrix
NORM = "model.norm."  # prefix of the final norm
HEAD = "lm_head."  # prefix of the LM head
EMBED_WEIGHT = f"{EMBED}weight"
HEAD_WEIGHT = f"{HEAD}weight"


def layer_prefix(i: int) -> str:
    """The HF name prefix of decoder layer i's tensors."""
    return f"model.layers.{i}."


def layer_of(hf_name: str) -> int | None:
    """The decoder layer an HF tensor name belongs to, or None (embeddings, norm, head)."""
    m = _HF_LAYER.match(hf_name)
    return int(m.group(1)) if m else None


def tied_embeddings(hf_config: dict) -> bool:
    """Whether a config.json ties the LM head to the embedding matrix (then a checkpoint may hold
    no `lm_head.weight`, and training the one trains the other). HF's default is untied."""
    return bool(hf_config.get("tie_word_embeddings", False))


def layer_file(i: int) -> str:
    """DeepSpeed's per-layer checkpoint file for global layer index i."""
    return f"layer_{i:02d}-model_states.pt"


def to_hf_name(layer: int, key: str) -> str | None:
    """HF parameter name of `key` inside pipeline layer `layer` (None: not exported)."""
    if key == ANCHOR:
        return None
    head, _, rest = key.partition(".")
    if head == "decoder":
        return f"{layer_prefix(layer)}{rest}"
    if head in ("embed_tokens", "norm"):
        return f"model.{key}"
    if head == "lm_head":
        return key
    raise KeyError(f"unexpected key {key!r} in pipeline layer {layer}")


def to_pipeline_name(hf_name: str, num_layers: int) -> tuple[int, str]:
    """Inverse of to_hf_name: (pipeline layer index, key inside it)."""
    m = _HF_LAYER.match(hf_name)
    if m:
        return int(m.group(1)), f"decoder.{m.group(2)}"
    if hf_name.startswith(EMBED):
        return 0, hf_name[len("model.") :]
    if hf_name.startswith(NORM):
        return num_layers - 1, hf_name[len("model.") :]
    if hf_name.startswith(HEAD):
        return num_layers - 1, hf_name
    raise KeyError(f"unexpected HF parameter name {hf_name!r}")
