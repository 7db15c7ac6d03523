"""Training figures, each a ratio against a baseline measured in the same run on the same model and batches.

  1. tokens/s of `pipeline.train` (1 stage, phase full) vs the plain PyTorch loop of
     bench.baseline (HF model + torch AdamW) on the same batches.               goal >= 0.95
  2. step time of the chat phase (format group = last 25% of layers) vs the full fine-tune
     step, same pipeline, against the FLOP model's ratio.               goal <= 1.10 x FLOP ratio
  3. optimizer-state bytes per rank of each stage (P=2, ZeRO-1), read from the checkpoint
     files, vs what Adam needs for that stage's trained parameters / DP.        goal <= 1.05
  4. time `data_prep.reader.micro_batches` takes to make one step's batches vs the step.  goal < 1%
  5. one validation batch (`eval_batch`, forward only) vs one training step of the raw phase,
     same run, same global batch.                                                goal < 0.5

The pipeline runs through its real entry point (`pipeline.train.main`) in this process, so
several repetitions share one import of torch + DeepSpeed; the plain loop runs in the same
process too. Repetitions interleave the sides (pipeline, reference, chat; the order rotates each
rep) so that load from other processes on a shared machine hits every side alike. Warm-up steps
of every run are dropped; each figure is the median over reps and `spread` the half-range of the
per-rep ratios.

    python -m bench.train_speed --size small        # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import yaml  # noqa: E402

from bench.kit import child_env, deepspeed_cmd, make_tokenizer, random_llama  # noqa: E402
from bench.synth import figure, median_spread, write_random_shards  # noqa: E402

# Model and batch per size. `small` is big enough that per-step framework overhead does not
# dominate a CPU step (~0.6 s), small enough that 5 interleaved reps take ~2 min on 2 cores.
SIZES = {
    "tiny": dict(
        model=dict(vocab_size=512, hidden=64, layers=4, heads=4, kv_heads=2, intermediate=176, max_position=64),
        seq=32,
        micro=2,
        batch=4,
        warmup=1,
        steps=3,
        reps=2,
        dp=1,
        loader_steps=10,
    ),
    "small": dict(
        model=dict(vocab_size=4096, hidden=256, layers=8, heads=4, kv_heads=2, intermediate=688, max_position=256),
        seq=128,
        micro=4,
        batch=8,
        warmup=2,
        steps=6,
        reps=5,
        dp=2,
        loader_steps=40,
    ),
    "medium": dict(
        model=dict(vocab_size=8192, hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1376, max_position=512),
        seq=256,
        micro=4,
        batch=8,
        warmup=2,
        steps=6,
        reps=5,
        dp=2,
        loader_steps=40,
    ),
}
GOAL_SPEED, GOAL_FLOP_SLACK, GOAL_OPT_BYTES, GOAL_LOADER = 0.95, 1.10, 1.05, 0.01
# A validation batch is a forward pass; a raw-phase step is a forward pass plus backward through
# the raw and format groups (~3x a forward where trained, ~2x where gradients only pass).
GOAL_EVAL_SHARE = 0.5
# ZeRO-1 (DeepSpeed stage 1/2 optimizer) keeps, per trained parameter: exp_avg and exp_avg_sq (fp32)
# and an fp32 master partition (kept even when the model itself is fp32), all split over DP ranks.
ADAM_BYTES_PER_PARAM = 4 + 4 + 4
# A fully frozen stage holds one 1-element "anchor" (pipeline/training/model.py); with ZeRO's alignment
# padding and the step counter that is a few dozen bytes.
FROZEN_STAGE_MAX_BYTES = 64
CPU_DS_CONFIG = REPO / "ds_configs" / "cpu_fp32_zero1.json"


class Setup:
    """Model dir + raw and chat shards for one size, in `root`."""

    def __init__(self, root: Path, size: str):
        self.root, self.size, self.p = root, size, SIZES[size]
        m = self.p["model"]
        tokens = (self.p["reps"] + 2) * (self.p["warmup"] + self.p["steps"] + 2) * self.p["batch"] * (self.p["seq"] + 1)
        tok = make_tokenizer(root / "tok")
        self.model = random_llama(root / "model", **m, tokenizer_dir=tok)
        self.raw = write_random_shards(root / "data" / "raw", m["vocab_size"], max(tokens, 50_000), tok, seed=1)
        self.chat = write_random_shards(
            root / "data" / "chat", m["vocab_size"], max(tokens, 50_000), tok, seed=2, chat=True
        )
        # What was tried for figure 1: the same DeepSpeed JSON with ZeRO stage 0. With one rank ZeRO-1
        # partitions nothing, yet still flattens every gradient into one buffer, runs Adam on that
        # flat fp32 copy and copies the result back into the parameters each step.
        ds = json.loads(CPU_DS_CONFIG.read_text())
        ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": 0}
        self.ds_zero0 = root / "cpu_fp32_zero0.json"
        self.ds_zero0.write_text(json.dumps(ds, indent=2))

    def config(self, name: str, phase: str, steps: int, **over) -> Path:
        """A run config as a user writes it; format group = last 25% of layers."""
        L = self.p["model"]["layers"]
        cfg = {
            "model": str(self.model),
            "data": str(self.chat if phase == "chat" else self.raw),
            "phase": phase,
            "raw_start": L // 4,
            "format_start": L - L // 4,
            "seq_len": self.p["seq"],
            "micro_batch_size": self.p["micro"],
            "global_batch_size": self.p["batch"],
            "steps": steps,
            "lr": 1e-4,
            "warmup_steps": 0,
            "out": str(self.root / "runs" / name),
            "save_every": 10_000,
            "keep_last": 1,
            "seed": 1,
            "log_every": 1,
            # The CPU figures run on CPU even on a GPU machine (bench/gpu.py measures the GPU).
            "ds_config": str(CPU_DS_CONFIG),
        }
        cfg.update(over)
        path = self.root / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path


@contextlib.contextmanager
def quiet():
    """Keep the trainer's layer map and progress bars out of the bench's own output."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            yield
        except SystemExit as e:  # fail_cleanly turns a UserError into exit 2: surface its message
            raise RuntimeError(
                f"pipeline.train exited {e.code}: {err.getvalue()[-2000:]}{out.getvalue()[-1000:]}"
            ) from None


def pipeline_step_times(cfg_path: Path, warmup: int) -> list[float]:
    """Run `python -m pipeline.train CFG` in this process; step_time_s of the steps after warm-up."""
    import shutil

    from pipeline.config import load_config
    from pipeline.train import main
    from pipeline.training.metrics_log import read_metrics

    out = Path(load_config(cfg_path).schedule.out)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each rep, never a resume
    with quiet():
        main([str(cfg_path)])
    gc.collect()
    return [r["step_time_s"] for r in read_metrics(out / "metrics.jsonl")][warmup:]


def reference_step_times(cfg_path: Path, warmup: int, steps: int) -> list[float]:
    """bench.baseline's plain PyTorch loop on the run's model and batches, timed per step after warm-up.

    Step k's time is making batch k plus training on it, which is also what the pipeline's
    step_time_s covers (train_batch pulls its micro-batches itself).
    """
    from bench.baseline import PlainLoop
    from pipeline.config import load_config
    from pipeline.training.plan import build_plan

    loop = PlainLoop(build_plan(load_config(cfg_path), 1, use_gpu=False))
    times = loop.step_times(warmup + steps)[warmup:]
    del loop
    gc.collect()
    return times


def validation_times(cfg_path: Path, warmup: int) -> tuple[float, float]:
    """(median seconds per validation batch, median seconds per training step) of one run that
    validates every other step with one batch per set."""
    import shutil

    from pipeline.config import load_config
    from pipeline.train import main
    from pipeline.training.metrics_log import read_metrics

    cfg = load_config(cfg_path)
    out = Path(cfg.schedule.out)
    shutil.rmtree(out, ignore_errors=True)
    with quiet():
        main([str(cfg_path)])
    gc.collect()
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r["step_time_s"] for r in rows if "step_time_s" in r][warmup:]
    evals = [r["eval_time_s"] / cfg.eval.eval_batches for r in rows if "eval_time_s" in r][1:]  # step 0: warm-up
    return statistics.median(evals), statistics.median(steps)


def flop_ratio(cfg_path: Path) -> tuple[float, dict]:
    """FLOP model: forward of everything + backward of the trained part, per token.

    Forward of a layer = 2 x its parameters + 4 x seq x attention width (scores and weighted sum,
    counted dense); the head = 2 x vocab x hidden; the embedding lookup and norms ~0. Backward is
    2 x forward (input and weight gradients) for a module that trains, 1 x for a frozen module above
    the first trained one (the gradient must pass through it), 0 below it.
    """
    from pipeline import hf
    from pipeline.config import load_config
    from pipeline.names import to_pipeline_name
    from pipeline.training.plan import build_plan

    cfg = load_config(cfg_path)
    plan = build_plan(cfg, 1, use_gpu=False)
    hf_cfg, groups, tied = plan.hf_config, plan.groups, plan.groups.tied
    model = hf.meta_model(hf.config_object(hf_cfg))
    for name, p in model.named_parameters():
        p.requires_grad_(groups.trains(name))
    L, S, H = groups.num_layers, cfg.data.seq_len, hf_cfg["hidden_size"]
    heads = hf_cfg["num_attention_heads"]
    attn_width = hf_cfg.get("head_dim") or H // heads
    # depth 0 = embedding, 1..L = layers, L+1 = head (+ final norm)
    fwd, trained = [0.0] * (L + 2), [False] * (L + 2)
    for name, p in model.named_parameters():
        i, key = to_pipeline_name(name, L)
        depth = 0 if key.startswith("embed_tokens") else (L + 1 if key.startswith(("norm", "lm_head")) else i + 1)
        if depth != 0:  # a lookup costs no FLOPs
            fwd[depth] += 2 * p.numel()
        trained[depth] |= p.requires_grad
    if tied:
        fwd[L + 1] += 2 * hf_cfg["vocab_size"] * H  # the tied head is still a matmul
    for d in range(1, L + 1):
        fwd[d] += 4 * S * heads * attn_width
    first = min(d for d in range(L + 2) if trained[d])
    bwd = [2 * f if trained[d] else (f if d > first else 0.0) for d, f in enumerate(fwd)]
    step, full = sum(fwd) + sum(bwd), 3 * sum(fwd)
    return step / full, {"forward_flops_per_token": sum(fwd), "trained_from_depth": first}


def loader_step_times(cfg_path: Path, steps: int) -> list[float]:
    """Seconds `data_prep.reader.micro_batches` takes to produce one step's micro-batches."""
    from data_prep.reader import micro_batches, open_mixture
    from pipeline.config import data_sources, load_config

    cfg = load_config(cfg_path)
    data = open_mixture(data_sources(cfg.data.data), cfg.data.seq_len, cfg.schedule.seed)
    per_step = cfg.data.global_batch_size // cfg.data.micro_batch_size
    it = micro_batches(data, cfg.data.micro_batch_size, 0, 1, start_sample=0)
    for _ in range(per_step):  # warm-up: page in the shard maps, build the first permutation
        next(it)
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        for _ in range(per_step):
            next(it)
        out.append(time.perf_counter() - t)
    return out


# ------------------------------------------------------------------------------------------------
# Optimizer state, from the checkpoint files of a P=2 run


def _stage_trained_numel(cfg_path: Path, run_dir: Path) -> dict[int, int]:
    """Trained parameters per stage, from the HF model, the run's groups and its stage bounds
    (independent of what DeepSpeed stored)."""
    import math

    from pipeline import hf
    from pipeline.config import load_config
    from pipeline.groups import LayerGroups
    from pipeline.names import to_pipeline_name

    rec = json.loads((run_dir / "run.json").read_text())
    groups = LayerGroups.from_record(rec["groups"], str(run_dir / "run.json"))
    shapes = hf.expected_tensors(hf.read_config(load_config(cfg_path).model.model))
    stage_of = {i: s for s, (a, b) in enumerate(rec["stages"]) for i in range(a, b)}
    out = {s: 0 for s in range(len(rec["stages"]))}
    for name, shape in shapes.items():
        if groups.trains(name):
            out[stage_of[to_pipeline_name(name, groups.num_layers)[0]]] += math.prod(shape)
    return out


def measured_optimizer_bytes(tag_dir: Path) -> dict[tuple[int, int], int]:
    """{(stage, dp_rank): bytes} of every optimizer tensor each rank saved: Adam moments (+ step), and
    with ZeRO-1 the fp32 master partition (zero_pp_rank_* files); without ZeRO the state is in the
    stage's mp_rank_* file."""
    import torch

    out = {}
    for f in sorted(tag_dir.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt")):
        dp = int(f.name.split("zero_pp_rank_")[1].split("_")[0])
        stage = int(f.stem.split("_mp_rank_")[1].split("_")[0])
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        n = sum(
            t.numel() * t.element_size()
            for st in osd["base_optimizer_state"]["state"].values()
            for t in st.values()
            if torch.is_tensor(t)
        )
        n += sum(t.numel() * t.element_size() for t in osd["single_partition_of_fp32_groups"])
        out[(stage, dp)] = n
    if not out:
        for f in sorted(tag_dir.glob("mp_rank_*_model_states.pt")):
            opt = torch.load(f, map_location="cpu", weights_only=False)["optimizer"]
            out[(int(f.stem.split("_")[2]), 0)] = sum(
                t.numel() * t.element_size() for st in opt["state"].values() for t in st.values() if torch.is_tensor(t)
            )
    return out


def optimizer_state_figures(setup: Setup) -> list[dict]:
    """One `deepspeed` launch (P=2 x DP) trains raw and chat for one step each and checkpoints."""
    from pipeline.rundir import tag_for

    dp = setup.p["dp"]
    cfgs = {phase: setup.config(f"zero_{phase}", phase, 1, pipeline_stages=2) for phase in ("raw", "chat")}
    # bench.train_phases runs several configs in one set of ranks
    cmd = deepspeed_cmd(2 * dp, "--module", "bench.train_phases", *map(str, cfgs.values()))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    print(f"  optimizer state: P=2 x DP={dp} launch took {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for phase, cfg_path in cfgs.items():
        run_dir = setup.root / "runs" / f"zero_{phase}"
        trained = _stage_trained_numel(cfg_path, run_dir)
        measured = measured_optimizer_bytes(run_dir / "checkpoints" / tag_for(1))
        # ZeRO-1 with data parallelism: 2 fp32 moments + an fp32 master partition, split over DP;
        # one data-parallel rank in fp32 runs ZeRO-0 and torch's AdamW: the 2 moments only.
        per_param, how = (
            (ADAM_BYTES_PER_PARAM / dp, "2 moments + fp32 master, ZeRO-1") if dp > 1 else (8, "2 moments, ZeRO-0")
        )
        for stage, numel in trained.items():
            per_rank = max(v for (s, _), v in measured.items() if s == stage)
            if numel:
                need = numel * per_param
                rows.append(
                    figure(
                        f"optimizer bytes per rank, {phase} phase, stage {stage} (P=2, DP={dp})",
                        per_rank,
                        round(need),
                        f"<= {GOAL_OPT_BYTES}",
                        per_rank / need <= GOAL_OPT_BYTES,
                        "bytes",
                        notes=f"{numel:,} trained params x {per_param:g} B ({how}); measured from the stage's "
                        f"optimizer files",
                    )
                )
            else:
                rows.append(
                    figure(
                        f"optimizer bytes per rank, {phase} phase, stage {stage}: fully frozen (P=2, DP={dp})",
                        per_rank,
                        0,
                        f"<= {FROZEN_STAGE_MAX_BYTES} bytes (the 1-element anchor only)",
                        per_rank <= FROZEN_STAGE_MAX_BYTES,
                        "bytes",
                        notes="frozen parameters add nothing; ratio undefined (nothing trains here)",
                    )
                )
    return rows


# ------------------------------------------------------------------------------------------------
# Profiles, written into the notes when a goal is missed


def profile_steps(cfg_path: Path, steps: int = 3) -> str:
    """torch.profiler over a few steady-state steps of the pipeline and of the plain loop (bench.baseline):
    the top ops by self CPU time, side by side, show where the extra time goes."""
    from torch.profiler import ProfilerActivity, profile

    from bench.baseline import PlainLoop
    from pipeline.config import load_config
    from pipeline.training.data import step_micro_batches
    from pipeline.training.dist import init
    from pipeline.training.engine import build_engine
    from pipeline.training.plan import build_plan

    cfg = load_config(cfg_path)
    plan = build_plan(cfg, 1, use_gpu=False)
    tables = []
    with quiet():
        init()
        eng = build_engine(plan, 0)
        it = step_micro_batches(plan.data, plan.batch.global_batch, plan.batch.micro_batch, 0, 1, cfg.data.seq_len, 0)
        for _ in range(2):
            eng.engine.train_batch(data_iter=it)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                eng.engine.train_batch(data_iter=it)
    tables.append(("pipeline.train (DeepSpeed engine.train_batch)", prof))
    del eng
    gc.collect()

    loop = PlainLoop(plan)
    for _ in range(2):
        loop.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            loop.step()
    tables.append(("plain PyTorch loop (bench.baseline)", prof))
    out = [_profile_delta(tables[0][1], tables[1][1], steps)]
    for title, prof in tables:
        out.append(
            f"{title}, {steps} steps, top ops by self CPU time:\n```\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48)
            + "```"
        )
    return "\n".join(out)


def _profile_delta(pipe, ref, steps: int) -> str:
    """The ops whose self CPU time per step grew most from the plain loop to the pipeline."""

    def by_op(prof):
        return {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}  # ms per step

    a, b = by_op(pipe), by_op(ref)
    total_a, total_b = sum(a.values()), sum(b.values())
    deltas = sorted(((a.get(k, 0.0) - b.get(k, 0.0), k) for k in set(a) | set(b)), reverse=True)[:6]
    parts = ", ".join(f"{k} +{d:.1f}" for d, k in deltas if d > 0)
    return (
        f"Where the time goes: self CPU {total_a:.1f} ms/step in the pipeline vs {total_b:.1f} ms/step in the "
        f"plain loop; largest increases (ms/step): {parts}."
    )


# ------------------------------------------------------------------------------------------------


def run(size: str = "small", root: Path | None = None, profile_on_miss: bool = True) -> list[dict]:
    """All training figures for `size`; the model and shards are built in a temp dir (or `root`)."""
    if size not in SIZES:
        raise ValueError(f"size {size!r}: expected one of {', '.join(SIZES)}")
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-train-")))
        return _run(Setup(root, size), profile_on_miss)


def _run(setup: Setup, profile_on_miss: bool) -> list[dict]:
    p = setup.p
    W, K, R = p["warmup"], p["steps"], p["reps"]
    full = setup.config("full", "full", W + K)
    chat = setup.config("chat", "chat", W + K)
    zero0 = setup.config("full_zero0", "full", W + K, ds_config=str(setup.ds_zero0))
    G, S = p["batch"], p["seq"]
    m = p["model"]
    what = (
        f"{m['layers']} layers, hidden {m['hidden']}, vocab {m['vocab_size']}, seq {S}, "
        f"batch {G} (micro {p['micro']}), {K} steps after {W} warm-up, {R} reps"
    )
    print(f"train speed: {what}", flush=True)

    sides = {
        "pipe": lambda: pipeline_step_times(full, W),
        "ref": lambda: reference_step_times(full, W, K),
        "chat": lambda: pipeline_step_times(chat, W),
        "zero0": lambda: pipeline_step_times(zero0, W),
    }
    times = {k: [] for k in sides}
    order = list(sides)
    for r in range(R):
        for side in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
            times[side].append(statistics.median(sides[side]()))
        print(
            f"  rep {r + 1}/{R}: s/step  pipeline {times['pipe'][-1]:.3f}  reference {times['ref'][-1]:.3f}  "
            f"chat {times['chat'][-1]:.3f}  pipeline+ZeRO-0 {times['zero0'][-1]:.3f}",
            flush=True,
        )
    rows = []

    # 1. tokens/s, pipeline vs plain loop (per-rep ratios pair runs that were neighbours in time)
    tps = {k: [G * S / t for t in v] for k, v in times.items()}
    speed_ratios = [a / b for a, b in zip(tps["pipe"], tps["ref"])]
    v, b = statistics.median(tps["pipe"]), statistics.median(tps["ref"])
    rows.append(
        figure(
            "tokens/s, pipeline.train 1 stage (phase full) vs plain PyTorch loop",
            round(v, 1),
            round(b, 1),
            f">= {GOAL_SPEED}",
            v / b >= GOAL_SPEED,
            "tokens/s",
            spread=median_spread(speed_ratios)[1],
            paired_ratio=round(statistics.median(speed_ratios), 4),
            per_rep_ratios=[round(x, 4) for x in speed_ratios],
            notes=what,
        )
    )
    z_ratios = [a / b for a, b in zip([G * S / t for t in times["zero0"]], tps["ref"])]
    v = statistics.median(G * S / t for t in times["zero0"])
    rows.append(
        figure(
            "tokens/s, pipeline.train 1 stage with a ZeRO stage-0 ds_config (tried) vs plain PyTorch loop",
            round(v, 1),
            round(b, 1),
            f"(reference for the row above; >= {GOAL_SPEED})",
            None,
            "tokens/s",
            spread=median_spread(z_ratios)[1],
            paired_ratio=round(statistics.median(z_ratios), 4),
            notes="same run, `ds_config` = ds_configs/cpu_fp32_zero1.json with zero_optimization.stage 0",
        )
    )

    # 2. chat-phase step vs full step, against the FLOP model
    fr, info = flop_ratio(chat)
    chat_ratios = [c / f for c, f in zip(times["chat"], times["pipe"])]
    v, b = statistics.median(times["chat"]), statistics.median(times["pipe"])
    rows.append(
        figure(
            "step time, chat phase (last 25% of layers + head) vs full fine-tune, same pipeline",
            round(v, 4),
            round(b, 4),
            f"<= {GOAL_FLOP_SLACK} x FLOP ratio = {GOAL_FLOP_SLACK * fr:.3f}",
            v / b <= GOAL_FLOP_SLACK * fr,
            "s/step",
            spread=median_spread(chat_ratios)[1],
            flop_ratio=round(fr, 4),
            paired_ratio=round(statistics.median(chat_ratios), 4),
            notes=f"FLOP model: forward of all + backward of trained part ({info['forward_flops_per_token'] / 1e6:.1f} "
            f"MFLOP/token forward); {what}",
        )
    )

    # 4. loader share (before 3: it reuses this process's warm page cache, not the launch's)
    for name, cfg_path, step_s in (("raw shards, full step", full, b), ("chat shards, chat step", chat, v)):
        lt, lspread = median_spread(loader_step_times(cfg_path, p["loader_steps"]))
        rows.append(
            figure(
                f"loader time per step ({name}) vs step time",
                round(lt, 6),
                round(step_s, 4),
                f"< {GOAL_LOADER}",
                lt / step_s < GOAL_LOADER,
                "s",
                spread=round(lspread, 6),
                notes=f"data_prep.reader.micro_batches making {G // p['micro']} micro-batches of {p['micro']}",
            )
        )

    # 5. a validation batch vs a training step, raw phase (what A-Raw pays per eval batch)
    val = setup.config("raw_validated", "raw", W + K, eval_every=2, eval_batches=1)
    pairs = [validation_times(val, W) for _ in range(R)]
    shares = [e / t for e, t in pairs]
    e, t = statistics.median(e for e, _ in pairs), statistics.median(t for _, t in pairs)
    rows.append(
        figure(
            "validation batch (eval_batch, forward only) vs training step, raw phase, same run",
            round(e, 4),
            round(t, 4),
            f"< {GOAL_EVAL_SHARE}",
            e / t < GOAL_EVAL_SHARE,
            "s",
            spread=median_spread(shares)[1],
            paired_ratio=round(statistics.median(shares), 4),
            notes=f"one validation costs eval_batches x this ratio of a step, per set; eval_every=2, "
            f"eval_batches=1, on the raw shards' val split; {what}",
        )
    )

    # 3. optimizer state per stage
    try:
        rows += optimizer_state_figures(setup)
    except Exception as e:  # a failed launch is a failed figure, not a crashed bench
        rows.append(
            figure(
                "optimizer bytes per stage (P=2, ZeRO-1)",
                None,
                None,
                f"<= {GOAL_OPT_BYTES}",
                False,
                "bytes",
                notes=f"failed: {e}"[:3000],
            )
        )

    if profile_on_miss and not rows[0]["met"]:
        rows[0]["profile"] = profile_steps(full)
    if profile_on_miss and not rows[2]["met"]:
        rows[2]["profile"] = "chat-phase step:\n" + profile_steps(chat)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m bench.train_speed",
        description=__doc__.splitlines()[0],
        epilog="examples:\n  python -m bench.train_speed --size small\n"
        "  python -m bench.train_speed --size tiny --keep /tmp/bench-train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--keep", type=Path, help="build model, shards and runs here and keep them (default: temp dir)")
    args = ap.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(args.size, args.keep), indent=2))


if __name__ == "__main__":
    main()
