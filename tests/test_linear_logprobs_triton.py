"""Triton linear_logprobs kernels: run under TRITON_INTERPRET=1 on CPU tensors against the
reference, and compiled for sm_80 / sm_90 without a GPU."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: @triton.jit reads it at decoration

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from ctrlsafe.ops import linear_logprobs  # noqa: E402
from test_linear_logprobs import make_case, values_and_grads  # noqa: E402

# Odd shapes around the 64 x 128 x 64 (T x V x H) kernel tiles, kept small: the interpreter runs
# each program instance in Python. (T, V, H, softcap, temperature)
CASES = [(1, 7, 1, None, 1.0), (7, 33, 7, 2.0, 1.3), (33, 4097, 33, None, 1.0), (70, 300, 65, 2.0, 1.3),
         (70, 300, 65, None, 0.7)]


@pytest.fixture(autouse=True, scope="module")
def interpreted_kernels():
    from ctrlsafe.kernels import linear_logprobs as kernels

    if type(kernels._forward).__name__ != "InterpretedFunction":
        pytest.skip("ctrlsafe.kernels.linear_logprobs was imported before TRITON_INTERPRET=1 was set")


@pytest.mark.parametrize("T,V,H,softcap,temperature", CASES)
def test_fp32_matches_reference(T, V, H, softcap, temperature):
    """Interpreted kernels: logp, lse and the gradients of a random weighted sum of both agree with
    the reference in fp32 (abs 1e-5 / rel 1e-4) on odd shapes with ignored rows, soft-cap, temperature."""
    case = make_case(T, V, H)
    ours = values_and_grads("triton", *case, softcap=softcap, temperature=temperature)
    ref = values_and_grads("reference", *case, softcap=softcap, temperature=temperature)
    for name, x, y in zip(("logp", "lse", "grad_hidden", "grad_weight"), ours, ref):
        assert x.dtype == y.dtype, name
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_all_ignored_and_one_position():
    """All rows ignored: zeros and zero grads without launching; one kept row: matches the reference."""
    hidden, weight, _ = make_case(5, 40, 8)
    logp, lse, gh, gw = values_and_grads("triton", hidden, weight, torch.full((5,), -100))
    for t in (logp, lse, gh, gw):
        assert torch.equal(t, torch.zeros_like(t))
    target = torch.full((5,), -100)
    target[2] = 39
    ours = values_and_grads("triton", hidden, weight, target)
    ref = values_and_grads("reference", hidden, weight, target)
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_bf16_at_least_as_accurate_as_reference():
    """bf16 inputs (tiles upcast in the interpreter, du rounded to bf16 before the backward dots as
    on the GPU): |ours - fp64 truth| <= |reference in bf16 - fp64 truth| + tol, grads in bf16."""
    hidden, weight, target = make_case(33, 301, 40, dtype=torch.bfloat16)
    kw = dict(softcap=3.0, temperature=0.8)
    ours = values_and_grads("triton", hidden, weight, target, **kw)
    ref = values_and_grads("reference", hidden, weight, target, **kw)
    truth = values_and_grads("reference", hidden.double(), weight.double(), target, **kw)
    for name, x, r, t in zip(("logp", "lse", "grad_hidden", "grad_weight"), ours, ref, truth):
        assert x.dtype == r.dtype, name
        tol = 2e-3 * t.abs().max().item() + 1e-6
        excess = (x.double() - t).abs() - (r.double() - t).abs()
        assert excess.max().item() <= tol, f"{name}: worse than the bf16 reference by {excess.max().item():.3g}"


COMPILE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ctrlsafe.kernels import linear_logprobs as K

    SCALARS = {"T": "i32", "V": "i32", "H": "i32", "stride_h": "i32", "stride_w": "i32",
               "scale": "fp32", "softcap": "fp32"}
    POINTERS = {"h_ptr": "*bf16", "w_ptr": "*bf16", "tgt_ptr": "*i64"}
    CONSTEXPRS = dict(BLOCK_T=K.BLOCK_T, BLOCK_V=K.BLOCK_V, BLOCK_H=K.BLOCK_H, HAS_SOFTCAP=True,
                      UPCAST=False, PRECISION="ieee")
    for kernel in (K._forward, K._backward_h, K._backward_w):
        signature = {n: "constexpr" if n in CONSTEXPRS else SCALARS.get(n) or POINTERS.get(n, "*fp32")
                     for n in kernel.arg_names}
        for capability in (80, 90):
            src = ASTSource(fn=kernel, signature=signature, constexprs=CONSTEXPRS)
            compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32))
            ptx = compiled.asm["ptx"]
            assert f".target sm_{capability}" in ptx, (kernel.__name__, capability)
            assert "mma" in ptx, (kernel.__name__, capability, "no tensor-core instruction")
            assert compiled.asm["cubin"], (kernel.__name__, capability)
            print(kernel.__name__, capability, "ok")
    """
)


def test_compiles_for_sm80_and_sm90():
    """The three kernels (bf16, soft-cap on) compile to PTX and cubin for sm_80 and sm_90 and use
    tensor-core mma instructions. Runs in a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("ok") == 6, out.stdout
