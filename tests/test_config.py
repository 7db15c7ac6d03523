"""The run config: every shipped config parses; typos and bad values are named precisely."""
from pathlib import Path

import pytest

from data_prep.common import UserError
from pipeline.config import LEAVES, describe_keys, load_config, parse_overrides, load_ds_config

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_shipped_configs():
    assert len(SHIPPED) >= 6


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert cfg.groups.phase in ("chat", "raw", "full")
    assert cfg.schedule.out and cfg.data.data


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_ds_config_merges(path, tmp_path):
    cfg = load_config(_write(tmp_path, f"ds_config: {path}\n"))
    ds, _ = load_ds_config(cfg, use_gpu=False)
    assert ds["zero_optimization"]["stage"] == 1


def _write(tmp_path, extra: str = "") -> Path:
    p = tmp_path / "run.yaml"
    p.write_text("model: m\ndata: d.manifest.json\nphase: raw\nout: o\n" + extra)
    return p


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    p = _write(tmp_path, "seq_len: 64\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match=r"run\.yaml:6: unknown config key `learning_rate`"):
        load_config(p)


def test_typo_close_to_a_key_gets_a_suggestion(tmp_path):
    with pytest.raises(UserError, match="did you mean `format_start`"):
        load_config(_write(tmp_path, "fromat_start: 3\n"))


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r":5: `steps` must be int"):
        load_config(_write(tmp_path, "steps: many\n"))


def test_override_wins_and_is_typed(tmp_path):
    cfg = load_config(_write(tmp_path, "lr: 0.1\n"), parse_overrides(["--lr=3e-4", "--steps=7"]))
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.schedule.steps == 7


def test_unknown_override_flag_is_rejected():
    with pytest.raises(UserError, match="--stpes"):
        parse_overrides(["--stpes=3"])


def test_missing_required_key(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model: m\nphase: raw\nout: o\n")
    with pytest.raises(UserError, match="required config key `data`"):
        load_config(p)


def test_batch_must_divide(tmp_path):
    with pytest.raises(UserError, match="global_batch_size"):
        load_config(_write(tmp_path, "micro_batch_size: 3\nglobal_batch_size: 8\n"))


def test_zero_stage_2_is_refused_with_the_file(tmp_path):
    ds = tmp_path / "z2.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    cfg = load_config(_write(tmp_path, f"ds_config: {ds}\n"))
    with pytest.raises(UserError, match=r"z2\.json: `zero_optimization\.stage` is 2"):
        load_ds_config(cfg, use_gpu=False)


def test_every_key_is_documented():
    text = describe_keys()
    for key, (_, f) in LEAVES.items():
        assert f.metadata["doc"].strip() and f"  {key} (" in text
    for key in ("model", "data", "phase", "raw_start", "format_start", "raw_trains_format", "pipeline_stages",
                "seq_len", "micro_batch_size", "global_batch_size", "steps", "lr", "seed", "out", "save_every",
                "keep_last"):
        assert key in LEAVES
