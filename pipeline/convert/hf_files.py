"""The files beside the weights of a written model: config.json, generation_config.json, the tokenizer.

config.json comes from the model whose architecture the weights follow; the tokenizer files are
copied byte for byte (never re-serialised through transformers, so nothing about the tokenizer can
change), except the chat template, which is the one the weights were trained with (template.py
decides which, and writes it). generation_config.json is the one file that is edited: its
`eos_token_id` must hold the shipped template's end-of-turn token as well as the text EOS, or
plain `generate()` and `pipeline("text-generation")` run on past the assistant's turn (the Llama-3
situation: text ends with <|end_of_text|>, turns with <|eot_id|>; ChatML turns end with <|im_end|>).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from data_prep.errors import UserError
from data_prep.files import atomic_write_json
from data_prep.template import end_of_turn_ids
from data_prep.tokenizer import TOKENIZER_FILES

from .. import hf
from .template import ChatTemplate, ship


def check_tokenizer(tokenizer_dir: Path, flag: str) -> None:
    """Refuse to write a model that would ship without a tokenizer."""
    if tokenizer_dir.is_file() and tokenizer_dir.suffix == ".model":
        return
    if not any((tokenizer_dir / n).is_file() for n in TOKENIZER_FILES):
        raise UserError(
            f"{flag}: {tokenizer_dir} holds no tokenizer files, so the result would have no tokenizer "
            f"and no chat template; put the tokenizer's files there (or record `tokenizer:` in the run)"
        )


def write_side_files(
    out: Path, model_dir: Path, tokenizer_dir: Path, template: ChatTemplate, dtype=None, shown_as: Path | None = None
) -> tuple[dict[str, str], dict]:
    """config.json (model_dir's; its dtype set to `dtype` when the weights were cast), the tokenizer
    files (tokenizer_dir's) rendering with `template`, and generation_config.json (tokenizer_dir's,
    else model_dir's, else one made from config.json) stopping at that template's end of turn.
    Returns ({file: origin}, the record's chat_template entry); `shown_as` is `out`'s final name."""
    written = {}

    def copy(src: Path, name: str, dest: str | None = None):
        shutil.copyfile(src if src.is_file() else src / name, out / (dest or name))
        written[dest or name] = str((src if src.is_file() else src / name).resolve())

    cfg = hf.read_config(model_dir)
    if dtype is not None and hf.config_dtype(cfg) != dtype:
        name = str(dtype).removeprefix("torch.")
        cfg.update({k: name for k in ("dtype", "torch_dtype") if k in cfg} or {"dtype": name})
        atomic_write_json(out / "config.json", cfg)
        written["config.json"] = f"{(model_dir / 'config.json').resolve()} (dtype set to {name})"
    else:
        copy(model_dir, "config.json")
    if tokenizer_dir.is_file():  # a SentencePiece .model: transformers reads it as tokenizer.model
        copy(tokenizer_dir, tokenizer_dir.name, "tokenizer.model")
    else:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                copy(tokenizer_dir, name)
        extra = tokenizer_dir / "additional_chat_templates"  # transformers >= 4.54 keeps named templates here
        if extra.is_dir():
            shutil.copytree(extra, out / extra.name)
            written[extra.name] = str(extra.resolve())
    chat_template = ship(out, template, tokenizer_dir, shown_as or out)
    for name in chat_template.get("written_to", []):
        written[name] = f"{written.get(name, 'new')}, its chat template replaced by {chat_template['from']}"
    written["generation_config.json"] = _generation_config(out, cfg, model_dir, tokenizer_dir)
    return written, chat_template


def _generation_config(out: Path, cfg: dict, model_dir: Path, tokenizer_dir: Path) -> str:
    src = next(
        (
            d / "generation_config.json"
            for d in (tokenizer_dir, model_dir)
            if d.is_dir() and (d / "generation_config.json").is_file()
        ),
        None,
    )
    gen = (
        json.loads(src.read_text())
        if src
        else {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    )
    origin = str(src.resolve()) if src else f"made from {(model_dir / 'config.json').resolve()}"
    eos = hf.eos_ids(gen.get("eos_token_id"))
    from transformers import AutoTokenizer

    try:  # the tokenizer as written, with the template it ships
        tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    except (OSError, ValueError):
        tok = None
    turn = [t for t in (end_of_turn_ids(tok) if tok is not None else []) if t not in eos]
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in eos + turn:
        turn.append(tok.eos_token_id)
    if turn:
        eos += turn
        gen["eos_token_id"] = eos if len(eos) > 1 else eos[0]
        names = ", ".join(f"{tok.convert_ids_to_tokens(t)} = {t}" for t in turn)
        origin += f" (eos_token_id extended with the chat template's end of turn: {names})"
    if src is not None and not turn:
        shutil.copyfile(src, out / "generation_config.json")  # nothing to add: byte for byte
    elif gen:
        atomic_write_json(out / "generation_config.json", gen)
    else:
        return "none (no token ids known)"
    return origin
