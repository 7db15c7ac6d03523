"""Tiny models with the real families' config quirks, at the published shape ratios, scaled down:

    llama3   GQA 4:1 (32 heads : 8 KV), MLP 3.5x, rope_theta 5e5 with `rope_scaling` type llama3,
             untied; special tokens at the top of the vocabulary (128k-style), a base that ends
             text with <|end_of_text|> and an instruct tokenizer that ends turns with <|eot_id|>
    qwen2.5  GQA 7:1 (14 : 2), MLP 5.4x, q/k/v biases, tied embeddings, ChatML (<|im_end|>)
    mistral  GQA 4:1, MLP 3.5x, a sliding window shorter than the training sequence, [INST] turns

Each family comes as a base X (its chat-token embedding rows untrained, as a real base's are) and
an instruct sibling X-Instruct (every tensor moved, those rows trained, the chat template and an
end-of-turn stop), written through the product's one model factory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.hf import save_random_model

from .tokenizers import documents

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
    "+ m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)

FAMILIES = {
    # specials (appended after the trained vocabulary, so they sit at the top ids), bos, base eos,
    # instruct eos (what ends a turn), template, and the chat tokens a base never trained (the
    # template's own specials beyond the base's bos/eos)
    "llama3": dict(
        specials=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|reserved_special_token_2|>",
            "<|eot_id|>",
        ],
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        turn_end="<|eot_id|>",
        template=LLAMA3_TEMPLATE,
        chat=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "qwen2.5": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None,
        eos="<|endoftext|>",
        turn_end="<|im_end|>",
        template=CHATML_TEMPLATE,
        chat=["<|im_start|>", "<|im_end|>"],
    ),
    "mistral": dict(
        specials=["<s>", "</s>", "[INST]", "[/INST]"],
        bos="<s>",
        eos="</s>",
        turn_end="</s>",
        template=MISTRAL_TEMPLATE,
        chat=["[INST]", "[/INST]"],
    ),
}


def model_config(family: str, vocab_size: int, ids: dict, layers: int = 4):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if family == "llama3":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=224,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=256,
            rope_theta=500000.0,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            **ids,
        )
    if family == "qwen2.5":
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=56,
            intermediate_size=304,
            num_hidden_layers=layers,
            num_attention_heads=7,
            num_key_value_heads=1,
            max_position_embeddings=256,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            **ids,
        )
    if family == "mistral":
        return MistralConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=224,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=256,
            sliding_window=8,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            **ids,
        )
    raise KeyError(family)


def tokenizers(family: str, root: Path) -> tuple[Path, Path]:
    """(base tokenizer dir, instruct tokenizer dir): one vocabulary, the instruct one with the chat
    template and the end-of-turn token as its eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    f = FAMILIES[family]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        documents(300, seed=2),
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    out = []
    for name, eos, template in (("tok", f["eos"], None), ("tok-instruct", f["turn_end"], f["template"])):
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(backend.to_str()))
        tok.add_special_tokens({"additional_special_tokens": f["specials"]})
        tok.eos_token, tok.bos_token, tok.pad_token = eos, f["bos"], f["eos"]
        if template:
            tok.chat_template = template
        tok.save_pretrained(str(root / name))
        out.append(root / name)
    return out[0], out[1]


def build(family: str, root: Path) -> dict:
    """Base X and X-Instruct of one family under root; returns their paths and the chat-token ids."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    f = FAMILIES[family]
    tok_dir, inst_tok = tokenizers(family, root)
    tok = AutoTokenizer.from_pretrained(str(inst_tok))
    to_id = tok.convert_tokens_to_ids
    ids = dict(
        bos_token_id=to_id(f["bos"]) if f["bos"] else None, eos_token_id=to_id(f["eos"]), pad_token_id=to_id(f["eos"])
    )
    chat_tokens = sorted(to_id(t) for t in f["chat"])
    config = model_config(family, len(tok), ids)
    base = save_random_model(config, root / "X", tokenizer_dir=tok_dir, seed=0)
    weights = load_file(str(base / "model.safetensors"))
    weights["model.embed_tokens.weight"][chat_tokens] = 0.0  # a base never trained its chat tokens
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    stop = sorted({ids["eos_token_id"], to_id(f["turn_end"])})
    instruct = save_random_model(
        config,
        root / "X-Instruct",
        tokenizer_dir=inst_tok,
        seed=1,
        generation_config={**ids, "eos_token_id": stop if len(stop) > 1 else stop[0]},
    )
    with torch.no_grad():  # the instruct's chat rows are trained: clearly not zero
        w = load_file(str(instruct / "model.safetensors"))
        assert w["model.embed_tokens.weight"][chat_tokens].abs().sum() > 0
    return {
        "base": base,
        "instruct": instruct,
        "tok": tok_dir,
        "chat_tok": inst_tok,
        "chat_tokens": chat_tokens,
        "turn_end": to_id(f["turn_end"]),
    }
