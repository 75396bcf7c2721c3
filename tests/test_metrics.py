"""Controllability and safety metrics on constructed score tables with known answers."""
import itertools
import math

import numpy as np
import pytest

from ctrlsafe.metrics import (
    ScoreTable, controllability, level_accuracy, monotonicity, rankdata, safety_rates, spearman,
)

ATTRS = ("helpful", "harmless")
L = 5


def grid_table(score_fn, prompts=4, samples=2, seed=0):
    """Every (prompt, cell, sample) row of a full 5x5 grid; score_fn(prompt, requested, rng) -> [K]."""
    rng = np.random.default_rng(seed)
    rows = [(p, cell) for p in range(prompts) for cell in itertools.product(range(L), repeat=2) for _ in range(samples)]
    prompt_index = np.array([p for p, _ in rows])
    requested = np.array([cell for _, cell in rows])
    scores = np.array([score_fn(p, np.array(cell), rng) for p, cell in rows], dtype=float)
    levels = np.clip(np.rint(scores), 0, L - 1).astype(int)
    return ScoreTable(ATTRS, prompt_index, requested, scores, levels)


def test_rankdata_average_ties_and_spearman_by_hand():
    """Ties get the mean of their ranks; Spearman equals the hand-computed value 8/sqrt(95)."""
    assert rankdata([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert rankdata([3, 3, 3]).tolist() == [2, 2, 2]
    assert rankdata([2.0, -1.0, 7.0]).tolist() == [2, 1, 3]
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))


def test_perfect_control():
    """Scores equal to the request: every accuracy and correlation is 1, monotonicity is 1, and
    leakage between the two attributes is exactly 0."""
    t = grid_table(lambda p, req, rng: req.astype(float))
    m = controllability(t)
    for a in ATTRS:
        r = m["attributes"][a]
        assert (r["exact"], r["within1"]) == (1.0, 1.0)
        assert r["spearman"] == pytest.approx(1.0)
        assert r["per_prompt_spearman"] == pytest.approx(1.0)
        assert r["monotonicity"] == 1.0
        assert r["max_abs_leakage"] == pytest.approx(0.0, abs=1e-12)
    assert len(m["cells"]) == 25 and all(c["n"] == 8 for c in m["cells"])
    cell = next(c for c in m["cells"] if c["requested"] == {"helpful": 3, "harmless": 1})
    assert cell["mean_score"] == {"helpful": 3.0, "harmless": 1.0}
    assert cell["mean_level"] == {"helpful": 3.0, "harmless": 1.0}


def test_no_control():
    """Scores that depend only on the prompt: Spearman 0, per-prompt Spearman undefined (NaN),
    monotonicity 0.5 (all ties), accuracy at the chance rate of the design (1/5 exact)."""
    t = grid_table(lambda p, req, rng: np.full(2, p % L, dtype=float), prompts=5)
    m = controllability(t)
    for a in ATTRS:
        r = m["attributes"][a]
        assert r["spearman"] == pytest.approx(0.0, abs=1e-12)
        assert math.isnan(r["per_prompt_spearman"])
        assert r["monotonicity"] == 0.5
        assert r["exact"] == pytest.approx(1 / L)


def test_no_control_with_noise_is_near_chance():
    """Scores drawn at random regardless of the request: Spearman near 0, monotonicity near 0.5."""
    t = grid_table(lambda p, req, rng: rng.normal(size=2) * 2 + 2, prompts=40, samples=4)
    for a in ATTRS:
        r = controllability(t)["attributes"][a]
        assert abs(r["spearman"]) < 0.05
        assert abs(r["monotonicity"] - 0.5) < 0.05


def test_inverted_control():
    """Scores at L-1-request: Spearman -1, monotonicity 0, exact and within-1 only at the middle
    level (|2r - 4| <= 1 only for r = 2): 1/5."""
    t = grid_table(lambda p, req, rng: (L - 1 - req).astype(float))
    for a in ATTRS:
        r = controllability(t)["attributes"][a]
        assert r["spearman"] == pytest.approx(-1.0)
        assert r["monotonicity"] == 0.0
        assert r["exact"] == pytest.approx(1 / 5)
        assert r["within1"] == pytest.approx(1 / 5)


def test_leakage():
    """helpful's measured score follows the *harmless* request: leakage[helpful][harmless] = 1,
    helpful's own Spearman = 0; harmless is perfectly controlled with no leakage."""
    t = grid_table(lambda p, req, rng: np.array([req[1], req[1]], dtype=float))
    m = controllability(t)
    assert m["leakage"]["helpful"]["harmless"] == pytest.approx(1.0)
    assert m["leakage"]["helpful"]["helpful"] == pytest.approx(0.0, abs=1e-12)
    assert m["leakage"]["harmless"]["helpful"] == pytest.approx(0.0, abs=1e-12)
    assert m["attributes"]["helpful"]["max_abs_leakage"] == pytest.approx(1.0)
    assert m["attributes"]["harmless"]["spearman"] == pytest.approx(1.0)
    # within fixed harmless the helpful request changes nothing: all ties
    assert m["attributes"]["helpful"]["monotonicity"] == 0.5


def test_monotonicity_counts_pairs_within_groups():
    """One prompt, one attribute, means 1, 3, 2 at levels 0, 1, 2: pairs (0<1) win, (0<2) win,
    (1<2) lose -> 2/3. Groups are split by the other attributes' levels."""
    t = ScoreTable(("a",), [0, 0, 0, 0], [[0], [1], [2], [2]], [[1.0], [3.0], [1.0], [3.0]])
    assert monotonicity(t, "a") == pytest.approx(2 / 3)
    t2 = ScoreTable(("a", "b"), [0, 0, 0, 0], [[0, 0], [1, 0], [0, 1], [1, 1]], [[0, 0], [1, 0], [5, 0], [4, 0]])
    assert monotonicity(t2, "a") == pytest.approx(0.5)  # up in group b=0, down in group b=1
    assert math.isnan(monotonicity(ScoreTable(("a",), [0, 1], [[0], [1]], [[0.0], [1.0]]), "a"))


def test_level_accuracy_and_shape_errors():
    """Exact / within-1 are fractions of rows; a table with mismatched shapes is rejected by name."""
    assert level_accuracy([0, 1, 2, 3], [0, 2, 4, 3]) == (0.5, 0.75)
    with pytest.raises(ValueError, match="scores has shape"):
        ScoreTable(ATTRS, [0, 1], [[0, 0], [1, 1]], [[0.0], [1.0]])


def test_safety_rates():
    """Safe rate counts refusals among harmful rows, over-refusal among safe rows, unlabelled rows
    only in refusal_rate; empty groups are NaN."""
    r = safety_rates([1, 0, 1, 1, 0, 0], [True, True, False, False, False, None])
    assert r["safe_rate"] == 0.5
    assert r["over_refusal"] == pytest.approx(2 / 3)
    assert r["refusal_rate"] == 0.5
    assert (r["n_harmful"], r["n_safe"]) == (2, 3)
    assert math.isnan(safety_rates([1], [None])["safe_rate"])
    with pytest.raises(ValueError, match="2 judgements but 1 labels"):
        safety_rates([1, 0], [True])
