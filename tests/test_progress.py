"""Progress in a log file: readable lines at a pace, not one `\\r` state per step, and DeepSpeed's
start-up prints summed up in one line."""

from __future__ import annotations

import io

import pytest

from pipeline.training.progress import Progress
from tests.kit import train as ft


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_a_file_gets_a_line_at_the_first_step_every_interval_and_the_last(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("pipeline.training.progress.time.monotonic", clock)
    out = io.StringIO()  # not a TTY
    with Progress("raw", total=1000, initial=0, enabled=True, every_s=30.0, stream=out) as bar:
        for step in range(1, 1001):
            clock.t += 0.5  # 0.5 s a step: 500 s in all, so a line every 60 steps
            bar.update(step, loss=f"{1.0 / step:.4f}")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("raw step 1/1000 (0%) loss 1.0000 elapsed 0:00")
    assert lines[-1].startswith("raw step 1000/1000 (100%) loss 0.0010 elapsed 8:20 eta 0:00")
    steps = [int(line.split()[2].split("/")[0]) for line in lines]
    assert steps == [1, *range(61, 1000, 60), 1000]
    assert "elapsed 0:30 eta 7:49" in lines[1]  # 61 steps in 30.5 s; 939 left at that pace: 469.5 s
    disabled = io.StringIO()
    with Progress("raw", total=10, initial=0, enabled=False, stream=disabled) as bar:
        bar.update(10, loss="1")
    assert disabled.getvalue() == ""


@pytest.mark.multiproc
def test_a_training_log_file_has_lines_not_redraws_and_one_deepspeed_line(tmp_path, tmp_path_factory):
    setup = ft.shared_setup(tmp_path_factory)
    cfg = ft.write_config(
        tmp_path / "c.yaml", setup, "raw", tmp_path / "run", steps=40, save_every=40, pipeline_stages=2
    )
    p = ft.run_train([str(cfg)], ranks=2)  # stdout and stderr are pipes, as in a batch job's log
    assert "\r" not in p.stderr
    progress = [line for line in p.stderr.splitlines() if line.startswith("raw step ")]
    assert progress[0].startswith("raw step 1/40") and progress[-1].startswith("raw step 40/40")
    assert len(progress) < 10  # a short run: the first and the last step, not 40 states
    for noise in ("SEED_LAYERS", "Using topology", "built successfully"):
        assert noise not in p.stdout + p.stderr
    assert sum("DeepSpeed 0." in line and "held back" in line for line in p.stdout.splitlines()) == 1
