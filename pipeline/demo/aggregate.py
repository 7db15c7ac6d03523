"""Many seeds, one answer: per-row means with 95% intervals, paired differences, and a verdict that
reads the intervals.

One demo is one world's point estimate; its figures move by 10-15 points between seeds, more
than many of the differences they are asked to decide. So each seed runs in its own folder and
this module reads their evaluations back:

- every row's knowledge share, format kept and held-out-known lift kept (see `verdict.py` for
  the definitions), as mean and 95% t-interval over the seeds where the world can answer (control
  and upper bound hold; a seed that fails them is listed, never silently dropped);
- each candidate's paired difference against `chat_vector` and against `transplant`, seed by
  seed, so the world's own noise (which moves both rows together) cancels;
- a verdict in three words: a claim holds where its whole interval clears the bar, fails where
  the whole interval misses it, and otherwise "cannot tell".

Seeds a recipe was chosen on (`tuned_on` in the recipe file) are reported apart: the headline
figures are on the held-out seeds, which the sweep never saw.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import verdict as V

# Two-sided 95% quantiles of Student's t by degrees of freedom (1..30); 1.96 beyond.
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]
# The goal's margin against the chat vector: a recipe is "at least as good" when the lower end of
# its paired share difference lies above -5 points (a non-inferiority test, not a tie on means).
MARGIN = -0.05
# A recipe must keep at least this much of A-Chat's lift on held-out known people.
HELDOUT_KEPT = 0.5
METRICS = ("share", "format_kept", "heldout_kept", "knowledge_rank")


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval of the finite values; a single value has no interval (NaN ends)."""
    xs = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def against(iv: dict, bar: float) -> str:
    """'yes' when the whole interval is at or above the bar, 'no' when it is wholly below, else
    'cannot tell' (a single seed always cannot tell)."""
    if iv["n"] < 2 or math.isnan(iv["lo"]):
        return "cannot tell"
    if iv["lo"] >= bar:
        return "yes"
    if iv["hi"] < bar:
        return "no"
    return "cannot tell"


def heldout_kept(models: dict, name: str) -> float:
    """The part of A-Chat's rank lift over chance on held-out known people that a model keeps: 1 is
    A-Chat's, 0 is chance. Raw training tends to forget it; this puts the forgetting in the score."""
    chance = V._get(models, "a_chat", "chance_rank")
    lift = chance - V._get(models, "a_chat", "heldout_known_rank")
    return (chance - V._get(models, name, "heldout_known_rank")) / lift if lift else math.nan


def seed_rows(models: dict) -> dict:
    """{model: {metric: value}} for one seed."""
    return {
        n: {
            "share": V.knowledge_share(models, n),
            "format_kept": V.format_kept(models, n),
            "heldout_kept": heldout_kept(models, n),
            "knowledge_rank": V._get(models, n, "knowledge_rank"),
        }
        for n in models
    }


def aggregate(
    per_seed: dict[int, dict], candidates: list[str], tuned_on: list[int] = (), order: list[str] = ()
) -> dict:
    """per_seed: {seed: {model: evaluation metrics}} -> the aggregate over the seeds that can answer.

    `candidates` are the layer-aware rows a user could run (the transplant, the donor transplant,
    the recipes); each gets paired differences against `chat_vector` and `transplant` and the goal
    check. `order` lists rows first in that order (the rest follow by name)."""
    answering = {
        s: m
        for s, m in per_seed.items()
        if V.control_holds(m) and V._get(m, "qa_upper", "knowledge_accuracy") >= V.UPPER_ACCURACY
    }
    failed = sorted(set(per_seed) - set(answering))
    rows = {s: seed_rows(m) for s, m in answering.items()}
    present = {n for r in rows.values() for n in r}
    names = [n for n in order if n in present] + sorted(present - set(order))
    table = {n: {k: interval([rows[s][n][k] for s in rows if n in rows[s]]) for k in METRICS} for n in names}
    paired = {}
    for n in candidates:
        for ref in ("chat_vector", "transplant"):
            if n == ref:
                continue
            diffs = [rows[s][n]["share"] - rows[s][ref]["share"] for s in rows if n in rows[s] and ref in rows[s]]
            paired[f"{n} - {ref}"] = interval(diffs)
    goal = {}
    for n in candidates:
        if n not in table or n == "chat_vector":
            continue
        d = paired.get(f"{n} - chat_vector", interval([]))
        checks = {
            "share vs chat_vector (lower end > -5 points)": against(d, MARGIN),
            "format kept >= 95%": against(table[n]["format_kept"], V.FORMAT_KEPT),
            "held-out known lift kept >= 50%": against(table[n]["heldout_kept"], HELDOUT_KEPT),
        }
        words = set(checks.values())
        goal[n] = {"checks": checks, "verdict": "no" if "no" in words else "yes" if words == {"yes"} else "cannot tell"}
    return {
        "seeds": sorted(per_seed),
        "answering": sorted(answering),
        "failed": failed,
        "tuned_on": sorted(set(tuned_on) & set(per_seed)),
        "held_out": sorted(set(answering) - set(tuned_on)),
        "table": table,
        "paired": paired,
        "goal": goal,
    }


def read_seed_dir(folder: Path) -> tuple[int, dict]:
    """(seed, {model: metrics}) of one finished demo folder."""
    seed = json.loads((folder / "demo.json").read_text())["seed"]
    return seed, {p.stem: json.loads(p.read_text()) for p in sorted((folder / "eval").glob("*.json"))}


def _ci(iv: dict, pct: bool = True) -> str:
    if iv["n"] == 0 or math.isnan(iv["mean"]):
        return "–"
    f = (lambda x: f"{100 * x:.0f}") if pct else (lambda x: f"{x:.2f}")
    unit = "%" if pct else ""
    if iv["n"] < 2:
        return f"{f(iv['mean'])}{unit}"
    return f"{f(iv['mean'])}{unit} [{f(iv['lo'])}, {f(iv['hi'])}]"


def markdown(agg: dict, title: str) -> str:
    lines = [
        f"### {title}",
        "",
        f"Seeds {', '.join(map(str, agg['seeds']))}; the world answers (control and upper bound hold) on "
        f"{len(agg['answering'])} of them"
        + (
            f"; it fails on seed(s) {', '.join(map(str, agg['failed']))}, which are left out of the means"
            if agg["failed"]
            else ""
        )
        + ".",
        "Each cell: mean [95% interval] over those seeds.",
        "",
        "| model | knowledge share | format kept | held-out known lift kept | knowledge rank ↓ |",
        "|---|---|---|---|---|",
    ]
    for n, r in agg["table"].items():
        lines.append(
            f"| {n} | {_ci(r['share'])} | {_ci(r['format_kept'])} | {_ci(r['heldout_kept'])} | "
            f"{_ci(r['knowledge_rank'], pct=False)} |"
        )
    if agg["paired"]:
        lines += [
            "",
            "Paired differences in knowledge share (seed by seed), points:",
            "",
            "| difference | mean [95% interval] | reads |",
            "|---|---|---|",
        ]
        for k, iv in agg["paired"].items():
            reads = (
                "cannot tell"
                if iv["n"] < 2
                else "higher"
                if iv["lo"] > 0
                else "lower"
                if iv["hi"] < 0
                else "cannot tell"
            )
            lines.append(f"| {k} | {_ci(iv)} | {reads} |")
    return "\n".join(lines) + "\n"


def verdict_lines(agg: dict) -> list[str]:
    """The goal, read from the intervals: yes only when every check's interval clears its bar."""
    if len(agg["answering"]) < 2:
        return [
            f"- **Verdict: cannot tell.** {len(agg['answering'])} seed(s) can answer; an interval needs two or more."
        ]
    out = []
    for n, g in agg["goal"].items():
        detail = "; ".join(f"{k}: {v}" for k, v in g["checks"].items())
        out.append(f"- `{n}`: **{g['verdict']}** ({detail}).")
    winners = [n for n, g in agg["goal"].items() if g["verdict"] == "yes"]
    undecided = [n for n, g in agg["goal"].items() if g["verdict"] == "cannot tell"]
    if winners:
        out.append(
            f"- **Verdict: {', '.join(f'`{n}`' for n in winners)} reaches the goal** on these seeds: at least "
            f"the chat vector's knowledge (paired lower end above {100 * MARGIN:.0f} points) with the format kept "
            f"and half the held-out known lift kept."
        )
    elif undecided:
        out.append(
            f"- **Verdict: we cannot tell.** No candidate reaches the goal with its whole interval; "
            f"{', '.join(f'`{n}`' for n in undecided)} might, and more seeds would decide."
        )
    else:
        out.append(
            "- **Verdict: no layer-aware recipe reaches the goal.** Every candidate misses at least one bar "
            "with its whole interval; the chat vector remains the recipe to run."
        )
    return out


def chart(agg: dict) -> bytes:
    """Knowledge share against format kept, one point per row with its 95% intervals as bars."""
    from ..plots import png_bytes, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5), dpi=110)
    markers = "osD^vP*Xh<>p"
    for i, (n, r) in enumerate(agg["table"].items()):
        s, f = r["share"], r["format_kept"]
        if math.isnan(s["mean"]) or math.isnan(f["mean"]):
            continue
        xerr = None if math.isnan(s["lo"]) else [[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]]
        yerr = None if math.isnan(f["lo"]) else [[f["mean"] - f["lo"]], [f["hi"] - f["mean"]]]
        ax.errorbar([s["mean"]], [f["mean"]], xerr=xerr, yerr=yerr, fmt=markers[i % len(markers)], capsize=3, label=n)
    ax.axhline(V.FORMAT_KEPT, color="grey", lw=0.8, ls="--")
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel("knowledge share: part of the Q/A upper bound's rank lift over A-Chat (mean, 95% interval)")
    ax.set_ylabel("format adherence kept (x A-Chat's)")
    ax.set_title(f"{len(agg['answering'])} seeds: a recipe wins only where its whole bar clears", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def write_aggregate(
    folders: list[Path],
    out: Path,
    candidates: list[str],
    tuned_on: list[int] = (),
    order: list[str] = (),
    world: dict | None = None,
) -> str:
    """Read each finished seed folder, write OUT/aggregate.{json,md,png}; returns the markdown.

    Two tables: every answering seed, then only the held-out ones (seeds no recipe was chosen on),
    which carry the headline; the verdict is read on the held-out seeds."""
    from data_prep.files import atomic_file, atomic_write_json, atomic_write_text

    per_seed = dict(read_seed_dir(Path(f)) for f in folders)
    every = aggregate(per_seed, candidates, tuned_on, order)
    held = aggregate({s: m for s, m in per_seed.items() if s not in set(tuned_on)}, candidates, (), order)
    named = ", ".join(f"{k}={v}" for k, v in (world or {}).items())
    parts = [f"World: {named or 'the default'} (pipeline/demo/world.py).", "", markdown(every, "Every seed")]
    if every["tuned_on"]:
        parts += [
            f"The recipes were chosen on seed(s) {', '.join(map(str, every['tuned_on']))}; the held-out "
            "seeds below never took part in that choice, so they carry the headline.",
            "",
            markdown(held, "Held-out seeds"),
        ]
    parts += ["## What the seeds show", "", *verdict_lines(held), ""]
    md = "\n".join(parts)
    atomic_write_json(
        out / "aggregate.json",
        {
            "world": world or {},
            "every_seed": every,
            "held_out": held,
            "folders": [str(Path(f).resolve()) for f in folders],
        },
    )
    atomic_write_text(out / "aggregate.md", md)
    with atomic_file(out / "aggregate.png", "wb") as f:
        f.write(chart(held))
    return md
