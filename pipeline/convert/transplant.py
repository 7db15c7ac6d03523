"""Transplant: A-Raw's decoder layers below format_start + A-Chat's format group -> one HF model.

Which input gives which tensor is the layer groups' answer (pipeline/groups.py): every tensor of
the format group (layers [format_start, L), the final norm, an untied LM head) comes from A-Chat,
every other tensor from A-Raw. The embeddings belong to the frozen group, so they come from A-Raw,
and both inputs must carry the same (the base's) ones. config.json, the tokenizer and the generation
config come from A-Chat, and so does the chat template: the one A-Chat's chat data was rendered
with. If A-Raw was trained with a different one, the transplant is refused unless
--chat-template-from chooses (template.py has the rule).

Inputs are run directories (one checkpoint step each, the latest complete one by default) or
Hugging Face directories. The boundary comes from the runs' run.json; only when both inputs are
HF directories must --format-start give it. Nothing is written unless every check passes.

With a donor (--donor X-Instruct instead of --chat A-Chat) the format group, norm and head come
from an instruct model of the same family: no A-Chat run, no chat data. The donor need not share
A-Raw's base, but its shapes, architecture and vocabulary must agree, and its layers below
format_start are not used (the provenance says so). The embeddings rule: the base's matrix
(A-Raw's lower layers learned on it, and with tied embeddings it is the head too), except the rows
of the special tokens the donor's chat template uses, which come from the donor. A base model never
trained those rows (Llama-3's <|eot_id|>, <|start_header_id|>): with its rows the format group would
read noise exactly where a turn begins and ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from data_prep.errors import UserError

from .. import hf
from ..groups import FORMAT, RAW, LayerGroups
from ..names import tied_embeddings, to_pipeline_name
from . import mergekit
from .hf_files import check_tokenizer
from .output import check_out_not_input, output_dtype, write_model
from .shards import DEFAULT_SHARD_SIZE, parse_size
from .sources import check_same_shape, open_source
from .template import for_merge

EMBED = "model.embed_tokens.weight"


def check_same_base(raw, chat) -> None:
    if raw.kind == "run" and chat.kind == "run":
        a, b = (raw.run.get("base_model") or {}), (chat.run.get("base_model") or {})
        if a.get("fingerprint") != b.get("fingerprint"):
            raise UserError(
                f"--raw and --chat were trained from different base models (run.json base_model."
                f"fingerprint: {raw.path} started from {a.get('path')}, {chat.path} from {b.get('path')})"
            )


def check_roles(raw, chat) -> None:
    """A swapped --raw/--chat would silently build the opposite model; the runs know their phase."""
    if raw.kind == "run" and RAW not in raw.groups.trained:
        raise UserError(
            f"--raw {raw.path}: this run did not train the raw group (phase "
            f"{raw.run.get('phase')!r}); were --raw and --chat swapped?"
        )
    if chat.kind == "run" and FORMAT not in chat.groups.trained:
        raise UserError(
            f"--chat {chat.path}: this run did not train the format group (phase "
            f"{chat.run.get('phase')!r}); were --raw and --chat swapped?"
        )


def merge_groups(raw, chat, given: int | None) -> LayerGroups:
    """The split the merge follows: the runs' recorded boundary, or --format-start for HF inputs."""
    recorded = {src.flag: src.groups.format_start for src in (raw, chat) if src.kind == "run"}
    if len(set(recorded.values())) > 1:
        raise UserError(
            f"the runs disagree on the boundary (run.json groups.format_start): --raw "
            f"{raw.path} has {recorded['--raw']}, {chat.flag} {chat.path} has {recorded[chat.flag]}"
        )
    if given is not None and recorded and given not in recorded.values():
        flag, f = next(iter(recorded.items()))
        raise UserError(
            f"--format-start {given} disagrees with {flag} run.json groups.format_start ({f}); "
            f"drop the flag to use the recorded boundary"
        )
    f = given if given is not None else next(iter(recorded.values()), None)
    if f is None:
        raise UserError(
            f"--raw and {chat.flag} are both Hugging Face directories, which do not record the "
            f"boundary: pass --format-start N (the first layer of the format group)"
        )
    raw_start = raw.groups.raw_start if raw.kind == "run" else 0
    return LayerGroups.resolve(
        min(raw_start, f - 1) if f >= 1 else 0,
        f,
        chat.num_layers,
        tied_embeddings(chat.config),
        where={"format_start": "--format-start", "raw_start": "--raw run.json"},
    )


def check_embeddings(raw, chat) -> None:
    """The result has one embedding matrix; both inputs must hold the same (the base's) one."""
    tied = tied_embeddings(chat.config)
    for src in (raw, chat):
        if src.kind == "run" and src.groups.embeddings_trained:
            tie_note = (
                " With tie_word_embeddings the LM head *is* that matrix, so A-Chat's head and "
                "A-Raw's embeddings cannot both be kept."
                if tied
                else ""
            )
            raise UserError(
                f"{src.flag} {src.path} trained the embeddings (run.json groups.embeddings_trained, phase "
                f"{src.run.get('phase')!r}), so there is no single set of embeddings both halves were trained "
                f"with.{tie_note} Choose: transplant runs that kept the embeddings frozen (phases raw and chat), "
                f"or use this run as a whole model (python -m pipeline.export)."
            )
    a, a_origin = raw.layer(0)[EMBED]
    b, b_origin = chat.layer(0)[EMBED]
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
        what = "the embeddings and (tied) LM head" if tied else "the embeddings"
        raise UserError(
            f"{EMBED} differs between --raw ({a_origin['path']}/{a_origin['file']}) and --chat "
            f"({b_origin['path']}/{b_origin['file']}): the inputs changed {what} or come from different "
            f"bases, and the transplant will not pick one silently. Choose which embeddings the result "
            f"must carry, and retrain the other model with them frozen."
        )


class ByGroup:
    """Layer i of the merge: each tensor from the input its group names (format: `format`,
    everything else: `rest`). A layer is read only from the inputs it needs."""

    def __init__(self, groups: LayerGroups, rest, fmt, expected: dict):
        self.groups, self.rest, self.fmt, self.config = groups, rest, fmt, fmt.config
        L = groups.num_layers
        self.names = {}
        for n in expected:
            self.names.setdefault(to_pipeline_name(n, L)[0], []).append(n)

    def source_of(self, name: str):
        return self.fmt if self.groups.group_of(name) == FORMAT else self.rest

    def layer(self, i: int) -> dict:
        loaded = {}
        for src in {id(self.source_of(n)): self.source_of(n) for n in self.names.get(i, [])}.values():
            loaded[id(src)] = src.layer(i)
        return {
            n: loaded[id(self.source_of(n))][n] for n in self.names.get(i, []) if n in loaded[id(self.source_of(n))]
        }


def check_same_vocabulary(raw, donor) -> None:
    """Token ids must mean the same tokens in both, or the donor's format group reads other words."""
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(str(raw.tokenizer_dir), local_files_only=True).get_vocab()
    b = AutoTokenizer.from_pretrained(str(donor.tokenizer_dir), local_files_only=True).get_vocab()
    if a != b:
        diff = next((t for t in sorted(set(a) | set(b)) if a.get(t) != b.get(t)), None)
        raise UserError(
            f"--raw and --donor have different vocabularies (token {diff!r} is id {a.get(diff)} in "
            f"{raw.tokenizer_dir}, id {b.get(diff)} in {donor.tokenizer_dir}); a donor must share "
            f"the base's tokenizer"
        )


def chat_token_ids(tokenizer_dir: Path, base_tokenizer_dir: Path) -> dict[int, str]:
    """The embedding rows a donor transplant takes from the donor: the special tokens its chat
    template writes (turn headers and ends) and its generation config's stop ids, except the base
    tokenizer's own bos/eos/unk/pad, which the base did train (every pretraining document has them)."""
    import json

    from transformers import AutoTokenizer

    from data_prep.template import template_special_ids

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    base = AutoTokenizer.from_pretrained(str(base_tokenizer_dir), local_files_only=True)
    own = {base.bos_token_id, base.eos_token_id, base.unk_token_id, base.pad_token_id}
    ids = template_special_ids(tok)
    gen_file = tokenizer_dir / "generation_config.json"
    if gen_file.is_file():
        ids |= set(hf.eos_ids(json.loads(gen_file.read_text()).get("eos_token_id")))
    return {i: tok.convert_ids_to_tokens(i) for i in sorted(ids - own)}


class WithDonorRows(ByGroup):
    """ByGroup, with the embedding rows of `rows` taken from the donor."""

    def __init__(self, groups, rest, donor, expected, rows: dict[int, str]):
        super().__init__(groups, rest, donor, expected)
        self.rows = rows

    def layer(self, i: int) -> dict:
        out = super().layer(i)
        if EMBED in out and self.rows:
            t, origin = out[EMBED]
            donor_t, donor_origin = self.fmt.layer(i)[EMBED]
            idx = torch.tensor(sorted(self.rows))
            t = t.clone()
            t[idx] = donor_t[idx].to(t.dtype)
            out[EMBED] = (
                t,
                {**origin, "rows_from_donor": {str(k): v for k, v in self.rows.items()}, "donor": donor_origin},
            )
        return out


def donor_transplant(
    raw,
    donor,
    out,
    format_start: int | None = None,
    raw_step: int | None = None,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    force: bool = False,
    dtype: str = "auto",
    chat_template_from: str | None = None,
) -> dict:
    """A-Raw below format_start + an instruct model's format group, norm and head (see the module
    docstring for the embeddings rule); returns transplant.json. Writes nothing on a refusal."""
    from .sources import HFSource

    max_bytes = parse_size(max_shard_size)
    rs = open_source(raw, raw_step, "--raw", "--raw-step")
    ds = HFSource(donor, "--donor")
    out = Path(out)
    check_out_not_input(out, [rs.path, ds.path, rs.model_dir])
    check_same_shape(rs, ds, ("--raw", "--donor"))
    if rs.kind == "run" and RAW not in rs.groups.trained:
        raise UserError(f"--raw {rs.path}: this run did not train the raw group (phase {rs.run.get('phase')!r})")
    if rs.kind == "run" and rs.groups.embeddings_trained:
        raise UserError(
            f"--raw {rs.path} trained the embeddings (phase {rs.run.get('phase')!r}); a donor transplant "
            f"keeps the base's embeddings, so A-Raw must have kept them frozen"
        )
    check_same_vocabulary(rs, ds)
    groups = merge_groups(rs, ds, format_start)
    check_tokenizer(ds.tokenizer_dir, f"--donor {ds.path}")
    template = for_merge(ds, [rs], chat_template_from)
    out_dtype = output_dtype(dtype, ds.config)
    L, f = groups.num_layers, groups.format_start
    # The base's own specials come from the base model's directory: a run may record another
    # tokenizer (the instruct one it packed chat data with) that shares the vocabulary.
    from data_prep.tokenizer import TOKENIZER_FILES

    base_tok = rs.model_dir if any((rs.model_dir / n).is_file() for n in TOKENIZER_FILES) else rs.tokenizer_dir
    rows = chat_token_ids(ds.tokenizer_dir, base_tok)
    merged = WithDonorRows(groups, rs, ds, hf.expected_tensors(ds.config), rows)
    yaml = mergekit.passthrough(rs, ds, f, L, str(out_dtype).removeprefix("torch."), out, donor_rows=rows)
    rec = write_model(
        out,
        [(i, merged) for i in range(L)],
        config=ds.config,
        model_dir=ds.model_dir,
        tokenizer_dir=ds.tokenizer_dir,
        dtype=out_dtype,
        max_bytes=max_bytes,
        force=force,
        tool="transplant",
        record={
            "format_start": f,
            "num_layers": L,
            "inputs": {"raw": rs.describe(), "donor": ds.describe()},
            "donor_layers_not_used": [0, f],
            "embeddings": "the base's (from --raw), rows of the donor's chat tokens from --donor",
            "embedding_rows_from_donor": {str(k): v for k, v in rows.items()},
        },
        template=template,
        extra_files={"mergekit.yaml": yaml},
    )
    if rec["chat_template"]["text"] is None:
        print(
            f"warning: the donor's tokenizer ({ds.tokenizer_dir}) has no chat template; the result has none",
            file=sys.stderr,
        )
    return rec


def transplant(
    raw,
    chat,
    out,
    format_start: int | None = None,
    raw_step: int | None = None,
    chat_step: int | None = None,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    force: bool = False,
    dtype: str = "auto",
    chat_template_from: str | None = None,
) -> dict:
    """Build the transplant in `out`; return the transplant.json record. Raises UserError, writing nothing."""
    max_bytes = parse_size(max_shard_size)
    rs = open_source(raw, raw_step, "--raw", "--raw-step")
    cs = open_source(chat, chat_step, "--chat", "--chat-step")
    out = Path(out)
    check_out_not_input(out, [rs.path, cs.path, rs.model_dir, cs.model_dir, cs.tokenizer_dir])
    check_same_shape(rs, cs)
    check_same_base(rs, cs)
    check_roles(rs, cs)
    groups = merge_groups(rs, cs, format_start)
    check_embeddings(rs, cs)
    check_tokenizer(cs.tokenizer_dir, f"--chat {cs.path}")
    template = for_merge(cs, [rs], chat_template_from)
    out_dtype = output_dtype(dtype, cs.config)
    L, f = groups.num_layers, groups.format_start
    merged = ByGroup(groups, rs, cs, hf.expected_tensors(cs.config))
    yaml = mergekit.passthrough(rs, cs, f, L, str(out_dtype).removeprefix("torch."), out)
    rec = write_model(
        out,
        [(i, merged) for i in range(L)],
        config=cs.config,
        model_dir=cs.model_dir,
        tokenizer_dir=cs.tokenizer_dir,
        dtype=out_dtype,
        max_bytes=max_bytes,
        force=force,
        tool="transplant",
        record={"format_start": f, "num_layers": L, "inputs": {"raw": rs.describe(), "chat": cs.describe()}},
        template=template,
        extra_files={"mergekit.yaml": yaml},
    )
    if rec["chat_template"]["text"] is None:
        print(
            f"warning: A-Chat ({cs.path}) records no chat template and its tokenizer ({cs.tokenizer_dir}) has "
            f"none; the result has none",
            file=sys.stderr,
        )
    return rec
