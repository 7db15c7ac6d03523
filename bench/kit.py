"""What the benchmarks build around the product: random Llama models, a tokenizer, free ports and
the environment of a child process. Nothing here is product code, nor test code.

Models come from the product's one model factory (`pipeline.hf.save_random_model`), so a bench
model is an ordinary HF directory loaded by the same code as a user's checkpoint. The config is
written out here, shape by shape, rather than taken from the demo's `model_config`: that one sizes
the vocabulary from its tokenizer and derives the MLP width from the hidden size, while the
published figures (bench/results) are for the exact shapes in each benchmark's SIZES.

The tokenizer is only an identity: benchmark shards hold random ids over the model's whole
vocabulary (bench.synth), so any tokenizer the trainer and the converters can load will do. A
fixed word-level vocabulary needs no training and loads in milliseconds.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def llama_config(
    vocab_size: int,
    layers: int = 4,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_position: int = 128,
    tie: bool = False,
    **extra,
):
    """A Llama config of this shape (transformers' defaults for everything else)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie,
        **extra,
    )


def random_llama(
    out: Path, vocab_size: int, seed: int = 0, tokenizer_dir=None, dtype=None, device: str = "cpu", **shape
) -> Path:
    """A seeded random-init Llama of `shape` (see llama_config) saved to `out`, with the tokenizer's
    files when given: through pipeline.hf.save_random_model, the product's factory."""
    from pipeline.hf import save_random_model

    return save_random_model(
        llama_config(vocab_size, **shape), out, tokenizer_dir=tokenizer_dir, seed=seed, dtype=dtype, device=device
    )


WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"] + (
    "hello world what is the capital of france paris a b c d e f g h i j k l m n o p".split()
)


def make_tokenizer(out: Path) -> Path:
    """A word-level fast tokenizer (a real `tokenizers` model, no chat template) saved to `out`:
    ids 0-2 are <unk>, <s> (bos) and </s> (eos, also pad), as in transformers' Llama config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def free_port() -> int:
    """A TCP port nobody listens on right now (for a launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    """The environment of a child that runs repository code: this one without any launcher's
    variables (a benchmark started from inside some job must not make its child think it is a rank
    of that job), this Python's bin first on PATH (the same `ninja` builds DeepSpeed's CPU op, see
    bench.run.venv_path_first) and the repository on PYTHONPATH; then `extra`."""
    from pipeline.training.dist import without_launcher

    env = without_launcher(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def deepspeed_cmd(ranks: int, *args: str) -> list[str]:
    """`deepspeed --num_gpus RANKS --master_port PORT ARGS...` with this Python's launcher."""
    return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), *args]
