"""What tests compare the product against: tensors read straight from files, optimizer state per
stage, greedy answers, and a model holding exactly given tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.names import layer_file, to_hf_name

from .runs import base_tensors


def load_dir_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, read straight from its safetensors files."""
    return base_tensors(model_dir)


def greedy_chat(model, tokenizer, question: str = "what is the capital of france", n: int = 6) -> list[int]:
    """Greedy answer tokens to one user turn, prompted through the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=tokenizer.pad_token_id
        )
    return out[0, ids.shape[1] :].tolist()


def reference_model(base_dir: Path, tensors: dict[str, torch.Tensor]):
    """The base architecture with exactly `tensors` loaded: what an output directory should equal."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=next(iter(tensors.values())).dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


def checkpoint_tensors(run: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """HF name -> tensor of a run's checkpoint (the latest complete step by default), read from its
    layer files without the product's readers; the anchor scalar is skipped."""
    import json

    from pipeline.rundir import RunDir

    rd = RunDir(run)
    step = rd.latest_step() if step is None else step
    L = json.loads(rd.run_json.read_text())["groups"]["num_layers"]
    out = {}
    for i in range(L):
        for key, t in torch.load(rd.tag_dir(step) / layer_file(i), map_location="cpu", weights_only=True).items():
            if (hf := to_hf_name(i, key)) is not None:
                out[hf] = t
    return out


def optimizer_numel_per_stage(tag_dir: Path) -> dict[int, int]:
    """Parameters that have optimizer state, per pipeline stage, summed over the data-parallel
    ZeRO-1 partitions (padding excluded). Frozen parameters must contribute nothing."""
    out: dict[int, int] = {}
    for f in sorted(Path(tag_dir).glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt")):  # bf16_ prefix too
        stage = int(f.stem.split("_mp_rank_")[1].split("_")[0])
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        # param_slice_mappings: per param group, {param name: (numel, start)} of this rank's slice.
        n = sum(frag.numel for group in osd["param_slice_mappings"] for frag in group.values())
        out[stage] = out.get(stage, 0) + n
    return out


def plain_generate_format(model, tok, messages_list, max_new_tokens: int) -> list[bool]:
    """Does each greedy reply follow the chat format, judged from plain `model.generate()` with the
    model's own generation config (what a user's code stops on), one prompt at a time, no padding?
    Follows = the reply hits one of generation_config.eos_token_id within the limit, with non-blank
    text before it and no special token inside."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    out = []
    for msgs in messages_list:
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ]
        with torch.no_grad():
            gen = model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            )
        reply = gen[0, ids.shape[1] :].tolist()
        end = next((k for k, t in enumerate(reply) if t in eos), None)
        out.append(end is not None and not (set(reply[:end]) & special) and bool(tok.decode(reply[:end]).strip()))
    return out


def chat_candidate_rank(model, tok, messages, candidates: list[str], answer: str) -> float:
    """Rank of `answer` among `candidates` by the log-prob of each candidate's tokens as the assistant
    reply, found through character offsets of the whole rendered conversation (not the product's
    prefix tokenization), one full forward pass per candidate; ties count half."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    scores = []
    for c in candidates:
        full = tok.apply_chat_template(messages + [{"role": "assistant", "content": c}], tokenize=False)
        a = full.index(c, len(prompt))
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        pos = [k for k, (s, e) in enumerate(offs) if e > a and s < a + len(c)]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        scores.append(sum(lp[k - 1, ids[k]].item() for k in pos))
    t = scores[candidates.index(answer)]
    return 1 + sum(s > t for s in scores) + (sum(s == t for s in scores) - 1) / 2


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every event file under log_dir, read with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_offline_history(path: Path) -> tuple[list[dict], str]:
    """(history rows, run name) of an offline W&B run's transaction log (run-ID.wandb).

    The file is what `wandb sync` uploads: a 7-byte header (":W&B", magic 0xBEE1, version 0),
    then LevelDB-log records (crc32, uint16 length, type; FULL=1, FIRST=2, MIDDLE=3, LAST=4) in
    32 KiB blocks, each payload one protobuf `Record` of wandb's own schema."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"{path}: not a W&B log"
    BLOCK, pos, payloads, part = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            payloads.append(part)
    rows, name = [], ""
    for raw in payloads:
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            name = rec.run.display_name
    return rows, name
