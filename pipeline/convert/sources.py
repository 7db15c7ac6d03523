"""Model weights in, one layer at a time: a pipeline run's checkpoint or a Hugging Face directory.

Both read as `source.layer(i) -> {hf_name: (tensor, origin)}`, where layer i holds decoder layer
i, plus the embeddings on layer 0 and the final norm and LM head on layer L-1 (pipeline/names.py).
Only one layer is ever loaded: a pipeline layer file is `torch.load`ed with mmap, an HF layer is
read tensor by tensor from its safetensors shard. `origin` says where a tensor came from (input,
run, step, file), for the provenance records.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from data_prep.errors import UserError

from .. import hf
from ..groups import LayerGroups
from ..names import HEAD_WEIGHT, layer_file, tied_embeddings, to_hf_name, to_pipeline_name
from ..rundir import RunDir

# Config keys that decide tensor shapes or the computation; the two inputs must agree on all of them.
SHAPE_KEYS = (
    "architectures",
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
)


def check_same_shape(a, b, flags=("--raw", "--chat")) -> None:
    for key in SHAPE_KEYS:
        x, y = a.config.get(key), b.config.get(key)
        if x != y:
            raise UserError(
                f"{flags[0]} and {flags[1]} are different models: config.json {key} is {x!r} in "
                f"{a.model_dir} but {y!r} in {b.model_dir}"
            )


class HFSource:
    """A Hugging Face model directory with safetensors weights."""

    kind = "hf"

    def __init__(self, path: str | Path, flag: str):
        self.path, self.flag = Path(path), flag
        self.config = hf.read_config(self.path)
        hf.check_architecture(self.config, str(self.path))
        self.num_layers = self.config["num_hidden_layers"]
        self.model_dir = self.tokenizer_dir = self.path
        self.run, self.step, self.groups = None, None, None
        self._files = hf.weight_map(self.path, flag=f"{flag}")
        self._by_layer: dict[int, list[str]] = {}
        tied = tied_embeddings(self.config)
        for name in self._files:
            if name.endswith(".rotary_emb.inv_freq") or (tied and name == HEAD_WEIGHT):
                continue  # a buffer old checkpoints saved (recomputed on load); a tied head saved twice
            try:
                i = to_pipeline_name(name, self.num_layers)[0]
            except KeyError:
                raise UserError(f"{flag} {self.path}: unexpected tensor {name!r} in {self._files[name]}") from None
            self._by_layer.setdefault(i, []).append(name)

    def names(self, i: int) -> list[str]:
        return list(self._by_layer.get(i, []))

    def layer(self, i: int) -> dict[str, tuple[torch.Tensor, dict]]:
        tensors = hf.read_tensors(self.path, self._files, self._by_layer.get(i, []))
        return {n: (t, self.origin(self._files[n])) for n, t in tensors.items()}

    def origin(self, fname: str) -> dict:
        return {"input": self.flag, "kind": "hf", "path": str(self.path.resolve()), "step": None, "file": fname}

    def describe(self) -> dict:
        return {"kind": "hf", "path": str(self.path.resolve())}


class RunSource:
    """One complete checkpoint step of a pipeline run directory (pipeline/rundir.py)."""

    kind = "run"

    def __init__(self, path: str | Path, step: int | None, flag: str, step_flag: str):
        self.path, self.flag = Path(path), flag
        self.rundir = RunDir(self.path)
        self.run = self.rundir.read_run()
        where = str(self.rundir.run_json)
        if not isinstance(self.run.get("groups"), dict) or not isinstance(self.run.get("config"), dict):
            raise UserError(f"{where}: missing `groups` or `config`")
        self.groups = LayerGroups.from_record(self.run["groups"], where)
        self.num_layers = self.groups.num_layers
        cfg = self.run["config"]
        self.model_dir = self._base_dir(cfg, where)
        tok = cfg.get("tokenizer")
        if not tok or tok == cfg.get("model"):  # the model's own tokenizer (training's default)
            self.tokenizer_dir = self.model_dir
        else:
            self.tokenizer_dir = _existing_dir(self._candidates(tok), where, "config.tokenizer")
        self.config = hf.read_config(self.model_dir)
        hf.check_architecture(self.config, str(self.model_dir))
        if self.config.get("num_hidden_layers") != self.num_layers:
            raise UserError(
                f"{where}: groups.num_layers={self.num_layers} but {self.model_dir}/config.json has "
                f"num_hidden_layers={self.config.get('num_hidden_layers')}"
            )
        self.step = self.rundir.resolve_step(step, step_flag)
        self.ckpt_dir = self.rundir.tag_dir(self.step)
        self.record = self.rundir.read_record(self.step)
        self._base: HFSource | None = None
        self._verified: set[str] = set()

    def _candidates(self, recorded: str) -> list[Path]:
        """Where a path run.json records may be now: where it was (run.json's paths are absolute),
        then at the same place relative to this run directory, for a run moved or copied together
        with its base model (run.json `run_dir` says where it was written). A path from a run.json
        of before paths were resolved is relative to wherever training ran: tried as it is."""
        cands = [Path(recorded)]
        was = self.run.get("run_dir")
        if was and Path(recorded).is_absolute():
            moved = Path(os.path.normpath(self.path.resolve() / os.path.relpath(recorded, was)))
            if moved != Path(recorded):
                cands.append(moved)
        return cands

    def _base_dir(self, cfg: dict, where: str) -> Path:
        """The base model directory: the recorded one (base_model.path, then config.model), or the
        same place relative to a moved run directory. When several exist, the one that still
        holds the fingerprint the run recorded wins."""
        cands: list[Path] = []
        for p in ((self.run.get("base_model") or {}).get("path"), cfg.get("model")):
            if isinstance(p, str) and p:
                cands += [c for c in self._candidates(p) if c not in cands]
        found = [c for c in cands if c.is_dir()]
        recorded = (self.run.get("base_model") or {}).get("fingerprint")
        if len(found) > 1 and recorded:
            for c in found:
                try:
                    if hf.model_identity(c)["fingerprint"] == recorded:
                        return c
                except UserError:
                    continue
        return _existing_dir(found or cands, where, "config.model")

    @property
    def base(self) -> HFSource:
        if self._base is None:
            self._base = HFSource(self.model_dir, f"{self.flag} base model")
        return self._base

    def layer(self, i: int) -> dict[str, tuple[torch.Tensor, dict]]:
        fname = layer_file(i)
        if fname not in self._verified:  # hashing a 2 GB layer file twice would cost seconds
            self.rundir.verify_file(self.step, fname, self.record)
            self._verified.add(fname)
        path = self.ckpt_dir / fname
        rel = str(path.relative_to(self.path))
        # mmap: tensors stay on disk until read, so a layer costs page cache, not private memory.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        out = {}
        for key, t in state.items():
            try:
                name = to_hf_name(i, key)
            except KeyError:
                raise UserError(f"{path}: unexpected key {key!r} (see pipeline/names.py)") from None
            if name is None or (self.groups.tied and name == HEAD_WEIGHT):
                continue  # the anchor; and the tied head, which the last layer saves again: it *is* the embedding
            out[name] = (t, self.origin(rel))
        # A checkpoint saved without its frozen parameters (DeepSpeed's exclude_frozen_params) lacks
        # them; those are the base model's by definition, so take them from there, and say so.
        has_base_weights = any(self.model_dir.glob("*.safetensors"))
        missing = [n for n in self.base.names(i) if n not in out] if has_base_weights else []
        if missing:
            bad = [n for n in missing if self.groups.trains(n)]
            if bad:
                raise UserError(f"{path}: lacks {bad[0]!r}, which this run trained (checkpoint incomplete)")
            base = self.base.layer(i)
            for n in missing:
                out[n] = (base[n][0], {**base[n][1], "input": f"{self.flag} base model (frozen in this run)"})
        return out

    def origin(self, rel: str) -> dict:
        return {"input": self.flag, "kind": "run", "path": str(self.path.resolve()), "step": self.step, "file": rel}

    def describe(self) -> dict:
        return {
            "kind": "run",
            "path": str(self.path.resolve()),
            "step": self.step,
            "phase": self.run.get("phase"),
            "groups": self.groups.to_record(),
            "base_model": self.run.get("base_model"),
        }


def _existing_dir(cands: list[Path], where: str, key: str) -> Path:
    for c in cands:
        if c.is_dir():
            return c
    tried = " or ".join(map(str, cands)) or "(none recorded)"
    raise UserError(
        f"{where}: {key}: directory {tried} does not exist (the run's base model / tokenizer must "
        f"still be on disk, where run.json records it or at the same place relative to the run directory)"
    )


def open_source(path: str | Path, step: int | None, flag: str, step_flag: str):
    """A run directory (run.json) or an HF directory (config.json), with a message for neither."""
    p = Path(path)
    if (p / "run.json").is_file():
        return RunSource(p, step, flag, step_flag)
    if step is not None:
        raise UserError(f"{step_flag} applies to a run directory, but {flag} {p} is a Hugging Face directory")
    if (p / "config.json").is_file():
        return HFSource(p, flag)
    raise UserError(f"{flag} {p}: neither a run directory (run.json) nor a Hugging Face directory (config.json)")
