"""Triton sampler: run under TRITON_INTERPRET=1 on CPU tensors against the float64 reference,
and compiled for sm_80 / sm_90 without a GPU."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: @triton.jit reads it at decoration

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from ctrlsafe.ops.sampling import triton as triton_sample  # noqa: E402
from ctrlsafe.sampling import sample  # noqa: E402
from test_sampling import assert_matches_reference, random_params  # noqa: E402

# The kernel computes exp((x - max) / T) in fp32 (argument error ~|x - max| / T * 6e-8), so
# rounding boundaries are wider than the C++ kernel's.
RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def interpreted_kernel():
    from ctrlsafe.kernels import sampling as kernels

    if type(kernels._sample_kernel).__name__ != "InterpretedFunction":
        pytest.skip("ctrlsafe.kernels.sampling was imported before TRITON_INTERPRET=1 was set")


@pytest.mark.parametrize("V", [1, 7, 33, 300, 4097])
def test_triton_matches_reference(V):
    """Tokens / valid exactly and logprobs to float precision for per-row mixed parameters (greedy,
    top-k 1 / small / >= V, top-p, min-p), with ties, fp32 logits (few rows: the interpreter is slow)."""
    g = torch.Generator().manual_seed(V)
    B = 8 if V < 4097 else 3
    logits = torch.randn(B, V, generator=g) * 3
    if V > 1:
        logits[0, : min(V, 3)] = logits[0].max()
    assert_matches_reference(triton_sample, logits, *random_params(B, V, g), rtol=RTOL)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in invalid rows
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_logits_and_invalid_rows(dtype):
    """fp16 / bf16 logits read directly; NaN / +inf / all -inf rows are invalid and isolated."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, 40, generator=g) * 2).to(dtype)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    logits[3] = float("-inf")
    logits[4, ::3] = float("-inf")
    assert_matches_reference(triton_sample, logits, *random_params(6, 40, g), rtol=RTOL)


def test_triton_equals_cpu_through_the_api():
    """backend="triton" and backend="cpu" draw the same tokens from the same seeds."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 50, generator=g)
    kwargs = dict(temperature=torch.tensor([0.7, 1.0, 0.0, 1.3]), top_k=torch.tensor([5, 0, 0, 20]), top_p=0.9,
                  min_p=torch.tensor([0.0, 0.05, 0.0, 0.0]), seed=torch.arange(4), step=11)
    assert torch.equal(sample(logits, backend="triton", **kwargs).tokens, sample(logits, backend="cpu", **kwargs).tokens)


COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from ctrlsafe.kernels.sampling import BLOCK, _sample_kernel
    sig = {"logits_ptr": "*fp32", "stride": "i64", "V": "i32", "temp_ptr": "*fp32", "top_k_ptr": "*i64",
           "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "u_ptr": "*fp32", "tokens_ptr": "*i64",
           "logprobs_ptr": "*fp32", "valid_ptr": "*i8", "BLOCK": "constexpr"}
    for cc in (80, 90):
        for dtype in ("*fp32", "*bf16"):
            src = triton.compiler.ASTSource(fn=_sample_kernel, signature={**sig, "logits_ptr": dtype}, constexprs={"BLOCK": BLOCK})
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32))
            assert "ld.global" in k.asm["ptx"], (cc, dtype)
""")


def test_triton_kernel_compiles_for_sm80_and_sm90():
    """The kernel lowers to PTX for Ampere and Hopper, fp32 and bf16 logits (GPU-only compile errors)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
