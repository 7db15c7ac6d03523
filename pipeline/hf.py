"""Loading Hugging Face causal LMs and tokenizers from local directories, and identifying them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_prep.common import UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def check_architecture(cfg: dict, where: str) -> str:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{where}/config.json: architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def model_identity(model_dir: str | Path) -> dict:
    """A cheap fingerprint of a model directory: its config plus the weight files' names and sizes
    and a hash of each file's first and last MiB.

    Hashing every byte of a 70B checkpoint would take minutes; head+tail+size catches a different
    checkpoint in practice, and the transplant records full sha256s of what it writes anyway.
    """
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return {
        "path": str(model_dir.resolve()),
        "architecture": (cfg.get("architectures") or [None])[0],
        "num_layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "vocab_size": cfg.get("vocab_size"),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "fingerprint": h.hexdigest(),
    }


def load_causal_lm(model_dir: str | Path, dtype=None):
    """Load an HF causal LM from a local directory (never the hub)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = read_config(model_dir)
    check_architecture(cfg, str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype or torch.float32, local_files_only=True
    )
    return model
