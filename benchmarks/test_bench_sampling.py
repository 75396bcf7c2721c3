"""pytest-benchmark suite for the sampler (shapes, cases and providers: benchmarks/bench_sampling.py).

    pytest benchmarks/test_bench_sampling.py --benchmark-only [--bench-full]
"""
import pytest
import torch

from ctrlsafe.benchmarks.bench_sampling import CASES, FULL_SHAPES, QUICK_SHAPES, STD, topk_sample, transformers_sample, vllm_sample
from ctrlsafe.sampling import sample


@pytest.fixture(params=sorted(CASES))
def case_name(request):
    return request.param


@pytest.fixture
def case(case_name):
    return CASES[case_name]


@pytest.fixture(params=range(len(FULL_SHAPES)), ids=[f"B{B}-V{V}" for B, V in FULL_SHAPES])
def logits(request, full, device, case_name):
    """The case's logits: N(0, STD[case]^2), as bench_sampling draws them."""
    B, V = FULL_SHAPES[request.param]
    if not full and (B, V) not in QUICK_SHAPES:
        pytest.skip("full shape (run with --bench-full)")
    return (torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * STD[case_name]).to(device)


def test_ctrlsafe(bench, logits, case):
    backend = "triton" if logits.is_cuda else "cpu"
    out = bench(sample, logits, **case, seed=0, backend=backend)
    assert out.valid.all()


def test_reference(bench, logits, case):
    assert bench(sample, logits, **case, seed=0, backend="reference").valid.all()


def test_vllm_sort(bench, logits, case):
    B = logits.shape[0]
    full = lambda v: torch.full((B,), v, device=logits.device)  # noqa: E731
    k = full(case["top_k"]) if case["top_k"] else None
    assert bench(vllm_sample, logits, full(case["temperature"]), k, full(case["top_p"])).shape == (B,)


def test_transformers_warpers(bench, logits, case):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(case["temperature"])] + ([TopKLogitsWarper(case["top_k"])] if case["top_k"] else [])
    warpers.append(TopPLogitsWarper(case["top_p"]))
    assert bench(transformers_sample, warpers, logits).shape == (logits.shape[0],)


def test_topk_then_top_p(bench, logits, case):
    if not case["top_k"]:
        pytest.skip("the topk baseline needs top_k")
    assert bench(topk_sample, logits, case["temperature"], case["top_k"], case["top_p"]).shape == (logits.shape[0],)


def test_plain_read(bench, logits):
    assert bench(torch.amax, logits, -1).shape == (logits.shape[0],)
