"""Hugging Face model directories: reading their config and weights (tensor by tensor, never the
whole model), identifying them, and writing a fresh random one.

Everything that opens a user's checkpoint goes through here: training reads only its stage's
tensors, export and transplant stream one layer at a time, evaluation loads whole models. The
demo's base, the tests' tiny models and the benchmarks' models are all written by
`save_random_model`, so they are loaded by exactly the code that loads a user's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_prep.errors import UserError
from data_prep.files import atomic_dir
from data_prep.tokenizer import TOKENIZER_FILES

from .names import HEAD_WEIGHT, tied_embeddings

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
INDEX_FILE = "model.safetensors.index.json"


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


def config_object(cfg: dict):
    """The transformers config class instance for a config.json dict (no second file read)."""
    from transformers import AutoConfig

    d = dict(cfg)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def config_dtype(cfg: dict):
    """The dtype config.json declares for the weights (`dtype`, or the older `torch_dtype`)."""
    import torch

    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)


def model_identity(model_dir: str | Path, cfg: dict | None = None) -> dict:
    """A cheap fingerprint of a model directory: its config plus the weight files' names and sizes
    and a hash of each file's first and last MiB.

    Hashing every byte of a 70B checkpoint would take minutes; head+tail+size catches a different
    checkpoint in practice, and export and transplant record full sha256s of what they write.
    """
    model_dir = Path(model_dir)
    cfg = read_config(model_dir) if cfg is None else cfg
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
        "tie_word_embeddings": tied_embeddings(cfg),
        "fingerprint": h.hexdigest(),
    }


# ---------------------------------------------------------------------------------------------
# Weights, tensor by tensor


def weight_map(model_dir: str | Path, flag: str = "--model") -> dict[str, str]:
    """Tensor name -> safetensors file, from the index when there is one (no file is opened)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in model_dir.glob("*.bin")) or sorted(p.name for p in model_dir.glob("*.pt"))
        hint = (
            f" (found {', '.join(other[:3])}: re-save the model with save_pretrained(safe_serialization=True))"
            if other
            else " (a config.json without weights: copy the model's *.safetensors files here)"
        )
        raise UserError(f"{flag} {model_dir}: no *.safetensors weights{hint}")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            out.update({k: f.name for k in st.keys()})
    return out


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def read_tensors(model_dir: str | Path, files: dict[str, str], names, dtype=None) -> dict:
    """The named tensors (as stored, or cast to `dtype`), each read from its shard with plain file
    reads into its own buffer: only these tensors' bytes are read, and nothing is memory-mapped, so
    a rank's resident memory holds its own tensors and not the pages of the checkpoint it touched
    (a bf16 stage cast to fp32 costs its fp32 size plus one tensor in flight, not 1.5x)."""
    import struct

    import torch

    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    out = {}
    for fname, ns in by_file.items():
        path = Path(model_dir) / fname
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
            start = 8 + size
            for n in ns:
                meta = header[n]
                t = torch.empty(meta["shape"], dtype=getattr(torch, _SAFETENSORS_DTYPES[meta["dtype"]]))
                a, b = meta["data_offsets"]
                f.seek(start + a)
                if b > a and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != b - a:
                    raise UserError(f"{path}: tensor {n!r} is cut short (the file is truncated)")
                out[n] = t if dtype is None or t.dtype == dtype else t.to(dtype)
    return out


def meta_model(config):
    """The architecture on the meta device: every module and shape, no memory, no init time."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def expected_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an HF checkpoint of this config holds (tied: no lm_head)."""
    model = meta_model(config_object(cfg))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied_embeddings(cfg):
        shapes.pop(HEAD_WEIGHT, None)
    return shapes


def load_causal_lm(model_dir: str | Path, dtype=None):
    """A whole HF causal LM from a local directory (never the hub), for evaluation."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = read_config(model_dir)
    check_architecture(cfg, str(model_dir))
    weight_map(model_dir)  # a clear error for a directory without safetensors
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or torch.float32, local_files_only=True)


def eos_ids(value) -> list[int]:
    """generation_config's `eos_token_id` as a list: it may be one id, a list of ids, or absent."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


# ---------------------------------------------------------------------------------------------
# A fresh model


def save_random_model(
    config,
    out_dir,
    tokenizer_dir=None,
    seed: int = 0,
    dtype=None,
    generation_config: dict | None = None,
    force: bool = False,
    device: str = "cpu",
) -> Path:
    """Write a seeded random-init causal LM of `config` (a transformers config object) to out_dir
    as an ordinary HF directory: weights, config, generation config, and the tokenizer's files
    when tokenizer_dir is given. The one model factory of the project: the demo's base, the test
    models and the benchmark models all come from here. `device="cuda"` initialises on a GPU (a
    1B model's fp32 init on CPU alone takes ~20 s); the weights are the same distribution, not
    the same numbers, as a CPU init with the same seed."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    with torch.random.fork_rng(devices=[]):  # seeding here must not move the caller's RNG
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    if generation_config is not None:
        model.generation_config = GenerationConfig(**generation_config)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
    return out_dir
