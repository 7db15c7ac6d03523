"""The layer groups: the one place that decides which parameter belongs to which group, and
which groups a run trains.

A model with L decoder layers is split by two boundaries:

    frozen  [0, raw_start)           + the embeddings   (with tied embeddings: + the LM head)
    raw     [raw_start, format_start)
    format  [format_start, L)        + the final norm and (untied) LM head

Membership is decided by Hugging Face parameter name, so the config check, the stage partition,
the pipeline model, checkpoint reading, export, transplant and chat vector all ask the same
`LayerGroups` object and none re-derives it. A run's groups are written into its run.json
(`to_record`) and read back from there (`from_record`), so a checkpoint carries its own answer.

Tied embeddings: the LM head *is* the embedding matrix, one parameter. It belongs to the
frozen group with the embeddings, so A-Chat cannot train it and a transplant takes it with
the embeddings. The cost: a tied model's chat format must live in the format layers and the
final norm alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_prep.errors import UserError

from .names import EMBED, HEAD, NORM, layer_of

FROZEN, RAW, FORMAT = "frozen", "raw", "format"
GROUPS = (FROZEN, RAW, FORMAT)
# What each phase trains. `raw_trains_format` adds the format group to `raw` (an ablation).
PHASE_TRAINS = {"chat": (FORMAT,), "raw": (RAW,), "full": GROUPS}
PHASES = tuple(PHASE_TRAINS)


def resolve_index(value, num_layers: int) -> int:
    """A layer index, or a fraction of the layer count rounded to the nearest layer."""
    if isinstance(value, float):
        return int(round(value * num_layers))
    return int(value)


@dataclass(frozen=True)
class LayerGroups:
    num_layers: int
    raw_start: int
    format_start: int
    tied: bool
    trained: tuple[str, ...]

    # --------------------------------------------------------------- building and checking
    @classmethod
    def resolve(
        cls,
        raw_start,
        format_start,
        num_layers: int,
        tied: bool,
        phase: str = "chat",
        raw_trains_format: bool = False,
        where: dict | None = None,
    ) -> "LayerGroups":
        """Resolve both boundaries (index or fraction) against the model and check them.

        `where` maps `raw_start` / `format_start` / `phase` to where the value came from
        ("file:line", "--format-start"), so an error names the line or flag."""
        w = lambda key: (where or {}).get(key, "config")
        if phase not in PHASE_TRAINS:
            raise UserError(f"{w('phase')}: `phase` must be one of {', '.join(PHASES)}, got {phase!r}")
        for key, value in (("raw_start", raw_start), ("format_start", format_start)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{w(key)}: `{key}` must be a layer index or a fraction, got {value!r}")
            if isinstance(value, float) and not 0.0 <= value <= 1.0:
                raise UserError(f"{w(key)}: `{key}` as a fraction must lie in [0, 1], got {value}")
            if isinstance(value, int) and value < 0:
                raise UserError(f"{w(key)}: `{key}` must be >= 0, got {value}")
        r, f = resolve_index(raw_start, num_layers), resolve_index(format_start, num_layers)
        if f > num_layers - 1:
            raise UserError(
                f"{w('format_start')}: `format_start` ({format_start} -> layer {f}) must be < the layer "
                f"count ({num_layers}): the format group needs at least one layer"
            )
        if f < 1:
            raise UserError(f"{w('format_start')}: `format_start` ({format_start} -> layer {f}) must be >= 1")
        if r >= f:
            raise UserError(
                f"{w('raw_start')}: `raw_start` ({raw_start} -> layer {r}) must be < `format_start` "
                f"({format_start} -> layer {f}): the raw group would be empty"
            )
        trained = PHASE_TRAINS[phase]
        if phase == "raw" and raw_trains_format:
            trained = (RAW, FORMAT)
        return cls(num_layers, r, f, bool(tied), tuple(trained))

    # --------------------------------------------------------------- membership
    def group_of_layer(self, i: int) -> str:
        return FROZEN if i < self.raw_start else (RAW if i < self.format_start else FORMAT)

    def group_of(self, hf_name: str) -> str:
        """The group of an HF parameter name (`model.layers.3.mlp.up_proj.weight`, `lm_head.weight`)."""
        i = layer_of(hf_name)
        if i is not None:
            return self.group_of_layer(i)
        if hf_name.startswith(EMBED):
            return FROZEN
        if hf_name.startswith(HEAD):
            return FROZEN if self.tied else FORMAT
        if hf_name.startswith(NORM):
            return FORMAT
        raise KeyError(f"unexpected HF parameter name {hf_name!r}")

    def trains(self, hf_name: str) -> bool:
        return self.group_of(hf_name) in self.trained

    def layer_trained(self, i: int) -> bool:
        return self.group_of_layer(i) in self.trained

    @property
    def embeddings_trained(self) -> bool:
        return FROZEN in self.trained

    @property
    def first_trained_layer(self) -> int:
        """The lowest decoder layer that trains (L when none does): below it, no gradient flows."""
        return next((i for i in range(self.num_layers) if self.layer_trained(i)), self.num_layers)

    # --------------------------------------------------------------- run.json
    def to_record(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "raw_start": self.raw_start,
            "format_start": self.format_start,
            "trained_groups": list(self.trained),
            "embeddings_trained": self.embeddings_trained,
            "tied_embeddings": self.tied,
        }

    @classmethod
    def from_record(cls, rec: dict, where: str) -> "LayerGroups":
        """Read back what `to_record` wrote; `where` names the file for errors."""
        try:
            trained = tuple(rec["trained_groups"])
            g = cls(
                int(rec["num_layers"]),
                int(rec["raw_start"]),
                int(rec["format_start"]),
                bool(rec["tied_embeddings"]),
                trained,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: `groups` is incomplete or malformed ({type(e).__name__}: {e})") from None
        if not (0 <= g.raw_start < g.format_start < g.num_layers) or not set(trained) <= set(GROUPS):
            raise UserError(f"{where}: `groups` is not a valid layer split: {rec}")
        if bool(rec.get("embeddings_trained", g.embeddings_trained)) != g.embeddings_trained:
            raise UserError(f"{where}: `groups.embeddings_trained` contradicts `groups.trained_groups`")
        return g

    def describe(self) -> str:
        return (
            f"frozen [0, {self.raw_start}) + embeddings, raw [{self.raw_start}, {self.format_start}), "
            f"format [{self.format_start}, {self.num_layers}) + norm + head; trains {', '.join(self.trained)}"
        )
