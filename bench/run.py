"""`make bench`: measure training, freezing, memory and data-prep speed against plain baselines.

Every figure is a ratio against a baseline measured in the same run, on the same machine, model
and batch: {"name", "value", "baseline", "ratio" (= value / baseline), "goal", "met", ...}. The
figures come from
  bench.train_speed      pipeline vs plain PyTorch, chat-phase step vs FLOP model,
                         optimizer bytes per stage, loader share of a step
  bench.dataprep         `data_prep raw` vs the tokenizer's ceiling and datasets.map
  bench.transplant_mem   transplant peak RSS on two model sizes
  bench.stage_memory     each rank's peak RSS vs what its stage holds and the plan's estimate,
                         P = 1, 2, 4, bf16 checkpoint
A part that fails is recorded as a failed figure carrying its error; the others still run.

Writes runs/bench/latest.json (the figures), latest.md (a table, the notes and any profiles)
and latest.meta.json (machine, versions, command, duration), then prints the markdown.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from data_prep.errors import fail_cleanly
from data_prep.files import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


PARTS = ("train", "dataprep", "transplant", "memory")
# bench sizes -> the sizes the other modules know. `tiny` is for the test suite: seconds, and the
# figures mean nothing.
PART_SIZE = {"tiny": "small", "small": "small", "medium": "full"}

EPILOG = """\
examples:
  python -m bench.run --size small                  # ~5-8 min on 2 CPU cores
  python -m bench.run --size medium --out /tmp/b    # bigger model and corpus
  python -m bench.run --parts train                 # only the training figures
  make bench BENCH_SIZE=medium
GPU figures (tokens/s and MFU of a ~1B Llama): python -m bench.gpu (see its --help).
"""


def cpu_environment() -> None:
    """The CPU figures are CPU figures on any machine (bench/gpu.py measures a GPU). Must run before
    torch or DeepSpeed is imported; setdefault where `make` exports the same values."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: what the CPU trainer runs with
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    venv_path_first()


def venv_path_first() -> None:
    """This Python's bin first on PATH, as the tests have it: DeepSpeed JIT-builds its CPU op with
    whichever `ninja` PATH finds, and two ninja versions (the venv's, the system's) keep different
    log formats, so alternating between them rebuilds the op (30-90 s) on every other start."""
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def machine_info() -> dict:
    import platform

    import deepspeed
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "device": "cpu",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cores": cores,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "load_average_at_start": _load(),
    }


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def failed(part: str, err: BaseException) -> dict:
    """A part that crashed, as a figure: nothing measured, goal missed, the error kept."""
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))[-3000:]
    return {
        "name": f"{part}: failed",
        "value": None,
        "baseline": None,
        "ratio": None,
        "goal": "runs",
        "met": False,
        "unit": "",
        "notes": f"{type(err).__name__}: {err}"[:2000],
        "traceback": tb,
    }


def run_part(part: str, size: str) -> list[dict]:
    if part == "train":
        from bench import train_speed

        return train_speed.run(size)
    if part == "dataprep":
        from bench import dataprep

        return dataprep.run(PART_SIZE[size])
    if part == "transplant":
        from bench import transplant_mem

        return transplant_mem.run(PART_SIZE[size])
    if part == "memory":
        from bench import stage_memory

        return stage_memory.run("tiny" if size == "tiny" else "small")
    raise ValueError(part)


def collect(size: str, parts: list[str]) -> list[dict]:
    figures = []
    for part in parts:
        t0 = time.perf_counter()
        print(f"== {part} ({size})", flush=True)
        try:
            rows = run_part(part, size)
        except Exception as e:  # noqa: BLE001 - recorded, not hidden: see failed()
            rows = [failed(part, e)]
            print(f"   {part} failed: {type(e).__name__}: {e}", flush=True)
        for r in rows:
            r.setdefault("part", part)
        figures += rows
        print(f"   {part}: {len(rows)} figure(s) in {time.perf_counter() - t0:.0f}s", flush=True)
    return figures


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:,.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def to_markdown(figures: list[dict], meta: dict) -> str:
    m = meta["machine"]
    lines = [
        f"# Benchmark ({meta['size']})",
        "",
        f"`{meta['command']}` on {m['cpu']} ({m['usable_cores']} usable cores, OMP_NUM_THREADS="
        f"{m['omp_num_threads']}), torch {m['torch']}, deepspeed {m['deepspeed']}, transformers "
        f"{m['transformers']}; {meta['seconds']:.0f} s; load average {m['load_average_at_start']} at start, "
        f"{meta['load_average_at_end']} at end (above the core count means other work shared the cores).",
        "",
        "| figure | value | baseline | ratio | spread | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        unit = f" {f['unit']}" if f.get("unit") else ""
        met = {True: "yes", False: "**no**", None: "-"}[f.get("met")]
        lines.append(
            f"| {f['name']} | {_fmt(f.get('value'))}{unit} | {_fmt(f.get('baseline'))} | "
            f"{_fmt(f.get('ratio'))} | {_fmt(f.get('spread'))} | {f.get('goal')} | {met} |"
        )
    notes = [f for f in figures if f.get("notes") or f.get("note") or f.get("profile")]
    if notes:
        lines += ["", "## Notes", ""]
        for f in notes:
            shown = ("flop_ratio", "paired_ratio", "per_rep_ratios", "ratio_to_plan")
            extra = [f"{k}={v}" for k, v in f.items() if k in shown]
            text = " ".join(x for x in (f.get("notes"), f.get("note")) if x)
            lines.append(f"- **{f['name']}**: {text}" + (f" ({', '.join(extra)})" if extra else ""))
        for f in figures:
            if f.get("profile"):
                lines += ["", f"### Profile: {f['name']} (goal missed)", "", f["profile"]]
    return "\n".join(lines) + "\n"


@fail_cleanly
def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--size",
        choices=list(PART_SIZE),
        default=os.environ.get("BENCH_SIZE", "small"),
        help="small: < 10 min on 2 CPU cores (default, or $BENCH_SIZE); medium: bigger model and "
        "corpus; tiny: seconds, for the tests",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "runs" / "bench",
        help="results directory (default runs/bench, untracked; `--out bench/results` updates the "
        "committed reference copy, on purpose)",
    )
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    cpu_environment()
    t0 = time.perf_counter()
    machine = machine_info()
    figures = collect(args.size, parts)
    meta = {
        "size": args.size,
        "parts": parts,
        "machine": machine,
        "seconds": round(time.perf_counter() - t0, 1),
        "load_average_at_end": _load(),
        "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    md = to_markdown(figures, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "latest.json", figures)
    atomic_write_json(args.out / "latest.meta.json", meta)
    atomic_write_text(args.out / "latest.md", md)
    print(md)
    print(f"wrote {args.out / 'latest.json'}, latest.md, latest.meta.json")
    return figures


if __name__ == "__main__":
    main()
