"""pytest-benchmark suite for multi-control generation (the work of bench_generate.py).

    pytest benchmarks/test_bench_generate.py --benchmark-only [--bench-full]
"""
import pytest

from ctrlsafe.benchmarks.bench_generate import FULL, PROVIDERS, QUICK, save_model


@pytest.fixture(scope="module")
def work_and_path(request, tmp_path_factory):
    work = FULL if request.config.getoption("--bench-full") else QUICK
    path = tmp_path_factory.mktemp("bench_generate") / "model"
    save_model(work, path)
    return work, path


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_generate(bench, device, work_and_path, provider):
    """prompts x controls x samples x new tokens (min = max) with each provider; the run must
    yield every requested sequence at full length."""
    if device != "cpu":
        pytest.skip("bench_generate compares against transformers on the CPU only")
    work, path = work_and_path
    out = bench(PROVIDERS[provider](work, path))
    rows = work.prompts * work.controls * work.n
    if provider == "ctrlsafe":
        assert len(out) == rows and all(len(c.token_ids) == work.new_tokens for c in out)
    else:
        assert tuple(out.shape) == (rows, work.prompt_len + work.control_len + work.new_tokens)
