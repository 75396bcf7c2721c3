"""Data mixing: FDC (Equilibrate RLHF) picks safety data by harm category at given counts or
ratios; SIT (Safe to Serve) adds safety demonstrations to general SFT data at a given ratio.

Both are one operation, `mix`: sample rows of a table per value of a column, without
replacement, deterministically from a seed, and shuffle the result. A spec asking for more rows
than a category has is an error (never a silent shortfall): a quietly smaller category would
change the very ratio the spec sets.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

SOURCE_COLUMN = "source"  # the column `sit_mix` adds: "general" or "safety"


def mix(table: pa.Table, column: str, spec: dict[str, float], *, seed: int, total: int | None = None) -> pa.Table:
    """Rows of `table` sampled per value of `column` as `spec` says, shuffled.

    Counts when every value is an integer >= 1 (`{"ehd": 100, "ihd": 50}`; `total` must then be
    None or their sum; the float 1.0 is the ratio "everything", the int 1 one row). Ratios otherwise: each in [0, 1], summing to 1; the result has `total`
    rows, or by default the most rows the ratios allow without repeating a row. Categories not in
    the spec are left out. Raises ValueError for an unknown category, a missing column, or a
    category with fewer rows than asked for.
    """
    if column not in table.column_names:
        raise ValueError(f"mix: the data has no column {column!r}; columns: {table.column_names}")
    if not spec:
        raise ValueError("mix: empty spec; give CATEGORY=COUNT or CATEGORY=RATIO for at least one category")
    values = np.asarray(table.column(column).to_pylist(), dtype=object)
    available = {c: np.flatnonzero(values == c) for c in dict.fromkeys(values.tolist())}
    unknown = [c for c in spec if c not in available]
    if unknown:
        raise ValueError(f"mix: {column} value(s) {unknown} do not occur in the data; present: {sorted(map(str, available))}")
    counts = _counts(spec, {c: len(available[c]) for c in spec}, total, column)
    rng = np.random.default_rng(seed)
    picked = [rng.choice(available[c], size=n, replace=False) for c, n in counts.items() if n]
    order = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    return table.take(pa.array(rng.permutation(order)))


def sit_mix(general: pa.Table, safety: pa.Table, ratio: float, *, seed: int, total: int | None = None) -> pa.Table:
    """General + safety demonstrations with a fraction `ratio` of safety rows (0 <= ratio < 1).

    Without `total`, every general row is used when the safety rows suffice (else as many as the
    ratio allows). Columns are those the two tables share, plus `source`."""
    if not 0 <= ratio < 1:
        raise ValueError(f"SIT safety ratio must be in [0, 1); got {ratio}")
    shared = [c for c in general.column_names if c in safety.column_names and c != SOURCE_COLUMN]
    both = pa.concat_tables(
        [_tag(general.select(shared), "general"), _tag(safety.select(shared), "safety")],
        promote_options="default",
    )
    spec = {"general": 1 - ratio, "safety": ratio} if ratio > 0 else {"general": 1.0}
    return mix(both, SOURCE_COLUMN, spec, seed=seed, total=total)


def parse_spec(text: str) -> dict[str, float]:
    """'ehd=100,ihd=50' or 'ehd=0.5,ihd=0.5' -> {name: number} (ints stay ints)."""
    spec = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"mix spec {text!r}: {part!r} must look like CATEGORY=COUNT or CATEGORY=RATIO")
        try:
            spec[name.strip()] = int(value) if value.strip().isdigit() else float(value)
        except ValueError:
            raise ValueError(f"mix spec {text!r}: {value!r} is not a number") from None
    return spec


def _tag(table: pa.Table, source: str) -> pa.Table:
    return table.append_column(SOURCE_COLUMN, pa.array([source] * table.num_rows, pa.string()))


def _counts(spec, available, total, column) -> dict[str, int]:
    for c, v in spec.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(f"mix: {column}={c!r} has {v!r}; counts are integers >= 1, ratios numbers in [0, 1]")
    if all(_is_count(v) for v in spec.values()):
        counts = {c: int(v) for c, v in spec.items()}
        if total is not None and total != sum(counts.values()):
            raise ValueError(f"mix: counts add up to {sum(counts.values())} but total={total} was given")
    else:
        if any(v > 1 for v in spec.values()) or abs(sum(spec.values()) - 1) > 1e-6:
            raise ValueError(
                f"mix: {spec} is neither counts (all integers >= 1) nor ratios (each in [0, 1], summing to 1)"
            )
        if total is None:  # the largest total every category can supply
            total = min(math.floor(available[c] / p + 1e-9) for c, p in spec.items() if p > 0)
        counts = _apportion(spec, total)
    short = {c: (n, available[c]) for c, n in counts.items() if n > available[c]}
    if short:
        detail = ", ".join(f"{c!r}: {n} asked, {a} available" for c, (n, a) in short.items())
        raise ValueError(f"mix: too few rows in {column} ({detail})")
    return counts


def _is_count(v) -> bool:
    """An int >= 1, or an integral float > 1 (100.0 from JSON); the float 1.0 is the ratio 'all'."""
    return v >= 1 if isinstance(v, int) else (v > 1 and float(v).is_integer())


def _apportion(ratios: dict[str, float], total: int) -> dict[str, int]:
    """Integer counts summing to total, proportional to ratios (largest remainder)."""
    exact = {c: p * total for c, p in ratios.items()}
    counts = {c: math.floor(x + 1e-9) for c, x in exact.items()}
    by_remainder = sorted(ratios, key=lambda c: exact[c] - counts[c], reverse=True)
    for c in by_remainder[: total - sum(counts.values())]:
        counts[c] += 1
    return counts
