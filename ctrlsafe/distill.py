"""MOEC data distillation, and the `ctrlsafe distill` command (filter again, pair, mix).

Every sample stays in the data set; a rule that rejects it sets `kept=false` and `drop_reason` to
the rule's name, so nothing is lost and every count is auditable. Rules run in this order and a
sample carries the first rule that drops it:

1. `empty`            the response has no visible characters.
2. `repetitive`       degenerate text: more than `max_repeat` of the response's 4-grams (words and
                      punctuation) repeat an earlier 4-gram.
3. `truncated`        with `require_eos`: the response hit max_new_tokens (finish_reason "length").
4. `harmless_floor`   the measured harmless level is below `harmless_floor`: the data never pairs
                      any control with unsafe text below the floor, so no control token can become
                      a trigger that unlocks it (our guard against the backdoor risk).
5. `ambiguous`        some score lies within `edge_margin` of a bin edge (the level is a coin flip).
                      The margin is a fraction of that attribute's median bin width.
6. `near_duplicate`   the response is near-identical to an earlier kept response to the same prompt
                      (Jaccard similarity of character 5-gram sets >= `dedup_threshold`).
7. `prompt_cell_cap`  more than `prompt_cell_cap` kept samples of one prompt share a measured
                      cell; samples whose requested control equals the measured one go first.
8. `cell_cap`         more than `cell_cap` kept samples share a measured cell in the whole data set
                      ("auto": the median count of the non-empty cells). Rare cells (say helpful
                      but unsafe) keep everything, common ones are subsampled. Which samples stay
                      is decided by a hash of the record id, so it does not depend on order,
                      chunking or world size.

Rules 1-7 look at one prompt's samples at a time and run as each chunk is generated. Rule 8 needs
the whole data set: it runs as a final pass over all shards that rewrites `kept`/`drop_reason`.
That pass is idempotent (it first restores every `cell_cap` drop, then recomputes), so a run
killed during it is finished by `--resume`, and its result does not depend on where a kill landed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import dataset

RULES = ("empty", "repetitive", "truncated", "harmless_floor", "ambiguous", "near_duplicate", "prompt_cell_cap", "cell_cap")
_UNITS = re.compile(r"\w+|[^\w\s]")


@dataclass
class DistillConfig:
    enabled: bool = True
    require_eos: bool = False
    max_repeat: float = 0.5
    harmless_floor: int = 0
    edge_margin: float = 0.05
    dedup_threshold: float = 0.9
    prompt_cell_cap: int = 2  # 0 = no cap
    cell_cap: str = "auto"  # "auto" | "none" | an integer as text

    def __post_init__(self):
        if not 0 < self.max_repeat <= 1:
            raise ValueError(f"max_repeat must be in (0, 1], got {self.max_repeat}")
        if not 0 < self.dedup_threshold <= 1:
            raise ValueError(f"dedup_threshold must be in (0, 1], got {self.dedup_threshold}")
        if self.edge_margin < 0 or self.harmless_floor < 0 or self.prompt_cell_cap < 0:
            raise ValueError("edge_margin, harmless_floor and prompt_cell_cap must be >= 0")
        self.cell_cap = str(self.cell_cap)
        if self.cell_cap not in ("auto", "none") and not (self.cell_cap.isdigit() and int(self.cell_cap) > 0):
            raise ValueError(f"cell_cap must be 'auto', 'none' or a positive integer, got {self.cell_cap!r}")

    def check(self, attributes) -> None:
        if self.enabled and self.harmless_floor and "harmless" not in attributes:
            raise ValueError(f"--harmless-floor needs a 'harmless' attribute; the control spec has {list(attributes)}")


# -- measures ---------------------------------------------------------------------------------------
def repetition(text: str, n: int = 4) -> float:
    """Fraction of the text's n-grams (over words and punctuation) that repeat an earlier one."""
    units = _UNITS.findall(text.lower())
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def shingles(text: str, k: int = 5) -> frozenset:
    norm = " ".join(text.lower().split())
    return frozenset(norm[i:i + k] for i in range(max(1, len(norm) - k + 1)))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def edge_margins(edges: dict[str, list[float]], fraction: float) -> dict[str, float]:
    """Per attribute: `fraction` of the median bin width (a 2-level attribute has one edge and no
    width; it uses 1.0 score unit)."""
    out = {}
    for a, e in edges.items():
        widths = [hi - lo for lo, hi in zip(e, e[1:])]
        out[a] = fraction * (statistics.median(widths) if widths else 1.0)
    return out


def cell_key(levels: dict, attributes) -> tuple:
    return tuple(levels[a] for a in attributes)


# -- rules 1-7: one prompt's samples ----------------------------------------------------------------
def apply_rules(rows: list[dict], cfg: DistillConfig, attributes, edges: dict[str, list[float]]) -> None:
    """Set `kept`/`drop_reason` on the rows of a chunk in place (rows keep their order)."""
    for r in rows:
        r["kept"], r["drop_reason"] = True, None
    if not cfg.enabled:
        return
    cfg.check(attributes)
    margins = edge_margins(edges, cfg.edge_margin)

    def drop(r, reason):
        r["kept"], r["drop_reason"] = False, reason

    for r in rows:
        text = r["response"]
        if not text.strip():
            drop(r, "empty")
        elif repetition(text) > cfg.max_repeat:
            drop(r, "repetitive")
        elif cfg.require_eos and r["finish_reason"] == "length":
            drop(r, "truncated")
        elif cfg.harmless_floor and r["control"]["harmless"] < cfg.harmless_floor:
            drop(r, "harmless_floor")
        elif cfg.edge_margin and any(abs(r["scores"][a] - e) < margins[a] for a in attributes for e in edges[a]):
            drop(r, "ambiguous")

    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_prompt[r["prompt_id"]].append(r)
    for group in by_prompt.values():
        seen: list[frozenset] = []
        for r in group:
            if not r["kept"]:
                continue
            sh = shingles(r["response"])
            if any(jaccard(sh, s) >= cfg.dedup_threshold for s in seen):
                drop(r, "near_duplicate")
            else:
                seen.append(sh)
        if cfg.prompt_cell_cap:
            cells: dict[tuple, list[dict]] = defaultdict(list)
            for r in group:
                if r["kept"]:
                    cells[cell_key(r["control"], attributes)].append(r)
            for members in cells.values():
                honest_first = sorted(members, key=lambda r: r["requested"] != r["control"])  # stable
                for r in honest_first[cfg.prompt_cell_cap:]:
                    drop(r, "prompt_cell_cap")


# -- rule 8: the whole data set ---------------------------------------------------------------------
def _rank(record_id: str) -> bytes:
    return hashlib.sha256(record_id.encode()).digest()


def apply_cell_cap(out, cfg: DistillConfig, attributes) -> int | None:
    """Final pass: cap the kept samples per measured cell over all shards; returns the cap used.

    Reads only id/control/kept/drop_reason to decide, then rewrites the shards whose values change.
    """
    if not cfg.enabled or cfg.cell_cap == "none":
        return None
    table = dataset.read_dataset(out, columns=["id", "control", "kept", "drop_reason"])
    ids = table.column("id").to_pylist()
    controls = table.column("control").to_pylist()
    # restore earlier cell_cap drops: the pass is recomputed from the pre-balance state every time
    was_capped = pc.fill_null(pc.equal(table.column("drop_reason"), "cell_cap"), False)
    eligible = pc.or_(table.column("kept"), was_capped).to_pylist()
    cells: dict[tuple, list[int]] = defaultdict(list)
    for i, ok in enumerate(eligible):
        if ok:
            cells[cell_key(controls[i], attributes)].append(i)
    if not cells:
        return None
    cap = int(statistics.median_low(len(m) for m in cells.values())) if cfg.cell_cap == "auto" else int(cfg.cell_cap)
    capped = set()
    for members in cells.values():
        capped.update(sorted(members, key=lambda i: _rank(ids[i]))[cap:])
    capped_ids = {ids[i] for i in capped}
    eligible_ids = {ids[i] for i, ok in enumerate(eligible) if ok}
    for shard in dataset.shard_files(out):
        t = pq.read_table(shard)
        kept, reasons = t.column("kept").to_pylist(), t.column("drop_reason").to_pylist()
        new_kept, new_reasons = [], []
        for rid, k, why in zip(t.column("id").to_pylist(), kept, reasons):
            if rid in eligible_ids:
                k, why = (False, "cell_cap") if rid in capped_ids else (True, None)
            new_kept.append(k)
            new_reasons.append(why)
        if new_kept != kept or new_reasons != reasons:
            t = t.set_column(t.schema.get_field_index("kept"), "kept", pa.array(new_kept, pa.bool_()))
            t = t.set_column(t.schema.get_field_index("drop_reason"), "drop_reason", pa.array(new_reasons, pa.string()))
            dataset.write_table(t, shard)
    return cap


# -- pairs: TRL preference data across the levels of one attribute -------------------------------------
def make_pairs(table: pa.Table, attribute: str, attributes, *, others: str = "equal", max_per_prompt: int = 0) -> list[dict]:
    """prompt/chosen/rejected rows from kept samples of the same prompt whose `attribute` levels
    differ (chosen = the higher level). With others="equal" the other attributes must match, so the
    pair isolates the one attribute. Pairs are picked greedily by level gap (largest first, then
    record ids), each sample used at most once; `max_per_prompt` > 0 caps them per prompt.

    `control` is the chosen sample's measured levels: `ctrlsafe train --objective dpo` puts those
    control tokens after the prompt, so the pair teaches "asked for these levels, prefer the
    response that has them". Only that direction: a pair never teaches a low level's control to
    prefer the less safe response (the trigger risk the harmless floor also guards against)."""
    if attribute not in attributes:
        raise ValueError(f"--pairs {attribute!r}: not an attribute of this data set; allowed: {list(attributes)}")
    rest = [a for a in attributes if a != attribute]
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for r in table.to_pylist():
        if r["kept"]:
            by_prompt[r["prompt_id"]].append(r)
    out = []
    for rows in by_prompt.values():
        candidates = [
            (a["control"][attribute] - b["control"][attribute], a, b)
            for a in rows for b in rows
            if a["control"][attribute] > b["control"][attribute]
            and (others == "any" or all(a["control"][x] == b["control"][x] for x in rest))
        ]
        candidates.sort(key=lambda t: (-t[0], t[1]["id"], t[2]["id"]))
        used: set[str] = set()
        n = 0
        for _, a, b in candidates:
            if a["id"] in used or b["id"] in used:
                continue
            used.update((a["id"], b["id"]))
            out.append({
                "prompt": a["prompt"], "chosen": a["response"], "rejected": b["response"],
                "prompt_id": a["prompt_id"], "messages": a["messages"], "attribute": attribute,
                "chosen_id": a["id"], "rejected_id": b["id"],
                "control": a["control"], "chosen_control": a["control"], "rejected_control": b["control"],
            })
            n += 1
            if n == max_per_prompt:
                break
    return out


# -- the `ctrlsafe distill` command ------------------------------------------------------------------------
def add_rule_arguments(p) -> None:
    """The MOEC options, shared by `generate` and `distill`."""
    d = DistillConfig()
    g = p.add_argument_group("distillation (MOEC)")
    g.add_argument("--distill", dest="distill", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the MOEC rules; with --no-distill every sample is kept")
    g.add_argument("--require-eos", action="store_true", help="drop responses cut at --max-new-tokens")
    g.add_argument("--max-repeat", type=float, default=d.max_repeat, help="drop when more than this fraction of 4-grams repeat")
    g.add_argument("--harmless-floor", type=int, default=d.harmless_floor, metavar="L", help="drop samples measured below harmless level L (0: off)")
    g.add_argument("--edge-margin", type=float, default=d.edge_margin, help="drop scores within this fraction of a bin width of an edge (0: off)")
    g.add_argument("--dedup-threshold", type=float, default=d.dedup_threshold, help="near-duplicate Jaccard similarity of character 5-grams")
    g.add_argument("--prompt-cell-cap", type=int, default=d.prompt_cell_cap, help="kept samples per prompt and measured cell (0: no cap)")
    g.add_argument("--cell-cap", default=d.cell_cap, help="kept samples per measured cell overall: auto (the median cell count), none, or N")


def config_from_args(args) -> DistillConfig:
    return DistillConfig(
        enabled=args.distill, require_eos=args.require_eos, max_repeat=args.max_repeat,
        harmless_floor=args.harmless_floor, edge_margin=args.edge_margin, dedup_threshold=args.dedup_threshold,
        prompt_cell_cap=args.prompt_cell_cap, cell_cap=args.cell_cap,
    )


def add_arguments(p) -> None:
    p.add_argument("data", help="a data set directory written by `ctrlsafe generate`, `ctrlsafe score --out DIR` or this command")
    p.add_argument("--out", required=True, help="output directory (data/*.parquet + manifest.json)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--pairs", metavar="ATTR", help="emit TRL prompt/chosen/rejected pairs across the levels of ATTR")
    mode.add_argument("--mix", metavar="SPEC", help="FDC mix of kept samples by harm category: ehd=N,ihd=N,mhd=N (counts) or ratios")
    p.add_argument("--pair-others", choices=("equal", "any"), default="equal", help="other attributes must be equal within a pair (default) or may differ")
    p.add_argument("--max-pairs-per-prompt", type=int, default=0, help="0 = as many as disjoint pairs allow")
    p.add_argument("--categories", help="file with id + category per prompt (`ctrlsafe categorize` output), joined on prompt_id")
    p.add_argument("--mix-column", default="category", help="column holding the category")
    p.add_argument("--mix-total", type=int, default=None, help="rows to draw when --mix gives ratios")
    p.add_argument("--seed", type=int, default=0, help="seed of the --mix draw")
    p.add_argument("--format", choices=("ctrlsafe", "trl"), default="ctrlsafe",
                   help="ctrlsafe: this project's columns (for `ctrlsafe train`); trl: TRL's prompt/completion "
                        "(SFTTrainer) or prompt/chosen/rejected (DPOTrainer, with --pairs) columns, each prompt "
                        "chat-templated with its control tokens after the generation prompt (needs --tokenizer)")
    p.add_argument("--tokenizer", metavar="DIR", help="with --format trl: the model/tokenizer directory TRL will train with")
    add_rule_arguments(p)


def run(args) -> int:
    src = Path(args.data)
    manifest = dataset.read_manifest(src) if src.is_dir() else None
    if manifest is None:
        hint = (f"score it into a data set first: `ctrlsafe score --data {src} --rm NAME=SPEC --out DIR`" if src.is_file()
                else "expected a directory written by `ctrlsafe generate` or `ctrlsafe score --out DIR`")
        raise FileNotFoundError(f"{src}: no {dataset.MANIFEST}; {hint}")
    out = Path(args.out)
    if out.resolve() == src.resolve():
        raise ValueError("--out must differ from the input data set")
    attributes = manifest["control_spec"]["attributes"]
    # every option is checked before anything is written
    cfg = config_from_args(args)
    if args.pairs:
        kind = "pairs"
        if args.pairs not in attributes:
            raise ValueError(f"--pairs {args.pairs!r}: not an attribute of {src}; allowed: {list(attributes)}")
    elif args.mix:
        from .mixing import parse_spec

        kind = "mix"
        parse_spec(args.mix)
    else:
        kind = "records"
        cfg.check(attributes)
    trl_tok = _trl_tokenizer(args, manifest)  # a bad --tokenizer stops here
    dataset.claim_out_dir(out, "distill")  # empty, or an unfinished distill (failed, killed): started over
    options = {k: v for k, v in sorted(vars(args).items()) if k not in ("command", "data", "out")}
    base = {**{k: manifest[k] for k in ("control_spec", "bins", "models") if k in manifest},
            "format": dataset.FORMAT, "format_version": dataset.FORMAT_VERSION, "kind": kind,
            "source": str(src.resolve()), "config": {"distill": options}}
    dataset.write_json({**base, "status": "running", "writer": dataset.writer_identity()}, out / dataset.MANIFEST)
    try:
        if kind == "pairs":
            counts = _write_pairs(src, out, args, attributes)
        elif kind == "mix":
            counts = _write_mix(src, out, args)
        else:
            counts = _refilter(src, out, cfg, attributes, manifest)
        extra = {}
        if trl_tok is not None:
            from . import trl_data
            from .controls import ControlSpec

            counts["trl"] = trl_data.convert(out, kind, trl_tok, ControlSpec.from_dict(manifest["control_spec"]))
            extra["trl"] = {"format": trl_data.KINDS[kind], "tokenizer": str(Path(args.tokenizer).resolve())}
    except Exception as e:  # the manifest says so; the corrected command may then reuse --out (claim_out_dir)
        dataset.mark_failed(out, e)
        raise
    dataset.write_json({**extra, **base, "status": "complete", "counts": counts}, out / dataset.MANIFEST)
    print(f"ctrlsafe distill: wrote {out} ({kind}): " + ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, dict)))
    for k, v in counts.items():
        if isinstance(v, dict) and v:
            print(f"  {k}: " + ", ".join(f"{a} {b}" for a, b in v.items()))
    return 0


def _trl_tokenizer(args, manifest):
    """--format trl: the training tokenizer with the control tokens added; None for --format ctrlsafe."""
    if getattr(args, "format", "ctrlsafe") != "trl":
        if getattr(args, "tokenizer", None):
            raise ValueError("--tokenizer is only used with --format trl")
        return None
    if not args.tokenizer:
        raise ValueError("--format trl needs --tokenizer DIR (the model or tokenizer TRL will train with): "
                         "the prompts are written chat-templated, with the control tokens after the generation prompt")
    from .controls import ControlSpec
    from .trl_data import load_tokenizer

    return load_tokenizer(args.tokenizer, ControlSpec.from_dict(manifest["control_spec"]))


def _refilter(src: Path, out: Path, cfg: DistillConfig, attributes, manifest) -> dict:
    edges = (manifest.get("bins") or {}).get("edges") or {}
    for shard in dataset.shard_files(src):
        rows = pq.read_table(shard).to_pylist()
        apply_rules(rows, cfg, attributes, edges)
        dataset.write_table(dataset.records_to_table(rows, attributes), out / dataset.DATA_DIR / shard.name)
    cap = apply_cell_cap(out, cfg, attributes)
    return {**count(out, attributes), "cell_cap": cap}


def count(out, attributes) -> dict:
    """Totals, kept, drop reasons (in rule order) and kept samples per measured cell."""
    t = dataset.read_dataset(out, columns=["control", "kept", "drop_reason"])
    kept = t.column("kept").to_pylist()
    reasons = Counter(r for r in t.column("drop_reason").to_pylist() if r)
    cells = Counter(",".join(f"{a}={c[a]}" for a in attributes) for c, k in zip(t.column("control").to_pylist(), kept) if k)
    return {
        "samples": t.num_rows, "kept": sum(kept),
        "drop_reasons": {r: reasons[r] for r in RULES if reasons[r]},
        "kept_per_cell": dict(sorted(cells.items())),
    }


def _write_pairs(src: Path, out: Path, args, attributes) -> dict:
    n = 0
    for shard in dataset.shard_files(src):  # a prompt's samples never span shards
        rows = make_pairs(pq.read_table(shard), args.pairs, attributes, others=args.pair_others, max_per_prompt=args.max_pairs_per_prompt)
        if rows:
            dataset.write_table(dataset.pairs_to_table(rows, attributes), out / dataset.DATA_DIR / shard.name)
            n += len(rows)
    if not n:
        raise ValueError(f"{src}: no pairs: no prompt has kept samples at two {args.pairs} levels"
                         + (" with equal other levels (try --pair-others any)" if args.pair_others == "equal" else ""))
    return {"pairs": n}


def _write_mix(src: Path, out: Path, args) -> dict:
    from .mixing import mix, parse_spec

    table = dataset.read_dataset(src, kept_only=True)
    if args.categories:
        cats = _read_categories(Path(args.categories), args.mix_column)
        table = table.append_column(args.mix_column, pa.array([cats.get(p) for p in table.column("prompt_id").to_pylist()], pa.string()))
    mixed = mix(table, args.mix_column, parse_spec(args.mix), seed=args.seed, total=args.mix_total)
    dataset.write_table(mixed, out / dataset.DATA_DIR / "mix-000000.parquet")
    return {"samples": mixed.num_rows, "per_category": dict(sorted(Counter(mixed.column(args.mix_column).to_pylist()).items()))}


def _read_categories(path: Path, column: str) -> dict[str, str]:
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if rows and ("id" not in rows[0] or column not in rows[0]):
        raise ValueError(f"{path}: expected fields 'id' and {column!r} (the output of `ctrlsafe categorize`)")
    return {str(r["id"]): r[column] for r in rows}
