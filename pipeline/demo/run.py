"""The main job end to end, on the built-in synthetic world.

Every step goes through the product's own entry points (data_prep, pipeline.train, export,
transplant, chat_vector, evaluation), so the demo is also the integration test a user can watch.
The steps form a dependency graph; two workers run whatever is ready (one thread each: on 2 cores
two single-threaded runs beat one two-threaded run, and a thread count changes nothing numeric).
A step is skipped when its output exists (outputs are written atomically, so existing means
complete), and training resumes from its checkpoints: rerunning continues where it stopped.

The models, each evaluated the same way (pipeline.evaluation):
    base          phase full from random init, on the known people (pretraining)
    a_chat        the method's A-Chat: the format group on chat data
    a_raw         the method's A-Raw: the raw group on the new people's biographies
    transplant    A-Raw below the boundary + A-Chat's format group (the vanilla recipe)
    naive         A-Chat, then every parameter trained on the raw corpus (what the method avoids)
    qa_upper      A-Chat, then SFT on Q/A about the new people (someone wrote those Q/A pairs)
    chat_vector   continued pretraining of the base on the raw corpus + (full chat tune - base)
    sequential    A-Chat, then its raw group trained on the raw text, format group frozen, no transplant
    donor         the user with X and X-Instruct and no chat data: A-Raw transplanted under chat_full
                  (a full chat fine-tune of the base, standing in for X-Instruct) as `--donor`
    instruct_vector  the same user's chat vector on A-Raw: A-Raw + (chat_full - base)
    recipe_<name> a recipe from demo/recipe.yaml (pipeline/demo/recipes.py)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from data_prep.errors import UserError
from data_prep.files import atomic_write_json
from pipeline import shipped
from pipeline.training.dist import without_launcher

from .forgetting import WATCHED, forgetting_report
from .recipes import CHAT_MODELS, VANILLA_RAW, Recipe

CONFIGS = shipped.config_dir() / "demo"

# Sizes: `full` is the real demo (about 15 min on 2 idle CPU cores); `tiny` only proves the
# plumbing (tests). Steps, batches and learning rates are in the shipped demo/*.yaml.
SIZES = {
    "full": dict(
        world=dict(
            n_known=300,
            n_new=100,
            bios_per_person=30,
            qa_fraction=0.7,
            pretrain_qa_rounds=6,
            chat_qa_rounds=16,
            qa_new_rounds=16,
        ),
        vocab=2048,
        model=dict(layers=8, hidden=128),
        seq_len=128,
        boundaries=(2, 6),
        max_new_tokens=24,
    ),
    "tiny": dict(
        world=dict(
            n_known=12,
            n_new=6,
            bios_per_person=2,
            pretrain_qa_rounds=1,
            chat_qa_rounds=2,
            qa_new_rounds=2,
            n_generic=20,
            n_format_eval=6,
        ),
        vocab=400,
        model=dict(layers=4, hidden=32),
        seq_len=32,
        boundaries=(1, 3),
        max_new_tokens=6,
    ),
}
TINY_STEPS = 3
BASELINES = (
    "base",
    "a_chat",
    "a_raw",
    "transplant",
    "naive",
    "qa_upper",
    "chat_vector",
    "sequential",
    "donor",
    "instruct_vector",
)


def model_config(tokenizer_dir, layers: int, hidden: int, heads: int = 4, kv_heads: int = 2, max_position: int = 512):
    """The demo's base: a small Llama with grouped-query attention (kv_heads < heads), like current
    Llama and Qwen models, so the weight mapping is exercised on the shapes it will meet. Returns
    (config, generation config): greedy, stopping at the tokenizer's end of turn."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=-(-hidden * 8 // 3 // 32) * 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        **ids,
    )
    return config, dict(ids, do_sample=False)


@dataclass
class Step:
    name: str
    est_s: float
    run: Callable[[], None]
    output: Path | None = None  # skip the step when this exists
    needs: tuple[str, ...] = ()


@dataclass
class Demo:
    out: Path
    size: str = "full"
    seed: int = 0
    recipes: list[Recipe] = field(default_factory=list)
    baselines: tuple[str, ...] = BASELINES
    world_overrides: dict = field(default_factory=dict)
    base_steps: int | None = None
    threads: int = 1
    workers: int = 2

    def __post_init__(self):
        # Absolute, so the steps (other processes) and the records name one folder whatever the
        # working directory.
        self.out = Path(self.out).absolute()
        self.s = SIZES[self.size]
        if "transplant" in self.baselines:  # a recipe that changes nothing is the transplant baseline
            self.recipes = [r for r in self.recipes if not r.is_vanilla]
        self.world = self.out / "world"
        self.data = self.out / "data"
        self.models = self.out / "models"
        self.runs = self.out / "runs"
        self.evals = self.out / "eval"

    # --- plumbing -------------------------------------------------------------------------------
    def _env(self, threads: int) -> dict:
        # Each step is a one-process job of its own, even when the demo runs inside a SLURM
        # allocation or a shell with MASTER_PORT set: two concurrent steps must not share a port.
        env = without_launcher(os.environ)
        # The steps import this very package, wherever it was imported from (a checkout run as
        # `python -m` from its root, or an installed wheel), from any working directory.
        package_root = str(Path(shipped.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env["OMP_NUM_THREADS"] = str(threads)
        env.setdefault("DS_ACCELERATOR", "cpu")
        return env

    def _call(self, args: list[str], what: str, threads: int | None = None) -> None:
        log = self.out / "logs" / f"{what}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            # Progress bars go to the terminal (stderr); everything else to the step's log file.
            p = subprocess.run(
                [sys.executable, *args], env=self._env(threads or self.threads), stdout=f, stderr=sys.stderr
            )
        if p.returncode:
            raise UserError(f"demo step `{what}` failed (exit {p.returncode}); its output is in {log}")

    def train(self, config: str, run: str, model: Path, data, boundaries=None, **extra) -> None:
        """`python -m pipeline.train demo/CONFIG.yaml` with this demo's paths and sizes."""
        lo, hi = boundaries or self.s["boundaries"]
        data = (
            [{"path": str(self.data / f"{d}.manifest.json"), "weight": w} for d, w in data]
            if isinstance(data, list)
            else self.data / f"{data}.manifest.json"
        )
        overrides = {
            "model": model,
            "data": json.dumps(data) if isinstance(data, list) else data,
            "out": self.runs / run,
            "seed": self.seed,
            "seq_len": self.s["seq_len"],
            **extra,
        }
        if config not in ("base", "cpt", "chat_full"):
            overrides.update(raw_start=lo, format_start=hi)
        if self.size == "tiny":
            overrides.update(steps=TINY_STEPS, micro_batch_size=2, global_batch_size=4)
        elif config == "base" and self.base_steps:
            overrides["steps"] = self.base_steps
        if eval_data := eval_manifests(config):  # the config's validation sets, in this demo's data folder
            overrides["eval_data"] = json.dumps(
                {
                    n: {"path": str(self.data / f"{d}.manifest.json"), "split": split}
                    for n, (d, split) in eval_data.items()
                }
            )
        args = ["-m", "pipeline.train", str(CONFIGS / f"{config}.yaml")] + [f"--{k}={v}" for k, v in overrides.items()]
        # Every other run starts from the base, so nothing runs beside it: it gets every worker's
        # threads (1.5x faster on 2 cores), the others one worker's each. Thread counts change
        # float sums, so the demo's numbers hold for a given --workers and --threads.
        self._call(args, f"train_{run}", self.threads * self.workers if config == "base" else None)

    def export(self, run: str, name: str) -> None:
        self._call(["-m", "pipeline.export", str(self.runs / run), "--out", str(self.models / name)], f"export_{name}")

    def transplant(self, raw_run: str, chat_run: str, name: str) -> None:
        self._call(
            [
                "-m",
                "pipeline.transplant",
                "--raw",
                str(self.runs / raw_run),
                "--chat",
                str(self.runs / chat_run),
                "--out",
                str(self.models / name),
            ],
            f"transplant_{name}",
        )

    def chat_vector(self, raw_run: str, chat_run: str, name: str, extra: list[str] = ()) -> None:
        self._call(
            [
                "-m",
                "pipeline.chat_vector",
                "--raw",
                str(self.runs / raw_run),
                "--chat",
                str(self.runs / chat_run),
                "--base",
                str(self.models / "base"),
                "--out",
                str(self.models / name),
                *extra,
            ],
            f"chat_vector_{name}",
        )

    def donor(self, raw_run: str, donor_model: str, name: str) -> None:
        self._call(
            [
                "-m",
                "pipeline.transplant",
                "--raw",
                str(self.runs / raw_run),
                "--donor",
                str(self.models / donor_model),
                "--out",
                str(self.models / name),
            ],
            f"transplant_{name}",
        )

    def prep(self, kind: str, src: str, name: str) -> None:
        self._call(
            [
                "-m",
                "data_prep",
                kind,
                str(self.world / f"{src}.jsonl"),
                "--tokenizer",
                str(self.out / "tokenizer"),
                "--output-prefix",
                str(self.data / name),
                "--val-fraction",
                "0",
                "--seed",
                str(self.seed),
            ],
            f"data_{name}",
        )

    # --- the plan ---------------------------------------------------------------------------------
    def steps(self) -> dict[str, Step]:
        scale = 1.0 if self.size == "full" else 0.05
        S: dict[str, Step] = {}

        def add(name, est, fn, output=None, needs=()):
            if name not in S:
                S[name] = Step(name, est * scale, fn, output, tuple(needs))

        def world():
            from .world import build_world

            build_world(self.world, seed=self.seed, **{**self.s["world"], **self.world_overrides})

        def tokenizer():
            from .tokenizer import build_tokenizer

            build_tokenizer([self.world / "tokenizer_corpus.jsonl"], self.out / "tokenizer", vocab_size=self.s["vocab"])

        def base_init():
            from pipeline.hf import save_random_model

            config, generation = model_config(self.out / "tokenizer", **self.s["model"])
            save_random_model(
                config,
                self.models / "base_init",
                tokenizer_dir=self.out / "tokenizer",
                seed=self.seed,
                generation_config=generation,
            )

        add("world", 2, world, self.world / "world.json")
        add("tokenizer", 3, tokenizer, self.out / "tokenizer" / "tokenizer.json", ["world"])
        add("model:base_init", 5, base_init, self.models / "base_init" / "config.json", ["tokenizer"])
        for kind, name in [
            ("raw", "pretrain"),
            ("raw", "raw"),
            ("chat", "chat"),
            ("chat", "qa_new"),
            ("raw", "raw_eval_new"),
        ]:
            add(
                f"data:{name}",
                8,
                lambda k=kind, n=name: self.prep(k, n, n),
                self.data / f"{name}.manifest.json",
                ["tokenizer"],
            )

        def trained(run, config, start, data, est, boundaries=None, **extra):
            sources = [d for d, _ in data] if isinstance(data, list) else [data]
            sources += [d for d, _ in eval_manifests(config).values()]

            def go():
                self.train(config, run, self.models / start, data, boundaries, **extra)
                self.export(run, run)

            add(f"model:{run}", est, go, self.models / run, [f"model:{start}", *(f"data:{d}" for d in sources)])

        def merged(name, est, fn, needs):
            add(f"model:{name}", est, fn, self.models / name, needs)

        trained("base", "base", "base_init", "pretrain", 260)
        wanted = set(self.baselines)
        if wanted & {"a_chat", "transplant", "naive", "qa_upper", "sequential"} or self.recipes:
            trained("a_chat", "chat", "base", "chat", 80)
        if wanted & {"a_raw", "transplant", "donor", "instruct_vector"}:
            trained("a_raw", "raw", "base", "raw", 110)
        if "transplant" in wanted:
            merged(
                "transplant",
                5,
                lambda: self.transplant("a_raw", "a_chat", "transplant"),
                ["model:a_raw", "model:a_chat"],
            )
        if "naive" in wanted:
            trained("naive", "naive", "a_chat", "raw", 110)
        if "qa_upper" in wanted:
            trained("qa_upper", "qa_upper", "a_chat", "qa_new", 100)
        if wanted & {"chat_vector", "donor", "instruct_vector"} or any(CHAT_MODELS[r.chat_model] for r in self.recipes):
            trained("chat_full", "chat_full", "base", "chat", 90)
        if "chat_vector" in wanted:
            trained("cpt", "cpt", "base", "raw", 110)
            merged(
                "chat_vector",
                5,
                lambda: self.chat_vector("cpt", "chat_full", "chat_vector"),
                ["model:cpt", "model:chat_full"],
            )
        if "donor" in wanted:
            merged("donor", 5, lambda: self.donor("a_raw", "chat_full", "donor"), ["model:a_raw", "model:chat_full"])
        if "instruct_vector" in wanted:
            merged(
                "instruct_vector",
                5,
                lambda: self.chat_vector("a_raw", "chat_full", "instruct_vector"),
                ["model:a_raw", "model:chat_full"],
            )
        if "sequential" in wanted:
            trained("sequential", "sequential", "a_chat", "raw", 110)
        for r in self.recipes:
            self._recipe_steps(r, trained, merged)
        for name in self.model_names():
            add(f"eval:{name}", 30, lambda n=name: self.evaluate(n), self.evals / f"{name}.json", [f"model:{name}"])
        add("report", 1, self.report, None, [f"eval:{n}" for n in self.model_names()])
        return S

    def _recipe_steps(self, r: Recipe, trained, merged) -> None:
        bounds = r.boundary(self.s["boundaries"])
        # A full chat tune (trained in steps()) has no boundary of its own; an A-Chat does.
        chat_run = CHAT_MODELS[r.chat_model]
        if not chat_run:
            chat_run = "a_chat" if bounds == tuple(self.s["boundaries"]) else f"a_chat_{bounds[0]}_{bounds[1]}"
            if chat_run != "a_chat":
                trained(chat_run, "chat", "base", "chat", 80, boundaries=bounds)
        extra = {k: v for k, v in r.raw.items() if k not in ("raw_start", "format_start")}
        # A recipe that only changes what happens after A-Raw shares the vanilla A-Raw.
        raw_run = self._raw_run(r)
        data = "raw"
        replayed = [(src, w) for src, w in (("pretrain", r.replay), ("chat", r.chat_replay)) if w]
        grow = 1 + r.replay + r.chat_replay
        if replayed:
            # The same raw exposure as the vanilla recipe: the steps grow with the replayed share.
            from pipeline.config import load_config

            steps = (
                extra.get("steps")
                or load_config(CONFIGS / "raw.yaml", {"model": "m", "data": "d", "out": "o"}).schedule.steps
            )
            extra["steps"] = round(steps * grow)
            data = [("raw", 1.0), *replayed]
        if raw_run != "a_raw":
            trained(raw_run, "raw", "base", data, 110 * grow, boundaries=bounds, **extra)
        else:
            trained("a_raw", "raw", "base", "raw", 110)
        if r.merge == "chat_vector":

            def merge(raw, chat, name):
                self.chat_vector(raw, chat, name, r.merge_args)
        else:
            merge = self.transplant
        merged(
            f"transplant_{r.name}",
            5,
            lambda: merge(raw_run, chat_run, f"transplant_{r.name}"),
            [f"model:{raw_run}", f"model:{chat_run}"],
        )
        if r.reattach_steps:
            trained(
                f"recipe_{r.name}",
                "reattach",
                f"transplant_{r.name}",
                "chat",
                60,
                boundaries=bounds,
                steps=r.reattach_steps,
            )
        else:  # the transplant itself is the recipe's model
            merged(
                r.model,
                1,
                lambda: _alias(self.models / f"transplant_{r.name}", self.models / r.model),
                [f"model:transplant_{r.name}"],
            )

    def _raw_run(self, r: Recipe) -> str:
        """The A-Raw a recipe needs: the vanilla one, or the run of the first recipe (in file order)
        with the same A-Raw settings, so recipes that differ only after A-Raw (how they merge)
        share one training."""
        if r.raw_key == VANILLA_RAW:
            return "a_raw"
        first = next(x for x in self.recipes if x.raw_key == r.raw_key)
        return f"a_raw_{first.name}"

    def model_names(self) -> list[str]:
        return [n for n in BASELINES if n in self.baselines] + [r.model for r in self.recipes]

    def evaluate(self, name: str) -> None:
        import torch

        from pipeline.evaluation.runner import evaluate_model

        torch.set_num_threads(self.threads)
        w = self.world
        metrics = evaluate_model(
            self.models / name,
            chat={
                "": [w / "chat_eval_format.jsonl", w / "chat_eval_new.jsonl"],
                "heldout_known": w / "chat_eval_heldout.jsonl",
            },
            raw={"new": w / "raw_eval_new.jsonl", "known": w / "raw_eval_known.jsonl"},
            probes={"new": w / "probe_new.jsonl"},
            max_new_tokens=self.s["max_new_tokens"],
            progress=False,
        )
        atomic_write_json(self.evals / f"{name}.json", metrics)

    def results(self) -> dict:
        return {n: json.loads((self.evals / f"{n}.json").read_text()) for n in self.model_names()}

    def report(self) -> None:
        from pipeline.evaluation.report import STANDARD_METRICS, write_report

        from .verdict import verdict_text

        models = self.results()
        table = write_report({"models": models}, self.out, columns=list(STANDARD_METRICS))
        verdict = verdict_text(models, [r.model for r in self.recipes])
        watched = {
            label: self.runs / run / "metrics.jsonl"
            for run, label in WATCHED.items()
            if (self.runs / run / "metrics.jsonl").exists()
        }
        curves = forgetting_report(watched, self.out / "forgetting.png")
        with open(self.out / "results.md", "a") as f:
            f.write("\n" + verdict + "\n" + (f"\n{curves}\n" if curves else ""))
        print("\n" + table + "\n\n" + verdict + (f"\n\n{curves}" if curves else ""), flush=True)

    # --- running the graph ------------------------------------------------------------------------
    def _claim_out(self) -> None:
        """One folder holds one demo. Reruns skip every step whose output exists, so a folder made
        with another seed, size or world would silently lend this run its models."""
        me = {"seed": self.seed, "size": self.size, "world": self.world_overrides, "base_steps": self.base_steps}
        f = self.out / "demo.json"
        if f.exists():
            was = json.loads(f.read_text())
            if was != me:
                changed = ", ".join(f"{k} {was.get(k)!r} -> {me[k]!r}" for k in me if was.get(k) != me[k])
                raise UserError(
                    f"{self.out} holds a demo made with other settings ({changed}); "
                    f"give this one its own --out (make demo DEMO_OUT=...)"
                )
        else:
            atomic_write_json(f, me)

    def run(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self._claim_out()
        steps = self.steps()
        done = {n for n, s in steps.items() if s.output is not None and s.output.exists()}
        todo = [s for n, s in steps.items() if n not in done]
        total = sum(s.est_s for s in todo)
        print(
            f"layer-aware demo: {len(steps)} steps ({len(done)} done already), about {total / 60:.0f} min of work "
            f"on {self.workers} worker(s) -> {self.out}",
            flush=True,
        )
        # The bar counts estimated seconds of work (each step's estimate when it completes).
        bar = tqdm(total=max(1, round(total)), unit=" est.s", desc="demo", position=0)
        lock, started = threading.Lock(), {}
        # transformers resolves its names lazily, and that is not thread-safe: two evaluations
        # starting at once can meet a half-built module ("cannot import name 'AutoTokenizer'").
        # Resolve what the in-process steps use here, before there are threads.
        import transformers

        for name in (
            "AutoConfig",
            "AutoModelForCausalLM",
            "AutoTokenizer",
            "GenerationConfig",
            "LlamaForCausalLM",
            "PreTrainedTokenizerFast",
        ):
            getattr(transformers, name)
        with ThreadPoolExecutor(self.workers) as pool:
            running = {}
            while todo or running:
                ready = [s for s in todo if all(n in done for n in s.needs)]
                for s in ready[: self.workers - len(running)]:
                    todo.remove(s)
                    with lock:
                        started[s.name] = time.time()
                        bar.write(f"  start {s.name} (est. {s.est_s:.0f}s)")
                    running[pool.submit(s.run)] = s
                if not running:
                    missing = sorted({n for s in todo for n in s.needs} - done - set(steps))
                    raise UserError(f"demo plan cannot continue: {', '.join(missing) or 'a cycle'}")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    s = running.pop(f)
                    f.result()  # a failed step stops the demo with its own message
                    done.add(s.name)
                    bar.write(f"  done  {s.name} ({time.time() - started[s.name]:.0f}s)")
                    bar.update(round(s.est_s))
        bar.close()


def eval_manifests(config: str) -> dict[str, tuple[str, str]]:
    """{set name: (demo data name, split)} of a demo config's `eval_data`. The YAML names paths in
    the default layout (runs/demo/data/NAME.manifest.json); the demo keeps NAME and its own folder."""
    from pipeline.config import eval_sources, read_yaml

    path = CONFIGS / f"{config}.yaml"
    data, _ = read_yaml(path)
    return {
        n: (Path(p).name.removesuffix(".manifest.json"), split)
        for n, (p, split) in eval_sources((data or {}).get("eval_data"), str(path)).items()
    }


def _alias(src: Path, dst: Path) -> None:
    """A recipe whose model is its transplant: a symlink, so nothing is written twice."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src.resolve(), dst)
