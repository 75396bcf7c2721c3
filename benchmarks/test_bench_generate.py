"""pytest-benchmark suite for multi-control generation (the work of bench_generate.py).

    pytest benchmarks/test_bench_generate.py --benchmark-only [--bench-full]
"""
import pytest

from ctrlsafe.benchmarks.bench_generate import FULL, PROVIDERS, QUICK, rows_of, save_model


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    """Full: SmolLM2-135M workload B (the multi-suffix shape); quick: the tiny model's B."""
    model, work = FULL[2] if request.config.getoption("--bench-full") else QUICK[0]
    path = tmp_path_factory.mktemp("bench_generate") / model.name
    save_model(model, path)
    return model, work, path


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_generate(bench, device, case, provider):
    """prompts x suffixes x samples x new tokens (min = max) with each provider; the run must
    yield every requested sequence at full length."""
    if device != "cpu":
        pytest.skip("bench_generate compares against transformers on the CPU only")
    model, work, path = case
    out = bench(PROVIDERS[provider](model, work, path))
    if provider == "ctrlsafe":
        assert len(out) == rows_of(work) and all(len(c.token_ids) == work.new_tokens for c in out)
    else:
        assert out.shape[0] == rows_of(work) and (out[:, -work.new_tokens :] != 0).any()
