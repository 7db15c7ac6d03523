"""What a set of results shows, said plainly, whatever it shows.

The demo's question is whether knowledge in raw text reaches the chat model. It can only be read
when two conditions hold, and the answer is then a third:

  1. the control holds: A-Chat ranks the facts of known people it never saw Q/A about at most at
     half the chance rank (extraction from the base generalises at all);
  2. the upper bound is real: the Q/A upper bound answers >= 80% of the new people's questions;
  3. the method's claim: a transplant variant keeps >= 95% of A-Chat's format adherence and gains
     >= 50% of the upper bound's rank lift on new people, while `naive` visibly breaks the format.

Knowledge share of a model = (A-Chat's rank - its rank) / (A-Chat's rank - the upper bound's rank)
on the new people's questions: 0 is A-Chat's knowledge, 1 is the upper bound's.
"""

from __future__ import annotations

import math

CONTROL, UPPER_ACCURACY, FORMAT_KEPT, SHARE, NAIVE_BROKEN = 0.5, 0.8, 0.95, 0.5, 0.5
# The rows a user could run that train fewer parameters than full continued pretraining (the
# recipes join them): the vanilla transplant, the transplant under an instruct model (`--donor`)
# and A-Raw + (instruct - base). These are the candidates; the chat vector is what they must beat.
LAYER_AWARE = ("transplant", "donor", "instruct_vector")


def _get(models: dict, name: str, key: str) -> float:
    """NaN for a model the run does not have (a report of a partial run must still print)."""
    return models.get(name, {}).get(key, float("nan"))


def knowledge_share(models: dict, name: str) -> float:
    a, q = _get(models, "a_chat", "knowledge_rank"), _get(models, "qa_upper", "knowledge_rank")
    return (a - _get(models, name, "knowledge_rank")) / (a - q) if a != q else float("nan")


def format_kept(models: dict, name: str) -> float:
    a = _get(models, "a_chat", "format_adherence")
    return _get(models, name, "format_adherence") / a if a else float("nan")


def control_holds(models: dict) -> bool:
    """A-Chat ranks held-out known people's true values at most CONTROL x the chance rank."""
    return _get(models, "a_chat", "heldout_known_rank") <= CONTROL * _get(models, "a_chat", "chance_rank")


def candidates(models: dict, recipes: list[str]) -> list[str]:
    """The layer-aware rows the claim is tested on: LAYER_AWARE and every recipe."""
    return [n for n in [*LAYER_AWARE, *recipes] if n in models]


def assess(models: dict, recipes: list[str]) -> dict:
    g = lambda n, k: _get(models, n, k)
    out = {"control": control_holds(models), "upper_bound": g("qa_upper", "knowledge_accuracy") >= UPPER_ACCURACY}
    rows = {
        n: {"format_kept": format_kept(models, n), "share": knowledge_share(models, n)}
        for n in candidates(models, recipes)
    }
    nan0 = lambda x: -math.inf if math.isnan(x) else x
    best = max(rows, key=lambda n: (rows[n]["format_kept"] >= FORMAT_KEPT, nan0(rows[n]["share"])), default=None)
    out.update(
        rows=rows,
        best=best,
        naive_broken=("naive" in models and format_kept(models, "naive") < NAIVE_BROKEN),
        claim=bool(best) and rows[best]["format_kept"] >= FORMAT_KEPT and rows[best]["share"] >= SHARE,
    )
    return out


def verdict_text(models: dict, recipes: list[str] = ()) -> str:
    g = lambda n, k: _get(models, n, k)
    a = assess(models, list(recipes))
    chance = g("a_chat", "chance_rank")
    held = g("a_chat", "heldout_known_rank")
    lines = ["## What this run shows"]
    lines.append(
        f"- Extraction control: A-Chat ranks held-out known people's true values at {held:.1f} "
        f"(chance {chance:.1f}, the bar {CONTROL * chance:.1f}). "
        + (
            "It holds: extraction generalises in this world."
            if a["control"]
            else "It FAILS: extraction does not generalise in this world, so no conclusion about new people "
            "can be drawn from the knowledge columns."
        )
    )
    lines.append(
        f"- Upper bound: the Q/A upper bound answers {g('qa_upper', 'knowledge_accuracy'):.0%} of the new "
        f"people's questions (rank {g('qa_upper', 'knowledge_rank'):.2f}); "
        + ("a real ceiling." if a["upper_bound"] else f"below the {UPPER_ACCURACY:.0%} bar: not a real ceiling.")
    )
    for n, r in a["rows"].items():
        lines.append(
            f"- `{n}`: format {g(n, 'format_adherence'):.2f} ({r['format_kept']:.0%} of A-Chat's), knowledge "
            f"rank {g(n, 'knowledge_rank'):.2f} = {r['share']:.0%} of the upper bound's lift, completion rank "
            f"on new people {g(n, 'raw_rank_new'):.1f}."
        )
    for n, what in [
        ("naive", "naive (A-Chat, then everything on raw text)"),
        ("chat_vector", "chat vector (continued pretraining + chat vector)"),
        ("sequential", "sequential (A-Chat, then the raw group on raw text; the seed's rejected variant)"),
    ]:
        if n in models:
            lines.append(
                f"- {what}: format {g(n, 'format_adherence'):.2f}, knowledge rank {g(n, 'knowledge_rank'):.2f} "
                f"= {knowledge_share(models, n):.0%} of the upper bound's lift."
            )
    if "naive" in models:
        lines.append(
            "- `naive` "
            + ("visibly breaks the chat format." if a["naive_broken"] else "does NOT visibly break the format here.")
        )
    if not (a["control"] and a["upper_bound"]):
        lines.append("- **Verdict: no result.** The world cannot answer the question until both conditions hold.")
    elif a["claim"]:
        b = a["best"]
        lines.append(
            f"- **Verdict: the method's claim holds here.** `{b}` keeps {a['rows'][b]['format_kept']:.0%} of "
            f"A-Chat's format and carries {a['rows'][b]['share']:.0%} of the upper bound's knowledge into chat."
        )
    else:
        b = a["best"]
        extra = (
            ""
            if b is None or math.isnan(a["rows"][b]["share"])
            else (
                f" The best, `{b}`, keeps {a['rows'][b]['format_kept']:.0%} of the format and carries "
                f"{a['rows'][b]['share']:.0%} of the upper bound's knowledge."
            )
        )
        lines.append(
            f"- **Verdict: the method's claim does NOT hold here.** No transplant variant keeps "
            f"{FORMAT_KEPT:.0%} of A-Chat's format while carrying {SHARE:.0%} of the upper bound's knowledge "
            f"into chat.{extra}"
        )
    if a["best"] is not None and "chat_vector" in models and a["control"] and a["upper_bound"]:
        b, r = a["best"], a["rows"][a["best"]]
        cv = {"format_kept": format_kept(models, "chat_vector"), "share": knowledge_share(models, "chat_vector")}
        beats = cv["format_kept"] >= FORMAT_KEPT and cv["share"] > r["share"]
        lines.append(
            f"- **Against the field's baseline:** `chat_vector` keeps {cv['format_kept']:.0%} of the format and "
            f"carries {cv['share']:.0%}; `{b}` keeps {r['format_kept']:.0%} and carries {r['share']:.0%}. "
            + ("The chat vector is the better recipe in this world." if beats else f"`{b}` is at least as good here.")
        )
    return "\n".join(lines)
