"""The main job end to end, on the built-in synthetic world.

Every step goes through the product's own entry points (data_prep, pipeline.train, export,
transplant, evaluation), so the demo is also the integration test a user can watch. Each step
is skipped when its output already exists (outputs are written atomically, so existing means
complete), and training resumes from its checkpoints: rerunning after an interruption
continues where it stopped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from data_prep.common import UserError, atomic_write_json

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "demo"

# Sizes: the full demo takes ~11 min on 2 CPU cores; `tiny` only proves the plumbing (tests).
SIZES = {
    "full": dict(world=dict(n_known=200, n_new=100, bios_per_person=4), vocab=2048,
                 model=dict(layers=8, hidden=128), seq_len=128, boundaries=(2, 6),
                 max_new_tokens=24),
    "tiny": dict(world=dict(n_known=12, n_new=6, bios_per_person=2, n_generic=20, n_format_eval=6), vocab=400,
                 model=dict(layers=4, hidden=32), seq_len=32, boundaries=(1, 3),
                 max_new_tokens=6),
}
TINY_STEPS = 3
# Columns of the results table: format first, then knowledge in chat, the control, raw storage.
COLUMNS = ["format_adherence", "knowledge_accuracy", "knowledge_rank", "chance_rank", "heldout_known_rank",
           "raw_rank_new", "ppl_raw_new", "ppl_raw_known"]


def model_config(tokenizer_dir, layers: int, hidden: int, heads: int = 4, kv_heads: int = 2,
                 max_position: int = 512):
    """The demo's base: a small Llama with grouped-query attention (kv_heads < heads), like current
    Llama and Qwen models, so the weight mapping is exercised on the shapes it will meet. Returns
    (config, generation config): greedy, stopping at the tokenizer's end of turn."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=-(-hidden * 8 // 3 // 32) * 32,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_position, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         rope_theta=10000.0, **ids)
    return config, dict(ids, do_sample=False)


@dataclass
class Step:
    name: str
    est_s: float
    run: Callable[[], None]
    output: Path | None = None  # skip the step when this exists
    lane: str | None = None  # consecutive steps with the same lane run at the same time


@dataclass
class Demo:
    out: Path
    size: str = "full"
    seed: int = 0
    ablations: bool = False
    # One thread by default: with 2 OpenMP threads a step takes 0.2 s on an idle 2-core machine but
    # 15 s as soon as anything else runs (spinning threads fight over the cores); 1 thread degrades gently.
    threads: int = 1

    def __post_init__(self):
        self.s = SIZES[self.size]
        self.world = self.out / "world"
        self.data = self.out / "data"
        self.models = self.out / "models"
        self.runs = self.out / "runs"
        self.evals = self.out / "eval"

    # --- plumbing -------------------------------------------------------------------------------
    def _env(self) -> dict:
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(self.threads)  # per process: runs of one lane share the cores
        env.setdefault("DS_ACCELERATOR", "cpu")
        return env

    def _call(self, args: list[str], what: str) -> None:
        log = self.out / "logs" / f"{what}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            # Progress bars go to the terminal (stderr); everything else to the step's log file.
            p = subprocess.run([sys.executable, *args], cwd=REPO, env=self._env(), stdout=f, stderr=sys.stderr)
        if p.returncode:
            raise UserError(f"demo step `{what}` failed (exit {p.returncode}); its output is in {log}")

    def train(self, config: str, run: str, model: Path, data: str, **extra) -> None:
        steps = None
        if self.size == "tiny":
            steps = TINY_STEPS
        lo, hi = self.s["boundaries"]
        overrides = {"model": model, "data": self.data / f"{data}.manifest.json", "out": self.runs / run,
                     "seed": self.seed, "seq_len": self.s["seq_len"], **extra}
        if "raw_start" not in extra and config != "base":
            overrides.update(raw_start=lo, format_start=extra.get("format_start", hi))
        if steps is not None:
            overrides["steps"] = steps
            overrides["micro_batch_size"] = 2
            overrides["global_batch_size"] = 4
        args = ["-m", "pipeline.train", str(CONFIGS / f"{config}.yaml")] + [f"--{k}={v}" for k, v in overrides.items()]
        self._call(args, f"train_{run}")

    def export(self, run: str, name: str) -> None:
        self._call(["-m", "pipeline.export", str(self.runs / run), "--out", str(self.models / name)], f"export_{name}")

    def transplant(self, raw_run: str, chat_run: str, name: str) -> None:
        self._call(["-m", "pipeline.transplant", "--raw", str(self.runs / raw_run), "--chat", str(self.runs / chat_run),
                    "--out", str(self.models / name)], f"transplant_{name}")

    def prep(self, kind: str, src: str, name: str) -> None:
        self._call(["-m", "data_prep", kind, str(self.world / f"{src}.jsonl"), "--tokenizer", str(self.out / "tokenizer"),
                    "--output-prefix", str(self.data / name), "--val-fraction", "0", "--seed", str(self.seed)],
                   f"data_{name}")

    # --- the plan ---------------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        scale = 1.0 if self.size == "full" else 0.05
        S: list[Step] = []
        add = lambda name, est, fn, output=None, lane=None: S.append(Step(name, est * scale, fn, output, lane))

        def world():
            from pipeline.demo.world import build_world
            build_world(self.world, seed=self.seed, **self.s["world"])

        def tokenizer():
            from pipeline.demo.tokenizer import build_tokenizer
            build_tokenizer([self.world / "tokenizer_corpus.jsonl"], self.out / "tokenizer", vocab_size=self.s["vocab"])

        def base_init():
            from pipeline.hf import save_random_model
            config, generation = model_config(self.out / "tokenizer", **self.s["model"])
            save_random_model(config, self.models / "base_init", tokenizer_dir=self.out / "tokenizer", seed=self.seed,
                              generation_config=generation)

        add("build the world", 2, world, self.world / "world.json")
        add("train the tokenizer", 3, tokenizer, self.out / "tokenizer" / "tokenizer.json")
        add("random-init the base", 5, base_init, self.models / "base_init" / "config.json")
        for kind, src, name in [("raw", "pretrain", "pretrain"), ("raw", "raw", "raw"), ("chat", "chat", "chat"),
                                ("chat", "qa_new", "qa_new")]:
            add(f"pack {name} shards", 5, lambda k=kind, s=src, n=name: self.prep(k, s, n),
                self.data / f"{name}.manifest.json")

        def trained(config, run, model_from, data, name, est, lane=None, **extra):
            def go():
                self.train(config, run, self.models / model_from, data, **extra)
                self.export(run, name)
            add(f"train + export {run}", est, go, self.models / name, lane)

        # Training runs are single processes with one thread each, so independent runs go in pairs
        # (a "lane"): on 2 cores that halves the wall time. A-Chat and A-Raw are independent by design.
        trained("base", "base", "base_init", "pretrain", "base", 240)
        trained("chat", "a_chat", "base", "chat", "a_chat", 110, lane="phases")
        trained("raw", "a_raw", "base", "raw", "a_raw", 160, lane="phases")
        add("transplant", 5, lambda: self.transplant("a_raw", "a_chat", "transplant"), self.models / "transplant")
        trained("naive", "naive", "a_chat", "raw", "naive", 190, lane="baselines")
        trained("qa_upper", "qa_upper", "a_chat", "qa_new", "qa_upper", 120, lane="baselines")
        trained("reattach", "reattach", "transplant", "chat", "transplant_reattach", 90, lane="remedies")
        # Remedy: representation anchoring during A-Raw (weight 1.0, as in the reference probe).
        trained("raw", "a_raw_anchor", "base", "raw", "a_raw_anchor", 160, lane="remedies", anchor_weight=1.0)
        add("transplant (anchored A-Raw)", 8, lambda: self.transplant("a_raw_anchor", "a_chat", "transplant_anchor"),
            self.models / "transplant_anchor")
        if self.ablations:
            trained("raw", "a_raw_raw_trains_format", "base", "raw", "a_raw_raw_trains_format", 170,
                    lane="ablation_rtf", raw_trains_format=True)
            add("transplant (raw_trains_format)", 8,
                lambda: self.transplant("a_raw_raw_trains_format", "a_chat", "transplant_raw_trains_format"),
                self.models / "transplant_raw_trains_format")
            trained("raw", "a_raw_lowlr", "base", "raw", "a_raw_lowlr", 140, lane="ablation_rtf", lr=5e-4,
                    min_lr=5e-5)
            add("transplant (low raw lr)", 8, lambda: self.transplant("a_raw_lowlr", "a_chat", "transplant_lowlr"),
                self.models / "transplant_lowlr")
            lo, hi = self.s["boundaries"]
            for fs in (hi - 1, hi + 1):
                trained("chat", f"a_chat_fs{fs}", "base", "chat", f"a_chat_fs{fs}", 110, lane=f"fs{fs}",
                        format_start=fs)
                trained("raw", f"a_raw_fs{fs}", "base", "raw", f"a_raw_fs{fs}", 160, lane=f"fs{fs}",
                        format_start=fs)
                add(f"transplant (format_start={fs})", 8,
                    lambda fs=fs: self.transplant(f"a_raw_fs{fs}", f"a_chat_fs{fs}", f"transplant_fs{fs}"),
                    self.models / f"transplant_fs{fs}")
        for name in self.model_names():
            add(f"evaluate {name}", 25, lambda n=name: self.evaluate(n), self.evals / f"{name}.json")
        add("write the report", 1, self.report)
        return S

    def model_names(self) -> list[str]:
        names = ["base", "a_chat", "a_raw", "transplant", "naive", "qa_upper", "transplant_reattach",
                 "transplant_anchor"]
        if self.ablations:
            lo, hi = self.s["boundaries"]
            names += ["transplant_raw_trains_format", "transplant_lowlr"] + [f"transplant_fs{fs}" for fs in (hi - 1, hi + 1)]
        return names

    def evaluate(self, name: str) -> None:
        import torch

        from pipeline.evaluation.runner import evaluate_model

        torch.set_num_threads(self.threads)
        w = self.world
        metrics = evaluate_model(
            self.models / name,
            chat={"": [w / "chat_eval_format.jsonl", w / "chat_eval_new.jsonl"],
                  "heldout_known": w / "chat_eval_heldout.jsonl"},
            raw={"new": w / "raw_eval_new.jsonl", "known": w / "raw_eval_known.jsonl"},
            probes={"new": w / "probe_new.jsonl"},
            max_new_tokens=self.s["max_new_tokens"], progress=True)
        atomic_write_json(self.evals / f"{name}.json", metrics)

    def report(self) -> None:
        from pipeline.evaluation.report import write_report

        models = {n: json.loads((self.evals / f"{n}.json").read_text()) for n in self.model_names()}
        table = write_report({"models": models}, self.out, columns=COLUMNS)
        verdict = verdict_text(models)
        with open(self.out / "results.md", "a") as f:
            f.write("\n" + verdict + "\n")
        print("\n" + table + "\n\n" + verdict, flush=True)

    def run(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        plan = self.steps()
        groups: list[list[Step]] = []  # consecutive steps of one lane run together
        for step in plan:
            if groups and step.lane and groups[-1][0].lane == step.lane:
                groups[-1].append(step)
            else:
                groups.append([step])
        total = sum(max(s.est_s for s in g) for g in groups)
        print(f"layer-aware demo: {len(plan)} steps, estimated {total / 60:.0f} min on 2 CPU cores -> {self.out}",
              flush=True)
        bar = tqdm(total=round(total), unit="s", desc="demo", bar_format="{l_bar}{bar}| est. {n:.0f}/{total:.0f}s "
                   "[{elapsed}<{remaining}]", position=0)
        done = 0
        for group in groups:
            todo = []
            for step in group:
                done += 1
                if step.output is not None and step.output.exists():
                    bar.write(f"[{done}/{len(plan)}] {step.name}: done already")
                else:
                    bar.write(f"[{done}/{len(plan)}] {step.name} (est. {step.est_s:.0f}s)")
                    todo.append(step)
            t0 = time.time()
            if len(todo) > 1:
                with ThreadPoolExecutor(len(todo)) as pool:  # each step is a subprocess: no GIL contention
                    for f in [pool.submit(s.run) for s in todo]:
                        f.result()
            elif todo:
                todo[0].run()
            for step in todo:
                bar.write(f"    {step.name}: done ({time.time() - t0:.0f}s)")
            bar.update(round(max(s.est_s for s in group)))
        bar.close()


def verdict_text(models: dict) -> str:
    """Say plainly what the table shows, whatever it shows."""
    def get(n, k):
        return models.get(n, {}).get(k, float("nan"))

    chance = get("a_chat", "chance_rank")
    lines = ["## What this run shows"]
    held = get("a_chat", "heldout_known_rank")
    generalises = held < 0.75 * chance
    lines.append(f"- Extraction control: A-Chat ranks held-out known people's true values at {held:.1f} "
                 f"(chance {chance:.1f}). " + ("Extraction generalises in this world, so the new-people "
                 "columns can be read." if generalises else "Extraction does NOT generalise in this world, "
                 "so no conclusion about new people can be drawn from the knowledge columns."))
    fc, ft = get("a_chat", "format_adherence"), get("transplant", "format_adherence")
    if fc < 0.5:
        lines.append(f"- Format: A-Chat itself reaches only {fc:.2f} format adherence, so there is no chat format "
                     f"for the transplant to keep (transplant {ft:.2f}); train A-Chat longer.")
    else:
        lines.append(f"- Format: A-Chat {fc:.2f}, transplant {ft:.2f}" +
                     (" (kept)." if ft >= fc - 0.1 else " (the transplant BROKE the chat format)."))
    for name, what in [("transplant_anchor", "Anchoring remedy"), ("transplant_reattach", "Re-attach remedy")]:
        if name in models:
            lines.append(f"- {what} (`{name}`): format {get(name, 'format_adherence'):.2f}, knowledge rank "
                         f"{get(name, 'knowledge_rank'):.1f}, completion rank on new people {get(name, 'raw_rank_new'):.1f}.")
    kt, kc = get("transplant", "knowledge_rank"), get("a_chat", "knowledge_rank")
    lines.append(f"- Knowledge of new people in chat (rank, lower is better): transplant {kt:.1f}, A-Chat {kc:.1f}, "
                 f"Q/A upper bound {get('qa_upper', 'knowledge_rank'):.1f}, chance {chance:.1f}." +
                 (" The transplant carries knowledge into chat." if generalises and kt < kc - 0.1 * chance
                  else " The transplant does not show knowledge of the new people above A-Chat."))
    lines.append(f"- Raw storage (completion probe rank on new people): base {get('base', 'raw_rank_new'):.1f}, "
                 f"A-Raw {get('a_raw', 'raw_rank_new'):.1f}, transplant {get('transplant', 'raw_rank_new'):.1f}.")
    return "\n".join(lines)
