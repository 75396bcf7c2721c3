"""pytest-benchmark suite for reward scoring (shapes and providers: benchmarks/bench_reward.py).

    pytest benchmarks/test_bench_reward.py --benchmark-only [--bench-full] [--bench-device cuda]
"""
import pytest
import torch

from ctrlsafe.benchmarks.bench_reward import FULL, QUICK, build_models, full_sequence_head, hf_batches, pairs
from ctrlsafe.ops import score_heads


@pytest.fixture(scope="module")
def work(full):
    return FULL if full else QUICK


@pytest.fixture(scope="module")
def scoring(work, device, tmp_path_factory):
    hf, rm = build_models(work, str(tmp_path_factory.mktemp("rm")), device)
    prompt_ids, response_ids = pairs(work)
    batches = hf_batches([p + r for p, r in zip(prompt_ids, response_ids)], work.hf_batch, device)
    return hf, rm, prompt_ids, response_ids, batches


@pytest.fixture(scope="module")
def head_inputs(work, device):
    N, T, H, K = work.head_N, work.head_T, work.head_H, work.head_K
    g = torch.Generator().manual_seed(0)
    return (torch.empty(N, T, H).normal_(generator=g).to(device), torch.randint(0, T, (N,), generator=g).to(device),
            (torch.rand(H, generator=g) + 0.5).to(device), (torch.randn(K, H, generator=g) / H**0.5).to(device),
            torch.zeros(K, device=device), torch.ones(K, device=device))


def test_scoring_ctrlsafe_shared_prompt(bench, scoring, work):
    hf, rm, prompt_ids, response_ids, _ = scoring
    assert bench(rm.score_ids, prompt_ids, response_ids).shape == (work.pairs, 1)


def test_scoring_transformers_padded_batches(bench, scoring, work):
    hf, _, _, _, batches = scoring

    @torch.no_grad()
    def run():
        return torch.cat([hf(input_ids=ids, attention_mask=mask).logits for ids, mask in batches])

    assert bench(run).shape == (work.pairs, 1)


def test_head_fused(bench, head_inputs):
    hidden, last, w, heads, mean, std = head_inputs
    scores, _ = bench(score_heads, hidden, last, w, heads, None, mean, std, None, eps=1e-5)
    assert scores.shape == (len(last), heads.shape[0])


def test_head_full_sequence(bench, head_inputs):
    hidden, last, w, heads, mean, std = head_inputs
    assert bench(full_sequence_head, hidden, last, w, heads, mean, std, 1e-5).shape == (len(last), heads.shape[0])
