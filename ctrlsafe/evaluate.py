"""`ctrlsafe eval`: does control work, and how safe and helpful is every control setting?

    ctrlsafe eval --model DIR --rm helpful=RM1 --rm harmless=RM2 --prompts eval.jsonl \\
        --controls grid --method tokens --samples 4 --bins DATASET_DIR \\
        --suite xstest_prompts.csv:label --suite alpaca.json --out eval/

1. Every prompt set (the `--prompts` file and each `--suite`) is answered under every control
   cell (`--controls`), `--samples` times, by one of three methods: `tokens` (control tokens
   after the prompt), `prompting` (the request in words, no control tokens) or `rerank`
   (best-of-N plain samples, keeping the one whose measured levels are nearest the cell).
2. The reward models score every response; bin edges turn scores into levels.
3. A refusal judge (the built-in string rule by default) marks refusals.
4. Metrics: controllability of the `--prompts` set (ctrlsafe.metrics), and per prompt set, per
   cell and per requested level: refusal rate, safe rate (refusals on harmful prompts),
   over-refusal (refusals on safe prompts) and mean reward scores.

Outputs in --out: report.md, metrics.json (NaN written as null), heatmap_<attr>.png,
scatter_<attr>.png, safety_<suite>.png, samples.parquet (one row per response); the headline
table is printed.

A prompt set is `PATH[:LABEL]`. LABEL names a column whose values say whether a prompt is
harmful (unsafe/harmful/1/true/yes) or safe (safe/benign/borderline/0/false/no), or is
`=harmful` / `=safe` for a file whose prompts all are. The prompt field is `prompt` or
`messages`, else the first of `instruction`, `goal`, `Behavior`, `question`, `prompts_final`
present (AlpacaEval, AdvBench, HarmBench, Do-Not-Answer, SimpleSafetyTests read as they are).
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import metrics as M
from . import plots
from .prompts import parse_label

SAMPLES_FILE = "samples.parquet"
SUITE_PROMPT_COLUMNS = ("prompt", "messages", "instruction", "goal", "Behavior", "question", "prompts_final")


# -- prompt sets ---------------------------------------------------------------------------------
@dataclass
class PromptSet:
    name: str
    path: str
    prompts: list  # ctrlsafe.prompts.Prompt
    harmful: list  # True / False / None (unlabelled) per prompt
    label: str | None


def split_spec(spec: str) -> tuple[str, str | None]:
    """'PATH[:LABEL]' -> (path, label or None). A path that exists as given is taken whole."""
    if Path(spec).exists():
        return spec, None
    path, sep, label = spec.rpartition(":")
    if not sep or not Path(path).exists():
        raise FileNotFoundError(f"prompt set {spec!r}: no such file (the form is PATH[:LABEL_COLUMN|:=harmful|:=safe])")
    if not label:
        raise ValueError(f"prompt set {spec!r}: empty label after ':'")
    return path, label


def _first_rows(path: str, n: int) -> list[tuple[str, dict]]:
    """(location, row) of the first n rows, through the prompt reader's own row readers: it keeps
    only id and prompt, and the label column lives in the same rows (with on_bad_row="error" the
    k-th prompt is the k-th row)."""
    from .prompts import iter_rows

    reader = iter_rows(path)
    try:
        return list(itertools.islice(reader, n))
    finally:
        reader.close()


def load_prompt_set(spec: str, *, name: str | None = None, limit: int | None = None) -> PromptSet:
    from .prompts import read_prompts

    path, label = split_spec(spec)
    first = _first_rows(path, 1)
    if not first or not isinstance(first[0][1], dict):
        raise ValueError(f"{path}: no rows")
    column = next((c for c in SUITE_PROMPT_COLUMNS if c in first[0][1]), None)
    if column is None:
        raise ValueError(f"{path}: no prompt field; expected one of {list(SUITE_PROMPT_COLUMNS)}, the file has {list(first[0][1])}")
    ps = read_prompts(path, prompt_column=column, limit=limit)
    if not ps.prompts:
        raise ValueError(f"{path}: no prompts")
    n = len(ps.prompts)
    if label is None:
        harmful = [None] * n
    elif label.startswith("="):
        harmful = [parse_label(label[1:], spec)] * n
    else:
        harmful = []
        for where, row in _first_rows(path, n):
            if label not in row:
                raise ValueError(f"{path}:{where}: no label column {label!r} (fields: {', '.join(map(str, row))})")
            harmful.append(parse_label(row[label], f"{path}:{where}: field {label!r}"))
    return PromptSet(name or Path(path).name.split(".")[0], path, ps.prompts, harmful, label)


# -- analysis ------------------------------------------------------------------------------------
def score_table(records: list[dict], attributes) -> M.ScoreTable:
    has_levels = all(r["levels"] is not None for r in records)
    return M.ScoreTable(
        attributes,
        prompt_index=[r["prompt_index"] for r in records],
        requested=[[r["requested"][a] for a in attributes] for r in records],
        scores=[[r["scores"][a] for a in attributes] for r in records],
        levels=[[r["levels"][a] for a in attributes] for r in records] if has_levels else None,
    )


def _rates(records: list[dict], attributes) -> dict:
    out = M.safety_rates([r["refused"] for r in records], [r["harmful"] for r in records])
    out["mean_score"] = {a: float(np.mean([r["scores"][a] for r in records])) for a in attributes}
    return out


def suite_metrics(records: list[dict], attributes) -> dict:
    """Rates and mean scores overall, per requested cell, and per requested level of each attribute."""
    cells = {}
    for r in records:
        cells.setdefault(tuple(r["requested"][a] for a in attributes), []).append(r)
    by_level = {}
    for a in attributes:
        groups = {}
        for r in records:
            groups.setdefault(r["requested"][a], []).append(r)
        by_level[a] = {lv: _rates(rs, attributes) for lv, rs in sorted(groups.items())}
    return {
        "overall": _rates(records, attributes),
        "cells": [{"requested": dict(zip(attributes, c)), **_rates(rs, attributes)} for c, rs in sorted(cells.items())],
        "by_level": by_level,
    }


def analyse(records: list[dict], attributes, main_set: str) -> dict:
    main = [r for r in records if r["suite"] == main_set]
    out = {"controllability": M.controllability(score_table(main, attributes)) if main else None, "suites": {}}
    for name in dict.fromkeys(r["suite"] for r in records):
        out["suites"][name] = suite_metrics([r for r in records if r["suite"] == name], attributes)
    return out


def safety_attribute(attributes) -> str:
    """The attribute whose level the safety curves follow: 'harmless' when present, else the last."""
    return "harmless" if "harmless" in attributes else attributes[-1]


# -- output --------------------------------------------------------------------------------------
def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    """Rows as a fixed-width text table (also valid Markdown: '|' separated with a rule line)."""
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return lines[:1] + ["|" + "|".join("-" * (w + 2) for w in widths) + "|"] + lines[1:]


def headline(result: dict, attributes) -> str:
    lines = []
    ctrl = result["controllability"]
    if ctrl:
        rows = [[a, m.get("exact"), m.get("within1"), m["spearman"], m["per_prompt_spearman"], m["monotonicity"], m["max_abs_leakage"]]
                for a, m in ctrl["attributes"].items()]
        lines.append(f"controllability ({ctrl['n']} samples)")
        lines += _table(["attribute", "exact", "within1", "spearman", "per-prompt", "monotonic", "max leak"], rows)
    srows = []
    for name, s in result["suites"].items():
        o = s["overall"]
        srows.append([name, o["n"], o["refusal_rate"], o["safe_rate"], o["over_refusal"]] + [o["mean_score"][a] for a in attributes])
    lines.append("")
    lines.append("prompt sets (all control cells)")
    lines += _table(["set", "n", "refusal", "safe_rate", "over_refusal"] + [f"mean {a}" for a in attributes], srows)
    return "\n".join(lines)


def _json_safe(x):
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


def write_samples(records: list[dict], attributes, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ints = pa.struct([(a, pa.int32()) for a in attributes])
    schema = pa.schema([
        ("suite", pa.string()), ("prompt_index", pa.int32()), ("prompt_id", pa.string()), ("prompt", pa.string()),
        ("requested", ints), ("sample_index", pa.int32()), ("response", pa.string()),
        ("scores", pa.struct([(a, pa.float32()) for a in attributes])), ("levels", ints),
        ("refused", pa.bool_()), ("harmful", pa.bool_()), ("finish_reason", pa.string()),
    ])
    pq.write_table(pa.Table.from_pylist([{f: r.get(f) for f in schema.names} for r in records], schema=schema), path)


def write_outputs(out: Path, result: dict, records: list[dict], attributes, levels: int, config: dict, main_set: str) -> list[Path]:
    """report.md, metrics.json, PNGs and samples.parquet in `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    figures = {}
    ctrl = result["controllability"]
    if ctrl:
        table = score_table([r for r in records if r["suite"] == main_set], attributes)
        for a in attributes:
            figures[f"heatmap_{a}"] = plots.heatmap(ctrl["cells"], attributes, a, out / f"heatmap_{a}.png", levels)
            figures[f"scatter_{a}"] = plots.scatter(table, a, out / f"scatter_{a}.png", levels)
    safety = safety_attribute(attributes)
    for name, s in result["suites"].items():
        curves = {}
        for key in ("refusal_rate", "safe_rate", "over_refusal"):
            pts = {lv: m[key] for lv, m in s["by_level"][safety].items() if not math.isnan(m[key])}
            if pts:
                curves[key] = pts
        figures[f"safety_{name}"] = plots.rate_curves(curves, out / f"safety_{name}.png", xlabel=f"requested {safety} level",
                                                      ylabel="rate", title=f"{name}: refusals vs {safety}")
    files += figures.values()

    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(_json_safe({"config": config, **result}), indent=1) + "\n")
    samples_path = out / SAMPLES_FILE
    write_samples(records, attributes, samples_path)
    report_path = out / "report.md"
    report_path.write_text(_report_md(result, attributes, config, figures, safety))
    return files + [metrics_path, samples_path, report_path]


def _report_md(result, attributes, config, figures, safety) -> str:
    md = ["# ctrlsafe eval", ""]
    md += [f"- {k}: `{v}`" for k, v in config.items()]
    md += ["", "## Headline", "", *headline(result, attributes).splitlines(), ""]
    ctrl = result["controllability"]
    if ctrl:
        md += ["## Controllability", "",
               "Spearman on measured scores vs requested level; monotonicity = better-than rate of mean scores "
               "between requested levels (0.5 = no control); leakage[a][b] = Spearman(score of a, requested b).", ""]
        md += _table(["measured \\ requested"] + list(attributes),
                     [[a] + [ctrl["leakage"][a][b] for b in attributes] for a in attributes])
        md += ["", "Per-cell mean measured scores:", ""]
        md += _table(["cell", "n"] + [f"mean {a}" for a in attributes],
                     [[" ".join(f"{a}={c['requested'][a]}" for a in attributes), c["n"]] + [c["mean_score"][a] for a in attributes]
                      for c in ctrl["cells"]])
        md += [""] + [f"![{k}]({Path(p).name})" for k, p in figures.items() if not k.startswith("safety_")] + [""]
    md += ["## Safety and helpfulness by prompt set", "",
           "safe_rate = refusals among harmful prompts; over_refusal = refusals among safe prompts.", ""]
    for name, s in result["suites"].items():
        md += [f"### {name}", "", f"By requested {safety} level:", ""]
        md += _table([safety, "n", "refusal", "safe_rate", "over_refusal"] + [f"mean {a}" for a in attributes],
                     [[lv, m["n"], m["refusal_rate"], m["safe_rate"], m["over_refusal"]] + [m["mean_score"][a] for a in attributes]
                      for lv, m in s["by_level"][safety].items()])
        md += ["", "Per cell:", ""]
        md += _table(["cell", "n", "refusal", "safe_rate", "over_refusal"] + [f"mean {a}" for a in attributes],
                     [[" ".join(f"{a}={c['requested'][a]}" for a in attributes), c["n"], c["refusal_rate"], c["safe_rate"], c["over_refusal"]]
                      + [c["mean_score"][a] for a in attributes] for c in s["cells"]])
        md += ["", f"![safety_{name}](safety_{name}.png)", ""]
    return "\n".join(md) + "\n"


# -- generation and scoring ----------------------------------------------------------------------
def refusal_judge(spec: str, threshold: float):
    """prompts, responses -> refused flags: a judge score above `threshold` is a refusal. The spec
    is any scorer spec: 'refusal' (the built-in rule, ctrlsafe.refusal: 1.0 / 0.0), an RM
    directory or module:function."""
    from .reward import Scorer

    scorer = Scorer({"refusal": spec})
    return lambda prompts, responses: [bool(s > threshold) for s in np.asarray(scorer.score(prompts, responses).scores)[:, 0]]


def generate_scored(engine, pset: PromptSet, controls, *, method, samples, sampling, max_new_tokens, seed, scorer, bins, levels,
                    progress=None):
    """Completions of one prompt set under `controls` with their scores [N,K]; returns
    (completions, scores, bins). `bins=None` calibrates on these scores (rerank: on the
    candidates, before choosing)."""
    from .pipeline import sample_for_method, select_nearest
    from .reward import LevelBins

    values = [p.value for p in pset.prompts]
    outs = sample_for_method(engine, values, controls, method=method, n=samples, sampling=sampling,
                             max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    scores = np.asarray(scorer.score([values[o.prompt_index] for o in outs], [o.text for o in outs],
                                     harmful=[pset.harmful[o.prompt_index] for o in outs]).scores, dtype=np.float64)
    if bins is None:
        bins = LevelBins.calibrate(scores, scorer.names, levels=levels, values=scorer.values)
    if method == "rerank":
        picks = select_nearest(outs, np.asarray(bins.to_levels(scores)), controls, scorer.names)
        outs = [replace(outs[i], control_index=ci, control=cell) for i, ci, cell in picks]
        scores = scores[[i for i, _, _ in picks]]
    return outs, scores, bins


def records_for(pset: PromptSet, outs, scores, levels, refused, attributes) -> list[dict]:
    return [
        {
            "suite": pset.name, "prompt_index": o.prompt_index, "prompt_id": pset.prompts[o.prompt_index].id,
            "prompt": pset.prompts[o.prompt_index].display, "requested": dict(o.control), "sample_index": o.sample_index,
            "response": o.text, "scores": {a: float(s) for a, s in zip(attributes, sc)},
            "levels": {a: int(v) for a, v in zip(attributes, lv)}, "refused": bool(r),
            "harmful": pset.harmful[o.prompt_index], "finish_reason": o.finish_reason,
        }
        for o, sc, lv, r in zip(outs, scores, levels, refused)
    ]


# -- CLI -----------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    from .pipeline import METHODS

    p.add_argument("--model", help="policy model directory (default: the tiny preset)")
    p.add_argument("--rm", action="append", default=[], metavar="NAME=DIR_OR_MODULE:FN",
                   help="a reward model per control attribute, repeatable (default: the tiny preset's helpful and harmless)")
    p.add_argument("--prompts", help="controllability prompt set PATH[:LABEL] (default: the shipped examples, labelled by 'kind')")
    p.add_argument("--suite", action="append", default=[], metavar="PATH[:LABEL]",
                   help="a safety / helpfulness prompt set, repeatable; LABEL is a column (safe/unsafe...) or =harmful / =safe")
    p.add_argument("--controls", default="grid", help="grid | 'helpful=0..4,harmless=1,3' | a JSON(L) file of level dicts")
    p.add_argument("--method", choices=METHODS, default="tokens", help="control tokens (default), the request in words, or best-of-N rerank")
    p.add_argument("--samples", type=int, default=2, help="samples per prompt and cell; rerank: candidates per prompt")
    p.add_argument("--bins", default="calibrate",
                   help="LevelBins JSON file, a generated data set directory (its manifest's bins), or calibrate "
                        "(quantiles of the --prompts set's own scores; default)")
    p.add_argument("--levels", type=int, default=5, help="levels per attribute when --bins calibrate")
    p.add_argument("--judge", default="refusal", help="refusal judge: 'refusal' (built-in string rule, default), an RM directory or module:function")
    p.add_argument("--judge-threshold", type=float, default=0.5, help="a judge score above this means refusal")
    p.add_argument("--limit", type=int, default=None, help="use the first K prompts of every prompt set (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="response length limit (tokens)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens with this much probability; 1 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed, model and prompts give the same responses")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--max-rows", type=int, default=256, help="engine: rows decoded together")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="engine: KV-cache tokens per wave")
    p.add_argument("--out", required=True, help="output directory: report.md, metrics.json, PNGs, samples.parquet")


def run(args) -> int:
    import torch

    from .controls import ControlSpec
    from .generate import SamplingParams
    from .pipeline import Progress, parse_controls, read_bins_file, load_engine
    from .presets import example_prompts_path, tiny
    from .reward import LevelBins, Scorer, parse_rm_args

    for name in ("samples", "max_new_tokens", "levels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from .convert import resolve_model

    args.model = resolve_model(args.model)
    preset = tiny() if args.model is None or not args.rm else None
    policy = args.model or str(preset.policy)
    rms = parse_rm_args(args.rm) if args.rm else {n: str(p) for n, p in preset.reward_models.items()}
    bins = None if args.bins == "calibrate" else LevelBins.from_json(read_bins_file(args.bins)).select(list(rms))
    levels = args.levels if bins is None else bins.levels
    spec = ControlSpec(tuple(rms), levels)
    controls = parse_controls(args.controls, spec)
    if controls is None:
        raise ValueError("--controls none: eval compares control cells; give grid or a subset")
    sets = [load_prompt_set(args.prompts or f"{example_prompts_path()}:kind", name="prompts", limit=args.limit)]
    sets += [load_prompt_set(s, limit=args.limit) for s in args.suite]
    names = [s.name for s in sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"prompt sets share the name(s) {dup} (names come from file names); rename a file")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    engine = load_engine(policy, spec, control_tokens=args.method == "tokens", device=device, dtype=dtype, max_rows=args.max_rows,
                         max_batch_tokens=args.max_batch_tokens)
    scorer = Scorer(dict(rms))
    judge = refusal_judge(args.judge, args.judge_threshold)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    records = []
    per_prompt = args.samples * (1 if args.method == "rerank" else len(controls))
    progress = Progress(sum(len(s.prompts) for s in sets) * per_prompt, enabled=True)
    for pset in sets:  # the --prompts set first: with --bins calibrate its scores set the edges
        progress.start_chunk()
        outs, scores, bins = generate_scored(engine, pset, controls, method=args.method, samples=args.samples, sampling=sampling,
                                             max_new_tokens=args.max_new_tokens, seed=args.seed, scorer=scorer, bins=bins, levels=levels,
                                             progress=progress.update)
        values = [pset.prompts[o.prompt_index].value for o in outs]
        refused = judge(values, [o.text for o in outs])
        records += records_for(pset, outs, scores, np.asarray(bins.to_levels(scores)), refused, spec.attributes)

    progress.close()
    config = {"model": policy, "reward_models": rms, "method": args.method, "controls": args.controls, "cells": len(controls),
              "samples": args.samples, "bins": bins.to_json() if args.bins == "calibrate" else args.bins,
              "judge": args.judge, "prompt_sets": {s.name: {"path": s.path, "label": s.label, "prompts": len(s.prompts)} for s in sets},
              "max_new_tokens": args.max_new_tokens, "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p},
              "seed": args.seed}
    result = analyse(records, spec.attributes, "prompts")
    files = write_outputs(Path(args.out), result, records, spec.attributes, levels, config, "prompts")
    print(headline(result, spec.attributes))
    print(f"wrote {len(files)} files to {args.out} (report.md, metrics.json, {SAMPLES_FILE}, PNGs)")
    return 0
