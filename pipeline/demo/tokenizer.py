"""The demo's tokenizer: SentencePiece trained on the world's text, saved as an HF tokenizer
directory with a chat template, so the demo loads it through the same code as a user's model.

Chat format (ChatML-like, one line per turn):

    <|im_start|>user When was Ana Berg born?<|im_end|>
    <|im_start|>assistant March 1984<|im_end|>

`<|im_start|>` and `<|im_end|>` are single special tokens; `<|im_end|>` is the end-of-turn and the
tokenizer's eos. The role is followed by a SPACE rather than ChatML's newline, on purpose: a
SentencePiece word carries its leading space ("▁Lisbon"), so after a space the reply's first word
is the same token as in the biographies ("grew up in Lisbon"). After a newline it would be a
different token ("Lis" "bon"), and a tiny model would have to learn that the two spellings are
the same city before any knowledge could flow from raw text into chat answers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from data_prep.errors import UserError
from data_prep.files import atomic_dir

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# {% generation %} marks the assistant tokens, so `return_assistant_tokens_mask` can put the
# chat loss on them only. The reply keeps its leading space inside the marked span: it is part
# of the reply's first token.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|im_start|>assistant{% generation %} {{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{%- else -%}"
    "<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{%- endif -%}"
)


def _lines(path: Path):
    """Training sentences of one file: jsonl `text` or chat `messages`, or plain text lines."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                yield line.rstrip("\n")
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if "text" in rec:
                yield from rec["text"].split("\n")
            for m in rec.get("messages", ()):
                yield f"{m['role']} {m['content']}"


def build_tokenizer(text_files, out_dir, vocab_size: int = 1024, force: bool = False) -> Path:
    """Train a byte-fallback BPE SentencePiece model on text_files and save an HF tokenizer
    directory (tokenizer.json, tokenizer_config.json, chat_template.jinja) in out_dir."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    sentences = [s for f in text_files for s in _lines(Path(f)) if s.strip()]
    if not sentences:
        raise UserError(f"no text to train the tokenizer on in {', '.join(map(str, text_files))}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        # byte fallback: any text a user types still encodes (as bytes), never as <unk>
        byte_fallback=True,
        character_coverage=1.0,
        # one thread and no sampling: the same text gives the same vocabulary, bit for bit
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        # identity normalization keeps the text as written (no NFKC, no whitespace folding), so
        # decode(encode(x)) == x and the chat template's newlines survive
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,  # numbers as digit sequences: arithmetic turns do not eat the vocab
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        user_defined_symbols=[IM_START, IM_END],
        minloglevel=2,
    )
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, force=force) as tmp:
        sp_path = tmp / "spm.model"  # the converter reads a file; removed before the rename
        sp_path.write_bytes(model.getvalue())
        kwargs = LlamaTokenizer.convert_to_native_format(
            vocab_file=str(sp_path),
            unk_token="<unk>",
            bos_token="<s>",
            eos_token=IM_END,
            pad_token="<pad>",
            legacy=False,
            add_prefix_space=False,
        )
        tok = LlamaTokenizer(**kwargs, add_bos_token=False, add_eos_token=False, extra_special_tokens=[IM_START])
        tok.chat_template = CHAT_TEMPLATE
        tok.model_max_length = 1 << 20  # no practical limit: the model config decides
        sp_path.unlink()
        tok.save_pretrained(tmp)
    return out_dir
