"""Tiny real tokenizers and corpora, built in a temp dir in well under a second.

Nothing can be downloaded here, so tests train their own: a SentencePiece BPE `.model`, and an
HF fast tokenizer directory (byte-level BPE, like Llama 3 / Qwen) with a ChatML template.
Both are loaded back through the real loading code (data_prep.tokenizer.load_tokenizer,
AutoTokenizer.from_pretrained). Other test files import these builders.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np

WORDS = (
    "the a of and to in is was for on that with as by at from it an be this are "
    "river mountain city king queen library engine layer model token shard window "
    "north south east west ancient modern small large quick brown fox jumps lazy dog "
    "alpha beta gamma delta seven eleven hundred thousand purple orange yellow "
    "Paris Lyon Oslo Bergen museum bridge harbour castle garden winter summer"
).split()

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


# Today's templates, cut to what matters for locating assistant turns (no tools), written from
# the published Qwen3 and Llama 3.2 chat templates.
# Qwen3: the assistant turns after the last user message get a think block, earlier ones do not;
# this variant's generation prompt also adds the empty think block (enable_thinking=False).
QWEN3 = (
    "{%- set ns = namespace(last_query_index=messages|length - 1, found=false) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if not ns.found and message.role == 'user' %}{%- set ns.found = true %}"
    "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- if loop.index0 > ns.last_query_index and loop.last %}"
    "{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message.content }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + message.content }}{%- endif %}"
    "{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is not defined or enable_thinking is false %}"
    "{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"
)
# Llama 3.2: every conversation opens with a system header dated by strftime_now, content trimmed.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\n' }}{{- 'Today Date: ' + date_string + '\n\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def sentence(rng: random.Random, n: int | None = None) -> str:
    words = [rng.choice(WORDS) for _ in range(n or rng.randint(4, 14))]
    return " ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ","])


def document(rng: random.Random, sentences: int | None = None) -> str:
    return " ".join(sentence(rng) for _ in range(sentences or rng.randint(1, 8)))


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [document(rng) for _ in range(n)]


def make_sp_model(tmp: Path, vocab_size: int = 400) -> Path:
    """A SentencePiece BPE model trained on WORDS text; returns the .model path."""
    import sentencepiece as spm

    tmp.mkdir(parents=True, exist_ok=True)
    text = tmp / "sp_train.txt"
    text.write_text("\n".join(documents(300, seed=1)) + "\nÜnïcödé ünïcödé 0123456789 ?!.,:;\n")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp / "sp"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        character_coverage=1.0,
    )
    return tmp / "sp.model"


def make_hf_tokenizer(
    out: Path,
    vocab_size: int = 512,
    chat_template: str | None = CHATML,
    corpus_seed: int = 2,
    eos_token: str = "<|endoftext|>",
    extra_specials: tuple[str, ...] = (),
    bos_token: str | None = None,
) -> Path:
    """An HF fast tokenizer directory (byte-level BPE; ChatML specials plus `extra_specials`; eos
    <|endoftext|> unless told). Another corpus_seed gives another tokenizer of the same size (other
    merges, other ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS + list(extra_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(documents(300, seed=corpus_seed), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos_token, pad_token="<|pad|>", bos_token=bos_token, unk_token=None
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def write_jsonl(path: Path, records: list) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def conversations(n: int, seed: int = 0, sharegpt: bool = False, system: bool = True) -> list[dict]:
    """n multi-turn conversations (some with a system message, unless system=False) in OpenAI or
    ShareGPT form."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": sentence(rng)}] if rng.random() < 0.4 and system else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": sentence(rng)})
            msgs.append({"role": "assistant", "content": document(rng, rng.randint(1, 3))})
        if sharegpt:
            names = {"system": "system", "user": "human", "assistant": "gpt"}
            out.append({"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in msgs]})
        else:
            out.append({"messages": msgs})
    return out


def read_shard(prefix_dir: Path, name: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Parse .idx by hand (not with data_prep.mmidx) and split .bin into documents."""
    idx = (prefix_dir / f"{name}.idx").read_bytes()
    magic, version, code, n, d = struct.unpack_from("<9sQBQQ", idx)
    assert magic == b"MMIDIDX\x00\x00" and version == 1
    dtype = {8: np.uint16, 4: np.int32, 1: np.uint8}[code]
    off = 9 + 8 + 1 + 8 + 8
    sizes = np.frombuffer(idx, "<i4", n, off)
    pointers = np.frombuffer(idx, "<i8", n, off + 4 * n)
    doc_idx = np.frombuffer(idx, "<i8", d, off + 12 * n)
    assert len(idx) == off + 12 * n + 8 * d
    assert d == n + 1 and (doc_idx == np.arange(n + 1)).all()
    item = np.dtype(dtype).itemsize
    assert (pointers == np.concatenate([[0], np.cumsum(sizes)[:-1]]) * item).all()
    data = np.fromfile(prefix_dir / f"{name}.bin", dtype=dtype)
    assert len(data) == sizes.sum()
    docs = [data[p // item : p // item + s] for p, s in zip(pointers, sizes)]
    return np.dtype(dtype), docs
