"""Layer groups and the group-aligned stage partition."""
import pytest

from data_prep.common import UserError
from pipeline.groups import make_groups, partition
from pipeline.names import group_of, to_hf_name, to_pipeline_name


def test_fractions_resolve_to_layers():
    g = make_groups(0.25, 0.75, 8, "chat")
    assert (g.raw_start, g.format_start) == (2, 6)


@pytest.mark.parametrize("raw,fmt,msg", [(4, 4, "raw group would be empty"), (5, 3, "must be <"),
                                         (1, 8, "must be < the layer count"), (0, 0, ">= 1")])
def test_invalid_boundaries(raw, fmt, msg):
    with pytest.raises(UserError, match=msg):
        make_groups(raw, fmt, 8, "raw")


@pytest.mark.parametrize("phase", ["chat", "raw", "full"])
@pytest.mark.parametrize("L,raw,fmt", [(4, 1, 3), (8, 2, 6), (12, 0, 9), (16, 4, 8), (6, 1, 5)])
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_raw_format_boundary_is_always_a_stage_boundary(phase, L, raw, fmt, P):
    g = make_groups(raw, fmt, L, phase)
    if P > L:
        return
    bounds = partition(g, P)
    assert bounds[0] == 0 and bounds[-1] == L and len(bounds) == P + 1
    assert all(a < b for a, b in zip(bounds, bounds[1:])), "every stage holds a layer"
    if P >= 2:
        assert fmt in bounds
        for s in range(P):
            groups = {g.group_of_layer(i) for i in range(bounds[s], bounds[s + 1])}
            assert not {"raw", "format"} <= groups, "raw and format share a stage"


def test_partition_balances_by_cost_frozen_layers_are_cheap():
    # chat phase on 8 layers, format = last 2: the 6 forward-only layers (cost 1 each) and the
    # 2 trained ones (cost 3 each) balance as 6 vs 6.
    g = make_groups(2, 6, 8, "chat")
    assert partition(g, 2) == [0, 6, 8]
    # full phase: uniform costs, so four equal stages, the boundary at 6 forcing [..6) | [6..8)
    g = make_groups(2, 6, 8, "full")
    assert partition(g, 4) in ([0, 2, 4, 6, 8],)


def test_more_stages_than_layers():
    with pytest.raises(UserError, match="pipeline_stages"):
        partition(make_groups(1, 3, 4, "raw"), 5)


def test_names_round_trip():
    for hf in ["model.layers.3.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight",
               "lm_head.weight"]:
        i, key = to_pipeline_name(hf, 8)
        assert to_hf_name(i, key) == hf
    assert to_hf_name(2, "anchor") is None
    assert group_of("model.layers.1.mlp.up_proj.weight", 2, 6) == "frozen"
    assert group_of("model.layers.2.mlp.up_proj.weight", 2, 6) == "raw"
    assert group_of("model.layers.6.mlp.up_proj.weight", 2, 6) == "format"
    assert group_of("lm_head.weight", 2, 6) == "format"
    assert group_of("model.embed_tokens.weight", 2, 6) == "frozen"
