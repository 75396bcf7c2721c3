"""The counter RNG's Triton kernel (what CUDA runs each decode step) against the C++ one, under
TRITON_INTERPRET=1 on CPU tensors, and compiled for sm_80 / sm_90 without a GPU."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: @triton.jit reads it at decoration

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from conftest import gpu_compile  # noqa: E402
from ctrlsafe.kernels.counter_rng import counter_uniforms as fused  # noqa: E402
from ctrlsafe.sampling import counter_uniforms  # noqa: E402

EDGES = [0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, -(2**32), 2**63 - 1, -(2**63)]


@pytest.mark.parametrize("n", [1, 7, 33, 4097])
def test_kernel_equals_cpu_bitwise(n):
    """Random full-range 64-bit seeds and steps, per row or one step for all rows: the same fp32
    uniforms as the C++ kernel, bit for bit (the sampler's tokens depend on them)."""
    g = torch.Generator().manual_seed(n)
    seed = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g)
    step = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g)
    assert torch.equal(fused(seed, step), counter_uniforms(seed, step))
    assert torch.equal(fused(seed, torch.tensor(12345)), counter_uniforms(seed, 12345))


def test_kernel_word_boundaries():
    """Seeds and steps at the 32- and 64-bit word boundaries (sign, carry into the high word)."""
    seed = torch.tensor(EDGES).repeat_interleave(len(EDGES))
    step = torch.tensor(EDGES).repeat(len(EDGES))
    got = fused(seed, step)
    assert torch.equal(got, counter_uniforms(seed, step))
    assert bool(((got >= 0) & (got < 1)).all())


def test_kernel_compiles_without_spills():
    """The kernel lowers for Ampere and Hopper with no register spills."""
    sig = {"seed_ptr": "*i64", "step_ptr": "*i64", "out_ptr": "*fp32", "n": "i32", "SEED_STRIDE": "constexpr",
           "STEP_STRIDE": "constexpr", "BLOCK": "constexpr"}
    jobs = [dict(kernel="ctrlsafe.kernels.counter_rng:_counter_uniforms_kernel", signature=sig, cc=cc,
                 constexprs={"SEED_STRIDE": 1, "STEP_STRIDE": stride, "BLOCK": 1024}) for cc in (80, 90) for stride in (0, 1)]
    for report in gpu_compile(jobs):
        assert report["spill_stores"] == report["spill_loads"] == 0, report["target"]
        assert "st.global" in report["ptx"]
