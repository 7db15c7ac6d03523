"""Peak host memory of every rank of a pipeline run, against what its stage holds, on a bf16 checkpoint.

Each rank builds only its own stage (pipeline/training/model.py) and reads only that stage's
tensors, so its memory should follow the stage, not the model. For P = 1, 2 and 4 stages, phase
raw (format group = the last quarter of the layers), a 16-layer x 768 Llama saved in bf16 trains
2 steps on CPU ranks (micro-batch 1, 2 micro-batches a step), and every rank reports its own
peak RSS. The baseline for a rank is the same run on a tiny model with the same layer count
(hidden 64): what a rank costs before any weights (Python, torch, DeepSpeed, the data, the
engine). A rank's peak above that baseline is compared to

  what its stage holds, measured: the bytes of every live tensor when the last optimizer step
  starts (weights, gradients, Adam's moments: every storage counted once), plus the activations
  its forward passes keep for backward (glibc's count of allocated bytes after a forward pass,
  less the same count when the step started and the gradients allocated since), and
  the plan's estimate of it (RunPlan.memory_per_stage: weights, gradients, optimizer state,
  activations of the micro-batches in flight, backward's buffers), which the layer map prints.

Goals: peak <= 1.2 x what the stage holds, and <= 1.1 x the plan's estimate.

Each rank also records, per pipeline instruction and per part of the optimizer step (forward,
backward, clipping, Adam, zero_grad, checkpoint save), its RSS when the phase starts, its peak
inside the phase (Linux's VmHWM, reset with /proc/self/clear_refs at every phase boundary) and
glibc's allocated / free bytes (mallinfo2). `--trace` adds the live tensors at every boundary
(slow) and writes that per-phase table as markdown.

    python -m bench.stage_memory                         # the figures, ~4 min on 2 CPU cores
    python -m bench.stage_memory --trace OUT.md          # + the per-phase trace of every rank
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    "small": dict(layers=16, hidden=768, intermediate=3072, heads=12, kv_heads=4, vocab_size=32000),
    "tiny": dict(layers=8, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab_size=4096),  # tests
}
IDLE = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab_size=512)
STAGES = (1, 2, 4)
GOAL_HELD, GOAL_PLAN = 1.2, 1.1

# Runs pipeline.train in each rank, its phases wrapped; writes rank{R}.json into argv[1].
_CHILD = r'''
import ctypes, gc, json, os, sys, time
import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine
from pipeline.training import engine as engine_mod

OUT, RANK = sys.argv[1], os.environ.get('RANK', '0')
TRACE = os.environ.get('STAGE_MEMORY_TRACE') == '1'
MB = 2 ** 20


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
                                               'fsmblks', 'uordblks', 'fordblks', 'keepcost')]


try:
    _libc = ctypes.CDLL('libc.so.6')
    _libc.mallinfo2.restype = Mallinfo2
except (OSError, AttributeError):
    _libc = None


def malloc_mb():
    """glibc: bytes allocated (heap + mmap'd blocks), free bytes kept in the heap."""
    if _libc is None:
        return {'in_use': 0.0, 'free_heap': 0.0, 'heap': 0.0, 'mmap': 0.0}
    m = _libc.mallinfo2()
    return {'in_use': (m.uordblks + m.hblkhd) / MB, 'free_heap': m.fordblks / MB, 'heap': m.arena / MB,
            'mmap': m.hblkhd / MB}


def status():
    d = {}
    for line in open('/proc/self/status'):
        if line.startswith(('VmHWM:', 'VmRSS:')):
            d[line[:5]] = int(line.split()[1]) / 1024
    return d


S = {'peak': 0.0, 'open': [], 'phases': [], 'engine': None, 'step': 0, 'tensors': None, 'act': 0.0,
     'step_in_use': None, 'resets': True}


def fold():
    """Fold the high-water mark since the last reset into the run's peak and every open phase's,
    then reset it to the current RSS, so each phase gets its own peak."""
    hwm = status()['VmHWM']
    S['peak'] = max(S['peak'], hwm)
    for ph in S['open']:
        ph['peak'] = max(ph['peak'], hwm)
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        S['resets'] = False  # per-phase peaks become running peaks; the run's peak stays right


def forget_probe():
    """Reset the high-water mark after a measurement (gc's object lists), so the probe's own memory
    counts in no phase; called right after fold(), so nothing real is lost."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def live_tensors_mb():
    """Every live CPU tensor storage once: what gc sees, plus parameters, gradients, optimizer state."""
    gc.collect()
    seen, n = set(), 0

    def add(t):
        nonlocal n
        if t is None or t.is_meta or t.device.type != 'cpu':
            return
        s = t.untyped_storage()
        if s.data_ptr() and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            n += s.nbytes()

    for o in gc.get_objects():
        if torch.is_tensor(o):
            add(o)
    e = S['engine']
    if e is not None:
        for p in e.module.parameters():
            add(p)
            add(p.grad)
        for st in getattr(e.optimizer, 'state', {}).values():
            for v in st.values():
                if torch.is_tensor(v):
                    add(v)
    return n / MB


def grads_mb():
    e = S['engine']
    if e is None:
        return 0.0
    return sum(p.grad.numel() * p.grad.element_size() for p in e.module.parameters() if p.grad is not None) / MB


def phase(name, fn):
    def wrapped(*a, **k):
        fold()
        S['seq'] = S.get('seq', 0) + 1
        ph = {'phase': name, 'step': S['step'], 'seq': S['seq'], 'depth': len(S['open']), 'peak': 0.0}
        if name == 'optimizer_step':
            S['tensors'] = live_tensors_mb()  # weights, gradients and (after step 1) Adam's moments
        if TRACE:
            ph['live_in'] = live_tensors_mb()
        if name == 'optimizer_step' or TRACE:
            forget_probe()
        ph['rss_in'], ph['malloc_in'] = status()['VmRSS'], malloc_mb()
        S['open'].append(ph)
        try:
            return fn(*a, **k)
        finally:
            fold()
            S['open'].remove(ph)
            ph['rss_out'], ph['malloc_out'] = status()['VmRSS'], malloc_mb()
            if TRACE:
                ph['live_out'] = live_tensors_mb()
                forget_probe()
            if name == 'forward' and S['step_in_use'] is not None:
                S['act'] = max(S['act'], ph['malloc_out']['in_use'] - S['step_in_use'] - grads_mb())
            S['phases'].append(ph)
    return wrapped


NAMES = {'ForwardPass': 'forward', 'BackwardPass': 'backward', 'ReduceGrads': 'reduce_grads',
         'ReduceTiedGrads': 'reduce_tied_grads', 'OptimizerStep': 'optimizer_step', 'LoadMicroBatch': 'load_batch',
         'SendActivation': 'send_act', 'RecvActivation': 'recv_act', 'SendGrad': 'send_grad', 'RecvGrad': 'recv_grad'}
for cls, fn in list(PipelineEngine._INSTRUCTION_MAP.items()):
    PipelineEngine._INSTRUCTION_MAP[cls] = phase(NAMES.get(cls.__name__, cls.__name__), fn)
DeepSpeedEngine.clip_fp32_gradients = phase('clip', DeepSpeedEngine.clip_fp32_gradients)
engine_mod.GlobalNormAdamW.clip_ = phase('clip', engine_mod.GlobalNormAdamW.clip_)
torch.optim.AdamW.step = phase('adam', torch.optim.AdamW.step)
DeepSpeedEngine.zero_grad = phase('zero_grad', DeepSpeedEngine.zero_grad)
PipelineEngine.save_checkpoint = phase('save', PipelineEngine.save_checkpoint)
_train_batch = PipelineEngine.train_batch


def train_batch(self, *a, **k):
    S['step'] += 1
    S['step_in_use'] = malloc_mb()['in_use']
    return _train_batch(self, *a, **k)


PipelineEngine.train_batch = train_batch
_build = engine_mod.build_engine


def build_engine(*a, **k):
    eng = _build(*a, **k)
    S['engine'] = eng.engine
    fold()
    S['loaded'] = {'load_peak': S['peak'], 'rss': status()['VmRSS'], 'malloc': malloc_mb()}
    if TRACE:
        S['loaded']['live'] = live_tensors_mb()
        forget_probe()
    return eng


engine_mod.build_engine = build_engine
from pipeline.train import main  # noqa: E402

try:
    main(sys.argv[2:])
finally:
    fold()
    end = live_tensors_mb()
    with open(os.path.join(OUT, 'rank%s.json' % RANK), 'w') as f:
        json.dump({'hwm_mb': S['peak'], 'tensors_mb': S['tensors'] if S['tensors'] is not None else end,
                   'activations_mb': S['act'], 'end_tensors_mb': end, 'loaded': S.get('loaded'),
                   'phase_peaks': S['resets'], 'phases': S['phases']}, f)
'''


def _model(root: Path, name: str, tok: Path, **shape) -> Path:
    import torch

    from bench.kit import random_llama

    return random_llama(root / name, tokenizer_dir=tok, dtype=torch.bfloat16, max_position=128, **shape)


def _config(root: Path, name: str, model: Path, data: Path, layers: int, P: int) -> Path:
    cfg = {
        "model": str(model),
        "data": str(data),
        "phase": "raw",
        "raw_start": layers // 4,
        "format_start": layers - layers // 4,
        "pipeline_stages": P,
        "seq_len": 64,
        "micro_batch_size": 1,
        "global_batch_size": 2,
        "steps": 2,
        "lr": 1e-4,
        "out": str(root / "runs" / name),
        "save_every": 2,
        "keep_last": 1,
        "ds_config": str(REPO / "ds_configs" / "cpu_fp32_zero1.json"),
        "verify_data": "size",
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def peak_rss_per_rank(cfg: Path, P: int, out: Path, trace: bool = False) -> list[dict]:
    """What each rank of `python -m pipeline.train cfg` on P CPU ranks wrote (see _CHILD)."""
    from bench.kit import child_env, deepspeed_cmd

    out.mkdir(parents=True)
    child = out / "child.py"
    child.write_text(_CHILD)
    e = child_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", STAGE_MEMORY_TRACE="1" if trace else "0")
    if P == 1:
        cmd = [sys.executable, str(child), str(out), str(cfg)]
    else:
        cmd = deepspeed_cmd(P, "--no_local_rank", str(child), str(out), str(cfg))
    p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=1200)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(P)]


def measure(size: str = "small", trace: bool = False) -> list[dict]:
    """One record per rank of P = 1, 2, 4: the model's and the idle run's rank reports, the plan's estimate."""
    from bench.kit import make_tokenizer
    from bench.synth import write_random_shards
    from pipeline.config import load_config
    from pipeline.training.plan import build_plan

    shape = SIZES[size]
    L = shape["layers"]
    records = []
    with tempfile.TemporaryDirectory(prefix="stage-memory-") as tmp:
        root = Path(tmp)
        tok = make_tokenizer(root / "tok")
        model = _model(root, "model", tok, **shape)
        idle = _model(root, "idle", tok, layers=L, **IDLE)
        whole_fp32 = 2 * sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20  # bf16 on disk x 2
        data = {
            v: write_random_shards(root / f"data{v}" / "raw", v, 20_000, tok, seed=1)
            for v in (shape["vocab_size"], IDLE["vocab_size"])
        }
        for P in STAGES:
            cfg = _config(root, f"p{P}", model, data[shape["vocab_size"]], L, P)
            base_cfg = _config(root, f"idle{P}", idle, data[IDLE["vocab_size"]], L, P)
            plan = build_plan(load_config(cfg), P, use_gpu=False)
            estimate = plan.memory_per_stage()
            ranks = peak_rss_per_rank(cfg, P, root / f"rss{P}", trace)
            idle_ranks = peak_rss_per_rank(base_cfg, P, root / f"idle-rss{P}", trace)
            for r in range(P):  # data-parallel size 1: rank r holds stage r
                lo, hi = plan.stages[r], plan.stages[r + 1]
                records.append(
                    {
                        "P": P,
                        "rank": r,
                        "layers": (lo, hi - 1),
                        "trains": any(plan.groups.layer_trained(i) for i in range(lo, hi)),
                        "run": ranks[r],
                        "idle": idle_ranks[r],
                        "whole_fp32_mb": whole_fp32,
                        "estimate": {k: v / 2**20 for k, v in estimate[r].items()},
                    }
                )
    return records


def row(rec: dict) -> dict:
    """A record as numbers: MB above the idle rank, what the stage holds, the plan's estimate."""
    run, idle = rec["run"], rec["idle"]
    above = run["hwm_mb"] - idle["hwm_mb"]
    tensors = run["tensors_mb"] - idle["tensors_mb"]
    activations = run["activations_mb"] - idle["activations_mb"]
    held = tensors + activations
    plan = rec["estimate"]["total"]
    return {
        "above": above,
        "tensors": tensors,
        "activations": activations,
        "held": held,
        "plan": plan,
        "per_held": above / held,
        "per_plan": above / plan,
    }


def run(size: str = "small") -> list[dict]:
    """The figures (see the module docstring): one per rank of P = 1, 2 and 4."""
    return figures(measure(size))


def figures(records: list[dict]) -> list[dict]:
    from bench.synth import figure

    rows = []
    for rec in records:
        x, (lo, hi) = row(rec), rec["layers"]
        trains = "trains" if rec["trains"] else "frozen"
        est = rec["estimate"]
        met = x["per_held"] <= GOAL_HELD and x["per_plan"] <= GOAL_PLAN
        rows.append(
            figure(
                f"peak RSS above an idle rank, P={rec['P']}, rank {rec['rank']} (layers {lo}-{hi}, {trains})",
                round(x["above"], 1),
                round(x["held"], 1),
                f"<= {GOAL_HELD} x what the stage holds and <= {GOAL_PLAN} x the plan's estimate",
                met,
                "MB",
                notes=f"peak {rec['run']['hwm_mb']:.0f} MB, idle rank {rec['idle']['hwm_mb']:.0f} MB; the stage holds "
                f"{x['tensors']:.0f} MB of tensors at the optimizer step + {x['activations']:.0f} MB of "
                f"activations; the plan estimated {x['plan']:.0f} MB (x{x['per_plan']:.2f}: weights "
                f"{est['weights']:.0f}, gradients {est['gradients']:.0f}, optimizer {est['optimizer']:.0f}, "
                f"activations {est['activations']:.0f}, backward {est['backward']:.0f}); whole model in fp32 "
                f"{rec['whole_fp32_mb']:.0f} MB (x{x['above'] / rec['whole_fp32_mb']:.2f} of it)",
                whole_model_fp32_mb=round(rec["whole_fp32_mb"], 1),
                idle_rank_mb=round(rec["idle"]["hwm_mb"], 1),
                tensors_mb=round(x["tensors"], 1),
                activations_mb=round(x["activations"], 1),
                plan_estimate_mb=round(x["plan"], 1),
                ratio_to_plan=round(x["per_plan"], 4),
                phase_peaks_mb=_phase_summary(rec["run"]),
            )
        )
    return rows


def _phase_summary(run: dict) -> dict:
    """The highest peak of each phase over the run, in MB of RSS."""
    out: dict[str, float] = {}
    for ph in run["phases"]:
        out[ph["phase"]] = round(max(out.get(ph["phase"], 0.0), ph["peak"]), 1)
    return out


# ---------------------------------------------------------------------------------------------
# The per-phase trace, as markdown

SHOWN = ("forward", "backward", "reduce_grads", "optimizer_step", "clip", "adam", "zero_grad", "save")


def phase_table(run: dict, idle: dict | None = None) -> str:
    """One rank's phases: RSS when it starts, its peak and that peak over the start, RSS after,
    live tensors before -> after (trace runs), glibc's allocated bytes and its free heap after."""
    head = (
        "| step | phase | RSS at start | peak in phase | peak - start | RSS after | live tensors | "
        "malloc in use | free heap after |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    ld = run.get("loaded") or {}
    if ld:
        live = f"{ld['live']:.0f}" if "live" in ld else "-"
        lines.append(
            f"| 0 | stage built and loaded | - | {ld['load_peak']:.0f} | - | {ld['rss']:.0f} | {live} | "
            f"{ld['malloc']['in_use']:.0f} | {ld['malloc']['free_heap']:.0f} |"
        )
    for ph in sorted(run["phases"], key=lambda ph: ph.get("seq", 0)):  # in the order they started
        if ph["phase"] not in SHOWN:
            continue
        name = ("&nbsp;&nbsp;" * ph.get("depth", 0)) + ph["phase"].replace("_", " ")
        live = f"{ph['live_in']:.0f} → {ph['live_out']:.0f}" if "live_in" in ph else "-"
        lines.append(
            f"| {ph['step']} | {name} | {ph['rss_in']:.0f} | {ph['peak']:.0f} | "
            f"{ph['peak'] - ph['rss_in']:+.0f} | {ph['rss_out']:.0f} | {live} | "
            f"{ph['malloc_in']['in_use']:.0f} → {ph['malloc_out']['in_use']:.0f} | "
            f"{ph['malloc_out']['free_heap']:.0f} |"
        )
    tail = f"\n\nPeak {run['hwm_mb']:.0f} MB" + (f"; the idle rank's {idle['hwm_mb']:.0f} MB." if idle else ".")
    return "\n".join(lines) + tail


def trace_markdown(records: list[dict], title: str) -> str:
    parts = [
        f"# {title}",
        "",
        "MB = 2^20 bytes of RSS (VmRSS, VmHWM) or glibc's count (mallinfo2: allocated = heap blocks in use + "
        "mmap'd blocks; free heap = freed blocks the heap keeps resident). Each phase's peak is its own "
        "(VmHWM reset at every boundary). p2p and batch-loading instructions are left out (nothing above 1 MB).",
        "",
    ]
    for rec in records:
        x, (lo, hi) = row(rec), rec["layers"]
        parts += [
            f"## P={rec['P']}, rank {rec['rank']}: layers {lo}-{hi}, {'trains' if rec['trains'] else 'frozen'}",
            "",
            f"Above the idle rank: {x['above']:.0f} MB; holds {x['tensors']:.0f} MB of tensors at the "
            f"optimizer step + {x['activations']:.0f} MB of activations = {x['held']:.0f} MB "
            f"(x{x['per_held']:.2f}); the plan's estimate {x['plan']:.0f} MB (x{x['per_plan']:.2f}).",
            "",
            phase_table(rec["run"], rec["idle"]),
            "",
        ]
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.stage_memory", description=__doc__.splitlines()[0])
    ap.add_argument("size", nargs="?", default="small", choices=list(SIZES))
    ap.add_argument(
        "--trace",
        type=Path,
        metavar="OUT.md",
        help="also count live tensors at every phase boundary (slower) and write the per-phase "
        "table there (and the raw records beside it, OUT.json)",
    )
    args = ap.parse_args(argv)
    records = measure(args.size, trace=args.trace is not None)
    rows = figures(records)
    if args.trace:
        args.trace.write_text(
            trace_markdown(
                records, f"Per-phase memory of every rank (`python -m bench.stage_memory {args.size} --trace`)"
            )
        )
        args.trace.with_suffix(".json").write_text(json.dumps(records, indent=1))
    print(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
