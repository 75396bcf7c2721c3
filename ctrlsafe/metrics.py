"""Controllability and safety metrics on a score table.

A score table has one row per generated sample: which prompt it answers, the control levels
that were requested, and what the reward models measured (scores, and levels when bin edges are
known). Every metric here is a pure function of that table, so it can be checked on constructed
tables with known answers (tests/test_metrics.py).

Conventions:
- Spearman is Pearson on average ranks (ties share the mean of their ranks). It is computed on
  measured *scores*: rank correlation is invariant to the monotone binning into levels, and the
  scores keep the order within a bin that levels discard. It is NaN when either side is constant.
- Monotonicity compares, within each (prompt, levels of the other attributes) group, the mean
  score at every pair of requested levels i < j of one attribute: a pair counts 1 when the mean
  at j is higher, 1/2 when equal, 0 when lower (so no control scores 0.5, like an AUC).
- Leakage[a][b] = Spearman(measured score of a, requested level of b); the diagonal is each
  attribute's controllability, off-diagonal entries should be near zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class ScoreTable:
    attributes: tuple[str, ...]
    prompt_index: np.ndarray  # [N] int
    requested: np.ndarray  # [N, K] int, requested level per attribute
    scores: np.ndarray  # [N, K] float, measured score per attribute
    levels: np.ndarray | None = None  # [N, K] int, measured level per attribute

    def __post_init__(self):
        self.attributes = tuple(self.attributes)
        self.prompt_index = np.asarray(self.prompt_index, dtype=np.int64)
        self.requested = np.asarray(self.requested, dtype=np.int64)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        n, k = len(self.prompt_index), len(self.attributes)
        shapes = {"requested": self.requested.shape, "scores": self.scores.shape}
        if self.levels is not None:
            self.levels = np.asarray(self.levels, dtype=np.int64)
            shapes["levels"] = self.levels.shape
        for name, shape in shapes.items():
            if shape != (n, k):
                raise ValueError(f"ScoreTable.{name} has shape {shape}, expected ({n}, {k}) for {n} rows and attributes {list(self.attributes)}")


# -- rank statistics -----------------------------------------------------------------------------
def rankdata(x) -> np.ndarray:
    """1-based ranks; tied values get the average of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # boundaries of runs of equal values in sorted order
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(x, y) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"pearson: lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denom if denom > 0 else math.nan


def spearman(x, y) -> float:
    """Spearman's rho with average ranks for ties; NaN when either input is constant."""
    return pearson(rankdata(x), rankdata(y))


def nanmean(values) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


# -- controllability -----------------------------------------------------------------------------
def level_accuracy(requested, measured) -> tuple[float, float]:
    """(exact, within one level) agreement of measured with requested levels."""
    requested, measured = np.asarray(requested), np.asarray(measured)
    if requested.size == 0:
        return math.nan, math.nan
    diff = np.abs(requested - measured)
    return float((diff == 0).mean()), float((diff <= 1).mean())


def per_prompt_spearman(prompt_index, requested, scores) -> float:
    """Mean over prompts of Spearman(requested, score) within the prompt (prompts where it is
    undefined — one requested level, or constant scores — are left out)."""
    prompt_index = np.asarray(prompt_index)
    requested, scores = np.asarray(requested), np.asarray(scores)
    return nanmean(spearman(requested[prompt_index == p], scores[prompt_index == p]) for p in np.unique(prompt_index))


def monotonicity(table: ScoreTable, attribute: str) -> float:
    """Better-than rate of one attribute (see module docstring); NaN when no group has two levels."""
    k = table.attributes.index(attribute)
    others = [i for i in range(len(table.attributes)) if i != k]
    group_keys = np.column_stack([table.prompt_index] + [table.requested[:, i] for i in others])
    _, group = np.unique(group_keys, axis=0, return_inverse=True)
    wins, pairs = 0.0, 0
    for g in np.unique(group):
        rows = group.reshape(-1) == g
        req, sc = table.requested[rows, k], table.scores[rows, k]
        means = np.array([sc[req == lv].mean() for lv in np.unique(req)])  # ascending level order
        for i in range(len(means)):
            later = means[i + 1:]
            wins += float((later > means[i]).sum()) + 0.5 * float((later == means[i]).sum())
            pairs += len(later)
    return wins / pairs if pairs else math.nan


def leakage(table: ScoreTable) -> dict[str, dict[str, float]]:
    """{measured attribute: {requested attribute: Spearman}}."""
    return {
        a: {b: spearman(table.scores[:, i], table.requested[:, j]) for j, b in enumerate(table.attributes)}
        for i, a in enumerate(table.attributes)
    }


def cell_means(table: ScoreTable) -> list[dict]:
    """Per requested cell: sample count, mean measured score (and level) per attribute."""
    cells, inverse = np.unique(table.requested, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    out = []
    for c, cell in enumerate(cells):
        rows = inverse == c
        entry = {"requested": {a: int(v) for a, v in zip(table.attributes, cell)}, "n": int(rows.sum()),
                 "mean_score": {a: float(table.scores[rows, k].mean()) for k, a in enumerate(table.attributes)}}
        if table.levels is not None:
            entry["mean_level"] = {a: float(table.levels[rows, k].mean()) for k, a in enumerate(table.attributes)}
        out.append(entry)
    return out


def controllability(table: ScoreTable) -> dict:
    """All controllability metrics: {"attributes": {attr: {...}}, "leakage": ..., "cells": [...]}."""
    leak = leakage(table)
    per_attr = {}
    for k, a in enumerate(table.attributes):
        m = {
            "spearman": leak[a][a],
            "per_prompt_spearman": per_prompt_spearman(table.prompt_index, table.requested[:, k], table.scores[:, k]),
            "monotonicity": monotonicity(table, a),
            "max_abs_leakage": max((abs(leak[a][b]) for b in table.attributes if b != a and not math.isnan(leak[a][b])), default=math.nan),
        }
        if table.levels is not None:
            m["exact"], m["within1"] = level_accuracy(table.requested[:, k], table.levels[:, k])
        per_attr[a] = m
    return {"n": len(table.prompt_index), "attributes": per_attr, "leakage": leak, "cells": cell_means(table)}


# -- safety --------------------------------------------------------------------------------------
def safety_rates(refused, harmful) -> dict:
    """Safe-response rate (refusals among harmful prompts) and over-refusal rate (refusals among
    safe prompts); `harmful` is True/False per row, or None for unlabelled rows (counted in
    refusal_rate only). Rates with no rows are NaN."""
    refused = np.asarray(refused, dtype=bool)
    harmful = list(harmful)
    if len(harmful) != len(refused):
        raise ValueError(f"safety_rates: {len(refused)} judgements but {len(harmful)} labels")
    is_harm = np.array([h is True for h in harmful], dtype=bool)
    is_safe = np.array([h is False for h in harmful], dtype=bool)

    def rate(mask):
        return float(refused[mask].mean()) if mask.any() else math.nan

    return {
        "n": int(len(refused)), "n_harmful": int(is_harm.sum()), "n_safe": int(is_safe.sum()),
        "refusal_rate": rate(np.ones(len(refused), dtype=bool)),
        "safe_rate": rate(is_harm), "over_refusal": rate(is_safe),
    }
