"""pytest-benchmark setup for the suites benchmarks/test_bench_*.py.

    pytest benchmarks --benchmark-only                          # small shapes, CPU
    pytest benchmarks --benchmark-only --bench-full             # the full shapes
    pytest benchmarks --benchmark-only --bench-device cuda      # on a GPU
    pytest benchmarks --benchmark-only --benchmark-autosave     # then --benchmark-compare

A plain `pytest` never runs these (pyproject's testpaths is tests/). Fixtures:
`device` (from --bench-device), `full` (--bench-full; suites pick small shapes when False) and
`bench(fn, *args)`: pytest-benchmark's `benchmark` timed the way `ctrlsafe bench` times, one
call per round with the device synchronised after it and, on CUDA, L2 flushed before it.
`ctrlsafe bench` stays the reference measurement (interleaved providers, device limits).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from ctrlsafe.benchmark import timing_for  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("ctrlsafe benchmarks")
    group.addoption("--bench-device", default="cpu", help="device for benchmarks/ suites: cpu, cuda, cuda:N (default cpu)")
    group.addoption("--bench-full", action="store_true", help="benchmarks/ suites use their full shapes instead of small ones")


@pytest.fixture(scope="session")
def device(request) -> str:
    d = request.config.getoption("--bench-device")
    if torch.device(d).type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"--bench-device {d}: CUDA is not available")
    return d


@pytest.fixture(scope="session")
def full(request) -> bool:
    return request.config.getoption("--bench-full")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def bench(benchmark, device, request):
    """`bench(fn, *args, **kwargs)` -> fn's result, timed over --benchmark-min-rounds rounds."""
    timing = timing_for(device)
    benchmark.extra_info["device"] = device
    benchmark.extra_info["device_name"] = timing.device_name()
    rounds = max(1, request.config.getoption("benchmark_min_rounds"))

    def run(fn, *args, **kwargs):
        def call():
            out = fn(*args, **kwargs)
            timing.sync()
            return out

        return benchmark.pedantic(call, setup=timing.flush, rounds=rounds, warmup_rounds=1)

    return run
