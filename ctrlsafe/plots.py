"""Evaluation plots (PNG). Figures are built with `matplotlib.figure.Figure`, which renders with
the Agg backend and never touches pyplot's global state, so plotting works headless and in
threads."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .metrics import ScoreTable


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def heatmap(cells: list[dict], attributes, attribute: str, path, levels: int) -> Path:
    """Requested attributes[0] (x) x requested attributes[1] (y); colour and label = mean measured
    score of `attribute`. Cells not requested stay blank; further attributes are averaged over."""
    x_attr = attributes[0]
    y_attr = attributes[1] if len(attributes) > 1 else None
    sums = np.zeros((levels if y_attr else 1, levels))
    counts = np.zeros_like(sums)
    for c in cells:
        x = c["requested"][x_attr]
        y = c["requested"][y_attr] if y_attr else 0
        sums[y, x] += c["mean_score"][attribute] * c["n"]
        counts[y, x] += c["n"]
    grid = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    fig = Figure(figsize=(4.8, 4.0) if y_attr else (4.8, 1.6))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(grid), origin="lower", cmap="viridis", aspect="auto")
    for (y, x), v in np.ndenumerate(grid):
        if not math.isnan(v):
            dark_cell = im.norm(v) < 0.6  # viridis is dark at the low end
            ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if dark_cell else "black")
    ax.set_xticks(range(levels))
    ax.set_xlabel(f"requested {x_attr}")
    if y_attr:
        ax.set_yticks(range(levels))
        ax.set_ylabel(f"requested {y_attr}")
    else:
        ax.set_yticks([])
    ax.set_title(f"measured {attribute} (mean score)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def scatter(table: ScoreTable, attribute: str, path, levels: int, seed: int = 0) -> Path:
    """Requested level (jittered) vs measured score for every sample, with the per-level mean."""
    k = table.attributes.index(attribute)
    req, sc = table.requested[:, k], table.scores[:, k]
    jitter = np.random.default_rng(seed).uniform(-0.15, 0.15, size=len(req))
    fig = Figure(figsize=(4.8, 3.6))
    ax = fig.subplots()
    ax.scatter(req + jitter, sc, s=6, alpha=0.4, label="samples")
    present = np.unique(req)
    ax.plot(present, [sc[req == lv].mean() for lv in present], "o-", color="C3", label="mean")
    ax.set_xticks(range(levels))
    ax.set_xlabel(f"requested {attribute} level")
    ax.set_ylabel(f"measured {attribute} score")
    ax.legend(loc="best", fontsize=7)
    return _save(fig, path)


def rate_curves(curves: dict[str, dict[int, float]], path, *, xlabel: str, ylabel: str, title: str) -> Path:
    """One line per named curve {x level: rate}, e.g. safe rate vs requested harmless level."""
    fig = Figure(figsize=(4.8, 3.4))
    ax = fig.subplots()
    for name, points in curves.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], "o-", label=name)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if curves:
        ax.legend(loc="best", fontsize=7)
    return _save(fig, path)
