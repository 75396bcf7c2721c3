"""The benchmark harness every script in benchmarks/ uses.

A benchmark script defines `run(quick: bool = False, device: str = "cpu") -> list[Row]` and ends
with `if __name__ == "__main__": main(run)`. Inside, `compare(...)` times several providers of
the same work interleaved (round-robin, so drift on a shared machine hits all alike) and returns
one Row per provider with median/p20/p80, effective bandwidth or FLOP rate, and the ratio to the
reference provider measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


@dataclass
class Row:
    benchmark: str
    provider: str
    shape: str
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gbps: float | None = None  # effective bytes moved / median time
    tflops: float | None = None
    throughput: float | None = None  # work items / s (tokens/s, pairs/s, ...)
    throughput_unit: str | None = None
    speedup_vs_reference: float | None = None  # reference median / this median (>1 = faster)
    peak_mem_mb: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fns: dict[str, Callable[[], object]], *, warmup: int = 1, reps: int = 7, device: str = "cpu") -> dict[str, list[float]]:
    """Milliseconds per call for each provider, measured in interleaved rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def compare(
    benchmark: str,
    shape: str,
    dtype: str,
    fns: dict[str, Callable[[], object]],
    *,
    reference: str = "reference",
    bytes_moved: float | None = None,
    flops: float | None = None,
    work_items: float | None = None,
    unit: str | None = None,
    warmup: int = 1,
    reps: int = 7,
    device: str = "cpu",
) -> list[Row]:
    """Time `fns` interleaved and return one Row each."""
    times = measure(fns, warmup=warmup, reps=reps, device=device)
    ref = statistics.median(times[reference]) if reference in times else None
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            Row(
                benchmark=benchmark,
                provider=name,
                shape=shape,
                dtype=dtype,
                median_ms=med,
                p20_ms=quantile(ts, 0.2),
                p80_ms=quantile(ts, 0.8),
                gbps=bytes_moved / (med * 1e-3) / 1e9 if bytes_moved else None,
                tflops=flops / (med * 1e-3) / 1e12 if flops else None,
                throughput=work_items / (med * 1e-3) if work_items else None,
                throughput_unit=unit,
                speedup_vs_reference=ref / med if ref else None,
            )
        )
    return rows


def format_rows(rows: list[Row]) -> str:
    cols = ["benchmark", "provider", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "gbps", "throughput", "speedup_vs_reference", "peak_mem_mb"]
    head = ["benchmark", "provider", "shape", "dtype", "median ms", "p20", "p80", "GB/s", "throughput", "x ref", "peak MB"]

    def cell(r, c):
        v = getattr(r, c)
        if v is None:
            return "-"
        if c == "throughput":
            return f"{v:,.1f} {r.throughput_unit or '/s'}"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    table = [head] + [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in table)


def main(run: Callable[..., list[Row]]) -> None:
    """Command-line entry of a single benchmark script."""
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="small shapes, few repetitions (CI)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    print(format_rows(run(quick=args.quick, device=args.device)))
