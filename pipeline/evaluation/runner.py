"""Running a model over the eval files: generation, candidate scoring, perplexity, and the suites
that turn them into the metrics of pipeline/evaluation/metrics.py.

Knowledge is scored by forward passes over (prompt, candidate) pairs in batches, not by
generation, so a few thousand candidates cost seconds on CPU for a tiny model.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import sys
from pathlib import Path

from data_prep.errors import UserError

from .metrics import (
    answer_matches,
    chance_rank,
    follows_format,
    load_chat_eval,
    load_probe,
    load_raw_texts,
    rank_of_true,
)

# ---------------------------------------------------------------- model computations


def _batches(order, size):
    for i in range(0, len(order), size):
        yield order[i : i + size]


def _bar(total, desc, progress):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not progress, leave=False)


def score_continuations(model, pairs, batch_size=64, pad_id=0, desc="scoring", progress=True):
    """Sum of log-probs of each continuation given its prefix: pairs = [(prefix_ids, cont_ids)].

    Only the continuation positions go through the LM head: with a 150k vocabulary the full
    logits of a batch would be gigabytes, with a 2k one it saves little but costs nothing.
    """
    import torch

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    # Longest first, so similar lengths share a batch (less padding) and memory peaks early.
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    scores = [0.0] * len(pairs)
    with torch.inference_mode(), _bar(len(pairs), desc, progress) as bar:
        for idx in _batches(order, batch_size):
            seqs = [list(pairs[i][0]) + list(pairs[i][1]) for i in idx]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            rows, cols, targets, owner = [], [], [], []
            for r, i in enumerate(idx):
                start, end = len(pairs[i][0]), len(seqs[r])
                for pos in range(start, end):  # token at pos is predicted from pos - 1
                    rows.append(r), cols.append(pos - 1), targets.append(seqs[r][pos]), owner.append(i)
            logits = head(hidden[rows, cols]).float()
            lp = torch.log_softmax(logits, dim=-1)[torch.arange(len(targets)), torch.tensor(targets)]
            for i, v in zip(owner, lp.tolist()):
                scores[i] += v
            bar.update(len(idx))
    return scores


def perplexity(model, token_lists, batch_size=16, pad_id=0, progress=True, desc="perplexity"):
    """exp of the mean next-token NLL over every predicted token of every text."""
    pairs = [(t[:1], t[1:]) for t in token_lists if len(t) > 1]
    if not pairs:
        return float("nan")
    total = sum(score_continuations(model, pairs, batch_size, pad_id, desc, progress))
    return math.exp(-total / sum(len(c) for _, c in pairs))


def generate(model, prompts, max_new_tokens, end_ids, pad_id, batch_size=32, progress=True):
    """Greedy replies (generated ids only) for token-id prompts, left-padded in batches."""
    import torch
    from transformers import GenerationConfig

    # A fresh config: a user model's sampling settings (temperature, top_p) must not leak in.
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(end_ids), pad_token_id=pad_id
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    with torch.inference_mode(), _bar(len(prompts), "generating", progress) as bar:
        for idx in _batches(order, batch_size):
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                p = prompts[i]
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
            for r, i in enumerate(idx):
                out[i] = gen[r, width:].tolist()
            bar.update(len(idx))
    return out


# ---------------------------------------------------------------- suites


def _chat_ids(tok, messages, where):
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja errors: a template that rejects these roles, no template...
        raise UserError(f"{where}: the tokenizer's chat template failed: {e}") from None
    return text, tok(text, add_special_tokens=False)["input_ids"]


def _continuation(tok, prefix_text, prefix_ids, full_text, value, special=False):
    """Token ids of `value` as they follow prefix_text inside full_text: tokenized jointly with the
    prefix (the way training saw it), falling back to tokenizing it alone when the joint
    tokenization does not keep the prefix's tokens intact."""
    tail = full_text[len(prefix_text) :]
    k = tail.find(value)
    if k < 0:
        return None
    ids = tok(prefix_text + tail[: k + len(value)], add_special_tokens=special)["input_ids"]
    if ids[: len(prefix_ids)] == list(prefix_ids) and len(ids) > len(prefix_ids):
        return ids[len(prefix_ids) :]
    return tok(tail[: k + len(value)], add_special_tokens=False)["input_ids"] or None


def score_candidates(model, prompts, conts, batch_size=256, pad_id=0, desc="ranking", progress=True):
    """scores[i][j] = sum of log-probs of conts[i][j] right after prompts[i] (token-id lists).

    Each prompt runs once and its KV cache is copied to its candidates, so a 20-candidate question
    costs one prompt plus 20 short continuations instead of 20 full sequences (about 10x less
    compute for the demo's questions). Prompts of equal length share a batch: no prompt padding,
    so default positions are right and the cache needs no masking.
    """
    import torch

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    # transformers 5.2x renamed `past_key_values` to `cache`; accept either generation.
    cache_kw = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    chunks, cur, n = [], [], 0
    for length in sorted(by_len):
        for i in by_len[length]:
            cur.append(i)
            n += len(conts[i])
            if n >= batch_size:
                chunks.append(cur)
                cur, n = [], 0
        if cur:
            chunks.append(cur)
            cur, n = [], 0
    scores = [[0.0] * len(c) for c in conts]
    with torch.inference_mode(), _bar(sum(map(len, conts)), desc, progress) as bar:
        for chunk in chunks:
            out = decoder(input_ids=torch.tensor([prompts[i] for i in chunk]), use_cache=True)
            last = out.last_hidden_state[:, -1]
            owner = [(i, j) for i in chunk for j in range(len(conts[i]))]
            rep = torch.tensor([b for b, i in enumerate(chunk) for _ in conts[i]])
            flat = [conts[i][j] for i, j in owner]
            width = max(map(len, flat))
            picked = [last[rep]]  # hidden states that predict each candidate's first token
            if width > 1:  # the rest are predicted from the candidate's own earlier tokens
                cache = out.cache if cache_kw == "cache" else out.past_key_values
                cache.batch_select_indices(rep)
                ids = torch.full((len(flat), width - 1), pad_id, dtype=torch.long)
                mask = torch.zeros((len(flat), len(prompts[chunk[0]]) + width - 1), dtype=torch.long)
                mask[:, : len(prompts[chunk[0]])] = 1
                for r, c in enumerate(flat):
                    ids[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                    mask[r, len(prompts[chunk[0]]) : len(prompts[chunk[0]]) + len(c) - 1] = 1
                hidden = decoder(input_ids=ids, attention_mask=mask, **{cache_kw: cache}).last_hidden_state
                picked.append(hidden)
            rows, targets = [], []  # row into the stacked hidden states, token to score
            for r, c in enumerate(flat):
                rows.append(r)
                targets.append(c[0])
                for k in range(1, len(c)):
                    rows.append(len(flat) + r * (width - 1) + (k - 1))
                    targets.append(c[k])
            stacked = torch.cat([picked[0]] + ([picked[1].reshape(-1, picked[1].shape[-1])] if width > 1 else []))
            lp = torch.log_softmax(head(stacked[rows]).float(), dim=-1)
            lp = lp[torch.arange(len(targets)), torch.tensor(targets)].tolist()
            k = 0
            for r, c in enumerate(flat):
                i, j = owner[r]
                scores[i][j] = sum(lp[k : k + len(c)])
                k += len(c)
            bar.update(len(flat))
    return scores


def _rank_records(model, tok, items, batch_size, pad_id, desc, progress, special=False):
    """items: [(prefix_text, prefix_ids, [full_text per candidate], candidates, answer, where)]
    -> (mean rank, mean chance rank, per-record ranks)."""
    conts = []
    for prefix_text, prefix_ids, fulls, cands, _, where in items:
        row = []
        for full, c in zip(fulls, cands):
            cont = _continuation(tok, prefix_text, prefix_ids, full, c, special)
            if cont is None:
                raise UserError(f"{where}: cannot locate candidate {c!r} in the rendered reply")
            row.append(cont)
        conts.append(row)
    scores = score_candidates(model, [it[1] for it in items], conts, batch_size, pad_id, desc, progress)
    ranks = [rank_of_true(sc, it[3].index(it[4])) for sc, it in zip(scores, items)]
    chance = [chance_rank(len(it[3])) for it in items]
    return sum(ranks) / len(ranks), sum(chance) / len(chance), ranks


def _chat_suite(model, tok, records, where, opts, details):
    """format adherence and accuracy (generation), rank (scoring) for one set of chat records."""
    progress, bs = opts["progress"], opts["batch_size"]
    prompts = [_chat_ids(tok, r["messages"], f"{where}[{i}]") for i, r in enumerate(records)]
    gens = generate(
        model, [p[1] for p in prompts], opts["max_new_tokens"], opts["end_ids"], opts["pad_id"], bs, progress
    )
    res = {}
    ok, correct, n_answer = 0, 0, 0
    for rec, gen in zip(records, gens):
        fmt = follows_format(gen, opts["end_ids"], opts["special_ids"], tok.decode)
        end = next((i for i, t in enumerate(gen) if t in opts["end_ids"]), len(gen))
        reply = tok.decode(gen[:end], skip_special_tokens=True).strip()
        ok += fmt
        row = {"messages": rec["messages"], "reply": reply, "format_ok": fmt}
        if "answer" in rec:
            n_answer += 1
            hit = answer_matches(reply, rec["answer"])
            correct += hit
            row.update(answer=rec["answer"], correct=hit)
        details.append(row)
    res["format_adherence"] = ok / len(records)
    if n_answer:
        res["accuracy"] = correct / n_answer
    ranked = [(i, r) for i, r in enumerate(records) if "candidates" in r]
    if ranked:
        items = []
        for i, r in ranked:
            fulls = [
                tok.apply_chat_template(r["messages"] + [{"role": "assistant", "content": c}], tokenize=False)
                for c in r["candidates"]
            ]
            items.append((prompts[i][0], prompts[i][1], fulls, r["candidates"], r["answer"], f"{where}[{i}]"))
        res["rank"], res["chance_rank"], ranks = _rank_records(
            model, tok, items, opts["score_batch_size"], opts["pad_id"], "ranking answers", progress
        )
        rows = details[len(details) - len(records) :]
        for (i, _), rank in zip(ranked, ranks):
            rows[i]["rank"] = rank
    return res


def _probe_suite(model, tok, records, where, opts):
    items = []
    for i, r in enumerate(records):
        # Raw text: the tokenizer's own special tokens (e.g. BOS) as in pretraining.
        prefix_ids = tok(r["prompt"])["input_ids"]
        fulls = [r["prompt"] + " " + c for c in r["candidates"]]
        items.append((r["prompt"], prefix_ids, fulls, r["candidates"], r["answer"], f"{where}:{i + 1}"))
    mean, chance, _ = _rank_records(
        model, tok, items, opts["score_batch_size"], opts["pad_id"], "probing", opts["progress"], special=True
    )
    return mean, chance


def _named(name, metric, prefix_style):
    if not name:
        return metric
    return f"{name}_{metric}" if prefix_style else f"{metric}_{name}"


def evaluate_model(
    model_dir,
    chat=None,
    raw=None,
    probes=None,
    tokenizer_dir=None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    score_batch_size: int = 256,
    details_path=None,
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate one model directory. Each of chat/raw/probes maps a suite name to a file (or a
    list of files, pooled); the name "" is the main suite. Metric names:

      chat  ""  -> format_adherence, knowledge_accuracy, knowledge_rank, chance_rank
            NAME -> NAME_format_adherence, NAME_accuracy, NAME_rank, NAME_chance_rank
      raw   ""  -> ppl_raw         NAME -> ppl_raw_NAME
      probes "" -> raw_rank, raw_chance_rank    NAME -> raw_rank_NAME, raw_chance_rank_NAME

    So the demo's {"": [format file, new-people file], "heldout_known": held-out file} gives
    heldout_known_rank; raw {"new": .., "known": ..} gives ppl_raw_new and ppl_raw_known.
    """
    import torch
    from transformers import AutoTokenizer

    from ..hf import eos_ids, load_causal_lm

    tok_dir = str(tokenizer_dir or model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{tok_dir}: cannot load a tokenizer ({e}); pass --tokenizer DIR") from None

    def files(spec):
        return [spec] if isinstance(spec, (str, Path)) else list(spec)

    # Every file is read and checked before the model is loaded: a bad probe file, or raw texts
    # too short to score, fails in a second, not after the chat suites have generated.
    chat_sets = {
        name: (",".join(map(str, files(spec))), [r for f in files(spec) for r in load_chat_eval(f)])
        for name, spec in (chat or {}).items()
    }
    if chat_sets and getattr(tok, "chat_template", None) is None:
        raise UserError(f"{tok_dir}: the tokenizer has no chat template (needed for --chat-eval)")
    raw_sets = {
        name: [ids for f in files(spec) for ids in _raw_token_lists(tok, f)] for name, spec in (raw or {}).items()
    }
    probe_sets = {
        name: (",".join(map(str, files(spec))), [r for f in files(spec) for r in load_probe(f)])
        for name, spec in (probes or {}).items()
    }
    model = load_causal_lm(model_dir).eval()
    # Replies end where plain `model.generate()` ends them: at the model's own generation_config
    # eos ids, and nowhere else. A metric that also stopped at the tokenizer's eos would report a
    # stop that a user's generate() or pipeline("text-generation") never makes.
    end_ids = set(eos_ids(model.generation_config.eos_token_id))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(end_ids, default=0)
    opts = {
        "progress": progress,
        "batch_size": batch_size,
        "score_batch_size": score_batch_size,
        "max_new_tokens": max_new_tokens,
        "end_ids": end_ids,
        "pad_id": pad_id,
        "special_ids": set(tok.all_special_ids),
    }

    if chat_sets and not end_ids:
        raise UserError(
            f"{model_dir}: the model's generation_config has no eos_token_id, so generate() never "
            "ends a reply; set it to the chat template's end-of-turn token (pipeline.export and "
            "pipeline.transplant write it)"
        )
    metrics, details = {}, []
    torch.manual_seed(0)  # nothing here samples; this only pins any library-internal randomness
    for name, (where, records) in chat_sets.items():
        res = _chat_suite(model, tok, records, where, opts, details)
        for k, v in res.items():
            if not name:
                k = {"accuracy": "knowledge_accuracy", "rank": "knowledge_rank"}.get(k, k)
            metrics[_named(name, k, True)] = v
    max_len = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    for name, token_lists in raw_sets.items():
        token_lists = [ids[:max_len] for ids in token_lists]
        metrics[_named(name, "ppl_raw", False)] = perplexity(
            model, token_lists, max(1, batch_size // 2), pad_id, progress
        )
    for name, (where, records) in probe_sets.items():
        mean, chance = _probe_suite(model, tok, records, where, opts)
        metrics[_named(name, "raw_rank", False)] = mean
        metrics[_named(name, "raw_chance_rank", False)] = chance
    if details_path:
        from data_prep.files import atomic_file

        with atomic_file(details_path, "w") as f:
            for row in details:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return metrics


def _raw_token_lists(tok, path) -> list[list[int]]:
    """The token ids of a --raw-eval file's texts that perplexity can score (two tokens or more:
    the first predicts nothing). A file with none is refused rather than reported as NaN; the
    texts left out of a file that has some are counted in a note."""
    texts = load_raw_texts(path)
    ids = [tok(t)["input_ids"] for t in texts]
    kept = [i for i in ids if len(i) > 1]
    if not kept:
        raise UserError(
            f"--raw-eval {path}: none of its {len(texts)} text(s) is long enough to score (perplexity "
            f"needs at least 2 tokens, one to predict the next from, and each has at most 1); "
            f"give longer texts"
        )
    if len(kept) < len(ids):
        print(
            f"note: --raw-eval {path}: {len(ids) - len(kept)} of its {len(ids)} texts have fewer than 2 tokens "
            f"and are not scored",
            file=sys.stderr,
        )
    return kept


_NAMED_FILE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.+)$")


def parse_named(values, flag) -> dict:
    """CLI values 'FILE' or 'NAME=FILE' -> {name: [files]} (unnamed files pool under "")."""
    out: dict[str, list] = {}
    for v in values or ():
        m = _NAMED_FILE.match(v)
        name, path = (m.group(1), m.group(2)) if m and not Path(v).exists() else ("", v)
        if not Path(path).exists():
            raise UserError(f"{flag} {v}: no such file {path}")
        out.setdefault(name, []).append(path)
    return out
