"""Tiny model configs, written through the product's one factory (pipeline.hf.save_random_model),
so every test model is an ordinary HF directory loaded by the same code as a user's checkpoint."""

from __future__ import annotations

from pathlib import Path

from pipeline.hf import save_random_model


def tiny_llama_config(
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


def tiny_llama(
    out: Path, vocab_size: int, seed: int = 0, tokenizer_dir=None, dtype=None, device: str = "cpu", **shape
) -> Path:
    return save_random_model(
        tiny_llama_config(vocab_size, **shape), out, tokenizer_dir=tokenizer_dir, seed=seed, dtype=dtype, device=device
    )


def demo_llama(
    tokenizer_dir, out: Path, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2, seed: int = 0
) -> Path:
    """The demo's base shape (pipeline.demo.run.model_config) at a test size."""
    from pipeline.demo.run import model_config

    config, generation = model_config(tokenizer_dir, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads)
    return save_random_model(config, out, tokenizer_dir=tokenizer_dir, seed=seed, generation_config=generation)
