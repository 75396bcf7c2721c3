"""The benchmark harness every script in benchmarks/ uses.

A benchmark script defines `run(quick: bool = False, device: str = "cpu") -> list[Row]` and ends
with `if __name__ == "__main__": main(run)`. Inside, `compare(...)` times several providers of
the same work interleaved (round-robin, so drift on a shared machine hits all alike) and returns
one Row per provider with median/p20/p80, effective bandwidth or FLOP rate, and the ratio to the
reference provider measured in the same run.

Timing goes through a `Timing` backend chosen by device (`timing_for`): perf_counter on CPU;
CUDA events with L2 flushed before every repetition on CUDA. The backend also names the device
and knows its limit (CPU: a read-bandwidth probe; CUDA: a datasheet table, else a copy probe),
which `describe_machine` + `stamp` attach to every row with versions, commit and the command
that reproduces it. `ctrlsafe bench` (ctrlsafe/bench.py) runs all scripts through this module.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

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
    # Filled by `stamp` (ctrlsafe bench and main): where and how the row was measured.
    fraction_of_limit: float | None = None  # gbps / limit_gbps (or 16-bit tflops / limit_tflops)
    suite: str | None = None  # the script: "sampling" for benchmarks/bench_sampling.py
    device: str | None = None  # "cpu", "cuda", "cuda:1"
    device_name: str | None = None
    limit_gbps: float | None = None
    limit_tflops: float | None = None
    limit_source: str | None = None  # "read probe", "copy probe", "datasheet H100 SXM"
    timer: str | None = None
    versions: dict = field(default_factory=dict)
    commit: str | None = None
    timestamp: str | None = None
    command: str | None = None  # the shell command that reproduces this row

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        """Inverse of to_dict; keys this version does not know (from newer files) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        for k in ("median_ms", "p20_ms", "p80_ms"):
            if not isinstance(d[k], (int, float)) or isinstance(d[k], bool):
                raise ValueError(f"field {k} must be a number, got {d[k]!r}")
        return cls(**{k: v for k, v in d.items() if k in names})


class SkipSuite(Exception):
    """Raise from a script's run() when it does not apply (e.g. a CPU-only comparison asked for
    --device cuda): `ctrlsafe bench` reports the suite as skipped, not failed."""


def require_cpu(suite: str, device: str) -> None:
    """For suites that compare against transformers end to end: those run on the CPU only."""
    if device != "cpu":
        raise SkipSuite(f"{suite} compares against transformers on the CPU only (its CUDA path is timed by the kernel suites)")


# ---------------------------------------------------------------------------------------------
# Timing backends


class Limit(NamedTuple):
    gbps: float | None
    tflops: float | None  # dense 16-bit tensor-core peak; None where not known
    source: str


class Timing(Protocol):
    """What `measure` needs from a device. Tests inject fakes of CudaTiming's `api`."""

    name: str

    def sync(self) -> None: ...
    def flush(self) -> None: ...
    def time_ms(self, fn: Callable[[], object]) -> float: ...
    def peak_mem_mb(self, fn: Callable[[], object]) -> float | None: ...
    def device_name(self) -> str: ...
    def limit(self) -> Limit: ...


PROBE_BYTES = 256 << 20  # larger than any CPU last-level cache or GPU L2 we know of


def _probe_gbps(timing: Timing, fn: Callable[[], object], nbytes: int, reps: int = 5) -> float:
    fn()
    timing.sync()
    ms = statistics.median(timing.time_ms(fn) for _ in range(reps))
    return nbytes / (ms * 1e-3) / 1e9


class CpuTiming:
    name = "perf_counter"

    def __init__(self, probe_bytes: int = PROBE_BYTES):
        self.probe_bytes = probe_bytes
        self._limit: Limit | None = None

    def sync(self) -> None:
        pass

    def flush(self) -> None:
        pass  # a CPU's last-level cache is not ours to evict cheaply; inputs stay warm as in use

    def time_ms(self, fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def peak_mem_mb(self, fn):
        return None  # no per-call allocator statistics on CPU; scripts measure RSS in subprocesses

    def device_name(self) -> str:
        return f"{cpu_model()} x{torch.get_num_threads()} threads"

    def limit(self) -> Limit:
        """Read bandwidth of this machine now: the median of a few sums over a tensor larger than cache."""
        if self._limit is None:
            x = torch.ones(self.probe_bytes // 4)
            self._limit = Limit(_probe_gbps(self, x.sum, x.numel() * 4), None, "read probe")
        return self._limit


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# (substring of torch.cuda.get_device_name, label, memory GB/s, dense bf16 tensor TFLOP/s) from the
# vendor datasheets; the first match wins, so variants come before the family name.
GPU_PEAKS = [
    ("H100 PCIe", "H100 PCIe", 2000, 756),
    ("H100 NVL", "H100 NVL", 3900, 835),
    ("H100", "H100 SXM", 3350, 989),
    ("H200 NVL", "H200 NVL", 4800, 835),
    ("H200", "H200 SXM", 4800, 989),
    ("A100-SXM4-40GB", "A100 SXM 40GB", 1555, 312),
    ("A100-PCIE-40GB", "A100 PCIe 40GB", 1555, 312),
    ("A100 80GB PCIe", "A100 PCIe 80GB", 1935, 312),
    ("A100", "A100 SXM 80GB", 2039, 312),
    ("L40S", "L40S", 864, 362),
    ("RTX 4090", "RTX 4090", 1008, 165),
]


def gpu_peak(device_name: str) -> Limit | None:
    for pattern, label, gbps, tflops in GPU_PEAKS:
        if pattern.lower() in device_name.lower():
            return Limit(float(gbps), float(tflops), f"datasheet {label}")
    return None


class CudaTiming:
    """CUDA events around each call, L2 flushed first so every repetition reads from HBM, as a
    kernel does in a real step (the previous call's working set is long gone from L2 there).

    `api` is torch.cuda; tests pass a fake with the same few functions to run this on a CPU."""

    name = "cuda events, L2 flushed"

    def __init__(self, device: str | torch.device = "cuda", *, api=None, flush_bytes: int = PROBE_BYTES, probe_bytes: int = PROBE_BYTES):
        self.device = torch.device(device)
        self.api = api if api is not None else torch.cuda
        self.flush_bytes = flush_bytes
        self.probe_bytes = probe_bytes
        self.flush_buffer: torch.Tensor | None = None  # allocated on first use
        self._limit: Limit | None = None

    def sync(self) -> None:
        self.api.synchronize(self.device)

    def flush(self) -> None:
        if self.flush_buffer is None:
            self.flush_buffer = torch.empty(self.flush_bytes, dtype=torch.uint8, device=self.device)
        self.flush_buffer.zero_()

    def time_ms(self, fn):
        self.flush()  # enqueued before `start`, so not part of the measured interval
        start, end = self.api.Event(enable_timing=True), self.api.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def peak_mem_mb(self, fn):
        """Memory one call allocates beyond what is already resident (inputs, flush buffer)."""
        self.sync()
        self.api.reset_peak_memory_stats(self.device)
        base = self.api.memory_allocated(self.device)
        fn()
        self.sync()
        return (self.api.max_memory_allocated(self.device) - base) / 2**20

    def device_name(self) -> str:
        return self.api.get_device_name(self.device)

    def limit(self) -> Limit:
        if self._limit is None:
            self._limit = gpu_peak(self.device_name()) or self._copy_probe()
        return self._limit

    def _copy_probe(self) -> Limit:
        src = torch.ones(self.probe_bytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        return Limit(_probe_gbps(self, lambda: dst.copy_(src), 2 * self.probe_bytes), None, "copy probe")


TIMINGS: dict[str, Timing] = {}  # one per device, so the flush buffer and the probe happen once


def timing_for(device: str | torch.device) -> Timing:
    key = str(torch.device(device))
    if key not in TIMINGS:
        TIMINGS[key] = CudaTiming(key) if torch.device(device).type == "cuda" else CpuTiming()
    return TIMINGS[key]


# ---------------------------------------------------------------------------------------------
# Measuring


def measure(fns: dict[str, Callable[[], object]], *, warmup: int = 1, reps: int = 7, device: str = "cpu", timing: Timing | None = None) -> dict[str, list[float]]:
    """Milliseconds per call for each provider, measured in interleaved rounds."""
    timing = timing or timing_for(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    timing.sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timing.time_ms(fn))
    return times


def peak_memory_mb(device: str = "cpu") -> float:
    """This process's peak memory: the allocator's peak on CUDA; on CPU the RSS high-water VmHWM.

    Not ru_maxrss: Linux carries the parent's high-water into a child across fork + exec, so a
    fresh subprocess started from a big parent would report the parent's size.
    """
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = "/proc/self/status"
    if os.path.exists(status):
        with open(status) as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    timing: Timing | None = None,
) -> list[Row]:
    """Time `fns` interleaved and return one Row each (peak memory too where the device tracks it)."""
    timing = timing or timing_for(device)
    times = measure(fns, warmup=warmup, reps=reps, device=device, timing=timing)
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
                peak_mem_mb=timing.peak_mem_mb(fns[name]),
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Where a run happened


@dataclass
class Machine:
    device: str
    device_name: str
    limit: Limit
    timer: str
    versions: dict
    commit: str
    timestamp: str


def describe_machine(device: str = "cpu") -> Machine:
    """Device, its limit (probes run now, on this device), versions, commit and time of this run."""
    timing = timing_for(device)
    versions = {pkg: _version(pkg) for pkg in ("torch", "triton", "transformers", "ctrlsafe")}
    versions["python"] = platform.python_version()
    if torch.device(device).type == "cuda":
        versions["cuda"] = torch.version.cuda
    return Machine(
        device=device,
        device_name=timing.device_name(),
        limit=timing.limit(),
        timer=timing.name,
        versions=versions,
        commit=git_commit(),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """HEAD of the checkout ctrlsafe runs from (+dirty if it has local changes), else "unknown"."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return "unknown"
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


HALF_DTYPES = {"bf16", "fp16", "bfloat16", "float16", "torch.bfloat16", "torch.float16"}


def stamp(rows: list[Row], machine: Machine, *, suite: str, command: str) -> list[Row]:
    """Attach the machine, the limit fraction and the reproducing command to each row (in place)."""
    lim = machine.limit
    for r in rows:
        r.suite, r.command = suite, command
        r.device, r.device_name, r.timer = machine.device, machine.device_name, machine.timer
        r.limit_gbps, r.limit_tflops, r.limit_source = lim.gbps, lim.tflops, lim.source
        r.versions, r.commit, r.timestamp = dict(machine.versions), machine.commit, machine.timestamp
        if r.fraction_of_limit is None:
            if r.gbps and lim.gbps:
                r.fraction_of_limit = r.gbps / lim.gbps
            elif r.tflops and lim.tflops and r.dtype in HALF_DTYPES:
                r.fraction_of_limit = r.tflops / lim.tflops
    return rows


# ---------------------------------------------------------------------------------------------
# Results: table and JSONL


def fmt_num(v: float) -> str:
    if v == 0 or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def format_rows(rows: list[Row]) -> str:
    """A plain aligned table; columns no row fills are left out."""
    cols = [
        ("benchmark", "benchmark"), ("provider", "provider"), ("shape", "shape"), ("dtype", "dtype"),
        ("median_ms", "median ms"), ("p20_ms", "p20"), ("p80_ms", "p80"), ("gbps", "GB/s"),
        ("tflops", "TFLOP/s"), ("fraction_of_limit", "% limit"), ("throughput", "throughput"),
        ("speedup_vs_reference", "x ref"), ("peak_mem_mb", "peak MB"),
    ]
    cols = [(c, h) for c, h in cols if any(getattr(r, c) is not None for r in rows)]

    def cell(r, c):
        v = getattr(r, c)
        if v is None:
            return "-"
        if c == "throughput":
            return f"{fmt_num(v)} {r.throughput_unit or '/s'}"
        if c == "fraction_of_limit":
            return f"{100 * v:.1f}%"
        return fmt_num(v) if isinstance(v, float) else str(v)

    table = [[h for _, h in cols]] + [[cell(r, c) for c, _ in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in table)


def format_machine(m: Machine) -> str:
    lim = m.limit
    limit = ", ".join(x for x in (lim.gbps and f"{lim.gbps:,.1f} GB/s", lim.tflops and f"{lim.tflops:,.0f} TFLOP/s bf16") if x)
    versions = " ".join(f"{k} {v}" for k, v in m.versions.items() if v)
    return (f"device {m.device}: {m.device_name}; limit {limit} ({lim.source}); timer {m.timer}\n"
            f"{versions}; commit {m.commit}; {m.timestamp}")


def write_jsonl(rows: list[Row], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r.to_dict()) + "\n")
    os.replace(tmp, path)  # a killed run never leaves a half-written results file


def read_jsonl(path: str | Path) -> list[Row]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                if not isinstance(d, dict):
                    raise ValueError("not a JSON object")
                rows.append(Row.from_dict(d))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a benchmark row: {e}") from None
    return rows


# ---------------------------------------------------------------------------------------------
# Peers: other projects' kernels for the same ops, as extra providers when installed


def _flashinfer_sampling():
    from flashinfer.sampling import top_k_top_p_sampling_from_logits

    def sample(logits, temperature, top_k, top_p):
        scaled = logits / temperature[:, None]
        return top_k_top_p_sampling_from_logits(scaled, top_k.to(torch.int32), top_p.float()).long()

    return sample


def _loss_tensor(out):
    # Liger has returned a bare loss, a (loss, z_loss, ...) tuple and a CrossEntropyOutput over releases
    return getattr(out, "loss", out[0] if isinstance(out, tuple) else out)


def _liger_logprobs():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def linear_logprobs(hidden, weight, target, ignore_index=-100):
        return -_loss_tensor(liger_fused_linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index, reduction="none"))

    return linear_logprobs


def _cce_logprobs():
    from cut_cross_entropy import linear_cross_entropy

    def linear_logprobs(hidden, weight, target, ignore_index=-100):
        return -linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index, reduction="none")

    return linear_logprobs


# op -> provider name -> (top-level package, adapter factory). Adapters take our op's arguments:
#   sampling(logits[B,V], temperature[B], top_k[B], top_p[B]) -> tokens[B] int64
#   linear_logprobs(hidden[T,H], weight[V,H], target[T], ignore_index) -> logp[T] (fp32 where the peer allows)
PEERS = {
    "sampling": {"flashinfer": ("flashinfer", _flashinfer_sampling)},
    "linear_logprobs": {"liger": ("liger_kernel", _liger_logprobs), "cut-cross-entropy": ("cut_cross_entropy", _cce_logprobs)},
}


def peers(op: str, device: str = "cuda") -> dict[str, Callable]:
    """Installed peer kernels for `op`, as {provider name: callable with our op's signature}.

    All peers are CUDA kernels, so on other devices this is empty. A peer that is present but
    fails to import is reported on stderr and left out: peers are never required."""
    if op not in PEERS:
        raise ValueError(f"no peers known for op {op!r}; known: {', '.join(PEERS)}")
    if torch.device(device).type != "cuda":
        return {}
    found = {}
    for name, (package, adapter) in PEERS[op].items():
        if importlib.util.find_spec(package) is None:
            continue
        try:
            found[name] = adapter()
        except Exception as e:  # a broken optional install must not stop the suite
            print(f"peer {name} is installed but unusable, skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return found


# ---------------------------------------------------------------------------------------------


def main(run: Callable[..., list[Row]]) -> None:
    """Command-line entry of a single benchmark script."""
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="small shapes, few repetitions (CI)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="also write the rows as JSONL")
    args = p.parse_args()
    suite = Path(sys.argv[0]).stem.removeprefix("bench_")
    command = f"python -m ctrlsafe.benchmarks.bench_{suite}" + " --quick" * args.quick + (f" --device {args.device}" if args.device != "cpu" else "")
    machine = describe_machine(args.device)
    torch.manual_seed(0)
    rows = stamp(run(quick=args.quick, device=args.device), machine, suite=suite, command=command)
    print(format_machine(machine))
    print(format_rows(rows))
    if args.out:
        write_jsonl(rows, args.out)
