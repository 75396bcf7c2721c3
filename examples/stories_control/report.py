"""Write docs/replication.md from a run.sh output directory: every number comes from the eval
metrics.json files and the data set manifest, never typed by hand.

    python report.py OUT [--out docs/replication.md] [--reading reading.md] [--seconds S]

Table: per method and attribute, the mean ± std over seeds of exact level accuracy, within-one
accuracy, Spearman (requested level vs score), per-prompt Spearman, monotonicity and the largest
absolute leakage (how much asking for the other attribute moves this one). The seed-0 heatmaps of every
method are copied next to the report (folder named after it) and linked.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np

METHODS = {
    "base": "base model, untrained control tokens",
    "rerank": "rerank (best-of-N, training-free)",
    "clm": "CLM on the distilled data",
    "exmate": "ExMATE on the distilled data",
}
METRICS = [("exact", "exact"), ("within1", "within-1"), ("spearman", "Spearman"),
           ("per_prompt_spearman", "per-prompt ρ"), ("monotonicity", "monotonic"), ("max_abs_leakage", "max leak")]


def load_runs(root: Path) -> dict[str, dict[int, dict]]:
    """{method: {seed: metrics.json}} from root/eval/<method>-s<seed>/."""
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted((root / "eval").glob("*-s*/metrics.json")):
        m = re.fullmatch(r"(\w+)-s(\d+)", path.parent.name)
        if m and m.group(1) in METHODS:
            runs.setdefault(m.group(1), {})[int(m.group(2))] = json.loads(path.read_text())
    if not runs:
        raise FileNotFoundError(f"{root}/eval: no <method>-s<seed>/metrics.json; run run.sh first")
    return runs


def mean_std(values: list) -> str:
    x = np.array([np.nan if v is None else v for v in values], dtype=float)
    if np.isnan(x).all():
        return "n/a"
    return f"{np.nanmean(x):.3f} ± {np.nanstd(x):.3f}" if len(x) > 1 else f"{x[0]:.3f}"


def results_table(runs: dict, attributes: list[str]) -> list[str]:
    lines = ["| method | attribute | seeds | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for method in METHODS:
        if method not in runs:
            continue
        seeds = sorted(runs[method])
        for attr in attributes:
            cells = [mean_std([runs[method][s]["controllability"]["attributes"][attr][key] for s in seeds]) for key, _ in METRICS]
            lines.append(f"| {METHODS[method]} | {attr} | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines


def cell_table(run: dict, attributes: list[str]) -> list[str]:
    """Mean score per requested cell (one seed): what the heatmaps show, as numbers."""
    a, b = attributes
    lines = [f"| {a} \\ {b} | " + " | ".join(str(j) for j in range(3)) + " |", "|---|---|---|---|"]
    cells = {(c["requested"][a], c["requested"][b]): c["mean_score"] for c in run["controllability"]["cells"]}
    for i in range(3):
        row = [f"{cells[(i, j)][a]:.1f} / {cells[(i, j)][b]:.1f}" if (i, j) in cells else "-" for j in range(3)]
        lines.append(f"| {i} | " + " | ".join(row) + " |")
    return lines


def length_table(root: Path, runs: dict) -> list[str]:
    """Response length and early stopping per method (all seeds): a control that works by making
    stories shorter shows up here, not in the controllability metrics."""
    import pyarrow.parquet as pq

    lines = ["| method | mean words | stopped before the token limit |", "|---|---|---|"]
    for method in METHODS:
        rows = [r for s in sorted(runs.get(method, {}))
                for r in pq.read_table(root / "eval" / f"{method}-s{s}" / "samples.parquet",
                                       columns=["response", "finish_reason"]).to_pylist()]
        if rows:
            words = np.mean([len(r["response"].split()) for r in rows])
            stopped = np.mean([r["finish_reason"] != "length" for r in rows])
            lines.append(f"| {METHODS[method]} | {words:.1f} | {stopped:.1%} |")
    return lines


def dataset_summary(root: Path) -> list[str]:
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    counts = manifest.get("counts", {})
    bins = manifest["bins"]["edges"]
    lines = [f"- bins (examples/stories_control/bins.json): " + "; ".join(f"{a} edges {e}" for a, e in bins.items())]
    if counts:
        lines.append("- data set counts: " + ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, (dict, list))))
    return lines


def copy_heatmaps(root: Path, runs: dict, attributes: list[str], out: Path) -> list[str]:
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for method in METHODS:
        seed = min(runs.get(method, {}), default=None)
        if seed is None:
            continue
        links = []
        for attr in attributes:
            src = root / "eval" / f"{method}-s{seed}" / f"heatmap_{attr}.png"
            if src.exists():
                dst = folder / f"{method}_{attr}.png"
                shutil.copyfile(src, dst)
                links.append(f"![{method} {attr}]({folder.name}/{dst.name})")
        if links:
            lines += [f"**{METHODS[method]}** (seed {seed})", "", " ".join(links), ""]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="run.sh output directory")
    p.add_argument("--out", type=Path, default=Path("docs/replication.md"))
    p.add_argument("--reading", type=Path, help="hand-written 'Honest reading' section to include")
    p.add_argument("--seconds", type=int, help="wall time of the run, for the record")
    args = p.parse_args()

    runs = load_runs(args.root)
    first = next(iter(next(iter(runs.values())).values()))
    attributes = list(first["controllability"]["attributes"])
    cfg = first["config"]
    lines = [
        "# Controllability mini-replication on stories260k",
        "",
        "Generated by `examples/stories_control/report.py` from the `metrics.json` files of "
        "`examples/stories_control/run.sh` (`make replication`); do not edit by hand.",
        "",
        "## Setup",
        "",
        f"- policy: `{Path(cfg['model']).name if 'stories260k' in cfg['model'] else cfg['model']}` "
        "(260K-parameter Llama trained on TinyStories); attributes: "
        + ", ".join(f"`{a}` (`{cfg['reward_models'][a]}`)" for a in attributes) + ", 3 levels each (9 cells)",
        f"- held-out openings: {cfg['prompt_sets']['prompts']['prompts']} (characters unseen in training); "
        f"{cfg['max_new_tokens']} new tokens; temperature {cfg['sampling']['temperature']}",
        *dataset_summary(args.root),
        f"- seeds per method: " + ", ".join(f"{m} {sorted(runs[m])}" for m in METHODS if m in runs),
    ]
    if args.seconds is not None:
        lines.append(f"- wall time of this run.sh invocation: {args.seconds} s (steps already finished in OUT are reused)")
    lines += ["", "## Results (held-out openings, mean ± std over seeds)", "", *results_table(runs, attributes), "",
              "exact / within-1: measured level equals / is within one of the requested level (chance 1/3 / 7/9 "
              "for uniform levels). Spearman: requested level vs score over all samples. monotonic: per opening and "
              "level of the other attribute, the fraction of level pairs whose mean score rises with the level "
              "(0.5 = chance). max leak: |Spearman| between this attribute's score and the *other* attribute's "
              "requested level (0 = disentangled).", "",
              "## Response length (all seeds)", "", *length_table(args.root, runs), "",
              "## Mean score per requested cell (seed 0; sentiment / dialogue)", ""]
    for method in METHODS:
        if method in runs:
            lines += [f"**{METHODS[method]}**", "", *cell_table(runs[method][min(runs[method])], attributes), ""]
    lines += ["## Heatmaps", "", *copy_heatmaps(args.root, runs, attributes, args.out)]
    if args.reading and args.reading.exists():
        lines += ["## Honest reading", "", args.reading.read_text().strip(), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
