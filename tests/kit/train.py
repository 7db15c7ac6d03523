"""A tiny but real training setup: an HF tokenizer dir, a 4-layer Llama saved to disk, raw and
chat shards packed by `data_prep`, run configs, and the launchers that start the real entry
point on one process or several CPU ranks. Built once per test module (packing and saving take a
few seconds).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.training.dist import without_launcher

from .models import tiny_llama
from .tokenizers import conversations, documents, make_hf_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def build_setup(root: Path) -> dict:
    """Returns paths: tokenizer, model, raw manifest, chat manifest."""
    from transformers import AutoTokenizer

    from data_prep.__main__ import main as data_prep_main

    tok_dir = make_hf_tokenizer(root / "tok", vocab_size=300)
    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    model = tiny_llama(root / "model", vocab, tokenizer_dir=tok_dir)  # a user's model dir carries its tokenizer
    raw = write_jsonl(root / "raw.jsonl", [{"text": d} for d in documents(200, seed=3)])
    chat = write_jsonl(root / "chat.jsonl", conversations(150, seed=4))
    data_prep_main(
        [
            "raw",
            str(raw),
            "--tokenizer",
            str(model),
            "--output-prefix",
            str(root / "data/raw"),
            "--val-fraction",
            "0.05",
        ]
    )
    data_prep_main(
        [
            "chat",
            str(chat),
            "--tokenizer",
            str(model),
            "--output-prefix",
            str(root / "data/chat"),
            "--val-fraction",
            "0.05",
        ]
    )
    return {
        "root": root,
        "model": model,
        "raw": root / "data/raw.manifest.json",
        "chat": root / "data/chat.manifest.json",
    }


_SHARED: dict[str, Path] = {}


def shared_setup(tmp_path_factory) -> dict:
    """build_setup's inputs built once per test session (training the tokenizer, saving the model
    and two data_prep runs: a few seconds, paid by a dozen modules otherwise), handed to each caller
    in a root of its own. The tokenizer, model, corpora and shard files are links to the shared,
    never-written copies; root and root/data are real folders, so whatever a test writes there (runs,
    configs, more shards) stays its own. Tests that move or copy the project folder itself build
    their own with build_setup."""
    if "base" not in _SHARED:
        _SHARED["base"] = tmp_path_factory.mktemp("shared_setup")
        build_setup(_SHARED["base"])
    base, root = _SHARED["base"], tmp_path_factory.mktemp("setup")
    for name in ("tok", "model", "raw.jsonl", "chat.jsonl"):
        (root / name).symlink_to(base / name)
    (root / "data").mkdir()
    for f in (base / "data").iterdir():
        (root / "data" / f.name).symlink_to(f)
    return {
        "root": root,
        "model": root / "model",
        "raw": root / "data/raw.manifest.json",
        "chat": root / "data/chat.manifest.json",
    }


def write_config(path: Path, setup: dict, phase: str, out: Path, **overrides) -> Path:
    cfg = {
        "model": str(setup["model"]),
        "data": str(setup["chat" if phase == "chat" else "raw"]),
        "phase": phase,
        "raw_start": 1,
        "format_start": 3,
        "seq_len": 16,
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "steps": 10,
        "lr": 3e-3,
        "warmup_steps": 2,
        "out": str(out),
        "save_every": 5,
        "keep_last": 2,
        "seed": 1,
    }
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env() -> dict:
    # Hermetic: a launcher's variables in the test runner's shell must not make a child think
    # it is a rank of some other job.
    e = without_launcher(os.environ)
    e["PATH"] = f"{VENV_BIN}:{e['PATH']}"
    e["PYTHONPATH"] = str(REPO)  # `pipeline`, `data_prep` and `tests.kit`
    return e


def run_train(
    args: list[str],
    ranks: int = 1,
    timeout: int = 400,
    check: bool = True,
    launcher: str = "python",
    env: dict | None = None,
):
    """Run the real entry point: one process, or `deepspeed --num_gpus N` CPU ranks (`env` on top of
    the hermetic environment; a None value removes the variable)."""
    if ranks == 1 and launcher == "python":
        cmd = [sys.executable, "-m", "pipeline.train", *args]
    else:
        cmd = [
            str(VENV_BIN / "deepspeed"),
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
            "--module",
            "pipeline.train",
            *args,
        ]
    e = {k: v for k, v in {**globals()["env"](), **(env or {})}.items() if v is not None}
    p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed_script(script: str, args: list[str], ranks: int, timeout: int = 600):
    """`deepspeed --num_gpus N script args...` on CPU ranks; fails the test with the ranks' output."""
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def build_template_setup(root: Path, conversations_n: int = 60) -> dict:
    """The usual base model: its tokenizer has no chat template and its eos is the text's end
    (<|endoftext|>, not <|im_end|>). Chat data packed with a ChatML template *file*
    (`data_prep chat --chat-template chatml.jinja`), all of it in the train split, so a test can
    compare every stored conversation with what a model directory's tokenizer renders.
    Returns paths: tokenizer, model, chat manifest, template file, conversations (.jsonl)."""
    from transformers import AutoTokenizer

    from data_prep.__main__ import main as data_prep_main

    from .tokenizers import CHATML

    tok_dir = make_hf_tokenizer(root / "tok", vocab_size=300, chat_template=None)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = tiny_llama(
        root / "model",
        len(tok),
        tokenizer_dir=tok_dir,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    template = root / "chatml.jinja"
    template.write_text(CHATML)
    chat = write_jsonl(root / "chat.jsonl", conversations(conversations_n, seed=4))
    data_prep_main(
        [
            "chat",
            str(chat),
            "--tokenizer",
            str(model),
            "--chat-template",
            str(template),
            "--output-prefix",
            str(root / "data/chat"),
            "--val-fraction",
            "0",
        ]
    )
    return {
        "root": root,
        "tokenizer": tok_dir,
        "model": model,
        "chat": root / "data/chat.manifest.json",
        "template": template,
        "conversations": chat,
    }
