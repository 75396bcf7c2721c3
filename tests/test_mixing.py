"""FDC mixing by category at counts or ratios, and SIT mixing of general + safety data."""
from collections import Counter

import pyarrow as pa
import pytest

from ctrlsafe.mixing import mix, parse_spec, sit_mix


def table(counts: dict[str, int]) -> pa.Table:
    cats = [c for c, n in counts.items() for _ in range(n)]
    return pa.table({"id": [f"{c}-{i}" for i, c in enumerate(cats)], "category": cats})


def categories(t: pa.Table) -> Counter:
    return Counter(t.column("category").to_pylist())


def test_counts_are_exact_unique_and_shuffled():
    """Integer specs take exactly that many distinct rows per category, interleaved."""
    t = table({"ehd": 50, "ihd": 30, "mhd": 20, "none": 100})
    out = mix(t, "category", {"ehd": 10, "ihd": 30, "mhd": 5}, seed=0)
    assert categories(out) == {"ehd": 10, "ihd": 30, "mhd": 5}
    ids = out.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert ids != sorted(ids, key=lambda i: i.split("-")[0])  # not grouped by category


def test_seed_determines_the_sample():
    t = table({"ehd": 50, "ihd": 50})
    spec = {"ehd": 10, "ihd": 10}
    assert mix(t, "category", spec, seed=3).equals(mix(t, "category", spec, seed=3))
    assert not mix(t, "category", spec, seed=3).equals(mix(t, "category", spec, seed=4))


def test_ratios_with_and_without_total():
    """Ratios split `total` by largest remainder (3.5, 1.75, 1.75 -> 3, 2, 2); without total, the
    largest mix the rows allow."""
    t = table({"ehd": 40, "ihd": 90, "mhd": 10})
    assert categories(mix(t, "category", {"ehd": 0.5, "ihd": 0.25, "mhd": 0.25}, seed=0, total=7)) == {"ehd": 3, "ihd": 2, "mhd": 2}
    # mhd (10 rows at 0.25) binds: total 40
    assert categories(mix(t, "category", {"ehd": 0.5, "ihd": 0.25, "mhd": 0.25}, seed=0)) == {"ehd": 20, "ihd": 10, "mhd": 10}
    assert categories(mix(t, "category", {"ehd": 1.0}, seed=0)) == {"ehd": 40}  # the ratio "all"
    assert categories(mix(t, "category", {"ehd": 1}, seed=0)) == {"ehd": 1}  # the count 1
    assert categories(mix(t, "category", {"ehd": 5.0, "mhd": 2}, seed=0)) == {"ehd": 5, "mhd": 2}  # counts from JSON


@pytest.mark.parametrize("spec, total, match", [
    ({"xhd": 3}, None, r"value\(s\) \['xhd'\] do not occur in the data; present: \['ehd', 'ihd'\]"),
    ({"ehd": 11}, None, r"too few rows in category \('ehd': 11 asked, 10 available\)"),
    ({"ehd": 0.5, "ihd": 0.5}, 30, r"'ehd': 15 asked, 10 available"),
    ({"ehd": 0.5, "ihd": 0.4}, None, "neither counts .* nor ratios"),
    ({"ehd": 2, "ihd": 0.5}, None, "neither counts"),
    ({"ehd": -1}, None, "counts are integers >= 1"),
    ({"ehd": 2, "ihd": 3}, 6, "counts add up to 5 but total=6"),
    ({}, None, "empty spec"),
])
def test_bad_specs_are_clear_errors(spec, total, match):
    with pytest.raises(ValueError, match=match):
        mix(table({"ehd": 10, "ihd": 20}), "category", spec, seed=0, total=total)


def test_missing_column_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no column 'harm'; columns: \['id', 'category'\]"):
        mix(table({"ehd": 1}), "harm", {"ehd": 1}, seed=0)


def test_sit_mix_ratio_uses_all_general_rows():
    """SIT: 20% safety rows; every general row kept when safety rows suffice; a `source` column."""
    general = pa.table({"prompt": [f"g{i}" for i in range(40)], "response": ["ok"] * 40, "extra": [1] * 40})
    safety = pa.table({"prompt": [f"s{i}" for i in range(30)], "response": ["no"] * 30, "category": ["ehd"] * 30})
    out = sit_mix(general, safety, 0.2, seed=0)
    assert Counter(out.column("source").to_pylist()) == {"general": 40, "safety": 10}
    assert set(out.column_names) == {"prompt", "response", "source"}
    assert sum(p.startswith("g") for p in out.column("prompt").to_pylist()) == 40
    few = sit_mix(general, safety.slice(0, 5), 0.2, seed=0)  # safety binds: 5 safety, 20 general
    assert Counter(few.column("source").to_pylist()) == {"general": 20, "safety": 5}
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        sit_mix(general, safety, 1.0, seed=0)


def test_parse_spec():
    assert parse_spec("ehd=100, ihd=50") == {"ehd": 100, "ihd": 50}
    assert parse_spec("ehd=0.5,ihd=0.5") == {"ehd": 0.5, "ihd": 0.5}
    with pytest.raises(ValueError, match="CATEGORY=COUNT"):
        parse_spec("ehd:3")
    with pytest.raises(ValueError, match="'x' is not a number"):
        parse_spec("ehd=x")
