"""The whole method on tiny models with the real families' quirks (tests/kit/families.py): Llama-3
(GQA, llama3 rope scaling, untied, top-of-vocab special tokens), Qwen2.5 (q/k/v biases, tied
embeddings) and Mistral (a sliding window shorter than the sequence). For each: A-Chat and A-Raw
through pipeline.train, each matching the HF model's own loss (so masks, biases and rope are the
family's), then transplant, donor transplant and chat vector, each loading and answering in
transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_prep.__main__ import main as prep
from pipeline.config import load_config
from pipeline.convert.chat_vector import chat_vector
from pipeline.convert.transplant import donor_transplant, transplant
from pipeline.groups import FORMAT, LayerGroups
from pipeline.training.metrics_log import read_metrics
from pipeline.training.plan import build_plan
from tests.kit import families
from tests.kit import train as ft
from tests.kit.oracles import checkpoint_tensors, load_dir_tensors
from tests.kit.reference import train_reference
from tests.kit.runs import base_tensors
from tests.kit.tokenizers import conversations, documents, write_jsonl

RAW_START, FORMAT_START = 1, 3


@pytest.fixture(scope="module", params=list(families.FAMILIES))
def fam(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param.replace(".", ""))
    d = families.build(request.param, root)
    write_jsonl(root / "raw.jsonl", [{"text": t} for t in documents(150, seed=3)])
    write_jsonl(root / "chat.jsonl", conversations(120, seed=4, system=False))
    for kind in ("raw", "chat"):
        prep(
            [
                kind,
                str(root / f"{kind}.jsonl"),
                "--tokenizer",
                str(d["chat_tok"]),
                "--output-prefix",
                str(root / "data" / kind),
                "--val-fraction",
                "0",
            ]
        )
    cfgs = {}
    for phase in ("chat", "raw"):
        setup = {"model": d["base"], "raw": root / "data/raw.manifest.json", "chat": root / "data/chat.manifest.json"}
        cfgs[phase] = ft.write_config(
            root / f"{phase}.yaml",
            setup,
            phase,
            root / "runs" / phase,
            seq_len=32,
            raw_start=RAW_START,
            format_start=FORMAT_START,
            steps=4,
            save_every=4,
            tokenizer=str(d["chat_tok"]),
        )
    # both phases in one process: one import of torch + DeepSpeed
    subprocess.run(
        [sys.executable, str(ft.REPO / "tests/helpers/train_phases.py"), *map(str, cfgs.values())],
        cwd=ft.REPO,
        env=ft.env(),
        check=True,
        capture_output=True,
        timeout=600,
    )
    return {**d, "root": root, "cfgs": cfgs, "family": request.param}


@pytest.mark.multiproc
@pytest.mark.parametrize("phase", ["chat", "raw"])
def test_the_pipeline_trains_like_the_hf_model_itself(fam, phase):
    losses = [r["loss"] for r in read_metrics(fam["root"] / "runs" / phase / "metrics.jsonl")]
    ref, _ = train_reference(build_plan(load_config(fam["cfgs"][phase]), 1, use_gpu=False))
    assert len(losses) == len(ref) == 4 and abs(ref[-1] - ref[0]) > 1e-3
    assert max(abs(a - b) for a, b in zip(losses, ref)) < 1e-4, (fam["family"], losses, ref)


def _answers(model_dir) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "where is the river"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.chat_template and model.generation_config.eos_token_id is not None
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.multiproc
def test_transplant_donor_and_chat_vector(fam, tmp_path):
    runs = fam["root"] / "runs"
    a_raw, a_chat = checkpoint_tensors(runs / "raw"), checkpoint_tensors(runs / "chat")
    inst, base = base_tensors(fam["instruct"]), base_tensors(fam["base"])
    tied = "lm_head.weight" not in base
    g = LayerGroups.resolve(RAW_START, FORMAT_START, 4, tied)

    transplant(runs / "raw", runs / "chat", tmp_path / "t")
    got = load_dir_tensors(tmp_path / "t")
    for name, t in got.items():
        assert torch.equal(t, (a_chat if g.group_of(name) == FORMAT else a_raw)[name]), name

    donor_transplant(runs / "raw", fam["instruct"], tmp_path / "d")
    got, rows = load_dir_tensors(tmp_path / "d"), fam["chat_tokens"]
    for name, t in got.items():
        want = inst[name] if g.group_of(name) == FORMAT else a_raw[name].clone()
        if name == "model.embed_tokens.weight":
            want[rows] = inst[name][rows]  # the chat tokens' rows from the instruct model
            assert want[rows].abs().sum() > 0 and a_raw[name][rows].abs().sum() == 0
        assert torch.equal(t, want), name

    chat_vector(runs / "raw", fam["instruct"], fam["base"], tmp_path / "cv")
    got = load_dir_tensors(tmp_path / "cv")
    for name, t in got.items():
        want = (a_raw[name].double() + (inst[name].double() - base[name].double())).float()
        assert torch.allclose(t, want, rtol=0, atol=1e-6), name

    for out in ("t", "d", "cv"):
        assert len(_answers(tmp_path / out)) == 4
