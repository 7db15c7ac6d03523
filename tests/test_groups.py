"""The layer groups (the one owner of membership) and the group-aligned stage partition."""

import pytest

from data_prep.errors import UserError
from pipeline.groups import FORMAT, FROZEN, RAW, LayerGroups
from pipeline.names import to_hf_name, to_pipeline_name
from pipeline.training.plan import layer_cost, partition


def groups(raw, fmt, L, phase="chat", tied=False, **kw):
    return LayerGroups.resolve(raw, fmt, L, tied, phase, **kw)


def test_fractions_resolve_to_layers():
    g = groups(0.25, 0.75, 8)
    assert (g.raw_start, g.format_start) == (2, 6)
    assert (groups(0.3, 0.7, 10).raw_start, groups(0.3, 0.7, 10).format_start) == (3, 7)


@pytest.mark.parametrize(
    "raw,fmt,msg",
    [
        (4, 4, "raw group would be empty"),
        (5, 3, "must be <"),
        (1, 8, "must be < the layer count"),
        (0, 0, ">= 1"),
        (1.5, 6, r"fraction must lie in \[0, 1\]"),
        (-1, 6, ">= 0"),
    ],
)
def test_invalid_boundaries_name_the_key_and_where(raw, fmt, msg):
    with pytest.raises(UserError, match=msg) as e:
        groups(raw, fmt, 8, "raw", where={"raw_start": "run.yaml:4", "format_start": "run.yaml:5"})
    assert "run.yaml:" in str(e.value)


@pytest.mark.parametrize("tied", [False, True])
def test_membership_by_name(tied):
    g = groups(2, 6, 8, tied=tied)
    assert g.group_of("model.layers.1.mlp.up_proj.weight") == FROZEN
    assert g.group_of("model.layers.2.self_attn.q_proj.bias") == RAW
    assert g.group_of("model.layers.5.input_layernorm.weight") == RAW
    assert g.group_of("model.layers.6.mlp.up_proj.weight") == FORMAT
    assert g.group_of("model.embed_tokens.weight") == FROZEN
    assert g.group_of("model.norm.weight") == FORMAT
    # The tied head is the embedding matrix: it goes with the embeddings, never with the format group.
    assert g.group_of("lm_head.weight") == (FROZEN if tied else FORMAT)
    with pytest.raises(KeyError):
        g.group_of("model.vision_tower.weight")


@pytest.mark.parametrize("phase,trained", [("chat", {FORMAT}), ("raw", {RAW}), ("full", {FROZEN, RAW, FORMAT})])
def test_what_each_phase_trains(phase, trained):
    g = groups(2, 6, 8, phase)
    assert set(g.trained) == trained
    assert g.trains("model.layers.7.mlp.up_proj.weight") == (FORMAT in trained)
    assert g.trains("model.layers.3.mlp.up_proj.weight") == (RAW in trained)
    assert g.embeddings_trained == (phase == "full")
    assert set(groups(2, 6, 8, "raw", raw_trains_format=True).trained) == {RAW, FORMAT}


def test_record_round_trip_and_refusals():
    g = groups(2, 6, 8, "raw", tied=True)
    assert LayerGroups.from_record(g.to_record(), "run.json") == g
    bad = {**g.to_record(), "format_start": 9}
    with pytest.raises(UserError, match="run.json: `groups` is not a valid layer split"):
        LayerGroups.from_record(bad, "run.json")
    with pytest.raises(UserError, match="incomplete"):
        LayerGroups.from_record({"num_layers": 8}, "run.json")


@pytest.mark.parametrize("phase", ["chat", "raw", "full"])
@pytest.mark.parametrize("L,raw,fmt", [(4, 1, 3), (8, 2, 6), (12, 0, 9), (16, 4, 8), (6, 1, 5)])
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_raw_format_boundary_is_always_a_stage_boundary(phase, L, raw, fmt, P):
    g = groups(raw, fmt, L, phase)
    bounds = partition(g, P)
    assert bounds[0] == 0 and bounds[-1] == L and len(bounds) == P + 1
    assert all(a < b for a, b in zip(bounds, bounds[1:])), "every stage holds a layer"
    if P >= 2:
        assert fmt in bounds
        for s in range(P):
            held = {g.group_of_layer(i) for i in range(bounds[s], bounds[s + 1])}
            assert not {RAW, FORMAT} <= held, "raw and format share a stage"


def test_partition_balances_by_cost_frozen_layers_are_cheap():
    # chat phase on 8 layers, format = last 2: the 6 forward-only layers (cost 1 each) and the
    # 2 trained ones (cost 3 each) balance as 6 vs 6.
    g = groups(2, 6, 8, "chat")
    assert [layer_cost(g, i) for i in range(8)] == [1, 1, 1, 1, 1, 1, 3, 3]
    assert partition(g, 2) == [0, 6, 8]
    # raw phase: layers above the raw group pass gradients down (cost 2), the prefix is forward-only
    g = groups(2, 6, 8, "raw")
    assert [layer_cost(g, i) for i in range(8)] == [1, 1, 3, 3, 3, 3, 2, 2]
    assert partition(g, 2) == [0, 6, 8]
    # full phase: uniform costs, so four equal stages, the boundary at 6 forcing [..6) | [6..8)
    assert partition(groups(2, 6, 8, "full"), 4) == [0, 2, 4, 6, 8]


def test_names_round_trip():
    for hf in [
        "model.layers.3.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]:
        i, key = to_pipeline_name(hf, 8)
        assert to_hf_name(i, key) == hf
    assert to_pipeline_name("model.embed_tokens.weight", 8)[0] == 0
    assert to_pipeline_name("lm_head.weight", 8)[0] == 7
    assert to_hf_name(2, "anchor") is None
