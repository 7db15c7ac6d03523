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

Streamed one layer at a time, like the transplant: memory is about one shard plus three layers.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from data_prep.common import UserError

from .. import hf
from . import mergekit
from .hf_files import check_tokenizer
from .output import check_out_not_input, output_dtype, write_model
from .shards import DEFAULT_SHARD_SIZE, parse_size
from .sources import HFSource, check_same_shape, open_source
from .template import for_merge


def check_lineage(src, base: HFSource) -> None:
    """A run must have been trained from --base (its recorded fingerprint); an HF input can only be
    checked for shape. Otherwise the difference to --base would not be what training changed."""
    if src.kind != "run":
        return
    recorded = (src.run.get("base_model") or {}).get("fingerprint")
    if recorded != hf.model_identity(base.path, base.config)["fingerprint"]:
        raise UserError(f"{src.flag} {src.path} was trained from {(src.run.get('base_model') or {}).get('path')}, "
                        f"not from --base {base.path} (run.json base_model.fingerprint differs): the chat vector "
                        f"needs both models' own base")


class ChatVector:
    """Layer i of the merge, from the same layer of the three inputs."""

    def __init__(self, raw, chat, base, ratio: float, dtype):
        self.raw, self.chat, self.base, self.ratio, self.dtype, self.config = raw, chat, base, ratio, dtype, chat.config

    def layer(self, i: int) -> dict:
        r, c, b = self.raw.layer(i), self.chat.layer(i), self.base.layer(i)
        out = {}
        for name, (tb, ob) in b.items():
            for src, have in ((self.raw, r), (self.chat, c)):
                if name not in have:
                    raise UserError(f"{src.flag} {src.path}: lacks {name!r}, which --base has")
            tr, tc = r[name][0], c[name][0]
            base64 = tb.to(torch.float64)
            # mergekit's order: deltas weighted, summed over the models, added to the base
            merged = base64 + ((tr.to(torch.float64) - base64) * 1.0 + (tc.to(torch.float64) - base64) * self.ratio)
            out[name] = (merged.to(self.dtype), {"input": "chat vector", "ratio": self.ratio, "raw": r[name][1],
                                               "chat": c[name][1], "base": ob})
        return out


def chat_vector(raw, chat, base, out, ratio: float = 1.0, raw_step: int | None = None, chat_step: int | None = None,
                max_shard_size: str = DEFAULT_SHARD_SIZE, force: bool = False, dtype: str = "auto",
                chat_template_from: str | None = None) -> dict:
    """Build the chat vector model in `out`; return chat_vector.json. Raises UserError, writing nothing."""
    max_bytes = parse_size(max_shard_size)
    if not math.isfinite(ratio):
        raise UserError(f"--ratio {ratio}: must be a finite number (1.0 adds the whole chat vector)")
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
    yaml = mergekit.task_arithmetic(rs, cs, bs, ratio, str(out_dtype).removeprefix("torch."), out)
    rec = write_model(out, [(i, ChatVector(rs, cs, bs, ratio, out_dtype)) for i in range(L)], config=cs.config,
                      model_dir=cs.model_dir, tokenizer_dir=cs.tokenizer_dir, dtype=out_dtype, max_bytes=max_bytes,
                      force=force, tool="chat_vector",
                      record={"ratio": ratio, "formula": "raw + ratio * (chat - base), in float64",
                              "inputs": {"raw": rs.describe(), "chat": cs.describe(), "base": bs.describe()}},
                      template=template, extra_files={"mergekit.yaml": yaml})
    if rec["chat_template"]["text"] is None:
        print(f"warning: --chat {cs.path} records no chat template and its tokenizer ({cs.tokenizer_dir}) has none; "
              f"the result has none", file=sys.stderr)
    return rec
