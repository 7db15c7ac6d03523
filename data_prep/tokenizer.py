"""Loading the tokenizer (an HF directory or a SentencePiece .model) and encoding fast.

Both kinds end up as a transformers *fast* tokenizer: a `.model` file is converted into one
(the same conversion `from_pretrained` does for Llama-style repos that ship only
`tokenizer.model`), so the rest of the code has one code path: the Rust tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError
from .files import sha256_file

# Files that define a tokenizer and its chat template: what data_prep hashes into a manifest and
# what export and transplant copy, byte for byte, into a model directory. A model directory also
# holds weights (GBs); hashing those would make every data-prep run slow for nothing.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def load_tokenizer(path: str | os.PathLike, flag: str = "--tokenizer"):
    """A transformers fast tokenizer from an HF tokenizer directory or a SentencePiece .model."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file or directory")
    # Imported here: transformers takes seconds to import and `--help` should not wait for it.
    import transformers

    transformers.logging.set_verbosity_error()
    if path.is_file():
        if path.suffix != ".model":
            raise UserError(f"{flag} {path}: expected an HF tokenizer directory or a SentencePiece .model file")
        return _from_sentencepiece(path, flag)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types; all mean "bad dir"
        raise UserError(f"{flag} {path}: cannot load a tokenizer from it ({type(e).__name__}: {e})") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"{flag} {path}: only fast (Rust) tokenizers are supported; save it with a tokenizer.json")
    return tok


def _from_sentencepiece(path: Path, flag: str):
    from transformers import TokenizersBackend

    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{flag} {path}: not a SentencePiece model ({e})") from None
    # from_pretrained wants a directory holding `tokenizer.model`; build the fast tokenizer from
    # a private copy, then check it against sentencepiece itself so a lossy conversion is an
    # error here rather than silently different tokens in the shards.
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(path, Path(d) / "tokenizer.model")
        tok = TokenizersBackend.from_pretrained(d)
    probe = "Hello world, this is a probe:\n  tabs\tand ünïcödé 123."
    if tok(probe, add_special_tokens=False)["input_ids"] != sp.encode(probe):
        raise UserError(
            f"{flag} {path}: converting this SentencePiece model to a fast tokenizer "
            "changes its tokens; save it as an HF tokenizer directory instead"
        )
    tok.name_or_path = str(path)
    return tok


def vocab_size(tok) -> int:
    """Number of token ids (base vocab + added tokens): what the embedding must cover."""
    return len(tok)


def tokenizer_identity(path: str | os.PathLike, tok=None) -> dict:
    """What the manifest records about the tokenizer: enough to refuse a mismatched model later."""
    path = Path(path)
    if path.is_file():
        files = {path.name: sha256_file(path)}
    else:
        files = {n: sha256_file(path / n) for n in TOKENIZER_FILES if (path / n).is_file()}
    combined = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in sorted(files.items())).encode())
    tok = tok if tok is not None else load_tokenizer(path)
    return {
        "name": path.name,
        "path": str(path),
        "sha256": combined.hexdigest(),
        "files": files,
        "vocab_size": vocab_size(tok),
        "eos_token_id": tok.eos_token_id,
        "encoding_sha256": encoding_sha256(tok),
    }


def encoding_sha256(tok) -> str:
    """A hash of everything that decides which ids a text becomes: the Rust tokenizer's own
    canonical serialisation (normalizer, pre-tokenizer, vocabulary and merges, added tokens).
    Unlike the file hashes it ignores the chat template and file formatting, so a model directory
    holding a byte-different copy of the same tokenizer still matches its data."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


@contextlib.contextmanager
def threads(workers: int):
    """Let the Rust tokenizer encode batches on `workers` threads inside this block.

    The tokenizer's thread pool is sized once, at its first parallel call, so in a fresh
    process (the CLI) this must come before any encoding. TOKENIZERS_PARALLELISM is read at
    every call; it is restored afterwards because other code in the same process (the
    trainer's data loader, other tests) wants it off.
    """
    names = ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")
    saved = {n: os.environ.get(n) for n in names}
    os.environ["RAYON_NUM_THREADS"] = str(workers)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if workers > 1 else "false"
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def plain_backend(tok):
    """The Rust tokenizer with any saved truncation/padding switched off.

    A tokenizer.json may carry `truncation: {max_length: 512}`; `tok(...)` overrides that per
    call, but the backend called directly would silently cut every document.
    """
    backend = tok.backend_tokenizer
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    return backend


def encode_batches(tok, batches: Iterator[list[str]]) -> Iterator[list]:
    """Rust encodings (ids only, no special tokens) of each batch of texts.

    Calls the backend's `encode_batch_fast` directly: it skips the character offsets and the
    Python list-of-lists that `tok(texts)` builds. It runs on the threads that `threads()`
    allows and releases the GIL while it works, so a thread can convert the previous batch.
    """
    backend = plain_backend(tok)
    for texts in batches:
        yield backend.encode_batch_fast(texts, add_special_tokens=False)


def to_arrays(encs: list, dtype: np.dtype) -> tuple[list, np.ndarray]:
    """Each encoding's ids as a numpy array of `dtype`, plus their lengths."""
    try:
        arrays = [np.array(e.ids, dtype=dtype) for e in encs]
    except OverflowError as e:  # numpy refuses ids that do not fit: never silently wrap
        raise ValueError(f"a token id does not fit {np.dtype(dtype)}: {e}") from None
    return arrays, np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
