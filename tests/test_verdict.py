"""The demo's verdict says what the numbers show, whichever way they fall: no result when the control
or the upper bound fails, the claim when a variant meets both bars, and a plain "does NOT hold"
otherwise. Each case is built from the bars themselves, so moving a bar or a formula breaks a test."""

import math

import pytest

from pipeline.demo import verdict as V

CHANCE = 10.0


def row(fmt, rank, heldout=9.0, acc=0.0):
    return {
        "format_adherence": fmt,
        "knowledge_rank": rank,
        "heldout_known_rank": heldout,
        "knowledge_accuracy": acc,
        "chance_rank": CHANCE,
        "raw_rank_new": 5.0,
    }


def world(transplant=(1.0, 5.0), control=4.0, upper_acc=0.9, naive_fmt=0.0, **more):
    """A-Chat at rank 10 and the upper bound at rank 2: the share of a rank r is (10 - r) / 8."""
    m = {
        "a_chat": row(1.0, 10.0, heldout=control),
        "qa_upper": row(1.0, 2.0, acc=upper_acc),
        "transplant": row(*transplant),
        "naive": row(naive_fmt, 3.0),
    }
    m.update({k: row(*v) for k, v in more.items()})
    return m


def test_share_and_format_kept_are_relative_to_a_chat_and_the_upper_bound():
    m = world(transplant=(0.9, 6.0))
    assert V.knowledge_share(m, "transplant") == pytest.approx(0.5)
    assert V.knowledge_share(m, "qa_upper") == pytest.approx(1.0)
    assert V.knowledge_share(m, "a_chat") == pytest.approx(0.0)
    assert V.format_kept(m, "transplant") == pytest.approx(0.9)


@pytest.mark.parametrize("control, upper_acc", [(V.CONTROL * CHANCE + 0.01, 0.9), (4.0, V.UPPER_ACCURACY - 0.01)])
def test_no_result_when_the_control_or_the_upper_bound_fails(control, upper_acc):
    m = world(control=control, upper_acc=upper_acc)
    text = V.verdict_text(m)
    assert "Verdict: no result" in text
    assert "claim holds" not in text


def test_the_claim_holds_exactly_at_the_bars():
    share_rank = 10.0 - V.SHARE * 8  # exactly the share bar
    m = world(transplant=(V.FORMAT_KEPT, share_rank))
    a = V.assess(m, [])
    assert a["control"] and a["upper_bound"] and a["naive_broken"] and a["claim"]
    assert "claim holds here" in V.verdict_text(m)


@pytest.mark.parametrize("transplant", [(V.FORMAT_KEPT - 0.01, 2.0), (1.0, 10.0 - (V.SHARE - 0.01) * 8)])
def test_the_claim_fails_below_either_bar(transplant):
    m = world(transplant=transplant)
    assert not V.assess(m, [])["claim"]
    assert "claim does NOT hold" in V.verdict_text(m)


def test_a_recipe_that_keeps_the_format_beats_a_better_knower_that_breaks_it():
    # The recipe knows more but loses the format; the transplant is the best variant that keeps it.
    m = world(transplant=(1.0, 5.0), recipe_x=(0.5, 2.0))
    a = V.assess(m, ["recipe_x"])
    assert a["best"] == "transplant" and a["claim"]
    # A recipe that keeps the format and knows more becomes the best.
    m = world(transplant=(1.0, 5.0), recipe_x=(1.0, 3.0))
    assert V.assess(m, ["recipe_x"])["best"] == "recipe_x"


def test_naive_that_keeps_the_format_is_reported():
    m = world(naive_fmt=0.9)
    assert not V.assess(m, [])["naive_broken"]
    assert "does NOT visibly break" in V.verdict_text(m)


@pytest.mark.parametrize("cv, better", [((0.97, 2.5), True), ((0.97, 6.0), False), ((0.5, 2.0), False)])
def test_the_chat_vector_baseline_is_named_when_it_wins(cv, better):
    text = V.verdict_text(world(transplant=(1.0, 5.0), chat_vector=cv))
    assert ("chat vector is the better recipe" in text) is better
    assert "Against the field's baseline" in text


def test_missing_upper_bound_is_not_a_crash():
    m = world()
    del m["qa_upper"]
    a = V.assess(m, [])
    assert not a["upper_bound"]
    assert math.isnan(V.format_kept({"a_chat": row(0.0, 10.0), "x": row(1.0, 1.0)}, "x"))
