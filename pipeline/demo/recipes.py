"""What the demo trains: the baselines every result is read against, and the recipes under test.

A recipe is one way to carry the raw documents into the chat model, written as a few keys over
the method's vanilla run (A-Raw on the raw corpus, transplanted under A-Chat's format group):

    name            the recipe's model in the results is `recipe_<name>`
    raw             config overrides for its A-Raw (raw_start, format_start, raw_trains_format,
                    anchor_weight, lr, min_lr, steps)
    replay          pretraining samples mixed into A-Raw per raw sample (0.25: one in five of its
                    samples is the base's own corpus, which holds plain-text Q/A about *other*
                    people and never about the raw documents).
    chat_replay     A-Chat's own chat data mixed into A-Raw per raw sample (0.5: one in three of
                    its samples is a chat conversation, loss on the assistant's tokens only). That
                    data asks only about *known* people and generic turns: no Q/A about the raw
                    documents is ever written. Steps grow by (1 + replay + chat_replay), so every
                    recipe sees the raw documents equally often.
    reattach_steps  a chat-phase tune of the transplant's format group on the same generic chat
                    data A-Chat saw, after the transplant (0: none)
    merge           how the two halves become one model: `transplant` (the method: A-Chat's format
                    group replaces A-Raw's) or `chat_vector` (A-Raw + (A-Chat - base): what A-Raw
                    wrote into the format group stays, and A-Chat's change is added on top)
    chat_model      the chat side of the merge: `a_chat` (the method's A-Chat, the format group
                    tuned on chat data) or `instruct` (`chat_full`, every layer tuned on the same
                    data: the demo's stand-in for the X-Instruct a user downloads; needs
                    `merge: chat_vector`, as the `instruct_vector` baseline is A-Raw + (instruct - base))
    weights         with `merge: chat_vector`, the layer-aware member of the merge family to build:
                    {raw: "frozen=1,raw=1,format=0.5", chat: "format=1", transition: 1}, passed to
                    pipeline.chat_vector as --raw-weights / --chat-weights / --transition
    tuned_on        the seeds the recipe was chosen on (by a sweep): a multi-seed demo reports
                    these seeds apart and reads its verdict on the others

A recipe with another `format_start` (or `raw_start`) trains its own A-Chat with that boundary,
so the transplant's two halves always agree on it. A recipe that changes nothing is the method
itself: the `transplant` baseline, which `make demo` runs anyway.

Recipes live in YAML: demo/recipe.yaml (shipped in pipeline/configs/) is the one `make demo` runs
(the best the sweep found), demo/sweep.yaml the list `make sweep` measures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.errors import UserError
from pipeline import shipped
from pipeline.config import read_yaml

RAW_KEYS = {"raw_start", "format_start", "raw_trains_format", "anchor_weight", "lr", "min_lr", "steps"}
RECIPE_KEYS = {
    "name",
    "raw",
    "replay",
    "chat_replay",
    "reattach_steps",
    "merge",
    "chat_model",
    "note",
    "tuned_on",
    "weights",
}
CHAT_MODELS = {"a_chat": None, "instruct": "chat_full"}  # recipe value -> the demo run that is not A-Chat
VANILLA_RAW = ((), 0.0, 0.0)  # Recipe.raw_key of a recipe that changes nothing in A-Raw
WEIGHT_KEYS = {"raw": "--raw-weights", "chat": "--chat-weights", "transition": "--transition"}
WORLD_KEYS = {"name", "world", "base_steps", "note"}


@dataclass(frozen=True)
class Recipe:
    name: str
    raw: dict = field(default_factory=dict)
    replay: float = 0.0
    reattach_steps: int = 0
    merge: str = "transplant"
    note: str = ""
    tuned_on: tuple[int, ...] = ()
    weights: tuple[tuple[str, str], ...] = ()  # (pipeline.chat_vector flag, value) pairs
    chat_replay: float = 0.0
    chat_model: str = "a_chat"

    @property
    def merge_args(self) -> list[str]:
        return [a for flag, value in self.weights for a in (flag, value)]

    @property
    def model(self) -> str:
        return f"recipe_{self.name}"

    @property
    def raw_key(self) -> tuple:
        """What decides this recipe's A-Raw: recipes with equal keys share one training, and
        VANILLA_RAW is the method's own A-Raw."""
        return (tuple(sorted(self.raw.items())), self.replay, self.chat_replay)

    @property
    def is_vanilla(self) -> bool:
        return (
            self.raw_key == VANILLA_RAW
            and not self.reattach_steps
            and self.merge == "transplant"
            and not self.weights
            and self.chat_model == "a_chat"
        )

    def boundary(self, default: tuple[int, int]) -> tuple[int, int]:
        return (self.raw.get("raw_start", default[0]), self.raw.get("format_start", default[1]))


@dataclass(frozen=True)
class WorldVariant:
    """Another world (its own base, A-Chat and Q/A upper bound): what decides the control."""

    name: str
    world: dict = field(default_factory=dict)
    base_steps: int | None = None
    note: str = ""


def _check(item, keys: set, where: str) -> dict:
    if (
        not isinstance(item, dict)
        or not isinstance(item.get("name"), str)
        or not re.fullmatch(r"[A-Za-z0-9_.-]+", item["name"])
    ):
        raise UserError(f"{where}: needs a `name` (letters, digits, _ . -), got {item!r}")
    unknown = set(item) - keys
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(keys))})")
    return item


def recipe_from(item, where: str) -> Recipe:
    item = _check(item, RECIPE_KEYS, where)
    raw = item.get("raw") or {}
    if not isinstance(raw, dict) or set(raw) - RAW_KEYS:
        raise UserError(f"{where}: `raw` may set {', '.join(sorted(RAW_KEYS))}, got {raw!r}")
    replay, reattach = item.get("replay", 0.0), item.get("reattach_steps", 0)
    chat_replay = item.get("chat_replay", 0.0)
    for key, value in (("replay", replay), ("chat_replay", chat_replay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise UserError(f"{where}: `{key}` must be a number >= 0, got {value!r}")
    if not isinstance(reattach, int) or reattach < 0:
        raise UserError(f"{where}: `reattach_steps` must be an integer >= 0, got {reattach!r}")
    merge = item.get("merge", "transplant")
    if merge not in ("transplant", "chat_vector"):
        raise UserError(f"{where}: `merge` must be `transplant` or `chat_vector`, got {merge!r}")
    tuned = item.get("tuned_on", [])
    if not isinstance(tuned, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in tuned):
        raise UserError(f"{where}: `tuned_on` must be a list of seeds (integers), got {tuned!r}")
    weights = item.get("weights") or {}
    if not isinstance(weights, dict) or set(weights) - set(WEIGHT_KEYS):
        raise UserError(f"{where}: `weights` may set {', '.join(sorted(WEIGHT_KEYS))}, got {weights!r}")
    if weights and merge != "chat_vector":
        raise UserError(f"{where}: `weights` needs `merge: chat_vector` (they weight its raw and chat deltas)")
    pairs = tuple((WEIGHT_KEYS[k], str(v)) for k, v in weights.items())
    chat_model = item.get("chat_model", "a_chat")
    if chat_model not in CHAT_MODELS:
        raise UserError(f"{where}: `chat_model` must be one of {', '.join(CHAT_MODELS)}, got {chat_model!r}")
    if chat_model != "a_chat" and merge != "chat_vector":
        raise UserError(f"{where}: `chat_model: {chat_model}` needs `merge: chat_vector` (its every layer changed)")
    return Recipe(
        item["name"],
        dict(raw),
        float(replay),
        reattach,
        merge,
        item.get("note", ""),
        tuple(tuned),
        pairs,
        float(chat_replay),
        chat_model,
    )


def load(path: str | Path) -> tuple[list[Recipe], list[WorldVariant]]:
    """A recipe file: a mapping with `recipes:` (and, for a sweep, `worlds:`), or one recipe."""
    path = shipped.find(path)  # `demo/recipe.yaml` names the shipped one
    data, _ = read_yaml(path, "recipe file")
    if isinstance(data, dict) and "name" in data:
        return [recipe_from(data, str(path))], []
    if isinstance(data, dict) and data.get("recipes") == []:
        return [], []
    if not isinstance(data, dict) or not isinstance(data.get("recipes", []), list):
        raise UserError(f"{path}: expected `recipes: [...]` (and optionally `worlds: [...]`), or one recipe")
    recipes = [recipe_from(r, f"{path}: recipes[{i}]") for i, r in enumerate(data.get("recipes") or [])]
    worlds = [
        WorldVariant(**{k: v for k, v in _check(w, WORLD_KEYS, f"{path}: worlds[{i}]").items()})
        for i, w in enumerate(data.get("worlds") or [])
    ]
    names = [r.name for r in recipes] + [w.name for w in worlds]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: names must be unique, got {names}")
    return recipes, worlds
