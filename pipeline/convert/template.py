"""The chat template a written model ships (export, transplant, chat vector), decided here only.

Rule 1, the trained template beats the tokenizer's own: a model ships the template its weights
were trained with, not whatever its tokenizer directory holds. A run that trained on chat data
recorded its data's template (run.json `chat_template`, copied from the chat manifest); a
directory this pipeline wrote records the template it ships and whether its weights were trained
with it (`chat_template` in export.json / transplant.json / chat_vector.json), and a run started
from such a directory inherits that. Only without either does the tokenizer directory's own
template ship. When the trained template replaces a different one, or fills a tokenizer that has
none (a base model's), the command says so on stderr and the record keeps both hashes.

Rule 2, a merge ships its format side's template: --chat's (transplant, chat vector) or --donor's,
by rule 1. Another input whose weights were trained with a different template (or with one where
the format side has none) is refused, naming both records, unless --chat-template-from names the
input whose template the result ships. --base, and inputs with no record of training on a
template, never conflict: a tokenizer's template says nothing about what the weights learned
(a base model's tokenizer may well carry an instruct template).

Written as transformers 5 reads it: chat_template.jinja (read before tokenizer_config.json), or
the tokenizer's existing `chat_template` entry rewritten in place (a named `default` among named
templates), then loaded back to check it renders with exactly this text. The end-of-turn token is
derived afterwards from the tokenizer as written (hf_files.py), so it always matches the template
shipped.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import UserError
from data_prep.files import atomic_write_json, atomic_write_text
from data_prep.template import template_sha256, tokenizer_template

RECORDS = ("export.json", "transplant.json", "chat_vector.json")  # what pipeline.convert writes beside a model
JINJA = "chat_template.jinja"


@dataclass(frozen=True)
class ChatTemplate:
    text: str | None
    origin: str  # where it comes from, in words, naming the file
    trained: bool  # the weights were trained on chat rendered with it
    record: str  # the file that says so (run.json, export.json, ...), or the tokenizer directory

    @property
    def sha256(self) -> str | None:
        return template_sha256(self.text) if self.text else None

    def short(self) -> str:
        return f"sha256 {self.sha256[:12]}" if self.text else "no template"


def _written_record(model_dir: Path, who: str) -> ChatTemplate | None:
    """The trained template a directory written by pipeline.convert records, if it records one."""
    for name in RECORDS:
        f = Path(model_dir) / name
        if f.is_file():
            try:
                rec = json.loads(f.read_text()).get("chat_template")
            except (json.JSONDecodeError, AttributeError) as e:
                raise UserError(f"{f}: unreadable record ({e})") from None
            if isinstance(rec, dict) and rec.get("trained") and rec.get("text"):
                return ChatTemplate(
                    rec["text"], f"the chat template {who} was trained with ({f}: {rec.get('from')})", True, str(f)
                )
    return None


def of_source(src) -> ChatTemplate:
    """What rule 1 ships for one input (a RunSource or HFSource of sources.py)."""
    if src.kind == "run":
        rec = src.run.get("chat_template")
        if isinstance(rec, dict) and rec.get("text"):
            return ChatTemplate(
                rec["text"],
                f"the chat template {src.flag} {src.path} was trained with (its chat data "
                f"{rec.get('manifest')} was rendered with {rec.get('from')})",
                True,
                str(src.rundir.run_json),
            )
        found = _written_record(src.model_dir, f"{src.flag} {src.path}'s base model {src.model_dir}")
    else:
        found = _written_record(src.path, f"{src.flag} {src.path}")
    if found is not None:
        return found
    text = tokenizer_template(src.tokenizer_dir, flag=f"{src.flag} tokenizer")
    return ChatTemplate(
        text, f"the template of {src.flag}'s tokenizer {src.tokenizer_dir}", False, str(src.tokenizer_dir)
    )


def for_merge(fmt, others: list, chosen: str | None = None) -> ChatTemplate:
    """Rule 2: `fmt` gives the format group (--chat or --donor), `others` the other weight inputs
    (not --base); `chosen` is --chat-template-from (an input's flag without dashes) or None."""
    inputs = {s.flag.removeprefix("--"): s for s in (fmt, *others)}
    if chosen is not None:
        if chosen not in inputs:
            raise UserError(f"--chat-template-from {chosen}: this merge's inputs are {', '.join(inputs)}")
        t = of_source(inputs[chosen])
        return ChatTemplate(t.text, f"{t.origin}, chosen by --chat-template-from {chosen}", t.trained, t.record)
    ship = of_source(fmt)
    for s in others:
        t = of_source(s)
        if t.trained and t.sha256 != ship.sha256:
            raise UserError(
                f"{s.flag} {s.path} was trained with another chat template than {fmt.flag} {fmt.path} ships "
                f"({t.record}: {t.short()}; {ship.record}: {ship.short()}): the result would answer in one format "
                f"with layers trained on the other. Pass --chat-template-from {fmt.flag[2:]} (or "
                f"{s.flag[2:]}) to choose the template it ships"
            )
    return ship


def ship(tmp: Path, t: ChatTemplate, tokenizer_dir: Path, out: Path) -> dict:
    """Make the tokenizer files already copied into `tmp` render with `t` (rule 1); say so when
    that changes the tokenizer's own; return the `chat_template` entry of the provenance record."""
    try:
        own = tokenizer_template(tmp, flag=f"{tokenizer_dir} (copied to {out})")
    except UserError:
        if t.text is not None:
            raise
        own = None  # nothing to write, and generation_config.json copes with such a tokenizer too
    if t.text is None or t.text == own:  # nothing to change (and a template is never removed)
        kept = (
            t
            if t.text is not None
            else ChatTemplate(own, f"the template of the tokenizer {tokenizer_dir}", False, str(tokenizer_dir))
        )
        return {
            "text": kept.text,
            "sha256": kept.sha256,
            "from": kept.origin,
            "trained": kept.trained,
            "tokenizer_template": "kept",
        }
    files = _write(tmp, t.text)
    if tokenizer_template(tmp, flag=str(out)) != t.text:
        raise UserError(
            f"{tokenizer_dir}: the chat template written into {out} does not load back as written "
            f"(an unusual tokenizer layout); put {t.record}'s template in {tokenizer_dir} yourself"
        )
    what = (
        f"the tokenizer's own template ({tokenizer_dir}, sha256 {template_sha256(own)[:12]}) is not shipped"
        if own
        else f"the tokenizer {tokenizer_dir} has no chat template of its own"
    )
    print(f"note: {out} ships {t.origin}; {what}", file=sys.stderr)
    return {
        "text": t.text,
        "sha256": t.sha256,
        "from": t.origin,
        "trained": t.trained,
        "tokenizer_template": (f"replaced (sha256 {template_sha256(own)})" if own else "added (it had none)"),
        "written_to": files,
    }


def _write(tmp: Path, text: str) -> list[str]:
    """Put `text` everywhere the tokenizer in `tmp` keeps its default template; returns those files."""
    entries = []
    for name in ("tokenizer_config.json", "chat_template.json"):
        f = tmp / name
        d = json.loads(f.read_text()) if f.is_file() else {}
        if isinstance(d, dict) and d.get("chat_template"):
            entries.append((f, d))
    for f, d in entries:  # older readers and other tools read these: the same text everywhere
        tpl = d["chat_template"]
        if isinstance(tpl, list):  # named templates: only the default one is the trained format
            d["chat_template"] = [{**e, "template": text} if e.get("name") == "default" else e for e in tpl]
        else:
            d["chat_template"] = text
        atomic_write_json(f, d)
    if (tmp / JINJA).is_file() or not entries:
        atomic_write_text(tmp / JINJA, text)
    return sorted({f.name for f, _ in entries} | ({JINJA} if (tmp / JINJA).is_file() else set()))
