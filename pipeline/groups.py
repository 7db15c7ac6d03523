"""Layer groups and the stage partition that respects them.

Groups: frozen [0, raw_start) with the embeddings, raw [raw_start, format_start), format
[format_start, L) with the final norm and LM head. Which groups train depends on the phase.

Stages: with P >= 2 the raw/format boundary is a stage boundary, so the two groups never share
a stage (and so never share optimizer state). Within that rule stages are balanced by cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from data_prep.common import UserError

# Relative cost of one layer per micro-batch, in units of one forward pass. A trained layer does
# forward + backward for activations + backward for weights (~3x). A frozen layer that gradients
# must still flow through (it sits above a trained layer) skips only the weight gradient (~2x).
# A frozen layer below every trained layer runs forward only (~1x).
COST_TRAINED, COST_BACKPROP, COST_FORWARD = 3.0, 2.0, 1.0


@dataclass(frozen=True)
class Groups:
    num_layers: int
    raw_start: int
    format_start: int
    phase: str
    raw_trains_format: bool = False

    @property
    def trained_groups(self) -> tuple[str, ...]:
        if self.phase == "full":
            return ("frozen", "raw", "format")  # everything; "frozen" here means the prefix + embeddings
        if self.phase == "chat":
            return ("format",)
        return ("raw", "format") if self.raw_trains_format else ("raw",)

    def group_of_layer(self, i: int) -> str:
        return "frozen" if i < self.raw_start else ("raw" if i < self.format_start else "format")

    def layer_trained(self, i: int) -> bool:
        return self.group_of_layer(i) in self.trained_groups

    def layer_cost(self, i: int) -> float:
        if self.layer_trained(i):
            return COST_TRAINED
        first_trained = min((j for j in range(self.num_layers) if self.layer_trained(j)), default=self.num_layers)
        return COST_BACKPROP if i > first_trained else COST_FORWARD

    def as_record(self, tied: bool) -> dict:
        return {
            "num_layers": self.num_layers, "raw_start": self.raw_start, "format_start": self.format_start,
            "trained_groups": list(self.trained_groups), "embeddings_trained": self.phase == "full",
            "tied_embeddings": tied,
        }


def resolve_boundary(value, num_layers: int, key: str) -> int:
    """A layer index, or a fraction of the layer count rounded to the nearest layer."""
    if isinstance(value, float):
        return int(round(value * num_layers))
    return value


def make_groups(raw_start, format_start, num_layers: int, phase: str, raw_trains_format: bool = False,
                where: dict | None = None) -> Groups:
    """`where` maps a key to the "file:line" it came from (RunConfig.where)."""
    w = lambda key: (where or {}).get(key, "config")
    r = resolve_boundary(raw_start, num_layers, "raw_start")
    f = resolve_boundary(format_start, num_layers, "format_start")
    if f > num_layers - 1:
        raise UserError(f"{w('format_start')}: `format_start` ({format_start} -> layer {f}) must be < the layer count "
                        f"({num_layers}): the format group needs at least one layer")
    if f < 1:
        raise UserError(f"{w('format_start')}: `format_start` ({format_start} -> layer {f}) must be >= 1")
    if r >= f:
        raise UserError(f"{w('raw_start')}: `raw_start` ({raw_start} -> layer {r}) must be < `format_start` "
                        f"({format_start} -> layer {f}): the raw group would be empty")
    return Groups(num_layers, r, f, phase, raw_trains_format)


def _best_split(costs: tuple[float, ...], parts: int) -> tuple[float, tuple[int, ...]]:
    """Contiguous split of `costs` into `parts` non-empty pieces minimising the largest piece."""

    @lru_cache(maxsize=None)
    def solve(start: int, k: int) -> tuple[float, tuple[int, ...]]:
        if k == 1:
            return sum(costs[start:]), (start,)
        best = (float("inf"), ())
        for cut in range(start + 1, len(costs) - k + 2):
            head = sum(costs[start:cut])
            if head >= best[0]:
                break
            tail, bounds = solve(cut, k - 1)
            cand = (max(head, tail), (start,) + bounds)
            if cand[0] < best[0]:
                best = cand
        return best

    return solve(0, parts)


def partition(groups: Groups, stages: int) -> list[int]:
    """Stage boundaries [0, b1, ..., L]: stage s holds layers [parts[s], parts[s+1])."""
    L, f = groups.num_layers, groups.format_start
    if stages > L:
        raise UserError(f"`pipeline_stages` ({stages}) is more than the model's {L} layers")
    if stages == 1:
        return [0, L]
    costs = tuple(groups.layer_cost(i) for i in range(L))
    best = None
    # Give k stages to the layers below format_start and the rest to the format group; try every k.
    for k in range(max(1, stages - (L - f)), min(f, stages - 1) + 1):
        lo_cost, lo = _best_split(costs[:f], k)
        hi_cost, hi = _best_split(costs[f:], stages - k)
        cand = (max(lo_cost, hi_cost), list(lo) + [f + b for b in hi] + [L])
        if best is None or cand[0] < best[0]:
            best = cand
    if best is None:
        raise UserError(f"`pipeline_stages` ({stages}) cannot keep the raw/format boundary at layer {f} "
                        f"a stage boundary with {f} layers below it and {L - f} above")
    return best[1]
