"""The run config: one typed tree, loaded from a flat YAML file plus `--key=value` overrides.

Each section is a small dataclass; every field carries its documentation in `metadata["doc"]`,
which is the one place keys are documented (`python -m pipeline.train --help` prints it, and the
README points there). The YAML is flat (`lr: 3e-4`, not `optim: {lr: ...}`) because leaf names are
unique across sections; a key that names no field is a typo and is rejected with its line number.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from data_prep.errors import UserError
from data_prep.manifest import SPLITS

from . import shipped
from .groups import PHASES


def doc(text: str, default=dataclasses.MISSING, **kw):
    """A dataclass field whose documentation travels with it."""
    if default is dataclasses.MISSING and "default_factory" not in kw:
        return field(metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text}, **kw)


@dataclass(kw_only=True)
class ModelSection:
    model: str = doc("Hugging Face model directory to start from (Llama, Mistral or Qwen2 architecture).")
    tokenizer: str | None = doc(
        "Tokenizer directory or SentencePiece .model the data was packed with; defaults to `model`. "
        "Recorded in the run so export and transplant ship the right tokenizer.",
        None,
    )


@dataclass(kw_only=True)
class GroupSection:
    phase: str = doc(
        "What to train: `chat` (format group on chat shards, loss on assistant tokens), "
        "`raw` (raw group on raw shards) or `full` (everything: base pretraining and the naive baseline)."
    )
    raw_start: Union[int, float] = doc(
        "First layer of the raw group: a layer index, or a fraction of the layer count (0.25 -> layer L/4). "
        "Layers below it and the embeddings stay frozen.",
        0.25,
    )
    format_start: Union[int, float] = doc(
        "First layer of the format group (index or fraction). The format group, the final norm and the "
        "LM head are what A-Chat trains and what the transplant takes from A-Chat.",
        0.75,
    )
    raw_trains_format: bool = doc(
        "Ablation: during `raw`, train the format group too (the method keeps it frozen).", False
    )
    anchor_weight: float = doc(
        "Representation anchoring during `raw`: adds weight x MSE between the hidden state entering the "
        "format group and the base model's, so A-Chat's format group still fits after the transplant. "
        "Costs a second (frozen, forward-only) pass through the raw group. 0 turns it off.",
        0.0,
    )


@dataclass(kw_only=True)
class DataSection:
    data: Any = doc(
        "A data-prep manifest (`P.manifest.json`), or a weighted list `[{path: M1, weight: 2}, {path: M2, weight: 1}]` "
        "whose samples are interleaved deterministically in proportion to the weights."
    )
    verify_data: str = doc(
        "How the shards are checked against their manifest when training opens them: `sha256` (every byte, "
        "catches corruption; costs one read of the corpus per start) or `size` (file sizes only).",
        "sha256",
    )
    seq_len: int = doc("Tokens per training sequence. Fixed: pipeline stages exchange shapes once.", 256)
    micro_batch_size: int = doc("Sequences per rank per forward/backward.", 4)
    global_batch_size: int = doc(
        "Sequences per optimizer step across the whole job. Gradient accumulation is derived: "
        "global / (micro x data-parallel size), so a config trains the same way on 1 or 64 ranks.",
        16,
    )


@dataclass(kw_only=True)
class OptimSection:
    lr: float = doc("Peak learning rate (AdamW).", 3e-4)
    min_lr: float = doc("Learning rate at the end of the cosine decay.", 0.0)
    warmup_steps: Union[int, float] = doc(
        "Linear warmup before the cosine decay: a number of steps, or a fraction of `steps` (0.05: the first 5%, "
        "rounded up, so at least one step). A fraction keeps a shortened run (--steps=20) from ending inside its "
        "warm-up.",
        0,
    )
    weight_decay: float = doc("AdamW decoupled weight decay, applied to trained parameters only.", 0.0)
    grad_clip: float = doc("Clip the global gradient norm to this (0 disables).", 1.0)


@dataclass(kw_only=True)
class ScheduleSection:
    steps: int = doc(
        "Optimizer steps to train. The cosine schedule spans exactly these, so a resume with "
        "another value is refused (it would change the learning rate of every later step).",
        100,
    )
    seed: int = doc("Seed for the data order and anything random. Same seed, same run.", 0)
    out: str = doc(
        "Run directory: config, layer groups, metrics, loss plot and checkpoints go here. "
        "Rerunning the same command resumes from its latest complete checkpoint."
    )
    save_every: int = doc("Save a checkpoint every N steps (the last step is always saved).", 50)
    keep_last: int = doc("Keep only the newest N complete checkpoints (0 keeps all).", 2)
    log_every: int = doc("Write a metrics.jsonl line every N steps.", 1)


@dataclass(kw_only=True)
class ParallelSection:
    pipeline_stages: int = doc(
        "Pipeline stages P. With P >= 2 the raw/format boundary is always a stage boundary, so the two groups "
        "never share a stage or its optimizer state. The world size must be a multiple of P; "
        "the rest is data parallelism (ZeRO-1).",
        1,
    )
    ds_config: str = doc(
        "DeepSpeed JSON to merge the run into; `auto` picks ds_configs/cpu_fp32_zero1.json without a GPU "
        "and ds_configs/gpu_bf16_zero1.json with one.",
        "auto",
    )
    activation_checkpoint_interval: int = doc(
        "Recompute activations every N layers in backward (0: off). Trades ~30% more compute for memory.", 0
    )
    compile_layers: bool = doc(
        "torch.compile each decoder layer (in place: names and checkpoints are unchanged). On a GPU it fuses "
        "the unfused norm/rotary/SiLU/cast kernels that take ~47% of a step (bench/results/gpu_profile_mb4.md); "
        "costs a minute or two of compilation at the first step. Off on CPU, where it gains little.",
        False,
    )
    dist_timeout_s: int = doc(
        "Collective timeout in seconds: a dead rank makes the others fail after this instead of hanging.", 120
    )


@dataclass(kw_only=True)
class EvalSection:
    eval_every: int = doc(
        "Validate every N steps, and also before the first step and after the last (0: off). Each set's "
        "mean loss (same loss and masks as training) goes to metrics.jsonl, the progress bar, loss.png and "
        "the monitors. Runs through the engine's forward-only path: the training curve and weights are "
        "unchanged. The run's own set is the val split of `data`; with no val split only `eval_data` is used.",
        0,
    )
    eval_batches: int = doc(
        "Batches of `global_batch_size` sequences per set per validation, always the same sequences. A set "
        "with fewer windows uses fewer batches (the layer map says so); one smaller than one batch is an error.",
        4,
    )
    eval_data: Any = doc(
        "More sets to validate on, by name: `{forget: base.manifest.json}` (its val split) or "
        "`{forget: {path: base.manifest.json, split: train}}`. Logged as `val_loss_NAME`; the run's own val "
        "split is `val_loss`.",
        None,
    )


@dataclass(kw_only=True)
class MonitorSection:
    report_to: Any = doc(
        "Where DeepSpeed's monitor also writes the training loss, learning rate and validation losses: a list "
        "of `tensorboard` (RUN/tensorboard/), `wandb` (the run is named after `out`; offline with "
        "WANDB_MODE=offline; team and group from WANDB_ENTITY and WANDB_RUN_GROUP) and `csv` (RUN/csv/). "
        "Their x axis is samples seen. metrics.jsonl is written either way. Needs "
        "`pip install 'layer-aware[monitor]'`.",
        None,
    )
    wandb_project: str = doc("The W&B project of `report_to: [wandb]`.", "layer-aware")


SECTIONS = {
    "model": ModelSection,
    "groups": GroupSection,
    "data": DataSection,
    "optim": OptimSection,
    "schedule": ScheduleSection,
    "parallel": ParallelSection,
    "eval": EvalSection,
    "monitor": MonitorSection,
}


@dataclass
class RunConfig:
    model: ModelSection
    groups: GroupSection
    data: DataSection
    optim: OptimSection
    schedule: ScheduleSection
    parallel: ParallelSection
    eval: EvalSection
    monitor: MonitorSection
    # key -> "file:line" (or "override --key") it came from, so checks that need the model can
    # name the line too. Not part of the config itself.
    where: dict = field(default_factory=dict, repr=False, compare=False)

    def flat(self) -> dict:
        """The config as the flat key -> value mapping a user writes."""
        out = {}
        for sec in SECTIONS:  # `where` is not a section, so it never reaches run.json
            out.update(dataclasses.asdict(getattr(self, sec)))
        return out


def _leaf_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index = {}
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"config key {f.name} defined twice"
            index[f.name] = (sec, f)
    return index


LEAVES = _leaf_index()


def describe_keys() -> str:
    """The config reference (for --help and the README)."""
    lines = []
    for sec, cls in SECTIONS.items():
        lines.append(f"[{sec}]")
        for f in dataclasses.fields(cls):
            default = "required" if f.default is dataclasses.MISSING else f"default {f.default!r}"
            lines.append(f"  {f.name} ({default}): {f.metadata['doc']}")
    return "\n".join(lines)


def _coerce(value, typ, key: str, where: str):
    """Check/convert a YAML or command-line value to the field's type; errors name the key."""
    hints = get_args(typ) if get_origin(typ) in (Union, types.UnionType) else (typ,)
    if value is None and type(None) in hints:
        return None
    if isinstance(value, str) and Any in hints and value.lstrip().startswith(("[", "{")):
        # --data='[{path: a.manifest.json, weight: 3}, {path: b.manifest.json, weight: 1}]'
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"{where}: `{key}` is not valid YAML ({e})") from None
    if isinstance(value, str) and str not in hints and Any not in hints:
        # Command-line overrides arrive as strings: parse them as YAML scalars (3e-4, true, 12).
        value = yaml.safe_load(value)
    if isinstance(value, str) and float in hints:
        # YAML 1.1 reads `3e-4` (no dot) as a string; nobody means a string there.
        try:
            value = float(value)
        except ValueError:
            pass
    for t in hints:
        if t is Any:
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    names = "/".join(getattr(t, "__name__", str(t)) for t in hints)
    raise UserError(f"{where}: `{key}` must be {names}, got {value!r}")


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given; a relative one that is not under the working directory but names a
    config shipped with the package (`chat.yaml`, `demo/raw.yaml`) is the shipped one, so the
    README's commands work from any folder and from an installed wheel (pipeline/shipped.py)."""
    return shipped.find(path)


def read_yaml(path: Path, what: str = "config file"):
    """(data, node) of a YAML file; a missing file or bad YAML is a UserError naming the file and line."""
    try:
        text = path.read_text()
        return yaml.safe_load(text), yaml.compose(text)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None


def _yaml_with_lines(path: Path) -> tuple[dict, dict[str, int]]:
    """Parse a YAML mapping and remember each top-level key's line (for error messages)."""
    data, node = read_yaml(path)
    if data is None:
        data, node = {}, None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a run config must be a mapping of `key: value` lines")
    lines = {}
    if node is not None:
        for k, _ in node.value:
            if k.value in lines:  # YAML itself lets the last one win, silently
                raise UserError(
                    f"{path}:{k.start_mark.line + 1}: `{k.value}` is given twice "
                    f"(first at line {lines[k.value]}); keep one"
                )
            lines[k.value] = k.start_mark.line + 1
    return data, lines


def _unknown(key: str, where: str) -> UserError:
    close = difflib.get_close_matches(key, LEAVES, n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return UserError(f"{where}: unknown config key `{key}`{hint}; see `python -m pipeline.train --help`")


def parse_overrides(args: list[str]) -> dict[str, str]:
    out = {}
    for a in args:
        if not a.startswith("--") or "=" not in a:
            raise UserError(f"override {a!r} must look like --key=value")
        k, v = a[2:].split("=", 1)
        if k not in LEAVES:
            raise _unknown(k, f"command-line flag --{k}")
        out[k] = v
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML run config, apply overrides, check types and the checks that need no model."""
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if path is not None:
        path = resolve_config_path(path)
        data, lines = _yaml_with_lines(path)
        for k, v in data.items():
            loc = f"{path}:{lines.get(k, '?')}"
            if k not in LEAVES:
                raise _unknown(str(k), loc)
            values[k], where[k] = v, loc
    for k, v in (overrides or {}).items():
        if k not in LEAVES:
            raise _unknown(k, f"override --{k}")
        values[k], where[k] = v, f"override --{k}"
    sections = {}
    for sec, cls in SECTIONS.items():
        kwargs = {}
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in values:
                kwargs[f.name] = _coerce(values[f.name], hints[f.name], f.name, where[f.name])
            elif f.default is dataclasses.MISSING:
                src = str(path) if path else "the command line"
                raise UserError(f"{src}: required config key `{f.name}` is missing ({f.metadata['doc']})")
        sections[sec] = cls(**kwargs)
    cfg = RunConfig(**sections)
    cfg.where = where
    validate(cfg, where)
    return cfg


def validate(cfg: RunConfig, where: dict[str, str] | None = None) -> None:
    """Checks that need only the config itself. The boundaries need the model: pipeline.groups
    checks them when the run's plan is built."""
    where = where or {}

    def bad(key, msg):
        raise UserError(f"{where.get(key, 'config')}: `{key}` {msg}")

    g, d, s, o = cfg.groups, cfg.data, cfg.schedule, cfg.optim
    for key, (sec, _) in LEAVES.items():  # inf or nan would train to NaN and exit 0
        v = getattr(getattr(cfg, sec), key)
        if isinstance(v, float) and not math.isfinite(v):
            bad(key, f"must be a finite number, got {v}")
    if g.phase not in PHASES:
        bad("phase", f"must be one of {', '.join(PHASES)}, got {g.phase!r}")
    for k in (
        "seq_len",
        "micro_batch_size",
        "global_batch_size",
        "pipeline_stages",
        "log_every",
        "steps",
        "save_every",
    ):
        if getattr(getattr(cfg, LEAVES[k][0]), k) < 1:
            bad(k, "must be >= 1")
    if not o.lr > 0:
        bad("lr", f"must be > 0, got {o.lr}")
    if not 0 <= o.min_lr <= o.lr:
        bad("min_lr", f"must lie in [0, lr = {o.lr}], got {o.min_lr}")
    if isinstance(o.warmup_steps, float) and not 0 <= o.warmup_steps < 1:
        bad("warmup_steps", f"as a fraction of `steps` must lie in [0, 1), got {o.warmup_steps} (or give whole steps)")
    for k in ("warmup_steps", "weight_decay", "grad_clip", "activation_checkpoint_interval"):
        if getattr(getattr(cfg, LEAVES[k][0]), k) < 0:
            bad(k, "must be >= 0")
    if g.anchor_weight < 0:
        bad("anchor_weight", "must be >= 0")
    if g.anchor_weight > 0 and g.phase != "raw":
        bad("anchor_weight", f"applies to `phase: raw` only (this run is `{g.phase}`)")
    if d.verify_data not in ("sha256", "size"):
        bad("verify_data", f"must be `sha256` or `size`, got {d.verify_data!r}")
    if s.keep_last < 0:
        bad("keep_last", "must be >= 0 (0 keeps every checkpoint)")
    if s.seed < 0:
        bad("seed", f"must be >= 0 (NumPy, which DeepSpeed seeds with it, takes no negative seed), got {s.seed}")
    if cfg.parallel.dist_timeout_s < 1:
        bad("dist_timeout_s", f"must be >= 1 (seconds a collective may wait), got {cfg.parallel.dist_timeout_s}")
    if d.global_batch_size % d.micro_batch_size:
        bad(
            "global_batch_size",
            f"({d.global_batch_size}) must be a multiple of micro_batch_size ({d.micro_batch_size})",
        )
    data_sources(cfg.data.data, where.get("data", "config"))
    if cfg.eval.eval_every < 0:
        bad("eval_every", "must be >= 0 (0 turns validation off)")
    if cfg.eval.eval_batches < 1:
        bad("eval_batches", "must be >= 1")
    eval_sources(cfg.eval.eval_data, where.get("eval_data", "config"))
    report_to(cfg.monitor.report_to, where.get("report_to", "config"))


# ---------------------------------------------------------------------------------------------
# Paths in a recorded config


def map_paths(flat: dict, fn) -> dict:
    """A copy of a flat config with every path in it passed through `fn`: `model`, `tokenizer`,
    `out`, `ds_config` (unless `auto`), and each manifest of `data` and `eval_data`."""
    out = dict(flat)
    for k in ("model", "tokenizer", "out"):
        if isinstance(out.get(k), str):
            out[k] = fn(out[k])
    if isinstance(out.get("ds_config"), str) and out["ds_config"] != "auto":
        out["ds_config"] = fn(out["ds_config"])

    def manifest(item):
        if isinstance(item, str):
            return fn(item)
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            return {**item, "path": fn(item["path"])}
        return item

    if isinstance(out.get("data"), (str, list)):
        out["data"] = manifest(out["data"]) if isinstance(out["data"], str) else [manifest(d) for d in out["data"]]
    if isinstance(out.get("eval_data"), dict):
        out["eval_data"] = {name: manifest(item) for name, item in out["eval_data"].items()}
    return out


def resolve_paths(flat: dict) -> dict:
    """The config as run.json records it: every path absolute, resolved against the working
    directory with symlinks followed, so a later command (export, transplant, a resume) finds the
    same files from any folder, and two spellings of one path (`runs/x`, `$PWD/runs/x`,
    `./runs/x/`) record the same thing. A `ds_config` named after a shipped DeepSpeed JSON
    resolves there, as training reads it."""

    def one(p: str) -> str:
        return str(shipped.find(p, shipped.ds_config_dir()).resolve())

    return map_paths(flat, one)


def relative_paths(flat: dict, run_dir: str | Path) -> dict:
    """The recorded config's paths relative to the run directory that recorded them: what stays
    the same when a project folder (base model, data and runs) is moved or copied whole."""
    return map_paths(flat, lambda p: os.path.relpath(p, run_dir))


MONITORS = ("tensorboard", "wandb", "csv")


def report_to(value, where: str = "config") -> list[str]:
    """Normalise `report_to` to a list of monitor names (a single name or a comma list is accepted)."""
    if value is None:
        return []
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise UserError(f"{where}: `report_to` must be a list of {', '.join(MONITORS)}, got {value!r}")
    for v in items:
        if v not in MONITORS:
            close = difflib.get_close_matches(v, MONITORS, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise UserError(f"{where}: `report_to` has {v!r}{hint}; it takes {', '.join(MONITORS)}")
    return list(dict.fromkeys(items))


def eval_sources(value, where: str = "config") -> dict[str, tuple[str, str]]:
    """Normalise `eval_data` to {name: (manifest path, split)}."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not value:
        raise UserError(
            f"{where}: `eval_data` must map names to manifests, e.g. `{{forget: base.manifest.json}}`, got {value!r}"
        )
    out = {}
    for name, item in value.items():
        if not (isinstance(name, str) and name.replace("_", "").isalnum() and name.isascii()):
            raise UserError(
                f"{where}: `eval_data` name {name!r} must be letters, digits and `_` "
                f"(it becomes the metric `val_loss_NAME`)"
            )
        if isinstance(item, str):
            item = {"path": item}
        if not (isinstance(item, dict) and isinstance(item.get("path"), str) and set(item) <= {"path", "split"}):
            raise UserError(
                f"{where}: `eval_data.{name}` must be a manifest path or {{path: MANIFEST, split: val}}, got {item!r}"
            )
        split = item.get("split", "val")
        if split not in SPLITS:
            raise UserError(f"{where}: `eval_data.{name}.split` must be `train` or `val`, got {split!r}")
        out[name] = (item["path"], split)
    return out


def data_sources(data, where: str = "config") -> list[tuple[str, float]]:
    """Normalise `data` to [(manifest path, weight)]."""
    if isinstance(data, str):
        return [(data, 1.0)]
    if isinstance(data, list) and data:
        out = []
        for i, item in enumerate(data):
            if not (isinstance(item, dict) and isinstance(item.get("path"), str) and set(item) <= {"path", "weight"}):
                raise UserError(f"{where}: `data[{i}]` must be {{path: MANIFEST, weight: W}}, got {item!r}")
            w = item.get("weight", 1.0)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w <= 0:
                raise UserError(f"{where}: `data[{i}].weight` must be a positive number, got {w!r}")
            out.append((item["path"], float(w)))
        return out
    raise UserError(f"{where}: `data` must be a manifest path or a list of {{path, weight}}, got {data!r}")
