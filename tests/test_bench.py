"""`ctrlsafe bench` and the harness: suites on CPU, result files and comparisons, the CUDA timing
path with a fake torch.cuda, peer detection with fake modules, pytest-benchmark wiring."""
import datetime
import importlib.machinery
import json
import re
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from ctrlsafe import bench, benchmark
from ctrlsafe.benchmark import CpuTiming, CudaTiming, Row
from ctrlsafe.cli import main as cli

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]

TINY_SUITE = """
import torch
from ctrlsafe.benchmark import compare

def run(quick=False, device="cpu"):
    x = torch.randn(64, 1024)  # on the CPU even for "cuda": the CUDA path is faked in these tests
    rows = compare("sum", "64x1024", "fp32", {"reference": lambda: x.sum(), "rowwise": lambda: x.sum(1)},
                   bytes_moved=x.numel() * 4, device=device, reps=3)
    rows[0].peak_mem_mb = rows[0].peak_mem_mb or 1.5  # as a script measuring its own peak would
    return rows
"""


@pytest.fixture
def suites(tmp_path, monkeypatch):
    """A benchmarks package `fakebench`: bench_tiny (fast), bench_broken (its subprocess fails), bench_gpuonly (skips)."""
    pkg = tmp_path / "fakebench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bench_tiny.py").write_text(TINY_SUITE)
    (pkg / "bench_broken.py").write_text(
        "import subprocess, sys\n"
        "def run(quick=False, device='cpu'):\n"
        "    subprocess.run([sys.executable, '-c', 'raise SystemExit(\"kernel exploded\")'], check=True, capture_output=True, text=True)\n")
    (pkg / "bench_gpuonly.py").write_text(
        "from ctrlsafe.benchmark import SkipSuite\n"
        "def run(quick=False, device='cpu'):\n    raise SkipSuite('needs CUDA')\n")
    (pkg / "conftest.py").write_text("")  # not a suite
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(bench, "PACKAGE", "fakebench")
    # a small probe keeps the test fast; the real one reads 256 MB
    monkeypatch.setitem(benchmark.TIMINGS, "cpu", CpuTiming(probe_bytes=8 << 20))
    yield pkg
    for name in [m for m in sys.modules if m.startswith("fakebench")]:
        del sys.modules[name]


def make_row(benchmark_name="op", provider="cpu", ms=1.0, **kw) -> Row:
    return Row(benchmark=benchmark_name, provider=provider, shape="8x8", dtype="fp32", median_ms=ms, p20_ms=ms * 0.9, p80_ms=ms * 1.1, device="cpu", suite="s", **kw)


# ---------------------------------------------------------------------------------------------
# Running suites on the CPU


def test_discover_lists_only_bench_modules(suites):
    """Suites are the bench_* modules of the package, by short name; other modules are not suites."""
    assert bench.discover() == {"broken": "fakebench.bench_broken", "gpuonly": "fakebench.bench_gpuonly", "tiny": "fakebench.bench_tiny"}


def test_quick_run_rows_fields_and_jsonl_roundtrip(suites, tmp_path, capsys):
    """A --quick run prints the machine and the table and writes JSONL whose rows carry every
    stamped field (device, limit and fraction, versions, commit, time, command) and read back equal."""
    out = tmp_path / "r.jsonl"
    assert cli(["bench", "--quick", "--only", "tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = benchmark.read_jsonl(out)
    assert [r.provider for r in rows] == ["reference", "rowwise"]
    limit = rows[0].limit_gbps
    assert limit > 0 and rows[0].limit_source == "read probe"
    for r in rows:
        assert r.suite == "tiny" and r.device == "cpu" and r.timer == "perf_counter"
        assert benchmark.cpu_model() in r.device_name
        assert 0 < r.p20_ms <= r.median_ms <= r.p80_ms
        assert r.gbps == pytest.approx(64 * 1024 * 4 / (r.median_ms * 1e-3) / 1e9)
        assert r.fraction_of_limit == pytest.approx(r.gbps / limit)
        assert torch.__version__.startswith(r.versions["torch"].split("+")[0]) and r.versions["transformers"]
        assert r.versions["python"] == ".".join(map(str, sys.version_info[:3]))
        assert r.commit and (r.commit == "unknown" or len(r.commit.split("+")[0]) == 12)
        assert datetime.datetime.fromisoformat(r.timestamp).tzinfo is not None
        assert r.command == "ctrlsafe bench --only tiny --quick"
        assert r.command in printed and r.provider in printed
    assert rows[0].speedup_vs_reference == 1.0 and rows[0].peak_mem_mb == 1.5
    assert "read probe" in printed and "% limit" in printed
    # round trip: every field survives
    again = tmp_path / "again.jsonl"
    benchmark.write_jsonl(rows, again)
    assert [r.to_dict() for r in benchmark.read_jsonl(again)] == [json.loads(line) for line in out.read_text().splitlines()]


def test_failing_suite_is_reported_and_others_still_run(suites, capsys):
    """A suite that raises is named on stderr with its subprocess's error, the other suites' rows
    still print, exit status 1;
    a suite raising SkipSuite is reported as skipped and is not a failure."""
    assert cli(["bench", "--quick"]) == 1
    cap = capsys.readouterr()
    assert "[broken] FAILED" in cap.err and "CalledProcessError" in cap.err and "kernel exploded" in cap.err and "1 suite(s) failed: broken" in cap.err
    assert "[gpuonly] skipped: needs CUDA" in cap.err
    assert "rowwise" in cap.out
    assert cli(["bench", "--quick", "--only", "gpuonly,tiny"]) == 0


def test_bad_arguments_are_one_line_errors(suites, tmp_path, capsys):
    """Unknown suites, impossible devices, missing files and negative thresholds exit 2 with a message naming them."""
    assert cli(["bench", "--only", "tiny,nope"]) == 2
    assert "unknown suite(s) nope; available: broken, gpuonly, tiny" in capsys.readouterr().err
    assert cli(["bench", "--only", "tiny", "--device", "tpu"]) == 2
    assert "--device 'tpu': allowed are cpu, cuda, cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli(["bench", "--only", "tiny", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert cli(["bench", "--compare", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
    assert cli(["bench", "--threshold", "-1"]) == 2
    assert "--threshold must be >= 0" in capsys.readouterr().err


def test_main_of_a_single_script(suites, tmp_path, monkeypatch, capsys):
    """`python -m ctrlsafe.benchmarks.bench_X --quick --out F` stamps rows with that command and writes them."""
    from fakebench import bench_tiny

    out = tmp_path / "one.jsonl"
    monkeypatch.setattr(sys, "argv", [str(suites / "bench_tiny.py"), "--quick", "--out", str(out)])
    benchmark.main(bench_tiny.run)
    rows = benchmark.read_jsonl(out)
    assert {r.command for r in rows} == {"python -m ctrlsafe.benchmarks.bench_tiny --quick"}
    assert "rowwise" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Result files and --compare


def write(path, rows):
    benchmark.write_jsonl(rows, path)
    return str(path)


@pytest.fixture
def two_runs(tmp_path):
    old = [make_row("a", ms=10.0), make_row("b", ms=10.0), make_row("c", ms=10.0), make_row("gone", ms=1.0)]
    new = [make_row("a", ms=14.0), make_row("b", ms=7.0), make_row("c", ms=10.5), make_row("fresh", ms=1.0)]
    return write(tmp_path / "old.jsonl", old), write(tmp_path / "new.jsonl", new)


def test_diff_statuses():
    """At a 10% threshold: +40% with p20..p80 clear of the old range is a regression, -30% an
    improvement, +5% the same, +20% with overlapping ranges noisy; unmatched rows are new or missing."""
    old = [make_row("a", ms=10.0), make_row("b", ms=10.0), make_row("c", ms=10.0), make_row("n", ms=10.0), make_row("gone")]
    new = [make_row("a", ms=14.0), make_row("b", ms=7.0), make_row("c", ms=10.5), make_row("n", ms=12.0), make_row("fresh")]
    new[3].p20_ms = 9.0  # a spread reaching into the old p20..p80
    got = {c.key[0]: (c.status, c.change) for c in bench.diff(old, new, 10.0)}
    assert got["a"][0] == "REGRESSION" and got["a"][1] == pytest.approx(0.4)
    assert got["b"][0] == "improved" and got["b"][1] == pytest.approx(-0.3)
    assert got["c"][0] == "same"
    assert got["n"][0] == "noisy" and got["n"][1] == pytest.approx(0.2)
    assert got["gone"] == ("missing", None) and got["fresh"] == ("new", None)
    assert bench.diff(old, new, 50.0)[0].status == "same"


def test_diff_matches_on_device_and_repeated_keys():
    """Rows on different device types never pair (cuda:0 pairs with cuda); the k-th repeat of a
    key pairs with the k-th."""
    old = [make_row(ms=1.0), make_row(ms=2.0), make_row("g", ms=1.0)]
    new = [make_row(ms=1.0), make_row(ms=2.6), make_row(ms=1.0), make_row("g", ms=1.0)]
    new[2].device = "cuda"
    old[2].device, new[3].device = "cuda", "cuda:0"
    statuses = [c.status for c in bench.diff(old, new, 10.0)]
    assert statuses == ["same", "REGRESSION", "new", "same"]


def test_compare_cli_flags_regressions_and_exit_code(two_runs, capsys):
    """--compare prints each change and marks REGRESSION (no ANSI colour off a TTY);
    --fail-on-regression turns a regression into exit 1; a higher --threshold clears it."""
    old, new = two_runs
    assert cli(["bench", "--results", new, "--compare", old]) == 0
    out = capsys.readouterr().out.split("compared with")[1]
    line_a = next(line for line in out.splitlines() if line.startswith("a "))
    assert "+40.0%" in line_a and line_a.endswith("REGRESSION")
    assert next(line for line in out.splitlines() if line.startswith("b ")).endswith("improved")
    assert "1 regression(s) (median > +10%, p20..p80 apart), 1 improved, 0 noisy" in out
    assert "1 within ±10%, 1 new, 1 missing from this run" in out
    assert "\033[" not in out
    assert cli(["bench", "--results", new, "--compare", old, "--fail-on-regression"]) == 1
    capsys.readouterr()
    assert cli(["bench", "--results", new, "--compare", old, "--fail-on-regression", "--threshold", "50"]) == 0
    assert "0 regression(s)" in capsys.readouterr().out


def test_colour_only_on_a_tty(monkeypatch):
    """Regressions are red only when writing to a terminal and NO_COLOR is unset."""
    changes = bench.diff([make_row("a", ms=1.0), make_row("b", ms=1.0)], [make_row("a", ms=2.0), make_row("b", ms=1.0)], 10.0)
    lines = bench.format_changes(changes, 10.0, color=True).splitlines()
    assert lines[1].startswith("\033[1;31m") and "REGRESSION" in lines[1] and "\033[" not in lines[2]

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert bench.use_color(Stream(True)) and not bench.use_color(Stream(False))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not bench.use_color(Stream(True))


def test_bad_result_files_name_file_and_line(tmp_path, capsys):
    """Broken JSON, a non-object line or a missing field is reported as file:line with the problem."""
    good = json.dumps(make_row().to_dict())
    cases = {
        "{not json": "bad.jsonl:2: not a benchmark row",
        "[1, 2]": "bad.jsonl:2: not a benchmark row: not a JSON object",
        json.dumps({k: v for k, v in make_row().to_dict().items() if k != "median_ms"}): "bad.jsonl:2: not a benchmark row: missing field(s) median_ms",
        json.dumps({**make_row().to_dict(), "p20_ms": "fast"}): "field p20_ms must be a number",
    }
    for line, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(good + "\n" + line + "\n")
        with pytest.raises(ValueError, match=re.escape(message)):
            benchmark.read_jsonl(bad)
    assert cli(["bench", "--results", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_rows_from_newer_files_keep_loading(tmp_path):
    """Fields a newer ctrlsafe adds are ignored, so old tools still compare new files."""
    p = tmp_path / "newer.jsonl"
    p.write_text(json.dumps({**make_row().to_dict(), "energy_joules": 3.0}) + "\n")
    assert benchmark.read_jsonl(p)[0].median_ms == 1.0


# ---------------------------------------------------------------------------------------------
# The CUDA path, with a fake torch.cuda


class FakeCuda:
    """The slice of torch.cuda the harness uses; events read perf_counter, memory numbers are fixed."""

    def __init__(self, name="NVIDIA H100 80GB HBM3"):
        self.name, self.log, self.elapsed = name, [], []

    def Event(self, enable_timing=False):
        assert enable_timing
        api = self

        class Event:
            def record(self):
                self.t = time.perf_counter()
                api.log.append("record")

            def synchronize(self):
                api.log.append("event sync")

            def elapsed_time(self, end):
                ms = (end.t - self.t) * 1e3
                api.elapsed.append(ms)
                return ms

        return Event()

    def synchronize(self, device=None):
        self.log.append("sync")

    def get_device_name(self, device=None):
        return self.name

    def reset_peak_memory_stats(self, device=None):
        self.log.append("reset peak")

    def memory_allocated(self, device=None):
        return 100 << 20

    def max_memory_allocated(self, device=None):
        return 150 << 20


def fake_cuda_timing(name="NVIDIA H100 80GB HBM3") -> CudaTiming:
    # tensors (flush buffer, probes) live on the CPU; everything CUDA-only goes through the fake api
    return CudaTiming("cpu", api=FakeCuda(name), flush_bytes=1 << 16, probe_bytes=1 << 20)


def test_cuda_timing_uses_events_and_flushes_l2_before_every_rep():
    """Each timed call is bracketed by events, reported times are the events' elapsed times,
    and the L2 flush buffer is zeroed before every timed call (not during warm-up)."""
    timing = fake_cuda_timing()
    seen = []

    def provider():
        buf = timing.flush_buffer
        seen.append(buf is not None and bool((buf == 0).all()))
        if buf is not None:
            buf.fill_(1)  # dirty it, as a kernel's traffic would

    times = benchmark.measure({"a": provider, "b": provider}, warmup=2, reps=4, timing=timing)
    assert seen == [False] * 4 + [True] * 8
    assert sorted(times["a"] + times["b"]) == sorted(timing.api.elapsed)
    assert timing.api.log.count("record") == 16 and timing.api.log.count("event sync") == 8
    assert "sync" in timing.api.log  # after warm-up
    assert timing.flush_buffer.numel() == 1 << 16


def test_cuda_rows_get_peak_memory():
    """On CUDA, compare() measures each provider's peak extra memory from the allocator statistics."""
    timing = fake_cuda_timing()
    rows = benchmark.compare("op", "1", "fp32", {"reference": lambda: None}, reps=2, timing=timing)
    assert rows[0].peak_mem_mb == 50.0 and "reset peak" in timing.api.log


@pytest.mark.parametrize("name,label,gbps", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 3350),
    ("NVIDIA H100 PCIe", "H100 PCIe", 2000),
    ("NVIDIA H200", "H200 SXM", 4800),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB", 2039),
    ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB", 1555),
    ("NVIDIA L40S", "L40S", 864),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 1008),
])
def test_gpu_peak_table(name, label, gbps):
    """Device names as torch reports them map to their own datasheet row (variants before families)."""
    lim = fake_cuda_timing(name).limit()
    assert lim.gbps == gbps and lim.source == f"datasheet {label}" and lim.tflops > 0


def test_unknown_gpu_falls_back_to_a_copy_probe():
    """A GPU missing from the table gets its bandwidth measured: copy probe timed with events."""
    timing = fake_cuda_timing("NVIDIA Tesla T4")
    assert benchmark.gpu_peak("NVIDIA Tesla T4") is None
    lim = timing.limit()
    assert lim.source == "copy probe" and lim.gbps > 0 and lim.tflops is None
    assert timing.api.log.count("record") == 10  # 5 timed copies


def test_suite_on_fake_cuda_stamps_gpu_limits(suites, monkeypatch):
    """With --device cuda the rows carry the GPU's name, datasheet limit, fraction of it, the
    event timer, peak memory from the allocator and a --device cuda command."""
    monkeypatch.setitem(benchmark.TIMINGS, "cuda", fake_cuda_timing())
    machine = benchmark.describe_machine("cuda")
    rows, failed = bench.run_suites({"tiny": "fakebench.bench_tiny"}, quick=True, device="cuda", machine=machine)
    assert not failed and len(rows) == 2
    for r in rows:
        assert r.device_name == "NVIDIA H100 80GB HBM3" and r.limit_gbps == 3350 and r.timer == "cuda events, L2 flushed"
        assert r.fraction_of_limit == pytest.approx(r.gbps / 3350)
        assert r.command == "ctrlsafe bench --only tiny --quick --device cuda"
        assert "cuda" in r.versions
    assert [r.peak_mem_mb for r in rows] == [50.0, 50.0]


def test_tflops_rows_use_the_16bit_peak():
    """FLOP-bound 16-bit rows are a fraction of the tensor-core peak; fp32 FLOP rows get none (no table entry)."""
    m = benchmark.Machine("cuda", "H100", benchmark.Limit(3350.0, 989.0, "datasheet H100 SXM"), "t", {}, "abc", "now")
    bf16, fp32 = make_row(tflops=494.5), make_row(tflops=30.0)
    bf16.dtype = "bf16"
    benchmark.stamp([bf16, fp32], m, suite="s", command="c")
    assert bf16.fraction_of_limit == pytest.approx(0.5) and fp32.fraction_of_limit is None


# ---------------------------------------------------------------------------------------------
# Peers


def fake_module(monkeypatch, name, **attrs):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, m)
    return m


def test_peers_detected_and_adapted(monkeypatch):
    """Installed peers appear as providers with our op signatures: FlashInfer gets tempered logits
    and int32 top_k and returns int64 tokens; Liger and CCE per-token losses become log-probs."""
    calls = {}

    def flashinfer_sample(logits, top_k, top_p):
        calls["flashinfer"] = (logits, top_k, top_p)
        return torch.zeros(logits.shape[0], dtype=torch.int32)

    fake_module(monkeypatch, "flashinfer")
    fake_module(monkeypatch, "flashinfer.sampling", top_k_top_p_sampling_from_logits=flashinfer_sample)
    loss = torch.tensor([0.5, 1.0, 0.0])
    fake_module(monkeypatch, "liger_kernel")
    fake_module(monkeypatch, "liger_kernel.transformers")
    fake_module(monkeypatch, "liger_kernel.transformers.functional",
                liger_fused_linear_cross_entropy=lambda h, w, t, ignore_index, reduction: (loss, None) if reduction == "none" else None)
    fake_module(monkeypatch, "cut_cross_entropy",
                linear_cross_entropy=lambda h, w, t, ignore_index, reduction: loss if reduction == "none" and ignore_index == -1 else None)

    sampling = benchmark.peers("sampling", "cuda")
    assert list(sampling) == ["flashinfer"]
    logits = torch.full((2, 5), 2.0)
    tokens = sampling["flashinfer"](logits, torch.tensor([0.5, 2.0]), torch.tensor([3, 4]), torch.tensor([0.9, 0.8]))
    assert tokens.dtype == torch.int64
    scaled, top_k, _ = calls["flashinfer"]
    assert torch.equal(scaled[:, 0], torch.tensor([4.0, 1.0])) and top_k.dtype == torch.int32

    lp = benchmark.peers("linear_logprobs", "cuda:0")
    assert list(lp) == ["liger", "cut-cross-entropy"]
    h, w, t = torch.zeros(3, 4), torch.zeros(6, 4), torch.tensor([1, 2, -1])
    for fn in lp.values():
        assert torch.equal(fn(h, w, t, ignore_index=-1), -loss)

    assert benchmark.peers("sampling", "cpu") == {}  # all peers are CUDA kernels


def test_peers_absent_or_broken(monkeypatch, capsys):
    """Absent peers are silently left out; one that is present but fails to import is skipped with a note."""
    for name in ("flashinfer", "liger_kernel", "cut_cross_entropy"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: "not installed"
    assert benchmark.peers("sampling", "cuda") == {} and benchmark.peers("linear_logprobs", "cuda") == {}
    fake_module(monkeypatch, "flashinfer")  # no flashinfer.sampling: a broken install
    monkeypatch.setitem(sys.modules, "flashinfer.sampling", None)
    assert benchmark.peers("sampling", "cuda") == {}
    assert "peer flashinfer is installed but unusable" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no peers known for op 'attention'"):
        benchmark.peers("attention")


# ---------------------------------------------------------------------------------------------
# pytest-benchmark wiring


def test_pytest_benchmark_conftest(pytester):
    """benchmarks/conftest.py gives suites a `bench` fixture that runs under --benchmark-only,
    records the device, small shapes by default and full ones with --bench-full."""
    pytester.makeconftest((ROOT / "benchmarks" / "conftest.py").read_text())
    pytester.makepyfile(test_bench_fake="""
        import torch
        def test_sum(bench, benchmark, full, device):
            x = torch.ones(10**5 if full else 10, device=device)
            benchmark.extra_info["n"] = x.numel()
            assert bench(x.sum).item() == x.numel()
    """)
    for extra, n in (([], 10), (["--bench-full"], 10**5)):
        out = pytester.path / "out.json"
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--benchmark-only", f"--benchmark-json={out}", *extra)
        result.assert_outcomes(passed=1)
        bench_result = json.loads(out.read_text())["benchmarks"][0]
        assert bench_result["extra_info"]["device"] == "cpu" and bench_result["extra_info"]["n"] == n
        assert bench_result["stats"]["rounds"] >= 5


# ---------------------------------------------------------------------------------------------
# The real suites


def test_ctrlsafe_bench_quick_reward_end_to_end(tmp_path, monkeypatch, capsys):
    """`ctrlsafe bench --quick --only reward` runs the installed suite: exit 0, the table printed,
    every row stamped and measured against a reference in the same run."""
    monkeypatch.setitem(benchmark.TIMINGS, "cpu", CpuTiming(probe_bytes=32 << 20))
    out = tmp_path / "reward.jsonl"
    assert cli(["bench", "--quick", "--only", "reward", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = benchmark.read_jsonl(out)
    assert rows and {r.suite for r in rows} == {"reward"}
    for r in rows:
        assert r.median_ms > 0 and r.speedup_vs_reference is not None and r.device == "cpu"
        assert r.command == "ctrlsafe bench --only reward --quick" and r.limit_source == "read probe"
        assert r.provider in printed
    assert any(r.speedup_vs_reference == 1.0 for r in rows)
