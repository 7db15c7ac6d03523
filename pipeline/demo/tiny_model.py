"""A tiny, randomly initialised Llama saved as an ordinary HF model directory (weights, config,
generation config and tokenizer side by side), so the demo's base and every test model go
through the same loading code as a user's checkpoint."""
from __future__ import annotations

from pathlib import Path

from data_prep.common import atomic_dir


def make_tiny_llama(tokenizer_dir, out_dir, layers: int = 8, hidden: int = 128, heads: int = 4,
                    kv_heads: int = 2, intermediate: int | None = None, max_position: int = 512,
                    tie: bool = False, seed: int = 0, force: bool = False) -> Path:
    """Write a seeded random LlamaForCausalLM (vocab = the tokenizer's) to out_dir.

    kv_heads < heads gives grouped-query attention, like current Llama/Qwen models, so the
    pipeline's weight mapping is exercised on the shapes it will meet. intermediate defaults to
    the usual ~8/3 x hidden, rounded to a multiple of 32.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if intermediate is None:
        intermediate = -(-hidden * 8 // 3 // 32) * 32
    eos = tok.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position, tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-5, rope_theta=10000.0,
    )
    # fork_rng: seeding here must not change the caller's global random state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out_dir
