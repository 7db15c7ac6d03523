"""The learning-rate schedule against the reference's own definition, for whole-step and
fractional warm-ups, and the fractions that make no sense refused."""

import pytest

from data_prep.errors import UserError
from pipeline.config import load_config
from pipeline.training.schedule import lr_factor
from tests.kit.reference import lr_at


@pytest.mark.parametrize(
    "warmup,steps,first_full", [(0, 10, 0), (3, 10, 2), (0.05, 20, 0), (0.07, 100, 6), (0.05, 2000, 99), (0.5, 3, 1)]
)
def test_schedule_matches_the_definition(warmup, steps, first_full):
    cfg = load_config("chat.yaml", {"warmup_steps": warmup, "steps": steps, "min_lr": 1e-6})
    got = [lr_factor(k, cfg) * cfg.optim.lr for k in range(steps)]
    assert got == pytest.approx([lr_at(k, cfg) for k in range(steps)], rel=1e-12, abs=1e-15)
    assert got[first_full] == pytest.approx(cfg.optim.lr)  # the last warm-up step reaches the peak
    assert max(got) == pytest.approx(cfg.optim.lr) and got[-1] > 1e-6 > 0


@pytest.mark.parametrize("warmup", [1.0, 1.5, -0.1])
def test_a_fraction_outside_zero_one_is_refused(warmup):
    with pytest.raises(UserError, match="warmup_steps"):
        load_config("chat.yaml", {"warmup_steps": warmup})
