"""The metrics of pipeline.evaluate, with their exact definitions, and the eval files they read.

Works on any local HF causal LM directory with a chat template; the demo and users call the same
`evaluate_model` (pipeline/evaluation/runner.py). Three kinds of input (all .jsonl, one record per line):

  chat eval  {"messages": [...user turn(s)...], "answer"?: str, "candidates"?: [str, ...]}
             (a {"prompt": str} record is a single user turn; a trailing assistant message is
             dropped and, when "answer" is absent, becomes the answer)
  raw eval   {"text": str}  (.txt: one document per paragraph, blank-line separated)
  probe      {"prompt": str, "answer": str, "candidates": [str, ...]}  plain text, no template

Metrics, with their exact definitions:

  format_adherence   share of prompts whose greedy reply (prompt rendered with
                     add_generation_prompt=True) emits one of the model's
                     generation_config eos_token_id (exactly where plain generate() stops) within
                     max_new_tokens, has non-blank text before it, and holds no special token
                     before it (no second `<|im_start|>`, no role header, no BOS/pad). A reply
                     that never ends has run on into raw text and fails.
  knowledge_accuracy records with "answer": the reply (text before end-of-turn) matches the
                     answer after normalization (lower case, whitespace collapsed, surrounding
                     quotes and trailing .,;:!? removed) if it equals it or starts with it
                     followed by a non-alphanumeric character ("Oslo, Norway" matches "Oslo";
                     "Oslomar" does not).
  knowledge_rank     records with "candidates": each candidate is scored by the sum of its
                     tokens' log-probs as the assistant reply right after the generation prompt
                     (end-of-turn not included); rank of the true value, 1 = best, ties counted
                     half. chance_rank = mean of (n_candidates + 1) / 2.
  raw_rank           the same ranking for probes, the value continuing the plain-text prompt
                     after a space.
  ppl_raw            exp(mean next-token NLL) over all tokens of the texts (token-weighted).

"""

from __future__ import annotations

from pathlib import Path

from data_prep.chat import BadRecord, message_text
from data_prep.errors import UserError
from data_prep.files import read_jsonl

# ---------------------------------------------------------------- pure metric functions


def normalize_answer(text: str) -> str:
    text = " ".join(text.lower().split())
    text = text.strip("\"'` ")
    return text.rstrip(".,;:!? ").strip("\"'` ")


def answer_matches(reply: str, answer: str) -> bool:
    """Exact match after normalization; the reply may continue after the answer at a word
    boundary (see module docstring)."""
    r, a = normalize_answer(reply), normalize_answer(answer)
    if not a:
        return False
    return r == a or (r.startswith(a) and not r[len(a)].isalnum())


def follows_format(gen_ids, end_ids, special_ids, decode) -> bool:
    """Does a generated reply (ids after the generation prompt) follow the chat template?"""
    gen_ids = list(gen_ids)
    end = next((i for i, t in enumerate(gen_ids) if t in end_ids), None)
    if end is None:  # never closed the turn within the limit: ran on into raw text
        return False
    content = gen_ids[:end]
    if any(t in special_ids for t in content):  # a new turn header, BOS, pad... inside the reply
        return False
    return bool(decode(content).strip())


def rank_of_true(scores, true_index: int) -> float:
    """1-based rank of scores[true_index] among scores (higher is better), ties counted half,
    so a model that scores every candidate the same gets exactly chance rank."""
    t = scores[true_index]
    higher = sum(s > t for s in scores)
    ties = sum(s == t for s in scores) - 1
    return 1 + higher + ties / 2


def chance_rank(n_candidates: int) -> float:
    return (n_candidates + 1) / 2


# ---------------------------------------------------------------- reading eval files


def _read_jsonl(path: Path):
    """Records of an eval file: JSON objects, one per line (data_prep.files.read_jsonl)."""
    for lineno, rec in read_jsonl(path):
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object")
        yield lineno, rec


def _check_candidates(rec: dict, where: str) -> None:
    cands = rec.get("candidates")
    if cands is None:
        return
    if not isinstance(cands, list) or len(cands) < 2 or not all(isinstance(c, str) and c for c in cands):
        raise UserError(f"{where}: 'candidates' must be a list of at least 2 non-empty strings")
    if rec.get("answer") not in cands:
        raise UserError(f"{where}: 'candidates' given but 'answer' is missing or not among them")
    if len(set(cands)) != len(cands):
        twice = next(c for c in cands if cands.count(c) > 1)
        raise UserError(
            f"{where}: candidate {twice!r} is listed twice (it would count twice in the rank and shift chance_rank)"
        )


def load_chat_eval(path) -> list[dict]:
    path = Path(path)
    out = []
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        msgs = rec.get("messages")
        if msgs is None and isinstance(rec.get("prompt"), str):
            msgs = [{"role": "user", "content": rec["prompt"]}]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in msgs)
        ):
            raise UserError(f"{where}: needs 'messages' (a list of {{role, content}}) or 'prompt'")
        try:  # content as text, or as the OpenAI format's list of text parts
            msgs = [
                {"role": m["role"], "content": message_text(m["content"], f"message {k}")} for k, m in enumerate(msgs)
            ]
        except BadRecord as e:
            raise UserError(f"{where}: {e}") from None
        rec = dict(rec)
        if msgs[-1]["role"] == "assistant":
            rec.setdefault("answer", msgs[-1]["content"])
            msgs = msgs[:-1]
        if not msgs:
            raise UserError(f"{where}: no prompt left once the assistant reply is removed")
        if "answer" in rec and not isinstance(rec["answer"], str):
            raise UserError(f"{where}: 'answer' must be a string")
        _check_candidates(rec, where)
        rec["messages"] = msgs
        out.append(rec)
    if not out:
        raise UserError(f"{path}: no records")
    return out


def load_raw_texts(path) -> list[str]:
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = []
        for lineno, rec in _read_jsonl(path):
            if not isinstance(rec.get("text"), str):
                raise UserError(f"{path}:{lineno}: needs a 'text' string")
            texts.append(rec["text"])
    elif path.is_file():
        # utf-8-sig: a leading byte-order mark (Windows editors write one) is not part of the text.
        try:
            whole = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not valid UTF-8 text (byte {e.start}: {e.reason})") from None
        texts = [p.strip() for p in whole.split("\n\n") if p.strip()]
    else:
        raise UserError(f"{path}: no such file")
    if not texts:
        raise UserError(f"{path}: no texts")
    return texts


def load_probe(path) -> list[dict]:
    path = Path(path)
    out = []
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec.get("prompt"), str) or "candidates" not in rec:
            raise UserError(f"{where}: a probe needs 'prompt', 'answer' and 'candidates'")
        _check_candidates(rec, where)
        out.append(rec)
    if not out:
        raise UserError(f"{path}: no records")
    return out
