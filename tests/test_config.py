"""The run config: the shipped configs are exactly the files on disk, and each parses, validates
and builds a plan; typos and bad values are named precisely."""

from pathlib import Path

import pytest

from data_prep.errors import UserError
from pipeline import shipped
from pipeline.config import LEAVES, describe_keys, load_config, parse_overrides
from pipeline.demo import run as demo_run
from pipeline.training import deepspeed_json

# Where the shipped files live is asked of the product (pipeline/shipped.py finds them as package
# data), never spelled here, so these tests follow the files wherever they move.
CONFIG_DIR = shipped.config_dir()  # run configs and the demo's recipe files
DEMO_DIR = demo_run.CONFIGS  # the demo's configs, as the demo reads them
DS_DIR = shipped.ds_config_dir()  # DeepSpeed JSONs
NAMES = shipped.shipped_configs()  # every shipped YAML, by the name the commands accept ("demo/raw.yaml")
RECIPE_FILES = ("recipe.yaml", "sweep.yaml", "family.yaml")  # the demo's recipes, not run configs
SHIPPED = [CONFIG_DIR / n for n in NAMES if Path(n).name not in RECIPE_FILES]
DS_SHIPPED = sorted(DS_DIR.glob("*.json"))


def files_on_disk(root: Path) -> list[str]:
    """Every YAML or JSON file under `root` (any depth), by its name relative to `root`."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix in (".yaml", ".yml", ".json")
    )


def test_the_shipped_configs_are_the_files_on_disk(tmp_path, monkeypatch):
    """The list the commands offer (and these tests run) is every config file in the product's
    folders, no more and no fewer: a `.yml`, a `.json` or a subfolder it misses fails here."""
    assert NAMES == files_on_disk(CONFIG_DIR)
    assert [p.name for p in DS_SHIPPED] == files_on_disk(DS_DIR)
    # The names the README, the Makefile and the demo use are among them...
    assert {"chat.yaml", "raw.yaml", "demo/chat.yaml", "demo/raw.yaml", "demo/recipe.yaml", "demo/sweep.yaml"} <= set(
        NAMES
    )
    assert {"cpu_fp32_zero1.json", "gpu_bf16_zero1.json"} <= set(files_on_disk(DS_DIR))
    assert DEMO_DIR.resolve() == (CONFIG_DIR / "demo").resolve()
    # ...each recipe-file exclusion names a shipped file (none silently skips a run config that moved)...
    assert sorted(n for n in NAMES if Path(n).name in RECIPE_FILES) == sorted(f"demo/{n}" for n in RECIPE_FILES)
    assert len(SHIPPED) + len(RECIPE_FILES) == len(NAMES)
    # ...and each name finds its file from a user's own folder, as training and the launchers look it up.
    monkeypatch.chdir(tmp_path)
    for n in NAMES:
        assert shipped.find(n).resolve() == (CONFIG_DIR / n).resolve(), n
    for p in DS_SHIPPED:
        assert shipped.find(p.name, DS_DIR).resolve() == p.resolve(), p.name


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_yaml_is_a_run_config_or_a_recipe_file(name):
    """Read for what it holds, each shipped YAML is exactly what its name says: a run config that
    parses and validates, or a recipe file (which is no run config)."""
    from pipeline.demo import recipes

    path = CONFIG_DIR / name
    if Path(name).name in RECIPE_FILES:
        found, worlds = recipes.load(path)
        assert found and all(r.raw.keys() <= recipes.RAW_KEYS for r in found)
        with pytest.raises(UserError, match="unknown config key"):
            load_config(path)
        if Path(name).name == "sweep.yaml":
            assert {
                "replay_0.25",
                "replay_0.5",
                "replay_1",
                "fs5",
                "fs7",
                "raw_trains_format",
                "anchor",
                "reattach",
            } <= {r.name for r in found} and worlds
    else:
        cfg = load_config(path)
        assert cfg.groups.phase in ("chat", "raw", "full")
        assert recipes.load(path) == ([], [])  # nothing in it reads as a recipe


# The shape each shipped config targets: the top-level ones are for a user's own model (any depth:
# 16 layers here), demo/*.yaml for the demo's base.
DEMO_LAYERS = demo_run.SIZES["full"]["model"]["layers"]
# Configs that must agree on the boundary: the transplant merges their runs.
PAIRS = [
    ("chat.yaml", "raw.yaml"),
    ("demo/chat.yaml", "demo/raw.yaml"),
    ("demo/chat.yaml", "demo/reattach.yaml"),
    ("demo/chat.yaml", "demo/sequential.yaml"),
]


def target_layers(path: Path) -> int:
    return DEMO_LAYERS if path.parent.resolve() == DEMO_DIR.resolve() else 16


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Tiny models of every targeted depth, sharing one tokenizer, with raw and chat shards long
    enough for the shipped seq_len (2048)."""
    from transformers import AutoTokenizer

    from data_prep.__main__ import main as prep
    from tests.kit.models import tiny_llama
    from tests.kit.tokenizers import conversations, documents, make_hf_tokenizer, write_jsonl

    root = tmp_path_factory.mktemp("shapes")
    tok = make_hf_tokenizer(root / "tok", vocab_size=300)
    vocab = len(AutoTokenizer.from_pretrained(str(tok)))
    models = {
        L: tiny_llama(root / f"model{L}", vocab, layers=L, max_position=4096, tokenizer_dir=tok)
        for L in {16, DEMO_LAYERS}
    }
    raw = write_jsonl(root / "raw.jsonl", [{"text": d} for d in documents(800, seed=3)])
    chat = write_jsonl(root / "chat.jsonl", conversations(500, seed=4))
    prep(["raw", str(raw), "--tokenizer", str(tok), "--output-prefix", str(root / "raw"), "--val-fraction", "0"])
    prep(["chat", str(chat), "--tokenizer", str(tok), "--output-prefix", str(root / "chat"), "--val-fraction", "0"])
    return {"models": models, "raw": root / "raw.manifest.json", "chat": root / "chat.manifest.json", "root": root}


def plan_of(path: Path, shapes):
    """The shipped config, unchanged but for where its model, data and run live."""
    from pipeline.training.plan import build_plan

    shipped = load_config(path)
    phase = shipped.groups.phase
    overrides = {
        "model": str(shapes["models"][target_layers(path)]),
        "data": str(shapes["chat" if phase == "chat" else "raw"]),
        "out": str(shapes["root"] / "runs" / path.stem),
    }
    if shipped.eval.eval_data:  # the same set names, on data that exists here
        overrides["eval_data"] = {n: {"path": str(shapes["raw"]), "split": "train"} for n in shipped.eval.eval_data}
    cfg = load_config(path, overrides)
    return build_plan(cfg, world_size=cfg.parallel.pipeline_stages, use_gpu=False)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_every_shipped_config_builds_a_plan_for_the_model_it_targets(path, shapes):
    plan = plan_of(path, shapes)
    assert plan.groups.num_layers == target_layers(path)
    assert plan.stages[-1] == plan.groups.num_layers and plan.num_stages == plan.cfg.parallel.pipeline_stages
    assert plan.record()["config"]["phase"] == plan.cfg.groups.phase


@pytest.mark.parametrize("a,b", PAIRS, ids=lambda p: p)
def test_paired_configs_agree_on_the_boundary(a, b, shapes):
    ga, gb = plan_of(CONFIG_DIR / a, shapes).groups, plan_of(CONFIG_DIR / b, shapes).groups
    assert (ga.raw_start, ga.format_start) == (gb.raw_start, gb.format_start)


@pytest.mark.parametrize("path", DS_SHIPPED, ids=lambda p: p.name)
def test_every_shipped_ds_config_merges(path, tmp_path):
    cfg = load_config(_write(tmp_path, f"ds_config: {path}\n"))
    ds, _ = deepspeed_json.load(cfg, use_gpu=False)
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
        deepspeed_json.load(cfg, use_gpu=False)


def test_every_key_is_documented():
    text = describe_keys()
    for key, (_, f) in LEAVES.items():
        assert f.metadata["doc"].strip() and f"  {key} (" in text
    for key in (
        "model",
        "data",
        "phase",
        "raw_start",
        "format_start",
        "raw_trains_format",
        "pipeline_stages",
        "seq_len",
        "micro_batch_size",
        "global_batch_size",
        "steps",
        "lr",
        "seed",
        "out",
        "save_every",
        "keep_last",
    ):
        assert key in LEAVES


@pytest.mark.parametrize(
    "fragment,key,owner",
    [
        ('"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}', "optimizer.params.lr", "lr"),
        (
            '"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1}}',
            "optimizer.params.weight_decay",
            "weight_decay",
        ),
        ('"gradient_clipping": 0.5', "gradient_clipping", "grad_clip"),
        ('"train_batch_size": 8', "train_batch_size", "global_batch_size"),
        ('"train_micro_batch_size_per_gpu": 2', "train_micro_batch_size_per_gpu", "micro_batch_size"),
        ('"gradient_accumulation_steps": 2', "gradient_accumulation_steps", "global_batch_size"),
        ('"scheduler": {"type": "WarmupLR"}', "scheduler", "warmup_steps"),
        (
            '"pipeline": {"activation_checkpoint_interval": 1}',
            "pipeline.activation_checkpoint_interval",
            "activation_checkpoint_interval",
        ),
        ('"tensorboard": {"enabled": true}', "tensorboard", "report_to"),
        ('"wandb": {"enabled": true, "project": "p"}', "wandb", "wandb_project"),
        ('"csv_monitor": {"enabled": true}', "csv_monitor", "report_to"),
    ],
)
def test_ds_json_refuses_every_key_the_run_config_owns(tmp_path, fragment, key, owner):
    ds = tmp_path / "ds.json"
    ds.write_text("{" + fragment + "}")
    cfg = load_config(_write(tmp_path, f"ds_config: {ds}\n"))
    with pytest.raises(UserError, match=rf"ds\.json: `{key}` is decided by the run config \(`[^`]*{owner}"):
        deepspeed_json.load(cfg, use_gpu=False)


def test_ds_json_keeps_what_it_owns(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(
        '{"optimizer": {"type": "AdamW", "params": {"betas": [0.8, 0.9], "eps": 1e-6}}, '
        '"zero_optimization": {"stage": 1}, "bf16": {"enabled": true}}'
    )
    cfg = load_config(_write(tmp_path, f"ds_config: {ds}\nlr: 0.25\n"))
    raw, _ = deepspeed_json.load(cfg, use_gpu=False)
    merged = deepspeed_json.merged(raw, cfg, 16, 4, 2, dp_size=1)
    assert merged["optimizer"]["params"] == {"betas": [0.8, 0.9], "eps": 1e-6, "lr": 0.25, "weight_decay": 0.0}
    assert (
        merged["train_batch_size"],
        merged["train_micro_batch_size_per_gpu"],
        merged["gradient_accumulation_steps"],
    ) == (16, 4, 2)
    assert merged["bf16"] == {"enabled": True} and merged["zero_optimization"]["stage"] == 1


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    p = _write(tmp_path, "lr: 0.5\nsteps: 3\nlr: 1.0\n")
    with pytest.raises(UserError, match=r"run\.yaml:7: `lr` is given twice \(first at line 5\)"):
        load_config(p)


@pytest.mark.parametrize(
    "extra,key",
    [
        ("lr: -1\n", "lr"),
        ("lr: 0\n", "lr"),
        ("steps: 0\n", "steps"),
        ("min_lr: 0.5\nlr: 0.1\n", "min_lr"),
        ("weight_decay: -0.1\n", "weight_decay"),
        ("grad_clip: -1\n", "grad_clip"),
        ("warmup_steps: -2\n", "warmup_steps"),
    ],
)
def test_out_of_range_values_name_the_key(tmp_path, extra, key):
    with pytest.raises(UserError, match=rf"run\.yaml:\d+: `{key}`"):
        load_config(_write(tmp_path, extra))


def test_a_recipe_file_with_a_typo_names_it(tmp_path):
    from pipeline.demo import recipes

    bad = tmp_path / "r.yaml"
    bad.write_text("recipes:\n  - name: x\n    replay_share: 0.5\n")
    with pytest.raises(UserError, match=r"r\.yaml: recipes\[0\]: unknown key\(s\) replay_share"):
        recipes.load(bad)
    bad.write_text("recipes:\n  - name: x\n    raw: {format_star: 5}\n")
    with pytest.raises(UserError, match=r"`raw` may set"):
        recipes.load(bad)
    for value in ("-0.5", "true", ".inf", "half"):
        bad.write_text(f"recipes:\n  - name: x\n    chat_replay: {value}\n")
        with pytest.raises(UserError, match=r"recipes\[0\]: `chat_replay` must be a number >= 0"):
            recipes.load(bad)


def test_a_recipe_builds_a_member_of_the_layer_aware_merge_family(tmp_path):
    from pipeline.demo import recipes

    f = tmp_path / "r.yaml"
    f.write_text("name: blend\nmerge: chat_vector\nweights: {raw: 'format=0.5', transition: 2}\n")
    (r,), _ = recipes.load(f)
    assert r.merge_args == ["--raw-weights", "format=0.5", "--transition", "2"] and not r.is_vanilla
    f.write_text("name: blend\nweights: {raw: 'format=0.5'}\n")  # a transplant has no deltas to weight
    with pytest.raises(UserError, match="`weights` needs `merge: chat_vector`"):
        recipes.load(f)
    f.write_text("name: blend\nmerge: chat_vector\nweights: {ratio: 2}\n")
    with pytest.raises(UserError, match="`weights` may set chat, raw, transition"):
        recipes.load(f)
    f.write_text("name: iv\nchat_model: instruct\n")  # a full chat tune has no format group to swap in
    with pytest.raises(UserError, match="`chat_model: instruct` needs `merge: chat_vector`"):
        recipes.load(f)
    f.write_text("name: iv\nmerge: chat_vector\nchat_model: chat_full\n")
    with pytest.raises(UserError, match="`chat_model` must be one of a_chat, instruct"):
        recipes.load(f)
    f.write_text("name: iv\nmerge: chat_vector\nchat_model: instruct\n")
    (r,), _ = recipes.load(f)
    assert r.chat_model == "instruct" and not r.is_vanilla
