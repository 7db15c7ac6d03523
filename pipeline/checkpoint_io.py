"""Model weights in and out, one layer at a time.

In: a pipeline run directory (one checkpoint step) or a Hugging Face directory, read as
`source.layer(i) -> {hf_name: (tensor, origin)}`. Only one layer is ever loaded: a pipeline
layer file is `torch.load`ed with mmap, an HF layer is read tensor by tensor with `safe_open`.

Out: `ShardWriter` writes a standard HF safetensors directory. It holds tensors until they
reach `max_shard_bytes`, then writes one shard and lets them go, so peak memory is about one
shard (plus one layer when layers are larger than shards) whatever the model size. A smaller shard size lowers that peak and costs
only more files (loaders don't care); the 2GB default keeps a 70B merge under ~4-5 GB of RAM.

Provenance: every tensor written is reported with the sha256 of its bytes and where it came
from (input, run, step, file), so transplant.json / export.json can say exactly what is inside.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import torch

from data_prep.common import UserError, sha256_file
from pipeline.hf import check_architecture, read_config
from pipeline.names import layer_file, to_hf_name, to_pipeline_name

DEFAULT_SHARD_SIZE = "2GB"
INDEX_FILE = "model.safetensors.index.json"
# Everything a tokenizer (and its chat template) may consist of; copied as files, byte for byte,
# rather than re-serialised through transformers, so nothing about the tokenizer can change.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
              torch.float8_e5m2: "F8_E5M2"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'2GB', '500MB', '64MiB' or a byte count -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"{flag} {text!r}: expected a size such as 2GB, 500MB or 64MiB")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    if n <= 0:
        raise UserError(f"{flag} {text!r}: must be positive")
    return n


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, without a copy when it is already contiguous."""
    t = t.detach().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def expected_tensors(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an HF checkpoint of this config holds.

    Built on the meta device (no memory, ~1s), so it knows about biases, head_dim and the like
    for every supported architecture. With tied embeddings there is no lm_head.weight to write.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

class HFSource:
    """A Hugging Face model directory with safetensors weights."""

    kind = "hf"

    def __init__(self, path: str | Path, flag: str):
        self.path, self.flag = Path(path), flag
        self.config = read_config(self.path)
        check_architecture(self.config, str(self.path))
        self.num_layers = self.config["num_hidden_layers"]
        self.model_dir = self.tokenizer_dir = self.path
        self.run, self.step = None, None
        self._files = self._weight_map()
        self._by_layer: dict[int, list[str]] = {}
        for name in self._files:
            try:
                i = to_pipeline_name(name, self.num_layers)[0]
            except KeyError:
                raise UserError(f"{flag} {self.path}: unexpected tensor {name!r} in {self._files[name]}") from None
            self._by_layer.setdefault(i, []).append(name)

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index}: not a safetensors index ({e})") from None
        from safetensors import safe_open

        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.flag} {self.path}: no *.safetensors weights (only safetensors "
                            f"HF directories are read; re-save the model with save_pretrained)")
        weight_map = {}
        for f in files:
            with safe_open(str(f), "pt") as st:
                weight_map.update({k: f.name for k in st.keys()})
        return weight_map

    def names(self, i: int) -> list[str]:
        return list(self._by_layer.get(i, []))

    def layer(self, i: int) -> dict[str, tuple[torch.Tensor, dict]]:
        from safetensors import safe_open

        out: dict[str, tuple[torch.Tensor, dict]] = {}
        by_file: dict[str, list[str]] = {}
        for name in self._by_layer.get(i, []):
            by_file.setdefault(self._files[name], []).append(name)
        for fname, names in by_file.items():
            with safe_open(str(self.path / fname), "pt") as st:
                for name in names:
                    out[name] = (st.get_tensor(name), self.origin(fname))
        return out

    def origin(self, fname: str) -> dict:
        return {"input": self.flag, "kind": "hf", "path": str(self.path.resolve()), "step": None, "file": fname}

    def describe(self) -> dict:
        return {"kind": "hf", "path": str(self.path.resolve())}


class RunSource:
    """One complete checkpoint step of a pipeline run directory (see the run-directory contract)."""

    kind = "run"

    def __init__(self, path: str | Path, step: int | None, flag: str, step_flag: str):
        self.path, self.flag = Path(path), flag
        self.run = read_run_json(self.path)
        try:
            self.groups = self.run["groups"]
            self.num_layers = int(self.groups["num_layers"])
            cfg = self.run["config"]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.path / 'run.json'}: missing key {e}") from None
        self.model_dir = _existing_dir(self._base_candidates(cfg), self.path / "run.json", "config.model")
        tok = cfg.get("tokenizer")
        self.tokenizer_dir = (_existing_dir([Path(tok)], self.path / "run.json", "config.tokenizer")
                              if tok else self.model_dir)
        self.config = read_config(self.model_dir)
        check_architecture(self.config, str(self.model_dir))
        if self.config.get("num_hidden_layers") != self.num_layers:
            raise UserError(f"{self.path / 'run.json'}: groups.num_layers={self.num_layers} but "
                            f"{self.model_dir}/config.json has num_hidden_layers={self.config.get('num_hidden_layers')}")
        self.step, self.ckpt_dir = resolve_step(self.path, step, step_flag)
        self.record = json.loads((self.ckpt_dir / "record.json").read_text())
        self._base: HFSource | None = None
        self._verified: set[str] = set()

    def _base_candidates(self, cfg: dict) -> list[Path]:
        # base_model.path is absolute (resolved when the run started); config.model may be relative
        # to wherever training was launched, so it is only the fallback.
        cands = []
        if isinstance(self.run.get("base_model"), dict) and self.run["base_model"].get("path"):
            cands.append(Path(self.run["base_model"]["path"]))
        if cfg.get("model"):
            cands.append(Path(cfg["model"]))
        return cands

    @property
    def base(self) -> HFSource:
        if self._base is None:
            self._base = HFSource(self.model_dir, f"{self.flag} base model")
        return self._base

    def trained(self, hf_name: str) -> bool:
        """Did this run train `hf_name` (so only its checkpoint, never the base, may supply it)?"""
        from pipeline.names import group_of

        if hf_name.startswith("model.embed_tokens.") or (self.groups.get("tied_embeddings") and hf_name.startswith("lm_head.")):
            return bool(self.groups.get("embeddings_trained"))
        group = group_of(hf_name, self.groups["raw_start"], self.groups["format_start"])
        return group in self.groups.get("trained_groups", [])

    def layer(self, i: int) -> dict[str, tuple[torch.Tensor, dict]]:
        fname = layer_file(i)
        path = self.ckpt_dir / fname
        rel = str(path.relative_to(self.path))
        if fname not in self._verified:  # hashing a 2 GB layer file twice would cost seconds
            verify_file(path, self.record, self.ckpt_dir / "record.json")
            self._verified.add(fname)
        # mmap: tensors stay on disk until read, so a layer costs page cache, not private memory.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        out = {}
        for key, t in state.items():
            try:
                name = to_hf_name(i, key)
            except KeyError:
                raise UserError(f"{path}: unexpected key {key!r} (see pipeline/names.py)") from None
            if name is not None:
                out[name] = (t, self.origin(rel))
        # A checkpoint saved without its frozen parameters (DeepSpeed's exclude_frozen_params) lacks
        # them; those are the base model's by definition, so take them from there, and say so.
        has_base_weights = any(self.model_dir.glob("*.safetensors"))
        missing = [n for n in self.base.names(i) if n not in out] if has_base_weights else []
        if missing:
            bad = [n for n in missing if self.trained(n)]
            if bad:
                raise UserError(f"{path}: lacks {bad[0]!r}, which this run trained (checkpoint incomplete)")
            base = self.base.layer(i)
            for n in missing:
                out[n] = (base[n][0], {**base[n][1], "input": f"{self.flag} base model (frozen in this run)"})
        return out

    def origin(self, rel: str) -> dict:
        return {"input": self.flag, "kind": "run", "path": str(self.path.resolve()), "step": self.step, "file": rel}

    def describe(self) -> dict:
        return {"kind": "run", "path": str(self.path.resolve()), "step": self.step, "phase": self.run.get("phase"),
                "groups": self.groups, "base_model": self.run.get("base_model")}


def _existing_dir(cands: list[Path], where: Path, key: str) -> Path:
    for c in cands:
        if c.is_dir():
            return c
    raise UserError(f"{where}: {key}: directory {', '.join(map(str, cands)) or '(none)'} does not exist "
                    f"(the run's base model / tokenizer must still be on disk)")


def read_run_json(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no run.json; runs are written by `python -m pipeline.train`)")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if run.get("format_version") != 1:
        raise UserError(f"{path}: format_version {run.get('format_version')!r} is not supported (expected 1)")
    return run


def complete_steps(run_dir: Path) -> dict[int, Path]:
    """Step -> tag dir, for every checkpoint whose record.json exists (written last = complete)."""
    steps = {}
    for d in sorted((Path(run_dir) / "checkpoints").glob("step_*")):
        rec = d / "record.json"
        if rec.is_file():
            try:
                steps[int(json.loads(rec.read_text())["step"])] = d
            except (json.JSONDecodeError, KeyError, ValueError):
                raise UserError(f"{rec}: unreadable checkpoint record") from None
    return steps


def resolve_step(run_dir: Path, step: int | None, flag: str) -> tuple[int, Path]:
    steps = complete_steps(run_dir)
    if not steps:
        raise UserError(f"{run_dir}/checkpoints: no complete checkpoint (none has a record.json)")
    if step is not None:
        if step not in steps:
            raise UserError(f"{flag} {step}: {run_dir} has no complete checkpoint at step {step} "
                            f"(available: {', '.join(map(str, sorted(steps)))})")
        return step, steps[step]
    latest = Path(run_dir) / "checkpoints" / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        for s, d in steps.items():
            if d.name == tag:
                return s, d
    # `latest` is written after record.json, so a kill between the two leaves it stale or absent:
    # the newest complete step is then the right answer.
    s = max(steps)
    return s, steps[s]


def verify_file(path: Path, record: dict, record_path: Path) -> None:
    want = record.get("files", {}).get(path.name)
    if want is None:
        raise UserError(f"{record_path}: does not list {path.name} (checkpoint incomplete?)")
    if not path.is_file():
        raise UserError(f"{path}: missing (listed in {record_path})")
    got = sha256_file(path)
    if got != want:
        raise UserError(f"{path}: sha256 {got[:12]}... disagrees with {record_path} ({want[:12]}...): "
                        f"the file is corrupt or was changed after the checkpoint was written")


def open_source(path: str | Path, step: int | None, flag: str, step_flag: str):
    p = Path(path)
    if (p / "run.json").is_file():
        return RunSource(p, step, flag, step_flag)
    if step is not None:
        raise UserError(f"{step_flag} applies to a run directory, but {flag} {p} is a Hugging Face directory")
    if (p / "config.json").is_file():
        return HFSource(p, flag)
    raise UserError(f"{flag} {p}: neither a run directory (run.json) nor a Hugging Face directory (config.json)")


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def write_safetensors(path: Path, items: list[tuple[str, torch.Tensor]]) -> tuple[str, list[str]]:
    """Write one safetensors file straight from the tensors' memory (no serialised copy).

    Returns the file's sha256 and each tensor's sha256 (same order as `items`).
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in items:
        if t.dtype not in _ST_DTYPES:
            raise UserError(f"tensor {name!r}: dtype {t.dtype} has no safetensors equivalent")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header with spaces to 8-byte alignment
    file_hash, sums = hashlib.sha256(), []
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            f.write(chunk)
            file_hash.update(chunk)
        for _, t in items:
            data = tensor_bytes(t)
            f.write(data)
            file_hash.update(data)
            sums.append(hashlib.sha256(data).hexdigest())
    return file_hash.hexdigest(), sums


class ShardWriter:
    """Collects whole layers into shards of at most `max_bytes` and writes each shard as soon as
    the next layer would not fit. A layer larger than `max_bytes` is split by tensor; a tensor
    larger than that gets a shard of its own (as with HF's save_pretrained)."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = Path(out_dir), max_bytes
        self.pending: list[tuple[str, torch.Tensor, dict]] = []
        self.pending_bytes = 0
        self.shards: list[str] = []
        self.file_sha: dict[str, str] = {}
        self.entries: list[dict] = []
        self.total_bytes = 0

    def add_layer(self, items: list[tuple[str, torch.Tensor, dict]]) -> None:
        """Add one layer's tensors, starting a new shard first if the layer would not fit.

        Keeping a layer inside one shard matters for memory: tensors loaded from one mmapped
        layer file share its mapping, and pages already read (for writing) stay resident until
        the last tensor of that file is let go. A layer straddling two shards would keep its
        first half resident through the whole next shard.
        """
        n = sum(t.numel() * t.element_size() for _, t, _ in items)
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self.flush()
        for name, t, origin in items:
            self.add(name, t, origin)

    def add(self, name: str, t: torch.Tensor, origin: dict) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self.flush()
        self.pending.append((name, t, origin))
        self.pending_bytes += n
        self.total_bytes += n

    def flush(self) -> None:
        if not self.pending:
            return
        fname = f".shard-{len(self.shards):05d}.safetensors"  # final name known only at the end
        file_sha, sums = write_safetensors(self.out_dir / fname, [(n, t) for n, t, _ in self.pending])
        self.shards.append(fname)
        self.file_sha[fname] = file_sha
        for (name, t, origin), sha in zip(self.pending, sums):
            self.entries.append({"name": name, "file": fname, "dtype": str(t.dtype).removeprefix("torch."),
                                 "shape": list(t.shape), "sha256": sha, "source": origin})
        self.pending, self.pending_bytes = [], 0

    def close(self) -> dict:
        """Write the last shard, give shards their final names (+ index if several). Returns
        {"files": {file: sha256}, "tensors": [entry, ...]}."""
        self.flush()
        n = len(self.shards)
        final = {s: ("model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors")
                 for k, s in enumerate(self.shards)}
        for s, f in final.items():
            (self.out_dir / s).rename(self.out_dir / f)
        for e in self.entries:
            e["file"] = final[e["file"]]
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {e["name"]: e["file"] for e in self.entries}}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return {"files": {final[s]: h for s, h in self.file_sha.items()}, "tensors": self.entries}


def stream_layers(plan: list[tuple[int, object]], writer: ShardWriter, expected: dict[str, tuple],
                  tied: bool, desc: str) -> None:
    """Write layer i of each (i, source) in `plan`, checking every name and shape against `expected`.

    Each layer is dropped as soon as its tensors are handed to the writer, which drops them when
    their shard is written: memory holds one shard, plus one layer at most.
    """
    from tqdm import tqdm

    seen = set()
    for i, src in tqdm(plan, desc=desc, unit="layer"):
        tensors, items = src.layer(i), []
        for name in sorted(tensors):
            t, origin = tensors[name]
            if tied and name == "lm_head.weight":
                continue  # the tied head *is* the embedding matrix: HF re-ties it on load
            if name.endswith(".rotary_emb.inv_freq"):
                continue  # a buffer that old HF checkpoints saved; recomputed on load, never a weight
            if name not in expected:
                raise UserError(f"{origin['path']}/{origin['file']}: tensor {name!r} is not part of a "
                                f"{expected_label(src)} model with this config.json")
            if tuple(t.shape) != expected[name]:
                raise UserError(f"{origin['path']}/{origin['file']}: {name} has shape {tuple(t.shape)}, "
                                f"config.json implies {expected[name]}")
            items.append((name, t, origin))
            seen.add(name)
        writer.add_layer(items)
        del tensors, items
    missing = sorted(set(expected) - seen)
    if missing:
        raise UserError(f"the inputs lack {len(missing)} tensor(s) the model needs, e.g. {missing[0]!r}")


def expected_label(src) -> str:
    return (src.config.get("architectures") or ["?"])[0]


def copy_extras(out: Path, model_dir: Path, tokenizer_dir: Path) -> dict[str, str]:
    """config.json (from model_dir), generation_config.json and tokenizer files (from tokenizer_dir,
    falling back to model_dir for the generation config). Returns {file: where it came from}."""
    copied = {}

    def copy(src: Path, name: str):
        shutil.copyfile(src / name, out / name)
        copied[name] = str((src / name).resolve())

    copy(model_dir, "config.json")
    for d in (tokenizer_dir, model_dir):
        if (d / "generation_config.json").is_file():
            copy(d, "generation_config.json")
            break
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            copy(tokenizer_dir, name)
    extra = tokenizer_dir / "additional_chat_templates"  # transformers >= 4.54 keeps named templates here
    if extra.is_dir():
        shutil.copytree(extra, out / extra.name)
        copied[extra.name] = str(extra.resolve())
    return copied


def has_chat_template(out: Path) -> bool:
    if (out / "chat_template.jinja").is_file() or (out / "chat_template.json").is_file():
        return True
    cfg = out / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))
