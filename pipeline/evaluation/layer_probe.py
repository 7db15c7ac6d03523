"""Where did chat tuning change the model? A probe that suggests `format_start`.

Given a base model and a chat model of the same family (an instruct sibling, or a full chat
fine-tune of the base), two measurements per decoder layer:

  weight_change   ||θ_chat − θ_base|| / ||θ_base|| over every tensor of the layer (Frobenius),
                  streamed one layer at a time, so a 70B pair costs one layer of memory
  hidden_cosine   the cosine similarity of the two models' hidden states after the layer, on the
                  same chat prompts, averaged over tokens and prompts (1.0: the layer's output is
                  unchanged; where it drops, chat tuning changed what the model computes)

The suggestion is the boundary of a one-step fit of weight_change: the layer k that best splits
the layers into a less-changed low part [0, k) and a more-changed top part [k, L) (least squares
of two means, the top one higher). If chat tuning changed the top layers most, that is where the
format group should start. When the fit finds no step (the top is not more changed than the
bottom), it says so rather than guess.
"""

from __future__ import annotations

import math
from pathlib import Path

from data_prep.errors import UserError
from data_prep.files import atomic_write_json, atomic_write_text, owned

from ..names import EMBED, HEAD, NORM, layer_of
from ..plots import png_bytes, pyplot


def weight_change(base, chat) -> dict:
    """Per decoder layer relative change, plus the embeddings and the final norm + head."""
    import torch

    L = base.num_layers
    layers, emb, top = [], None, None
    for i in range(L):
        b, c = base.layer(i), chat.layer(i)
        missing = sorted(set(b) ^ set(c))
        if missing:
            raise UserError(f"--base and --chat hold different tensors in layer {i} (e.g. {missing[0]!r})")
        groups = {
            "layer": [n for n in b if layer_of(n) == i],
            "embed": [n for n in b if n.startswith(EMBED)],
            "top": [n for n in b if n.startswith((NORM, HEAD))],
        }
        for key, names in groups.items():
            if not names:
                continue
            d2 = sum(float(torch.sum((c[n][0].double() - b[n][0].double()) ** 2)) for n in names)
            n2 = sum(float(torch.sum(b[n][0].double() ** 2)) for n in names)
            value = math.sqrt(d2 / n2) if n2 else float("nan")
            if key == "layer":
                layers.append(value)
            elif key == "embed":
                emb = value
            else:
                top = value
    return {"layers": layers, "embeddings": emb, "norm_and_head": top}


def hidden_cosine(base_dir: Path, chat_dir: Path, conversations: list[list[dict]]) -> list[float]:
    """Mean cosine similarity of the two models' hidden states after each decoder layer."""
    import torch
    from transformers import AutoTokenizer

    from ..hf import load_causal_lm

    tok = AutoTokenizer.from_pretrained(str(chat_dir), local_files_only=True)
    models = [load_causal_lm(d).eval() for d in (base_dir, chat_dir)]
    sums, count = None, 0
    with torch.inference_mode():
        for msgs in conversations:
            ids = tok.apply_chat_template(
                msgs, add_generation_prompt=msgs[-1]["role"] != "assistant", return_tensors="pt", return_dict=True
            )["input_ids"]
            hs = [m(input_ids=ids, output_hidden_states=True).hidden_states[1:] for m in models]
            cos = [torch.nn.functional.cosine_similarity(a[0].float(), b[0].float(), dim=-1) for a, b in zip(*hs)]
            per = torch.stack([c.sum() for c in cos])
            sums = per if sums is None else sums + per
            count += ids.shape[1]
    return (sums / count).tolist()


def suggest(changes: list[float]) -> tuple[int | None, float]:
    """The k of the best one-step fit, and how much of the variance the step explains (0..1)."""
    L = len(changes)
    mean = sum(changes) / L
    total = sum((x - mean) ** 2 for x in changes)
    best, best_sse = None, float("inf")
    for k in range(1, L):
        lo, hi = changes[:k], changes[k:]
        mlo, mhi = sum(lo) / len(lo), sum(hi) / len(hi)
        if mhi <= mlo:
            continue
        sse = sum((x - mlo) ** 2 for x in lo) + sum((x - mhi) ** 2 for x in hi)
        if sse < best_sse:
            best, best_sse = k, sse
    explained = 1 - best_sse / total if best is not None and total > 0 else 0.0
    return best, explained


def plot(result: dict, png: Path) -> None:
    plt = pyplot()

    L = len(result["weight_change"])
    fig, ax1 = plt.subplots(figsize=(7, 3.8), dpi=120)
    ax1.bar(range(L), result["weight_change"], color="tab:blue", alpha=0.7, label="relative weight change")
    ax1.set_xlabel("decoder layer")
    ax1.set_ylabel("||chat - base|| / ||base||", color="tab:blue")
    ax2 = ax1.twinx()
    if result.get("hidden_cosine"):
        ax2.plot(range(L), result["hidden_cosine"], "o-", color="tab:red", label="hidden-state cosine")
    ax2.set_ylabel("cosine(base, chat) after the layer", color="tab:red")
    k = result["suggested_format_start"]
    if k is not None:
        ax1.axvline(k - 0.5, color="black", ls="--", lw=1)
        ax1.text(k - 0.45, ax1.get_ylim()[1] * 0.95, f" suggested format_start = {k}", va="top", fontsize=9)
    ax1.set_title("what chat tuning changed, per layer", fontsize=10)
    from data_prep.files import atomic_file

    with atomic_file(png, "wb") as f:
        f.write(png_bytes(fig))


def markdown(result: dict) -> str:
    rows = ["| layer | weight change | hidden cosine |", "|---|---|---|"]
    cos = result.get("hidden_cosine") or [None] * len(result["weight_change"])
    for i, (w, c) in enumerate(zip(result["weight_change"], cos)):
        mark = " ← format_start" if i == result["suggested_format_start"] else ""
        rows.append(f"| {i}{mark} | {w:.4f} | {'–' if c is None else f'{c:.4f}'} |")
    k, ex = result["suggested_format_start"], result["step_explains"]
    rows.append("")
    rows.append(f"embeddings: {result['embeddings']:.4f}; final norm + head: {result['norm_and_head']:.4f}")
    rows.append(
        f"suggested format_start: {k} (the one-step fit explains {ex:.0%} of the per-layer variance)"
        if k is not None
        else "no suggestion: the top layers did not change more than the bottom ones"
    )
    return "\n".join(rows) + "\n"


def run_probe(base, chat, out: Path, prompts=None, max_prompts: int = 16) -> dict:
    """Measure, write probe.json / probe.md / probe.png into `out`, return the result. `out` is
    owned from the start (data_prep.files.owned): a second probe into it is refused at once,
    rather than both writing and leaving one's table beside the other's plot."""
    if isinstance(max_prompts, bool) or not isinstance(max_prompts, int) or max_prompts < 1:
        raise UserError(f"--max-prompts {max_prompts}: must be >= 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    with owned(out, "--out"):
        return _run_probe(base, chat, out, prompts, max_prompts)


def _run_probe(base, chat, out: Path, prompts, max_prompts: int) -> dict:
    from ..convert.sources import check_same_shape, open_source
    from .metrics import load_chat_eval

    bs, cs = open_source(base, None, "--base", "--base-step"), open_source(chat, None, "--chat", "--chat-step")
    check_same_shape(bs, cs, ("--base", "--chat"))
    w = weight_change(bs, cs)
    k, explained = suggest(w["layers"])
    result = {
        "base": str(Path(base).resolve()),
        "chat": str(Path(chat).resolve()),
        "weight_change": w["layers"],
        "embeddings": w["embeddings"],
        "norm_and_head": w["norm_and_head"],
        "suggested_format_start": k,
        "step_explains": explained,
    }
    if prompts is not None:
        if bs.kind != "hf" or cs.kind != "hf":
            raise UserError(
                "--prompts needs two HF directories (export run directories first: python -m pipeline.export)"
            )
        convs = []
        for r in load_chat_eval(prompts)[:max_prompts]:
            convs.append(r["messages"] + ([{"role": "assistant", "content": r["answer"]}] if "answer" in r else []))
        result["hidden_cosine"] = hidden_cosine(bs.path, cs.path, convs)
        result["prompts"] = {"file": str(Path(prompts).resolve()), "used": len(convs)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "probe.json", result)
    atomic_write_text(out / "probe.md", markdown(result))
    plot(result, out / "probe.png")
    return result
