"""What happens when things go wrong: kills, dead ranks, damaged files.

- kill -9 of a 2-rank training at a random step, then the same command again: the final weights
  are bit-identical to an uninterrupted run's and metrics.jsonl holds the same loss curve;
- kill -9 while a checkpoint is being saved: the half-written tag is never taken as the latest,
  a checkpoint file that disagrees with its record.json stops the resume on every rank, and the
  resumed run still ends bit-identical;
- one rank of a 4-rank job SIGKILLs itself: every rank exits non-zero within 120 s, each naming
  rank 2, and no process of the job is left (under `deepspeed`, and with no launcher to help);
- a SIGTERM from outside stops every rank within seconds, saying no rank had died;
- kill -9 of a transplant: nothing that looks complete is left, and a rerun is byte-identical.
(kill -9 during data prep: tests/test_data_prep_raw.py::test_kill_mid_run_leaves_nothing_finished.)

Kill moments are drawn from a seeded RNG; the seed is printed and can be replayed with
LAYER_AWARE_TEST_SEED=N. Ranks are started the way torchrun/srun start them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT per process, all in one new process group) so the test can
SIGKILL the whole job at once and see every rank's exit status; the dead-rank test uses the real
`deepspeed` launcher, whose reaction to a dead child is part of what it checks.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.names import layer_file
from pipeline.rundir import RunDir, tag_for
from pipeline.training.metrics_log import read_metrics
from tests.kit import train as ft
from tests.kit.oracles import checkpoint_tensors

SEED = int(os.environ.get("LAYER_AWARE_TEST_SEED") or random.SystemRandom().randrange(1_000_000))
STEPS, SAVE_EVERY = 24, 4
RUN = dict(pipeline_stages=2, steps=STEPS, save_every=SAVE_EVERY, keep_last=2, dist_timeout_s=60)
LAUNCH_TIMEOUT = 400


@pytest.fixture(scope="module")
def rng():
    print(f"\nkill moments drawn with LAYER_AWARE_TEST_SEED={SEED}")
    return random.Random(SEED)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return ft.shared_setup(tmp_path_factory)


def config(setup, name: str, **overrides) -> tuple[Path, Path]:
    run = setup["root"] / "runs" / name
    return ft.write_config(setup["root"] / f"{name}.yaml", setup, "raw", run, **{**RUN, **overrides}), run


FAULTS = str(ft.REPO / "tests" / "helpers" / "train_with_faults.py")


def entry(env: dict | None) -> list[str]:
    """The real entry point; with fault variables set, the same under tests/kit/faults.py."""
    if any(k.startswith("LAYER_AWARE_TEST_") and k != "LAYER_AWARE_TEST_SEED" for k in (env or {})):
        return [sys.executable, FAULTS]
    return [sys.executable, "-m", "pipeline.train"]


class Job:
    """n ranks of `python -m pipeline.train CONFIG` in one new process group, logs in files."""

    def __init__(self, cfg: Path, n: int = 2, env: dict | None = None):
        port = ft.free_port()
        self.logs = [cfg.with_name(f"{cfg.stem}.{time.monotonic_ns()}.rank{r}.log") for r in range(n)]
        self.procs = []
        for r in range(n):
            e = {
                **ft.env(),
                **(env or {}),
                "RANK": str(r),
                "WORLD_SIZE": str(n),
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            group = {"process_group": 0 if r == 0 else self.procs[0].pid}
            self.procs.append(
                subprocess.Popen(
                    [*entry(env), str(cfg)],
                    cwd=ft.REPO,
                    env=e,
                    stdout=open(self.logs[r], "w"),
                    stderr=subprocess.STDOUT,
                    **group,
                )
            )

    def kill(self) -> None:
        os.killpg(self.procs[0].pid, signal.SIGKILL)

    def wait(self, timeout: float = LAUNCH_TIMEOUT) -> list[int]:
        end = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1.0, end - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job still running after {timeout} s:\n{self.output()}") from None

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")


def train_to_end(cfg: Path, n: int = 2, **env) -> Job:
    job = Job(cfg, n, env)
    codes = job.wait()
    assert codes == [0] * n, f"exit codes {codes}:\n" + "\n".join(job.output(r)[-3000:] for r in range(n))
    return job


def wait_for(cond, job: Job, what: str, timeout: float = LAUNCH_TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if not job.running():
            raise AssertionError(f"job ended before {what} (seed {SEED}):\n{job.output()[-3000:]}")
        if time.monotonic() > end:
            job.kill()
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.005)


def assert_same_run(run: Path, baseline: Path) -> None:
    got, want = checkpoint_tensors(run, STEPS), checkpoint_tensors(baseline, STEPS)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{k} differs (seed {SEED})"
    curve = lambda r: [(m["step"], m["loss"], m["lr"]) for m in read_metrics(r / "metrics.jsonl")]
    assert curve(run) == curve(baseline), f"loss curve differs (seed {SEED})"
    assert len(curve(run)) == STEPS


@pytest.fixture(scope="module")
def baseline(setup):
    cfg, run = config(setup, "uninterrupted")
    train_to_end(cfg)
    rows = read_metrics(run / "metrics.jsonl")
    assert rows[0]["loss"] != rows[-1]["loss"]  # it trains, so equal weights mean something
    return run


@pytest.mark.multiproc
def test_kill9_mid_training_then_resume_is_bit_identical(setup, baseline, rng):
    cfg, run = config(setup, "killed")
    kill_after = rng.randint(3, STEPS - 8)
    job = Job(cfg)
    metrics = run / "metrics.jsonl"
    wait_for(
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after, job, f"step {kill_after}"
    )
    job.kill()
    assert job.wait() == [-signal.SIGKILL] * 2
    done = len(read_metrics(metrics))
    print(f"killed after step {done} (aimed at {kill_after})")
    assert done < STEPS, "the run finished before the kill"
    resume_from = RunDir(run).latest_step()
    assert resume_from is None or resume_from <= done

    job = train_to_end(cfg)
    if resume_from:
        assert f"resuming from {run / 'checkpoints' / tag_for(resume_from)}" in job.output()
    assert_same_run(run, baseline)


@pytest.mark.multiproc
def test_kill9_during_checkpoint_save(setup, baseline, rng):
    cfg, run = config(setup, "killed_in_save")
    ckpt = run / "checkpoints"
    save = rng.randint(2, STEPS // SAVE_EVERY - 1)
    tag = ckpt / tag_for(save * SAVE_EVERY)
    # Every rank's DeepSpeed files of this tag are on disk and record.json is not: kill in there.
    job = Job(cfg, env={"LAYER_AWARE_TEST_PAUSE_IN_SAVE": "3"})
    wait_for(lambda: len(list(tag.glob("mp_rank_*_model_states.pt"))) == 2, job, f"the save of {tag.name}")
    time.sleep(rng.uniform(0.0, 1.5))
    job.kill()
    assert job.wait() == [-signal.SIGKILL] * 2
    previous = (save - 1) * SAVE_EVERY
    print(f"killed while saving {tag.name}")
    assert tag.is_dir() and not (tag / "record.json").exists() and any(tag.iterdir())
    assert RunDir(run).latest_step() == previous
    assert (ckpt / "latest").read_text().strip() == tag_for(previous)

    # A checkpoint file that disagrees with its record: every rank refuses to resume from it.
    bad = ckpt / tag_for(previous) / layer_file(1)
    good = bad.read_bytes()
    bad.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    job = Job(cfg)
    codes = job.wait()
    # 2: this rank hit the error itself; 3: it stopped on the other rank's word (whichever came first).
    assert set(codes) <= {2, 3} and 2 in codes, codes
    for r in range(2):
        err = [l for l in job.output(r).splitlines() if l.startswith("error: ")]
        assert err and str(bad) in err[0] and "sha256" in err[0] and "record.json" in err[0], job.output(r)
        assert "Traceback" not in job.output(r)
    bad.write_bytes(good)

    job = train_to_end(cfg)
    assert f"resuming from {ckpt / tag_for(previous)}" in job.output()
    assert_same_run(run, baseline)


WRAPPER = """#!/bin/bash
# One rank under the deepspeed launcher: run it, then record how it ended. The trap keeps this
# shell alive through the launcher's SIGTERM (bash runs it only after its child has exited).
trap ':' TERM
"{python}" -u {entry} "$@" > "{logs}/rank_$RANK.log" 2>&1
code=$?
echo $code > "{logs}/exit_$RANK"
exit $code
"""


class LauncherJob:
    """`deepspeed --num_gpus n` running each rank through WRAPPER, in one new session."""

    def __init__(self, cfg: Path, n: int, env: dict, logs: Path):
        wrapper = logs / "rank.sh"
        wrapper.write_text(WRAPPER.format(python=sys.executable, logs=logs, entry=FAULTS))
        wrapper.chmod(0o755)
        self.logs = [logs / f"rank_{r}.log" for r in range(n)]
        self.exit_files = [logs / f"exit_{r}" for r in range(n)]
        self.launcher = subprocess.Popen(
            [
                str(ft.VENV_BIN / "deepspeed"),
                "--num_gpus",
                str(n),
                "--master_port",
                str(ft.free_port()),
                "--no_python",
                str(wrapper),
                str(cfg),
            ],
            cwd=ft.REPO,
            env={**ft.env(), **env},
            stdout=open(logs / "launcher.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pgid = self.launcher.pid

    def running(self) -> bool:
        return self.launcher.poll() is None

    def kill(self) -> None:
        os.killpg(self.pgid, signal.SIGKILL)

    def wait(self, timeout: float) -> list[int]:
        self.launcher.wait(timeout=timeout)  # it returns once every rank is gone
        assert self.launcher.returncode != 0
        # bash reports a rank killed by signal S as 128 + S; Popen as -S: use Popen's convention.
        codes = [int(f.read_text()) for f in self.exit_files]
        return [-(c - 128) if c > 128 else c for c in codes]

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")


@pytest.mark.multiproc
@pytest.mark.parametrize("launcher", ["deepspeed", "ranks"])
def test_a_dead_rank_stops_every_rank_with_its_name(setup, tmp_path, launcher):
    """Rank 2 of 4 (P=2 x DP=2) SIGKILLs itself after step 3.

    deepspeed: its launcher SIGTERMs the other local ranks (the single-node case).
    ranks: nobody tells the survivors (a rank on another node, mpirun/srun without kill-on-exit):
    they find out from their collectives or from the verdict another rank left in the store.
    """
    cfg, run = config(setup, f"dead_rank_{launcher}", steps=40, dist_timeout_s=30)
    env = {"LAYER_AWARE_TEST_DIE_RANK": "2", "LAYER_AWARE_TEST_DIE_STEP": "3"}
    job = LauncherJob(cfg, 4, env, tmp_path) if launcher == "deepspeed" else Job(cfg, 4, env)
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, job, "step 3")
    died = time.monotonic()
    try:
        codes = job.wait(timeout=120)
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError("the job hung: still running 120 s after rank 2 died") from None
    took = time.monotonic() - died
    print(f"{launcher}: every rank gone {took:.1f} s after rank 2 died; exit codes {codes}")
    assert took < 120
    # Nothing of the job is left: the launcher and the ranks all ran in this process group.
    time.sleep(1.0)
    with pytest.raises(ProcessLookupError):
        os.killpg(job.pgid if launcher == "deepspeed" else job.procs[0].pid, 0)

    assert codes[2] == -signal.SIGKILL, codes
    for r in (0, 1, 3):
        out = job.output(r)
        assert codes[r] != 0, (r, codes)
        errors = [l for l in out.splitlines() if "error: " in l]
        assert errors and f"[rank {r}]" in errors[-1] and "rank 2 died" in errors[-1], out[-3000:]
        assert "Traceback" not in out, out[-3000:]


@pytest.mark.multiproc
def test_sigterm_stops_every_rank_promptly(setup):
    """A scheduler's SIGTERM (preemption, scancel) reaches the ranks while they train: each says
    that no rank had died and exits 143 within seconds, even mid-collective."""
    cfg, run = config(setup, "sigterm", steps=400, save_every=100)
    job = Job(cfg, 2)
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, job, "step 3")
    os.killpg(job.procs[0].pid, signal.SIGTERM)
    t0 = time.monotonic()
    codes = job.wait(timeout=60)
    assert codes == [128 + signal.SIGTERM] * 2, codes
    assert time.monotonic() - t0 < 30
    for r in range(2):
        errors = [l for l in job.output(r).splitlines() if "error: " in l]
        assert errors and f"[rank {r}] received SIGTERM" in errors[-1] and "every rank is alive" in errors[-1], (
            job.output(r)[-3000:]
        )


@pytest.mark.multiproc
def test_kill9_during_transplant_leaves_nothing_complete(tmp_path, rng):
    from pipeline.convert.transplant import transplant
    from tests.kit.runs import make_base, make_run

    # Big enough (~70 MB of weights, 5 MB shards) that the transplant is still writing when killed.
    base = make_base(tmp_path / "base", num_layers=8, hidden=512)
    raw = make_run(tmp_path / "a-raw", base, "raw", raw_start=2, format_start=6).path
    chat = make_run(tmp_path / "a-chat", base, "chat", raw_start=2, format_start=6).path
    out = tmp_path / "out" / "transplant"
    out.parent.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "pipeline.transplant",
        "--raw",
        str(raw),
        "--chat",
        str(chat),
        "--out",
        str(out),
        "--max-shard-size",
        "5MB",
    ]
    proc = subprocess.Popen(cmd, cwd=ft.REPO, env=ft.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # 24 shards of 5 MB: kill once a random number of them is on disk.
    kill_at = rng.randint(1, 18)
    written = lambda: sum(len(list(p.glob("*.safetensors"))) for p in out.parent.glob(f".tmp-{out.name}*"))
    end = time.monotonic() + 120
    while written() < kill_at:
        assert proc.poll() is None and time.monotonic() < end, "the transplant ended before the kill"
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the transplant finished before the kill: grow the model"
    left = [p.name for p in out.parent.iterdir()]
    assert not out.exists() and all(n.startswith(".tmp-") for n in left), left

    subprocess.run(cmd, cwd=ft.REPO, env=ft.env(), check=True, capture_output=True, timeout=300)
    transplant(raw, chat, tmp_path / "clean" / "transplant", max_shard_size="5MB")
    # mergekit.yaml names export paths beside its own --out (absolute, by design): compare it with that folder named X
    files = lambda d: {
        p.name: p.read_bytes().replace(str(d.parent.resolve()).encode(), b"X") for p in sorted(d.iterdir())
    }
    got, want = files(out), files(tmp_path / "clean" / "transplant")
    assert got.keys() == want.keys() and len(got) > 5
    assert got == want


@pytest.mark.multiproc
def test_a_cpu_job_leaves_no_shared_memory_behind(setup):
    """DeepSpeed's CPU allreduce maps a 69 MB /dev/shm segment per rank; left named, every job
    under the deepspeed launcher (finished or killed) would keep 69 MB per rank of RAM until reboot."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    cfg, _ = config(setup, "shm", steps=2, save_every=2)
    ft.run_train([str(cfg)], ranks=2)
    left = set(shm.glob("deepspeed_allreduce_buffer_*")) - before
    assert not left, sorted(p.name for p in left)


@pytest.mark.multiproc
def test_a_diverging_run_stops_at_its_step_and_keeps_the_last_good_checkpoint(setup):
    """lr 1e30 trains one finite step (saved), then the loss is NaN: both ranks of a 2-stage job
    stop at step 2 with exit 4 and a line naming the step, nothing NaN is logged or saved, and the
    latest checkpoint is step 1."""
    cfg, run = config(setup, "diverge", steps=6, save_every=1, lr=1e30, warmup_steps=0)
    p = ft.run_train([str(cfg)], ranks=2, check=False)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "error: step 2: loss nan" in out and "the last good checkpoint (step 1) stays the latest" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert RunDir(run).latest_step() == 1
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1] and all(r["loss"] == r["loss"] for r in rows if "loss" in r)
    assert all(torch.isfinite(t).all() for t in checkpoint_tensors(run).values())
