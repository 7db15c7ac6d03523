"""Chat vector: θ = θ_raw + ratio × (θ_chat − θ_base), over every tensor.

The field's answer to the same problem (Chat Vector, Huang et al., ACL 2024; instruction
residuals, Jindal et al., 2024): continue pretraining the base on your documents (here: any run
or HF model trained from the base, such as A-Raw or a full continued pretraining), then add back
what chat tuning changed (the chat model minus its base). config.json, the tokenizer, the chat
template and the generation config come from the chat model, as for the transplant: the template
is the one its chat data was rendered with, and a --raw trained with another is refused unless
--chat-template-from chooses (template.py). --base's own template never counts.

Arithmetic: each tensor is computed as mergekit's `task_arithmetic` computes it with
`dtype: float64`, base + 1·(raw − base) + ratio·(chat − base) in float64, then cast to the output
dtype, so `mergekit.yaml` (written beside it) reproduces it bitwise. When A-Raw and the chat model
trained disjoint parameter sets, every tensor is exactly one of its inputs: the chat vector *is*
the transplant (tests/test_chat_vector.py checks that tensor by tensor).

Layer-aware (layer_weights.py): `--raw-weights` / `--chat-weights` per layer group (with
`--transition W` to blend across format_start) or `--layer-weights FILE` per layer give each tensor
its own weights, θ = base + a·(raw − base) + b·(chat − base), the same float64 arithmetic, and
mergekit.yaml expresses them as per-layer weight lists (mergekit.py says how, exactly).
Group weights that select whole groups (raw 1 below format_start, chat 1 from it up) give the
transplant; uniform weights give the chat vector (tests/test_layer_merge.py).

Streamed one layer at a time, like the transplant: memory is about one shard plus three layers.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from data_prep.errors import UserError

from .. import hf
from ..names import tied_embeddings
from . import layer_weights as lw
from . import mergekit
from .hf_files import check_tokenizer
from .output import check_out_not_input, output_dtype, write_model
from .shards import DEFAULT_SHARD_SIZE, parse_size
from .sources import HFSource, check_same_shape, open_source
from .template import for_merge
from .transplant import merge_groups  # the boundary rule of the transplant, for the per-group weights


def check_lineage(src, base: HFSource) -> None:
    """A run must have been trained from --base (its recorded fingerprint); an HF input can only be
    checked for shape. Otherwise the difference to --base would not be what training changed."""
    if src.kind != "run":
        return
    recorded = (src.run.get("base_model") or {}).get("fingerprint")
    if recorded != hf.model_identity(base.path, base.config)["fingerprint"]:
        raise UserError(
            f"{src.flag} {src.path} was trained from {(src.run.get('base_model') or {}).get('path')}, "
            f"not from --base {base.path} (run.json base_model.fingerprint differs): the chat vector "
            f"needs both models' own base"
        )


class ChatVector:
    """Layer i of the merge, from the same layer of the three inputs. `weights` None: the plain chat
    vector (raw 1, chat `ratio` for every tensor); else each tensor's (a, b) from the table."""

    def __init__(self, raw, chat, base, ratio: float, dtype, weights: lw.LayerWeights | None = None):
        self.raw, self.chat, self.base, self.ratio, self.dtype, self.config = raw, chat, base, ratio, dtype, chat.config
        self.weights = weights

    def layer(self, i: int) -> dict:
        r, c, b = self.raw.layer(i), self.chat.layer(i), self.base.layer(i)
        out = {}
        for name, (tb, ob) in b.items():
            for src, have in ((self.raw, r), (self.chat, c)):
                if name not in have:
                    raise UserError(f"{src.flag} {src.path}: lacks {name!r}, which --base has")
            tr, tc = r[name][0], c[name][0]
            if self.weights is None:
                wr, wc, how = 1.0, self.ratio, {"ratio": self.ratio}
            else:
                wr, wc = self.weights.of(name)
                how = {"weights": {"raw": wr, "chat": wc}}
            base64 = tb.to(torch.float64)
            # mergekit's order: deltas weighted, summed over the models, added to the base
            merged = base64 + ((tr.to(torch.float64) - base64) * wr + (tc.to(torch.float64) - base64) * wc)
            out[name] = (
                merged.to(self.dtype),
                {"input": "chat vector", **how, "raw": r[name][1], "chat": c[name][1], "base": ob},
            )
        return out


def check_weight_flags(ratio, raw_weights, chat_weights, transition, layer_weights, format_start) -> None:
    """Which flags go together; refused before any input is read."""
    given = lambda *pairs: [flag for flag, v in pairs if v is not None]
    if layer_weights is not None:
        clash = given(
            ("--raw-weights", raw_weights),
            ("--chat-weights", chat_weights),
            ("--transition", transition),
            ("--ratio", ratio),
            ("--format-start", format_start),
        )
        if clash:
            raise UserError(
                f"--layer-weights {layer_weights}: gives every weight itself (per layer, embed, norm, "
                f"head); drop {', '.join(clash)}"
            )
        return
    if ratio is not None and chat_weights is not None:
        raise UserError(
            f"--ratio {ratio}: is the chat weight of every tensor; with --chat-weights give each "
            f"group's chat weight there instead"
        )
    if raw_weights is None and chat_weights is None:
        for flag, v in (("--transition", transition), ("--format-start", format_start)):
            if v is not None:
                raise UserError(
                    f"{flag} {v}: only the per-group weights (--raw-weights, --chat-weights) use the "
                    f"layer groups; without them every tensor gets the same weights"
                )


def chat_vector(
    raw,
    chat,
    base,
    out,
    ratio: float | None = None,
    raw_step: int | None = None,
    chat_step: int | None = None,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    force: bool = False,
    dtype: str = "auto",
    chat_template_from: str | None = None,
    *,
    raw_weights=None,
    chat_weights=None,
    transition=None,
    layer_weights=None,
    format_start: int | None = None,
) -> dict:
    """Build the chat vector model in `out`; return chat_vector.json. Raises UserError, writing nothing.

    Without raw_weights / chat_weights / layer_weights: raw + ratio (default 1.0) x (chat - base).
    raw_weights / chat_weights: `frozen=1,raw=1,format=0` (or a dict) per layer group, with
    `transition` layers blended on each side of format_start (`format_start` only for two HF
    inputs, as for the transplant); layer_weights: a YAML file of per-layer lists (layer_weights.py)."""
    max_bytes = parse_size(max_shard_size)
    if ratio is not None and not math.isfinite(ratio):
        raise UserError(f"--ratio {ratio}: must be a finite number (1.0 adds the whole chat vector)")
    check_weight_flags(ratio, raw_weights, chat_weights, transition, layer_weights, format_start)
    ratio = 1.0 if ratio is None else ratio
    group_w = {
        flag: lw.parse_group_weights(v, flag)
        for flag, v in (("--raw-weights", raw_weights), ("--chat-weights", chat_weights))
        if v is not None
    }
    width = lw.parse_transition(transition) if transition is not None else 0
    rs = open_source(raw, raw_step, "--raw", "--raw-step")
    cs = open_source(chat, chat_step, "--chat", "--chat-step")
    bs = HFSource(base, "--base")
    out = Path(out)
    check_out_not_input(out, [rs.path, cs.path, bs.path, cs.model_dir, cs.tokenizer_dir])
    check_same_shape(rs, cs)
    check_same_shape(rs, bs, ("--raw", "--base"))
    for src in (rs, cs):
        check_lineage(src, bs)
    check_tokenizer(cs.tokenizer_dir, f"--chat {cs.path}")
    template = for_merge(cs, [rs], chat_template_from)
    out_dtype = output_dtype(dtype, bs.config)
    L = bs.num_layers
    dtype_name = str(out_dtype).removeprefix("torch.")
    inputs = {"raw": rs.describe(), "chat": cs.describe(), "base": bs.describe()}
    weights = None
    if layer_weights is not None:
        weights = lw.from_file(layer_weights, L, tied_embeddings(cs.config))
    elif group_w:
        weights = lw.from_groups(
            merge_groups(rs, cs, format_start),
            group_w.get("--raw-weights", {}),
            group_w.get("--chat-weights", {}),
            width,
            ratio,
        )
    if weights is None:
        yaml = mergekit.task_arithmetic(rs, cs, bs, ratio, dtype_name, out)
        record = {"ratio": ratio, "formula": "raw + ratio * (chat - base), in float64", "inputs": inputs}
    else:
        yaml = mergekit.layer_arithmetic(rs, cs, bs, weights, dtype_name, out)
        record = {
            "formula": "base + a * (raw - base) + b * (chat - base), in float64, (a, b) per tensor: weights",
            "weights": weights.record(),
            "inputs": inputs,
        }
    rec = write_model(
        out,
        [(i, ChatVector(rs, cs, bs, ratio, out_dtype, weights)) for i in range(L)],
        config=cs.config,
        model_dir=cs.model_dir,
        tokenizer_dir=cs.tokenizer_dir,
        dtype=out_dtype,
        max_bytes=max_bytes,
        force=force,
        tool="chat_vector",
        record=record,
        template=template,
        extra_files={"mergekit.yaml": yaml},
    )
    if rec["chat_template"]["text"] is None:
        print(
            f"warning: --chat {cs.path} records no chat template and its tokenizer ({cs.tokenizer_dir}) has none; "
            f"the result has none",
            file=sys.stderr,
        )
    return rec
