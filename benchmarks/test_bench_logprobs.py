"""pytest-benchmark suite for linear_logprobs: forward + backward of the token-mean NLL.

    pytest benchmarks/test_bench_logprobs.py --benchmark-only [--bench-full] [--bench-device cuda]

Small shapes by default (T512 H256 V16384); --bench-full uses the issue's T4096 H1024 V128256.
Peak memory is not measured here (see bench_logprobs.py, which uses fresh subprocesses).
"""
import pytest
import torch

from ctrlsafe.benchmarks.bench_logprobs import FULL, QUICK, inputs, providers


@pytest.fixture(scope="module")
def work(full):
    return FULL if full else QUICK


@pytest.mark.parametrize("provider", ["naive", "reference", "ours"])
def test_linear_logprobs_fwd_bwd(bench, device, work, provider):
    """Times one fwd+bwd per round; checks the NLL and weight-grad norm against the naive provider."""
    fns = providers(device)
    name = next(n for n in fns if n.startswith("ours")) if provider == "ours" else provider
    hidden, weight, target = inputs(work, device)

    def step(fn):
        hidden.grad = weight.grad = None
        loss = -fn(hidden, weight, target).mean()
        loss.backward()
        return loss.detach(), weight.grad.norm()

    loss, grad_norm = bench(step, fns[name])
    naive_loss, naive_grad_norm = step(fns["naive"])
    torch.testing.assert_close(loss, naive_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_norm, naive_grad_norm, rtol=1e-3, atol=1e-6)
