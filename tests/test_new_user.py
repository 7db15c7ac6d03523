"""What a new user hits, end to end through the real entry points: chat models that must stop in
plain `transformers`, two trainings on one run directory, a resume with another length, a bf16
base, Ctrl-C. Each of these exited 0 with a wrong result (or a traceback) before."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.convert.export import export_run
from pipeline.convert.transplant import transplant
from pipeline.rundir import RunDir
from tests.kit import train as ft
from tests.kit.models import tiny_llama
from tests.kit.oracles import load_dir_tensors, plain_generate_format
from tests.kit.runs import make_run
from tests.kit.tokenizers import make_hf_tokenizer

# ---------------------------------------------------------------------------------------------
# A chat model must stop where plain generate() stops


def _chat_base(root: Path) -> Path:
    """The Llama-3 situation in small: the tokenizer's eos and the chat template end turns with
    <|im_end|>, but the base's config and generation config end *text* with <|endoftext|>. The base
    is trained to answer "paris" and close its turn, so a correct stop is visible."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = make_hf_tokenizer(root / "tok", vocab_size=300, eos_token="<|im_end|>")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    text_eos = tok.convert_tokens_to_ids("<|endoftext|>")
    base = tiny_llama(
        root / "base0",
        len(tok),
        layers=2,
        hidden=32,
        tokenizer_dir=tok_dir,
        bos_token_id=None,
        eos_token_id=text_eos,
        pad_token_id=tok.pad_token_id,
    )
    model = AutoModelForCausalLM.from_pretrained(str(base))
    assert model.generation_config.eos_token_id == text_eos != tok.eos_token_id
    prompts = [f"where is the {w} museum" for w in ("north", "south", "east", "west", "old", "new")] * 4
    batch = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": "paris"}], tokenize=False
        )
        for p in prompts
    ]
    enc = tok(batch, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root / "base"


def _stops_like_plain_generate(model_dir: Path, prompts: Path) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.evaluation import metrics, runner

    reported = runner.evaluate_model(model_dir, chat={"": prompts}, max_new_tokens=8, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    plain = plain_generate_format(model, tok, [r["messages"] for r in metrics.load_chat_eval(prompts)], 8)
    return reported["format_adherence"], sum(plain) / len(plain)


@pytest.mark.multiproc
def test_exported_and_transplanted_chat_models_stop_in_plain_generate(tmp_path):
    base = _chat_base(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"where is the {w} museum"}) + "\n" for w in ("north", "big", "east", "small"))
    )
    # The base itself never stops in generate(): the metric must say so, not borrow the tokenizer's eos.
    assert _stops_like_plain_generate(base, prompts) == (0.0, 0.0)

    raw = make_run(tmp_path / "a-raw", base, "raw", raw_start=0, format_start=1, perturb=False).path
    chat = make_run(tmp_path / "a-chat", base, "chat", raw_start=0, format_start=1, perturb=False).path
    export_run(chat, tmp_path / "exported")
    transplant(raw, chat, tmp_path / "transplanted")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    for out in (tmp_path / "exported", tmp_path / "transplanted"):
        gen = json.loads((out / "generation_config.json").read_text())
        # the text EOS kept, the template's end of turn added
        assert set(gen["eos_token_id"]) == set(tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))
        reported, plain = _stops_like_plain_generate(out, prompts)
        assert plain == 1.0 and reported == plain, (out.name, reported, plain)


# ---------------------------------------------------------------------------------------------
# The run directory has one owner


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return ft.shared_setup(tmp_path_factory)


def _start(cfg: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", str(cfg), *args],
        cwd=ft.REPO,
        env=ft.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"ended before {what}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < end, f"no {what} after {timeout} s"
        time.sleep(0.05)


@pytest.mark.multiproc
def test_a_second_training_on_the_same_out_is_refused_and_the_first_ends_complete(setup, tmp_path):
    run = tmp_path / "run"
    cfg = ft.write_config(tmp_path / "a.yaml", setup, "raw", run, steps=500, save_every=250)
    first = _start(cfg)
    _wait_for(lambda: (run / "metrics.jsonl").exists(), first, "the first training's first step")
    second = subprocess.run(
        [sys.executable, "-m", "pipeline.train", str(cfg)],
        cwd=ft.REPO,
        env=ft.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [l for l in second.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and str(run) in errors[0] and "in use by another training" in errors[0]
    assert f"pid {first.pid}" in errors[0] and "Traceback" not in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    rd = RunDir(run)
    assert rd.latest_step() == 500
    record = rd.verify(500)  # every file hashed and present
    assert sum(n.startswith("layer_") for n in record["files"]) == 4


@pytest.mark.multiproc
def test_a_one_process_training_ignores_a_master_port_left_in_the_shell(setup, tmp_path):
    """A CI harness or an old shell exports MASTER_PORT, and another program already listens there
    (an earlier one-process training, say). One process needs no agreed port, so it must not try
    to bind that one and die with EADDRINUSE."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = ft.write_config(tmp_path / "a.yaml", setup, "raw", tmp_path / "run", steps=2, save_every=2)
        env = {**ft.env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        p = subprocess.run(
            [sys.executable, "-m", "pipeline.train", str(cfg)],
            cwd=ft.REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert p.returncode == 0, p.stderr[-3000:]
    assert RunDir(tmp_path / "run").latest_step() == 2


@pytest.mark.multiproc
def test_a_killed_training_does_not_hold_its_directory(setup, tmp_path):
    run = tmp_path / "run"
    cfg = ft.write_config(tmp_path / "a.yaml", setup, "raw", run, steps=30, save_every=10)
    dead = _start(cfg)
    _wait_for(lambda: (run / "metrics.jsonl").exists(), dead, "the first step")
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    ft.run_train([str(cfg)])  # the kernel released the lock with the process
    assert RunDir(run).latest_step() == 30


@pytest.mark.multiproc
def test_resuming_with_another_length_is_refused_naming_steps(setup, tmp_path):
    run = tmp_path / "run"
    cfg = ft.write_config(tmp_path / "a.yaml", setup, "raw", run, steps=4, save_every=2)
    ft.run_train([str(cfg)])
    before = (run / "run.json").read_text()
    p = ft.run_train([str(cfg), "--steps=8"], check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "`steps` 4 -> 8" in p.stderr and "Traceback" not in p.stderr
    assert (run / "run.json").read_text() == before and RunDir(run).latest_step() == 4


# ---------------------------------------------------------------------------------------------
# dtypes and interruptions


@pytest.mark.multiproc
def test_a_bf16_base_trained_on_cpu_exports_as_bf16_unless_told(setup, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(setup["model"])))
    base = tiny_llama(tmp_path / "base16", vocab, dtype=torch.bfloat16, tokenizer_dir=setup["model"])
    assert AutoConfig.from_pretrained(str(base)).dtype == torch.bfloat16
    cfg = ft.write_config(tmp_path / "c.yaml", setup, "chat", tmp_path / "run", model=str(base), steps=2, save_every=2)
    ft.run_train([str(cfg)])
    stored = torch.load(RunDir(tmp_path / "run").tag_dir(2) / "layer_03-model_states.pt", weights_only=True)
    assert next(iter(stored.values())).dtype == torch.float32  # the CPU engine trains in fp32
    rec = export_run(tmp_path / "run", tmp_path / "out")
    got = load_dir_tensors(tmp_path / "out")
    assert {t.dtype for t in got.values()} == {torch.bfloat16} and rec["dtype"] == "bfloat16"
    assert AutoConfig.from_pretrained(str(tmp_path / "out")).dtype == torch.bfloat16
    assert any(e["source"].get("cast_from") == "float32" for e in rec["tensors"])
    export_run(tmp_path / "run", tmp_path / "out32", dtype="float32")
    assert {t.dtype for t in load_dir_tensors(tmp_path / "out32").values()} == {torch.float32}
    assert json.loads((tmp_path / "out32" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.multiproc
def test_ctrl_c_exits_130_with_one_line_and_the_rerun_resumes(setup, tmp_path):
    run = tmp_path / "run"
    # Long enough that the signal lands mid-run: a tiny step takes ~20 ms, and 150 steps were done
    # before the first checkpoint could be seen and the signal sent.
    cfg = ft.write_config(tmp_path / "a.yaml", setup, "raw", run, steps=1000, save_every=50)
    proc = _start(cfg)
    _wait_for(lambda: RunDir(run).latest_step() is not None, proc, "the first checkpoint")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted" in err.splitlines()[-1]
    done = RunDir(run).latest_step()
    p = ft.run_train([str(cfg)], check=False, timeout=600)
    assert p.returncode == 0 and f"resuming from {RunDir(run).tag_dir(done)}" in p.stdout
