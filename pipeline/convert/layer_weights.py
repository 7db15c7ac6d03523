"""Layer-aware weights for the chat vector: per tensor,

    θ = θ_base + a · (θ_raw − θ_base) + b · (θ_chat − θ_base)

with its own (a, b) for every decoder layer l (a_l, b_l) and for the embeddings, the final norm and
an untied LM head. The plain chat vector is a = 1, b = ratio everywhere; the transplant is a = 1,
b = 0 below format_start and a = 0, b = 1 from it up. Everything between is a layer-aware merge.

Three ways to give the weights (the flags of `python -m pipeline.chat_vector`):

- none: a = 1, b = --ratio for every tensor, today's chat vector (no table: chat_vector.py);
- per layer group, `--raw-weights frozen=1,raw=1,format=0 --chat-weights frozen=0,raw=0,format=1`
  (`from_groups`): a tensor gets its group's weights, and pipeline/groups.py `LayerGroups` says
  which group that is: a decoder layer by its index, the embeddings frozen, the final norm and an
  untied head format, a tied head is the embedding matrix. A group not named keeps the default
  (raw 1, chat --ratio). `--transition W` blends the W layers on each side of format_start
  linearly from the raw group's weights to the format group's instead of switching at one layer
  (Layer Swapping, Bandarkar et al., ICLR 2025);
- explicit, `--layer-weights FILE.yaml` (`from_file`): `raw:` and `chat:` lists of one value per
  decoder layer, and `embed:`, `norm:` (and `head:` when untied) as `{raw: A, chat: B}`.

Every weight is a finite float with -0.0 written as 0.0 (the sign of a zero weight would reach the
sign of a zero result, and mergekit reads `0.0`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.errors import UserError

from ..groups import FORMAT, GROUPS, RAW, LayerGroups
from ..names import EMBED, HEAD, NORM, layer_of

SIDES = ("raw", "chat")  # the two deltas: raw - base, chat - base


def _weight(value, where: str) -> float:
    """A weight as given (a number or its text) -> a finite float, -0.0 as 0.0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{where}: {value!r} is not a number")
    try:
        w = float(value)
    except ValueError:
        raise UserError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(w):
        raise UserError(f"{where}: {value!r} must be a finite number")
    return w + 0.0


@dataclass(frozen=True)
class LayerWeights:
    """(a, b) per decoder layer and for the three tensors outside the layers."""

    raw: tuple[float, ...]  # a_0 .. a_{L-1}
    chat: tuple[float, ...]  # b_0 .. b_{L-1}
    embed: tuple[float, float]  # (a, b) of the embedding matrix (and of a tied head: the same matrix)
    norm: tuple[float, float]  # (a, b) of the final norm
    head: tuple[float, float] | None  # (a, b) of the LM head; None: tied, the head is the embedding
    labels: tuple[str, ...] = ()  # per layer, what decided its weights (its group, the transition; "" from a file)
    given: dict = field(default_factory=dict)  # how they were given, for the provenance
    groups: LayerGroups | None = None  # the split they followed, when they followed one

    @property
    def num_layers(self) -> int:
        return len(self.raw)

    def of(self, name: str) -> tuple[float, float]:
        """(a, b) of the HF tensor `name`."""
        i = layer_of(name)
        if i is not None:
            return self.raw[i], self.chat[i]
        if name.startswith(EMBED):
            return self.embed
        if name.startswith(NORM):
            return self.norm
        if name.startswith(HEAD) and self.head is not None:
            return self.head
        raise KeyError(f"no weights for tensor {name!r}")

    def record(self) -> dict:
        """The per-layer table, as chat_vector.json records it."""
        pair = lambda p: {"raw": p[0], "chat": p[1]}
        return {
            "formula": "base + a * (raw - base) + b * (chat - base), in float64, (a, b) per tensor below",
            "given": self.given,
            "groups": self.groups.to_record() if self.groups else None,
            "layers": [
                {"layer": i, "decided_by": self.labels[i] if self.labels else "", "raw": a, "chat": b}
                for i, (a, b) in enumerate(zip(self.raw, self.chat))
            ],
            "embed": pair(self.embed),
            "norm": pair(self.norm),
            "head": pair(self.head) if self.head is not None else "tied: the embedding matrix (embed)",
        }


def summary(table: dict) -> list[str]:
    """`LayerWeights.record()` as lines: runs of layers with the same (a, b), then the embeddings,
    the final norm and the head. What the command prints."""
    lines, rows, i = [], table["layers"], 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and (rows[j + 1]["raw"], rows[j + 1]["chat"]) == (rows[i]["raw"], rows[i]["chat"]):
            j += 1
        span = f"layer {i}" if i == j else f"layers {i}-{j}"
        why = {r["decided_by"] for r in rows[i : j + 1]}
        note = f" ({next(iter(why))})" if len(why) == 1 and next(iter(why)) else ""
        lines.append(f"  {span}{note}: raw {rows[i]['raw']:g}, chat {rows[i]['chat']:g}")
        i = j + 1
    for key, what in (("embed", "embeddings"), ("norm", "final norm"), ("head", "LM head")):
        v = table[key]
        lines.append(f"  {what}: {v}" if isinstance(v, str) else f"  {what}: raw {v['raw']:g}, chat {v['chat']:g}")
    return lines


# ------------------------------------------------------------------------------- per group


def parse_group_weights(spec, flag: str) -> dict[str, float]:
    """`frozen=1,raw=1,format=0` (or a {group: weight} dict) -> {group: weight}; groups not named are absent."""
    example = f"e.g. {flag} frozen=1,raw=1,format=0"
    if isinstance(spec, dict):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        text = str(spec).strip()
        if not text:
            raise UserError(f"{flag}: empty; expected GROUP=WEIGHT pairs separated by commas ({example})")
        items = []
        for part in text.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise UserError(f"{flag} {text}: {part.strip()!r} is not GROUP=WEIGHT ({example})")
            items.append((key.strip(), value.strip()))
    out: dict[str, float] = {}
    for key, value in items:
        if key not in GROUPS:
            raise UserError(
                f"{flag}: unknown group {key!r}; the groups are {', '.join(GROUPS)} (pipeline/groups.py; {example})"
            )
        if key in out:
            raise UserError(f"{flag}: group {key!r} is given twice")
        out[key] = _weight(value, f"{flag} {key}")
    return out


def parse_transition(value, flag: str = "--transition") -> int:
    """A transition width: a whole number of layers >= 0 (0: switch at format_start)."""
    if isinstance(value, bool):
        raise UserError(f"{flag} {value!r}: must be a whole number of layers >= 0")
    if isinstance(value, int):
        w = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        w = int(value)
    else:
        raise UserError(f"{flag} {value!r}: must be a whole number of layers >= 0 (0: no transition)")
    if w < 0:
        raise UserError(f"{flag} {w}: must be >= 0 (the number of layers blended on each side of format_start)")
    return w


def from_groups(
    groups: LayerGroups,
    raw_weights: dict[str, float],
    chat_weights: dict[str, float],
    transition: int = 0,
    ratio: float = 1.0,
    flag: str = "--transition",
) -> LayerWeights:
    """Each tensor gets its group's weights (groups.py decides the group); the `transition` layers on each
    side of format_start blend from the raw group's weights to the format group's."""
    a = {g: raw_weights.get(g, 1.0) for g in GROUPS}
    b = {g: chat_weights.get(g, ratio) for g in GROUPS}
    L, r, f, W = groups.num_layers, groups.raw_start, groups.format_start, transition
    if W > f - r or W > L - f:
        raise UserError(
            f"{flag} {W}: the zone, {W} layer(s) on each side of format_start {f}, is layers "
            f"[{f - W}, {f + W}); it must lie inside the raw group [{r}, {f}) and the format group "
            f"[{f}, {L}), so at most {min(f - r, L - f)} here"
        )
    raw, chat, labels = [], [], []
    for i in range(L):
        g = groups.group_of_layer(i)
        if W and f - W <= i < f + W:
            # layer centres at i + 0.5, the zone [f - W, f + W): s runs 1/(4W), 3/(4W), ... 1 - 1/(4W),
            # so the 2W layers blend symmetrically and none is left at either end's weights
            s = (i - (f - W) + 0.5) / (2 * W)
            raw.append((1 - s) * a[RAW] + s * a[FORMAT] + 0.0)
            chat.append((1 - s) * b[RAW] + s * b[FORMAT] + 0.0)
            labels.append(f"{g}, transition {s:g} of the way from raw to format")
        else:
            raw.append(a[g])
            chat.append(b[g])
            labels.append(g)
    pair = lambda g: (a[g], b[g])
    head = None if groups.tied else pair(groups.group_of(HEAD))
    return LayerWeights(
        tuple(raw),
        tuple(chat),
        pair(groups.group_of(EMBED)),
        pair(groups.group_of(NORM)),
        head,
        labels=tuple(labels),
        groups=groups,
        given={
            "raw_weights": a,
            "chat_weights": b,
            "transition": W,
            "rule": "a tensor takes its layer group's weights (pipeline/groups.py): layers by "
            "index, embeddings frozen, final norm and untied head format",
        },
    )


# ------------------------------------------------------------------------------- explicit, from a file

FILE_KEYS = ("raw", "chat", "embed", "norm", "head")
EXAMPLE = (
    "raw: [1, 1, 0.5, 0], chat: [0, 0, 0.5, 1], embed: {raw: 1, chat: 0}, norm: {raw: 0, chat: 1}, "
    "head: {raw: 0, chat: 1}"
)


def from_file(path, num_layers: int, tied: bool, flag: str = "--layer-weights") -> LayerWeights:
    """Explicit weights: `raw:` and `chat:` lists of one value per decoder layer; `embed:`, `norm:` and
    (untied only) `head:` as {raw: A, chat: B}. Every error names the flag, the file, its line and key."""
    import hashlib

    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    try:
        data, node = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(
            f"{flag} {path}{f':{mark.line + 1}' if mark else ''}: invalid YAML: {getattr(e, 'problem', None) or e}"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path}: expected a mapping such as {{{EXAMPLE}}}")
    lines: dict[str, int] = {}
    for k, _ in node.value:
        if k.value in lines:
            raise UserError(
                f"{flag} {path}:{k.start_mark.line + 1}: `{k.value}` is given twice (first at line {lines[k.value]})"
            )
        lines[k.value] = k.start_mark.line + 1
    at = lambda key: f"{flag} {path}:{lines[key]}" if key in lines else f"{flag} {path}"
    allowed = [k for k in FILE_KEYS if not (tied and k == "head")]
    for key in data:
        if key == "head" and tied:
            raise UserError(
                f"{at(key)}: `head`: this model ties the LM head to the embeddings (config.json "
                f"tie_word_embeddings), so the head is the embedding matrix and takes `embed`'s "
                f"weights; remove `head`"
            )
        if key not in allowed:
            raise UserError(f"{at(key)}: unknown key `{key}` (expected {', '.join(allowed)})")
    for key in allowed:
        if key not in data:
            raise UserError(
                f"{flag} {path}: `{key}` is missing; the file gives {', '.join(allowed)} "
                f"(e.g. {{{EXAMPLE if not tied else EXAMPLE.rsplit(', head', 1)[0]}}})"
            )
    lists = {}
    for side in SIDES:
        v = data[side]
        if not isinstance(v, list):
            raise UserError(
                f"{at(side)}: `{side}` must be a list of {num_layers} numbers, one per decoder "
                f"layer (0..{num_layers - 1}), got {type(v).__name__}"
            )
        if len(v) != num_layers:
            raise UserError(
                f"{at(side)}: `{side}` has {len(v)} value(s), but the model has {num_layers} "
                f"decoder layers (one value per layer, 0..{num_layers - 1})"
            )
        lists[side] = tuple(_weight(x, f"{at(side)}: `{side}[{i}]`") for i, x in enumerate(v))
    pairs = {}
    for key in allowed[2:]:
        v = data[key]
        if not isinstance(v, dict) or set(v) != set(SIDES):
            raise UserError(f"{at(key)}: `{key}` must be a mapping {{raw: A, chat: B}} (both), got {v!r}")
        pairs[key] = tuple(_weight(v[s], f"{at(key)}: `{key}.{s}`") for s in SIDES)
    return LayerWeights(
        lists["raw"],
        lists["chat"],
        pairs["embed"],
        pairs["norm"],
        pairs.get("head"),
        labels=("",) * num_layers,
        given={"layer_weights": str(path.resolve()), "sha256": hashlib.sha256(text.encode()).hexdigest()},
    )
