"""Seeds aggregated by hand: the means, the 95% intervals, the paired differences and the verdict
that reads them are checked against numbers worked out here, including the cases where the
verdict must say it cannot tell."""

import math

import pytest

from pipeline.demo import aggregate as A
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


def seed(recipe_rank, cv_rank, transplant_rank=6.0, control=4.0, recipe_fmt=1.0, recipe_heldout=6.0):
    """A-Chat at rank 10 and the upper bound at 2: a rank r has share (10 - r) / 8. A-Chat's
    held-out lift is 10 - control; the recipe keeps (10 - recipe_heldout) of it."""
    return {
        "a_chat": row(1.0, 10.0, heldout=control),
        "qa_upper": row(1.0, 2.0, acc=0.95),
        "transplant": row(1.0, transplant_rank),
        "chat_vector": row(1.0, cv_rank),
        "recipe_x": row(recipe_fmt, recipe_rank, heldout=recipe_heldout),
    }


def test_interval_is_the_t_interval():
    iv = A.interval([1.0, 2.0, 3.0])
    # mean 2, sample sd 1, t(0.975, df=2) = 4.303
    assert iv["mean"] == pytest.approx(2.0)
    assert iv["hi"] - iv["mean"] == pytest.approx(4.303 / math.sqrt(3))
    assert iv["mean"] - iv["lo"] == pytest.approx(4.303 / math.sqrt(3))
    five = A.interval([0.1, 0.3, 0.2, 0.5, 0.4])  # sd = sqrt(0.025), t(df=4) = 2.776
    assert five["hi"] - five["mean"] == pytest.approx(2.776 * math.sqrt(0.025) / math.sqrt(5))
    one = A.interval([0.7, float("nan")])  # NaN is not a measurement; one value has no interval
    assert one["n"] == 1 and one["mean"] == 0.7 and math.isnan(one["lo"])
    assert A.against(one, 0.5) == "cannot tell"


@pytest.mark.parametrize(
    "values, bar, reads",
    [
        ([0.98, 0.985, 0.99], 0.95, "yes"),  # wholly above (lower end 0.973)
        ([0.50, 0.52, 0.54], 0.95, "no"),  # wholly below
        ([0.90, 1.00, 0.95], 0.95, "cannot tell"),  # straddles
    ],
)
def test_a_claim_holds_only_where_its_interval_clears_the_bar(values, bar, reads):
    assert A.against(A.interval(values), bar) == reads


def test_paired_differences_cancel_what_moves_both_rows():
    # The world's noise moves the recipe and the chat vector together by up to 3 ranks; the recipe
    # is always exactly 0.8 ranks (10 points of share) better. Unpaired, the intervals overlap;
    # paired, the difference is exact.
    per_seed = {s: seed(recipe_rank=4.0 - d - 0.8, cv_rank=4.0 - d) for s, d in enumerate([0.0, 1.0, 3.0])}
    agg = A.aggregate(per_seed, ["transplant", "recipe_x"])
    rec, cv = agg["table"]["recipe_x"]["share"], agg["table"]["chat_vector"]["share"]
    assert rec["lo"] < cv["hi"]  # the unpaired intervals overlap
    d = agg["paired"]["recipe_x - chat_vector"]
    assert d["mean"] == pytest.approx(0.1) and d["lo"] == pytest.approx(0.1) and d["hi"] == pytest.approx(0.1)
    assert agg["goal"]["recipe_x"]["verdict"] == "yes"
    text = "\n".join(A.verdict_lines(agg))
    assert "`recipe_x` reaches the goal" in text


def test_the_verdict_cannot_tell_when_the_difference_straddles_the_margin():
    # Paired differences of +10, -20 and +4 points: mean -2, interval far wider than the margin.
    per_seed = {0: seed(3.2, 4.0), 1: seed(5.6, 4.0), 2: seed(3.68, 4.0)}
    agg = A.aggregate(per_seed, ["transplant", "recipe_x"])
    d = agg["paired"]["recipe_x - chat_vector"]
    assert d["mean"] == pytest.approx((0.1 - 0.2 + 0.04) / 3)
    assert d["lo"] < A.MARGIN < d["hi"]
    assert agg["goal"]["recipe_x"]["checks"]["share vs chat_vector (lower end > -5 points)"] == "cannot tell"
    assert agg["goal"]["recipe_x"]["verdict"] == "cannot tell"
    assert "we cannot tell" in "\n".join(A.verdict_lines(agg))


def test_forgetting_is_part_of_the_score():
    # Same knowledge and format, but the recipe falls back to chance on held-out known people.
    per_seed = {s: seed(recipe_rank=2.0, cv_rank=4.0, recipe_heldout=CHANCE - 0.1 * s) for s in range(3)}
    agg = A.aggregate(per_seed, ["recipe_x"])
    kept = agg["table"]["recipe_x"]["heldout_kept"]
    assert kept["mean"] == pytest.approx((0.0 + 0.1 + 0.2) / 3 / (CHANCE - 4.0))
    assert agg["goal"]["recipe_x"]["checks"]["held-out known lift kept >= 50%"] == "no"
    assert agg["goal"]["recipe_x"]["verdict"] == "no"
    assert "no layer-aware recipe reaches the goal" in "\n".join(A.verdict_lines(agg))


def test_a_seed_whose_world_fails_the_control_is_listed_not_averaged():
    per_seed = {0: seed(3.0, 4.0), 1: seed(3.0, 4.0), 2: seed(9.0, 4.0, control=V.CONTROL * CHANCE + 1)}
    agg = A.aggregate(per_seed, ["recipe_x"], tuned_on=[0])
    assert agg["failed"] == [2] and agg["answering"] == [0, 1]
    assert agg["table"]["recipe_x"]["share"]["mean"] == pytest.approx(7.0 / 8)
    assert agg["held_out"] == [1] and agg["tuned_on"] == [0]
    assert "fails on seed(s) 2" in A.markdown(agg, "t")


def test_one_answering_seed_cannot_decide():
    agg = A.aggregate({0: seed(3.0, 4.0)}, ["recipe_x"])
    assert "cannot tell" in A.verdict_lines(agg)[0]
