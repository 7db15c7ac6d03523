"""Tiny real models and hand-built pipeline run directories, for tests that read checkpoints.

The run directories follow the run-directory contract exactly (run.json, checkpoints/step_N/
layer_NN-model_states.pt with pipeline keys, record.json with sha256s written last, latest), so
export and transplant can be tested without the trainer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.groups import FROZEN, LayerGroups
from pipeline.names import ANCHOR, layer_file, to_pipeline_name

from .models import tiny_llama

WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"] + (
    "hello world what is the capital of france paris a b c d e f g h i j k l m n o p".split()
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(out: Path, chat_template: bool) -> Path:
    """A word-level fast tokenizer (real `tokenizers` model), optionally with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return Path(out)


def make_base(
    out: Path,
    num_layers: int = 4,
    hidden: int = 32,
    tied: bool = False,
    dtype=torch.float32,
    seed: int = 0,
    vocab: int = 48,
) -> Path:
    """A random tiny Llama (the product's factory), its norms moved off 1.0 so they are
    distinguishable, plus a tokenizer without chat template."""
    from safetensors.torch import save_file

    out = tiny_llama(
        Path(out),
        vocab,
        seed=seed,
        dtype=dtype,
        layers=num_layers,
        hidden=hidden,
        tie=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    tensors = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():  # norms start at exactly 1.0; make them distinguishable
        if "norm" in name:
            tensors[name] = (t.float() + torch.randn(t.shape, generator=gen) * 0.1).to(t.dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    make_tokenizer(out, chat_template=False)
    return out


def base_tensors(base_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@dataclass
class Run:
    path: Path
    base: Path
    # step -> {hf_name: tensor} exactly as stored (lm_head included when untied)
    tensors: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def make_run(
    run_dir: Path,
    base_dir: Path,
    phase: str,
    raw_start: int = 1,
    format_start: int = 2,
    steps=(5,),
    seed: int = 1,
    tokenizer: Path | None = None,
    embeddings_trained: bool | None = None,
    drop_frozen: bool = False,
    perturb: bool = True,
    chat_template: str | None = None,
) -> Run:
    """A pipeline run dir whose checkpoints hold the base weights with the phase's groups changed.

    Each step perturbs the trained groups differently (so steps are distinguishable).
    drop_frozen: store only trained tensors, like DeepSpeed's exclude_frozen_params.
    perturb=False stores the base weights unchanged (for round trips).
    chat_template: record in run.json that the run's chat data was rendered with this template,
    as the trainer does (pipeline/training/plan.py `data_template`).
    """
    from pipeline.hf import model_identity, read_config

    run_dir, base_dir = Path(run_dir), Path(base_dir)
    cfg = read_config(base_dir)
    L, tied = cfg["num_hidden_layers"], bool(cfg.get("tie_word_embeddings", False))
    groups = LayerGroups.resolve(raw_start, format_start, L, tied, phase)
    if embeddings_trained is not None and embeddings_trained != groups.embeddings_trained:
        trained = tuple(g for g in groups.trained if g != FROZEN) + ((FROZEN,) if embeddings_trained else ())
        groups = LayerGroups(L, raw_start, format_start, tied, trained)
    run_cfg = {"model": str(base_dir), "phase": phase, "raw_start": raw_start, "format_start": format_start}
    if tokenizer is not None:
        run_cfg["tokenizer"] = str(tokenizer)
    run_json = {
        "format_version": 1,
        "config": run_cfg,
        "phase": phase,
        "groups": groups.to_record(),
        "base_model": model_identity(base_dir),
        "stages": [[0, L]],
    }
    if chat_template is not None:
        run_json["chat_template"] = {
            "text": chat_template,
            "sha256": hashlib.sha256(chat_template.encode()).hexdigest(),
            "from": "--chat-template (hand-built run)",
            "manifest": str(run_dir / "chat.manifest.json"),
        }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(run_json, indent=2))
    run = Run(run_dir, base_dir)
    base = base_tensors(base_dir)
    for step in steps:
        gen = torch.Generator().manual_seed(seed * 1000 + step)
        tensors = {}
        for name, t in base.items():
            trained = groups.trains(name)
            if trained and perturb:
                t = (t.float() + 0.05 * torch.randn(t.shape, generator=gen)).to(t.dtype)
            if trained or not drop_frozen:
                tensors[name] = t.clone()
        write_checkpoint(run_dir, step, tensors, L, tied, latest=True)
        run.tensors[step] = tensors
    return run


def write_checkpoint(
    run_dir: Path, step: int, tensors: dict[str, torch.Tensor], L: int, tied: bool, latest: bool = True
) -> Path:
    """One DeepSpeed-style checkpoint tag: layer files (pipeline keys), engine file, record.json, latest."""
    tag = f"step_{step:08d}"
    d = Path(run_dir) / "checkpoints" / tag
    d.mkdir(parents=True, exist_ok=True)
    per_layer: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(L)}
    for name, t in tensors.items():
        i, key = to_pipeline_name(name, L)
        per_layer[i][key] = t
    if tied and "model.embed_tokens.weight" in tensors:
        # DeepSpeed saves the shared matrix again as the last layer's lm_head (it is a parameter there too).
        per_layer[L - 1]["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    per_layer[0][ANCHOR] = torch.zeros(1)
    files = {}
    for i, state in per_layer.items():
        torch.save(state, d / layer_file(i))
    torch.save({"global_steps": step}, d / "mp_rank_00_model_states.pt")
    for f in sorted(d.iterdir()):
        files[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    (d / "record.json").write_text(json.dumps({"step": step, "files": files}))
    if latest:
        (Path(run_dir) / "checkpoints" / "latest").write_text(tag)
    return d
