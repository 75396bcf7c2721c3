"""`ctrlsafe bench`: every benchmarks/bench_*.py through one harness, one table, JSONL, comparisons.

    ctrlsafe bench --quick                                  # all suites, small shapes
    ctrlsafe bench --device cuda --out gpu.jsonl            # a new GPU, full shapes
    ctrlsafe bench --device cuda --compare gpu.jsonl --fail-on-regression

Each suite is a module ctrlsafe.benchmarks.bench_NAME with `run(quick, device) -> list[Row]`.
Its rows are stamped with the machine (device, limit, versions, commit, time) and the command
that reproduces them. `--compare OLD.jsonl` matches rows by (benchmark, provider, shape, dtype,
device) and reports the change in median time, flagging anything slower than `--threshold`
whose p20..p80 range is clear of the old one.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from . import benchmark as harness
from .benchmark import Row
from .cli import CommandError

PACKAGE = "ctrlsafe.benchmarks"


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions (minutes on a laptop CPU)")
    p.add_argument("--only", metavar="NAMES", help=f"comma-separated suites to run (default all): {', '.join(discover())}")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--out", type=Path, metavar="FILE.jsonl", help="write the rows, one JSON object per line")
    p.add_argument("--compare", type=Path, metavar="OLD.jsonl", help="print the change in median time against an earlier run")
    p.add_argument("--threshold", type=float, default=10.0, metavar="PCT", help="with --compare: a median slower by more than this percent, with p20..p80 clear of the old range, is a regression (default 10)")
    p.add_argument("--fail-on-regression", action="store_true", help="with --compare: exit 1 if any row regressed")
    p.add_argument("--results", type=Path, metavar="NEW.jsonl", help="do not run: take the rows from this file (re-print it, or --compare two stored runs)")


def discover(package: str | None = None) -> dict[str, str]:
    """{suite name: module name} for every bench_*.py in the benchmarks package (nothing imported)."""
    pkg = importlib.import_module(package or PACKAGE)
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_"))
    return {n.removeprefix("bench_"): f"{pkg.__name__}.{n}" for n in names}


def select(available: dict[str, str], only: str | None) -> dict[str, str]:
    if not only:
        return available
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise CommandError(f"--only: unknown suite(s) {', '.join(unknown)}; available: {', '.join(available) or 'none'}")
    return {n: available[n] for n in names}


def reproduce_command(suite: str, quick: bool, device: str) -> str:
    return f"ctrlsafe bench --only {suite}" + " --quick" * quick + (f" --device {device}" if device != "cpu" else "")


def run_suites(suites: dict[str, str], *, quick: bool, device: str, machine: harness.Machine) -> tuple[list[Row], list[str]]:
    """Run each suite in turn; a suite that fails is reported and left out, the rest still run."""
    rows, failed = [], []
    for name, module in suites.items():
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            got = importlib.import_module(module).run(quick=quick, device=device)
        except harness.SkipSuite as e:
            print(f"[{name}] skipped: {e}", file=sys.stderr)
            continue
        except Exception as e:
            failed.append(name)
            detail = traceback.format_exc() if os.environ.get("CTRLSAFE_DEBUG") else f"{type(e).__name__}: {e}"
            if getattr(e, "stderr", None):  # a suite's subprocess died: its own error is the useful part
                detail += "\n" + "\n".join(str(e.stderr).strip().splitlines()[-5:])
            print(f"[{name}] FAILED after {time.perf_counter() - t0:.1f} s: {detail}", file=sys.stderr)
            continue
        rows += harness.stamp(list(got), machine, suite=name, command=reproduce_command(name, quick, device))
        print(f"[{name}] {len(got)} rows in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rows, failed


# ---------------------------------------------------------------------------------------------
# Comparing two runs


def row_key(r: Row) -> tuple:
    # device type only: a run on cuda:0 compares with one on cuda (or on last year's GPU)
    return (r.benchmark, r.provider, r.shape, r.dtype, (r.device or "").split(":")[0])


@dataclass
class Change:
    key: tuple  # row_key
    old: Row | None
    new: Row | None
    status: str  # REGRESSION | improved | same | noisy | new (not in OLD) | missing (in OLD, not in this run)

    @property
    def change(self) -> float | None:
        """Relative change of the median time: +0.25 = 25% slower."""
        if self.old is None or self.new is None:
            return None
        return self.new.median_ms / max(self.old.median_ms, 1e-9) - 1


def diff(old: list[Row], new: list[Row], threshold_pct: float = 10.0) -> list[Change]:
    """Match rows by key (the k-th occurrence of a key in one run pairs with the k-th in the other).

    A median that moved by more than the threshold is a REGRESSION (or improved) only when the
    two runs' p20..p80 ranges do not overlap; otherwise it is "noisy" (a shared or throttling
    machine), reported but not failed on."""

    def keyed(rows):
        seen: Counter = Counter()
        out = {}
        for r in rows:
            k = row_key(r)
            out[k + (seen[k],)] = r
            seen[k] += 1
        return out

    o, n = keyed(old), keyed(new)
    t = threshold_pct / 100
    changes = []
    for k in list(n) + [k for k in o if k not in n]:
        c = Change(k[:-1], o.get(k), n.get(k), "")
        if c.old is None:
            c.status = "new"
        elif c.new is None:
            c.status = "missing"
        elif abs(c.change) <= t:
            c.status = "same"
        elif c.new.p20_ms > c.old.p80_ms or c.new.p80_ms < c.old.p20_ms:
            c.status = "REGRESSION" if c.change > 0 else "improved"
        else:  # the median moved, but each run's p20..p80 spread covers part of the other's
            c.status = "noisy"
        changes.append(c)
    return changes


COLORS = {"REGRESSION": "\033[1;31m", "improved": "\033[32m", "noisy": "\033[33m", "missing": "\033[33m"}


def format_changes(changes: list[Change], threshold_pct: float, color: bool = False) -> str:
    head = ["benchmark", "provider", "shape", "dtype", "device", "old ms", "new ms", "change", "status"]
    lines = [head]
    for c in changes:
        ms = lambda r: harness.fmt_num(r.median_ms) if r else "-"  # noqa: E731
        pct = f"{100 * c.change:+.1f}%" if c.change is not None else "-"
        lines.append([str(x) for x in c.key] + [ms(c.old), ms(c.new), pct, c.status])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        text = "  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip()
        status = changes[i - 1].status if i else ""
        out.append(f"{COLORS[status]}{text}\033[0m" if color and status in COLORS else text)
    n = Counter(c.status for c in changes)
    out.append(f"{n['REGRESSION']} regression(s) (median > +{threshold_pct:g}%, p20..p80 apart), {n['improved']} improved, "
               f"{n['noisy']} noisy (median moved, ranges overlap), {n['same']} within ±{threshold_pct:g}%, "
               f"{n['new']} new, {n['missing']} missing from this run")
    return "\n".join(out)


def use_color(stream) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


# ---------------------------------------------------------------------------------------------


def run(args) -> int:
    if args.threshold < 0:
        raise CommandError(f"--threshold must be >= 0 percent; got {args.threshold}")
    if args.compare and not args.compare.is_file():
        raise FileNotFoundError(f"--compare: {args.compare} does not exist")
    suites = select(discover(), args.only)
    failed: list[str] = []
    if args.results:
        if not args.results.is_file():
            raise FileNotFoundError(f"--results: {args.results} does not exist")
        rows = [r for r in harness.read_jsonl(args.results) if not args.only or r.suite in suites]
        print(format_rows_by_suite(rows))
    else:
        device = check_device(args.device)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # model-saving bars would shred the table
        machine = harness.describe_machine(device)
        print(harness.format_machine(machine), flush=True)
        rows, failed = run_suites(suites, quick=args.quick, device=device, machine=machine)
        print(format_rows_by_suite(rows))
        if args.out:
            harness.write_jsonl(rows, args.out)
            print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    status = 1 if failed else 0
    if args.compare:
        old = harness.read_jsonl(args.compare)
        if args.only:  # rows of suites not run this time are not "missing"
            old = [r for r in old if r.suite is None or r.suite in suites]
        changes = diff(old, rows, args.threshold)
        print(f"\ncompared with {args.compare}:")
        print(format_changes(changes, args.threshold, color=use_color(sys.stdout)))
        if args.fail_on_regression and any(c.status == "REGRESSION" for c in changes):
            status = 1
    if failed:
        print(f"ctrlsafe bench: {len(failed)} suite(s) failed: {', '.join(failed)}", file=sys.stderr)
    return status


def check_device(device: str) -> str:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise CommandError(f"--device {device!r}: allowed are cpu, cuda, cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    if kind == "cuda" and torch.device(device).index is not None:
        torch.cuda.set_device(device)  # events and the flush buffer follow the current device
    return device


def format_rows_by_suite(rows: list[Row]) -> str:
    """The table, then how to reproduce each suite's rows."""
    commands = dict.fromkeys((r.suite, r.command) for r in rows if r.command)
    return "\n".join([harness.format_rows(rows)] + [f"  {suite}: {cmd}" for suite, cmd in commands])
