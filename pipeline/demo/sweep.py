"""`python -m pipeline.demo --sweep demo/sweep.yaml`: measure many recipes, one table.

Every recipe of the file runs against the same base and A-Chat as the demo in the same `--out`
(what is done is skipped, so a sweep after `make demo` reuses its runs), next to the baselines;
each `worlds:` entry is another world with its own base, A-Chat and Q/A upper bound, which is what
decides whether the control holds. Writes sweep.json, sweep.md (the tables and the verdict) and
sweep.png (format kept against knowledge share, one point per variant).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from data_prep.files import atomic_file, atomic_write_json, atomic_write_text

from ..plots import png_bytes, pyplot
from . import recipes as R
from .run import Demo
from .verdict import FORMAT_KEPT, SHARE, assess, control_holds, format_kept, knowledge_share, verdict_text

READ_AGAINST = ("transplant", "naive", "chat_vector", "sequential")


def run_sweep(out: Path, sweep_file: Path, size: str = "full", seed: int = 0, workers: int = 2) -> dict:
    recipes, worlds = R.load(sweep_file)
    demo = Demo(out, size=size, seed=seed, recipes=recipes, workers=workers)
    demo.run()
    models = demo.results()
    world_rows = {}
    for w in worlds:
        d = Demo(
            out / "worlds" / w.name,
            size=size,
            seed=seed,
            world_overrides=w.world,
            base_steps=w.base_steps,
            baselines=("base", "a_chat", "a_raw", "transplant", "qa_upper"),
            workers=workers,
        )
        d.run()
        m = d.results()
        world_rows[w.name] = {
            "world": w.world,
            "base_steps": w.base_steps,
            "note": w.note,
            "heldout_known_rank": m["a_chat"]["heldout_known_rank"],
            "base_heldout_known_rank": m["base"]["heldout_known_rank"],
            "chance_rank": m["a_chat"]["chance_rank"],
            "control": control_holds(m),
            "qa_upper_accuracy": m["qa_upper"]["knowledge_accuracy"],
            "transplant_share": knowledge_share(m, "transplant"),
            "transplant_format_kept": format_kept(m, "transplant"),
        }
    names = [n for n in READ_AGAINST if n in models] + [r.model for r in recipes]
    rows = {
        n: {
            "format_adherence": models[n]["format_adherence"],
            "format_kept": format_kept(models, n),
            "knowledge_rank": models[n]["knowledge_rank"],
            "share": knowledge_share(models, n),
            "raw_rank_new": models[n]["raw_rank_new"],
            "heldout_known_rank": models[n]["heldout_known_rank"],
            "note": next((r.note for r in recipes if r.model == n), ""),
        }
        for n in names
    }
    result = {
        "recipes": rows,
        "worlds": world_rows,
        "assessment": assess(models, [r.model for r in recipes]),
        "a_chat": models["a_chat"],
        "qa_upper": models["qa_upper"],
    }
    atomic_write_json(out / "sweep.json", result)
    md = markdown(result, world_rows) + "\n" + verdict_text(models, [r.model for r in recipes]) + "\n"
    atomic_write_text(out / "sweep.md", md)
    with atomic_file(out / "sweep.png", "wb") as f:
        f.write(chart(rows))
    print(md, flush=True)
    return result


def sweep_seeds(out: Path, sweep_file: Path, seeds: list[int], size: str = "full", workers: int = 2) -> dict:
    """The sweep on tuning seeds: each seed in OUT/seed-S, then one aggregate over them, and the
    recipe with the best mean knowledge share among those whose mean format kept clears the bar,
    written as OUT/chosen_recipe.yaml with `tuned_on: SEEDS`. Report it on other seeds
    (`make demo RECIPE=OUT/chosen_recipe.yaml SEEDS=...`): figures on the seeds it was chosen on
    are biased upwards by the choice itself."""
    import yaml

    from .aggregate import write_aggregate
    from .run import BASELINES
    from .verdict import LAYER_AWARE

    recipes, _ = R.load(sweep_file)
    folders = []
    for s in seeds:
        print(f"== sweep, seed {s} ==", flush=True)
        run_sweep(out / f"seed-{s}", sweep_file, size=size, seed=s, workers=workers)
        folders.append(out / f"seed-{s}")
    names = [r.model for r in recipes]
    md = write_aggregate(folders, out, [*LAYER_AWARE, *names], (), order=[*BASELINES, *names])
    table = json.loads((out / "aggregate.json").read_text())["every_seed"]["table"]
    ok = [r for r in recipes if table.get(r.model, {}).get("format_kept", {}).get("mean", 0) >= FORMAT_KEPT]
    best = max(ok, key=lambda r: table[r.model]["share"]["mean"], default=None)
    if best is not None:
        item = {
            "name": best.name,
            **({"raw": best.raw} if best.raw else {}),
            **({"replay": best.replay} if best.replay else {}),
            **({"reattach_steps": best.reattach_steps} if best.reattach_steps else {}),
            **(
                {"weights": {k: v for k, flag in R.WEIGHT_KEYS.items() for f, v in best.weights if f == flag}}
                if best.weights
                else {}
            ),
            "merge": best.merge,
            "note": best.note,
            "tuned_on": list(seeds),
        }
        atomic_write_text(
            out / "chosen_recipe.yaml",
            f"# Chosen by `make sweep` on seeds {seeds} from {sweep_file}: the best mean knowledge share\n"
            f"# among recipes keeping >= {FORMAT_KEPT:.0%} of A-Chat's format. Report it on other seeds.\n"
            + yaml.safe_dump(item, sort_keys=False),
        )
        md += f"\nChosen on seeds {seeds}: `{best.name}` -> {out / 'chosen_recipe.yaml'}\n"
    print(md, flush=True)
    return {"chosen": best.name if best else None}


def _f(v, pct=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.0%}" if pct else f"{v:.2f}"


def markdown(result: dict, worlds: dict) -> str:
    a, q = result["a_chat"], result["qa_upper"]
    lines = [
        f"A-Chat: format {_f(a['format_adherence'])}, knowledge rank {_f(a['knowledge_rank'])}; Q/A upper bound: "
        f"rank {_f(q['knowledge_rank'])}, accuracy {_f(q['knowledge_accuracy'], True)}. Share = the part of the "
        f"upper bound's rank lift over A-Chat a model gains; the claim needs format kept >= {FORMAT_KEPT:.0%} and "
        f"share >= {SHARE:.0%}.",
        "",
        "| model | format | kept | knowledge rank ↓ | share | completion rank new ↓ | held-out known ↓ | what |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in result["recipes"].items():
        lines.append(
            f"| {n} | {_f(r['format_adherence'])} | {_f(r['format_kept'], True)} | {_f(r['knowledge_rank'])} | "
            f"{_f(r['share'], True)} | {_f(r['raw_rank_new'])} | {_f(r['heldout_known_rank'])} | {r['note']} |"
        )
    if worlds:
        lines += [
            "",
            "World variants (each its own base and A-Chat): the control and the ceiling.",
            "",
            "| world | settings | base held-out ↓ | A-Chat held-out ↓ | chance | control | Q/A upper accuracy | "
            "transplant share |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n, w in worlds.items():
            settings = ", ".join(f"{k}={v}" for k, v in w["world"].items()) + (
                f", base steps {w['base_steps']}" if w["base_steps"] else ""
            )
            lines.append(
                f"| {n} | {settings or 'the demo world'} | {_f(w['base_heldout_known_rank'])} | "
                f"{_f(w['heldout_known_rank'])} | {_f(w['chance_rank'])} | {'holds' if w['control'] else 'fails'} | "
                f"{_f(w['qa_upper_accuracy'], True)} | {_f(w['transplant_share'], True)} |"
            )
    return "\n".join(lines) + "\n"


def chart(rows: dict) -> bytes:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8.5, 5), dpi=110)
    markers = "osD^vP*Xh<>p"
    for i, (n, r) in enumerate(rows.items()):
        ax.scatter([r["share"]], [r["format_kept"]], s=50, marker=markers[i % len(markers)], label=n)
    ax.axhline(FORMAT_KEPT, color="grey", lw=0.8, ls="--")
    ax.axvline(SHARE, color="grey", lw=0.8, ls="--")
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel("knowledge share: part of the Q/A upper bound's rank lift over A-Chat (new people, chat)")
    ax.set_ylabel("format adherence kept (x A-Chat's)")
    ax.set_title("recipes: the claim needs the top-right corner", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return png_bytes(fig)
