"""pipeline.export: a pipeline checkpoint -> a standard Hugging Face directory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_prep.errors import UserError
from pipeline.convert.export import export_run
from pipeline.convert.shards import tensor_bytes
from tests.kit.oracles import greedy_chat, load_dir_tensors, reference_model
from tests.kit.runs import base_tensors, make_base, make_run, make_tokenizer

REPO = Path(__file__).resolve().parents[1]


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".tmp-{out.name}*"))


def assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name


def test_round_trip_base_to_checkpoint_to_export_is_bitwise(tmp_path):
    base = make_base(tmp_path / "base", dtype=torch.bfloat16)
    make_run(tmp_path / "run", base, "chat", perturb=False)
    rec = export_run(tmp_path / "run", tmp_path / "out")
    out = tmp_path / "out"
    assert_same(load_dir_tensors(out), base_tensors(base))
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (base / f).read_bytes(), f
    # export.json: every tensor's sha256 is that of its bytes in the output, and names its layer file
    written = load_dir_tensors(out)
    assert json.loads((out / "export.json").read_text()) == rec
    for e in rec["tensors"]:
        assert e["sha256"] == hashlib.sha256(tensor_bytes(written[e["name"]])).hexdigest()
        assert e["source"]["step"] == 5 and e["source"]["file"].startswith("checkpoints/step_00000005/layer_")
    assert rec["files"]["model.safetensors"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_export_loads_and_answers_with_the_chat_template(tmp_path):
    base = make_base(tmp_path / "base")
    tok_dir = make_tokenizer(tmp_path / "chat-tok", chat_template=True)
    run = make_run(tmp_path / "run", base, "chat", tokenizer=tok_dir)
    export_run(tmp_path / "run", tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "chat_template.jinja").read_text() == (tok_dir / "chat_template.jinja").read_text()
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    sd = model.state_dict()
    for name, t in run.tensors[5].items():
        assert torch.equal(sd[name], t), name
    tok = AutoTokenizer.from_pretrained(str(out))
    answer = greedy_chat(model, tok)
    assert len(answer) == 6
    assert answer == greedy_chat(reference_model(base, run.tensors[5]), tok)


def test_sharded_export_writes_an_index_and_loads(tmp_path):
    base = make_base(tmp_path / "base")
    run = make_run(tmp_path / "run", base, "raw")
    export_run(tmp_path / "run", tmp_path / "out", max_shard_size="10KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert not (out / "model.safetensors").exists()
    for s in shards:  # a shard only exceeds the limit when it holds a single bigger tensor
        names = [n for n, f in index["weight_map"].items() if f == s.name]
        assert s.stat().st_size <= 10_000 + 4096 or len(names) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in run.tensors[5].values())
    model = AutoModelForCausalLM.from_pretrained(str(out))
    sd = model.state_dict()
    for name, t in run.tensors[5].items():
        assert torch.equal(sd[name], t), name


def test_tied_embeddings_export_has_no_lm_head_and_reties(tmp_path):
    base = make_base(tmp_path / "base", tied=True)
    run = make_run(tmp_path / "run", base, "raw")
    # the checkpoint carries the shared matrix twice (embeddings on layer 0, head on layer L-1)
    assert "lm_head.weight" in torch.load(tmp_path / "run/checkpoints/step_00000005/layer_03-model_states.pt")
    export_run(tmp_path / "run", tmp_path / "out")
    got = load_dir_tensors(tmp_path / "out")
    assert "lm_head.weight" not in got
    assert_same(got, run.tensors[5])
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert torch.equal(model.lm_head.weight, base_tensors(base)["model.embed_tokens.weight"])


def test_frozen_tensors_left_out_of_a_checkpoint_come_from_the_base(tmp_path):
    base = make_base(tmp_path / "base")
    run = make_run(tmp_path / "run", base, "chat", drop_frozen=True)
    rec = export_run(tmp_path / "run", tmp_path / "out")
    want = {**base_tensors(base), **run.tensors[5]}
    assert_same(load_dir_tensors(tmp_path / "out"), want)
    src = {e["name"]: e["source"] for e in rec["tensors"]}
    assert "base model" in src["model.layers.0.mlp.up_proj.weight"]["input"]
    assert src["model.layers.3.mlp.up_proj.weight"]["file"].endswith("layer_03-model_states.pt")


def test_step_selection_and_a_missing_step(tmp_path):
    base = make_base(tmp_path / "base")
    run = make_run(tmp_path / "run", base, "chat", steps=(5, 10))
    export_run(tmp_path / "run", tmp_path / "latest")
    assert_same(load_dir_tensors(tmp_path / "latest"), run.tensors[10])
    export_run(tmp_path / "run", tmp_path / "five", step=5)
    assert_same(load_dir_tensors(tmp_path / "five"), run.tensors[5])
    with pytest.raises(UserError, match=r"--step 7: .*available: 5, 10"):
        export_run(tmp_path / "run", tmp_path / "seven", step=7)
    assert_nothing_written(tmp_path / "seven")
    with pytest.raises(UserError, match="not a run directory"):
        export_run(base, tmp_path / "seven")
    assert_nothing_written(tmp_path / "seven")


def test_an_incomplete_newest_step_is_ignored(tmp_path):
    base = make_base(tmp_path / "base")
    run = make_run(tmp_path / "run", base, "chat", steps=(5, 10))
    # killed while saving step 10: record.json (written last) missing, `latest` not yet moved on
    (tmp_path / "run/checkpoints/step_00000010/record.json").unlink()
    (tmp_path / "run/checkpoints/latest").write_text("step_00000005")
    export_run(tmp_path / "run", tmp_path / "out")
    assert_same(load_dir_tensors(tmp_path / "out"), run.tensors[5])


def test_a_corrupt_layer_file_is_named_and_nothing_is_written(tmp_path):
    base = make_base(tmp_path / "base")
    make_run(tmp_path / "run", base, "chat")
    f = tmp_path / "run/checkpoints/step_00000005/layer_02-model_states.pt"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"layer_02-model_states\.pt: sha256 .*record\.json"):
        export_run(tmp_path / "run", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_a_non_empty_out_dir_needs_force(tmp_path):
    base = make_base(tmp_path / "base")
    run = make_run(tmp_path / "run", base, "chat")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        export_run(tmp_path / "run", out)
    assert os.listdir(out) == ["keep.txt"]
    with pytest.raises(UserError, match="overlaps the input"):
        export_run(tmp_path / "run", tmp_path / "run", force=True)
    export_run(tmp_path / "run", out, force=True)
    assert not (out / "keep.txt").exists()
    assert_same(load_dir_tensors(out), run.tensors[5])


@pytest.mark.multiproc
def test_cli_help_and_errors(tmp_path):
    base = make_base(tmp_path / "base")
    make_run(tmp_path / "run", base, "chat")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipeline.export"]
    h = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=env, cwd=REPO)
    assert h.returncode == 0 and "--max-shard-size" in h.stdout and "examples:" in h.stdout
    bad = subprocess.run(
        cmd + [str(tmp_path / "run"), "--step", "99", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: --step 99") and "Traceback" not in bad.stderr
    assert_nothing_written(tmp_path / "o")
    ok = subprocess.run(
        cmd + [str(tmp_path / "run"), "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "o/model.safetensors").is_file()
