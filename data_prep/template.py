"""The chat template: rendering a conversation with it, where each assistant turn lies in the text,
the token that ends that turn, and how a template is named in records.

One module decides these, so that what data_prep trains and what an exported model is told agree:
the end-of-turn token that `pipeline.convert` adds to generation_config.json's eos_token_id is
found by the same span rule that puts that token in the loss mask (data_prep/chat.py), so a
model stops at exactly the token it learned to write at the end of every reply.

The assistant span of message i, found with the template itself (any template, any syntax):

    prompt_i = render(messages[:i], add_generation_prompt=True)   # ends right after the header
    upto_i   = render(messages[:i+1])                             # ends after the turn
    span i   = [len(prompt_i), len(upto_i.rstrip()))              # content + end-of-turn token

The whitespace the template puts between turns (ChatML's "\\n" after <|im_end|>) is not part of
the turn. Today's templates bend this rule in known ways, and these are handled:

- The generation prompt holds more than the rendered history does. Qwen3 with
  `enable_thinking=False` adds an empty `<think>\\n\\n</think>\\n\\n` to the prompt that earlier
  turns of the full render lack. The turn then starts where prompt_i and the full render part,
  provided they part after the history (render(messages[:i]) is still a prefix of the full render).
- The last turn is rendered differently from the same turn inside a longer conversation. Qwen3
  writes the think block only on the assistant turns after the last user message, so upto_i is not
  a prefix of the full render. The turn then ends where its content, followed by what upto_i
  writes after the content (the end-of-turn token), ends in the full render.
- Templates that date their system message (Llama 3.1/3.2: "Today Date: ...", through
  `strftime_now`) open every conversation with a system header the messages do not hold; the
  shards then carry the packing day's date, as the model will see its own day when prompted.

Anything else (a template that rewrites earlier turns) is a BadRecord naming the message index,
which data_prep reports with the record's file and line.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import UserError


class BadRecord(Exception):
    """A record that cannot be used; becomes `file:line: why` (or is skipped with --skip-bad)."""


def template_text(tok) -> str | None:
    """The template `tok` renders with when no tools are given: its own string, or the `default`
    of named templates (transformers' rule)."""
    t = getattr(tok, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    return t or None


def tokenizer_template(path: str | Path, flag: str = "--tokenizer") -> str | None:
    """The template a tokenizer directory (or SentencePiece .model: none) renders with, as
    transformers loads it: chat_template.jinja before tokenizer_config.json's entry."""
    from .tokenizer import load_tokenizer

    return template_text(load_tokenizer(path, flag=flag))


def template_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_template_file(path: str | Path, flag: str = "--chat-template") -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise UserError(f"{flag} {path}: the file is empty")
    return text


def manifest_template(manifest: dict) -> dict | None:
    """{text, sha256, from} of the template a chat manifest's shards were rendered with; None for
    raw shards. Manifests written before the hash was recorded get it computed from the text."""
    text = manifest.get("chat_template") if manifest.get("kind") == "chat" else None
    if isinstance(text, dict):  # named templates recorded whole by older versions
        text = text.get("default")
    if not text:
        return None
    return {
        "text": text,
        "sha256": manifest.get("chat_template_sha256") or template_sha256(text),
        "from": manifest.get("chat_template_from") or "the packing tokenizer's own template",
    }


class Renderer:
    """Chat template rendering plus the assistant character spans (see the module docstring).
    `flag` names the template's origin in errors (`--chat-template FILE`, `--tokenizer DIR`)."""

    def __init__(self, tok, template_flag: str):
        self.tok, self.flag = tok, template_flag

    def render(self, msgs: list[dict], gen: bool) -> str:
        import jinja2

        try:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{self.flag}: template syntax error at line {e.lineno}: {e.message}") from None
        except Exception as e:  # noqa: BLE001 - templates raise their own errors for bad input
            raise BadRecord(f"the chat template refused it ({type(e).__name__}: {e})") from None

    def __call__(self, msgs: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        full = self.render(msgs, gen=False)
        return full, [self._span(full, msgs, i) for i, m in enumerate(msgs) if m["role"] == "assistant"]

    def _span(self, full: str, msgs: list[dict], i: int) -> tuple[int, int]:
        def cannot(why: str) -> BadRecord:
            return BadRecord(
                f"message {i} (assistant): the chat template ({self.flag}) {why}, so the turn's "
                f"tokens cannot be located; a template that rewrites earlier turns cannot be "
                f"trained on turn by turn"
            )

        prompt = self.render(msgs[:i], gen=True) if i else self._empty_prompt()
        history = self.render(msgs[:i], gen=False) if i else ""
        if not full.startswith(history):
            raise cannot(f"renders messages 0-{i - 1} differently inside the whole conversation")
        a = len(prompt)
        if not full.startswith(prompt):  # the prompt adds what the history lacks (Qwen3's think block)
            a = len(history)
            while a < len(prompt) and a < len(full) and prompt[a] == full[a]:
                a += 1
        upto = self.render(msgs[: i + 1], gen=False)
        if full.startswith(upto) and len(upto.rstrip()) > a:
            return a, len(upto.rstrip())
        # This turn rendered as the last one differs from it inside the whole (Qwen3 gives only the
        # final turns a think block): end where its content and its end-of-turn text end in the whole.
        content = str(msgs[i].get("content", "")).strip()
        k_upto = upto.rfind(content) if content else -1
        k_full = full.find(content, a) if content else -1
        if k_upto < 0 or k_full < 0:
            raise cannot("does not write this turn's content where the generation prompt ends")
        tail = upto[k_upto + len(content) :].rstrip()
        end = k_full + len(content)
        if not full.startswith(tail, end):
            raise cannot(f"ends this turn with {tail!r} when it is the last one, and otherwise inside the whole")
        return a, end + len(tail)

    def _empty_prompt(self) -> str:
        # An assistant turn first: the prompt is whatever the template emits before any message.
        try:
            return self.render([], gen=True)
        except BadRecord:
            return ""


def end_of_turn_ids(tok) -> list[int]:
    """The special token(s) `tok`'s chat template writes at the end of an assistant turn (inside
    the span the loss mask trains, after the reply): what must stop generation. Llama-3 ends turns
    with <|eot_id|> but text with <|end_of_text|>, ChatML with <|im_end|>; a model whose generation
    config knows only the text's end runs on past its turn in plain `generate()`. Empty when there
    is no template, it refuses a plain user/assistant exchange, or it ends turns without one."""
    msgs = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    try:
        full, [(a, b)] = Renderer(tok, "the chat template")(msgs)
    except (UserError, BadRecord, ValueError):
        return []
    k = full.find("pong", a, b)
    if k < 0:
        return []
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    for t in tok(full[k + len("pong") : b], add_special_tokens=False)["input_ids"]:
        if t in special:
            return [t]
    return []


def template_special_ids(tok) -> set[int]:
    """Every special token the template writes around messages (role headers, turn ends): rendered
    for a system+user+assistant exchange, a user+assistant one and a generation prompt, so
    templates that refuse a system role still count."""
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    ids: set[int] = set()
    for conv, gen in ((msgs, False), (msgs[1:], False), (msgs[1:2], True)):
        try:
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        except Exception:  # noqa: BLE001 - a template without a system role, say
            continue
        ids |= {t for t in tok(text, add_special_tokens=False)["input_ids"] if t in special}
    return ids
