"""Triton linear_logprobs (GEMMs by torch.mm, row kernels in Triton): run under TRITON_INTERPRET=1
on CPU tensors against the float64 reference (on CPU the GEMMs are torch's CPU matmul), and the
row kernels compiled for sm_80 / sm_90 without a GPU."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: @triton.jit reads it at decoration

import re

import pytest
import torch

pytest.importorskip("triton")

from conftest import gpu_compile  # noqa: E402
from ctrlsafe.ops import linear_logprobs  # noqa: E402
from test_linear_logprobs import make_case, values_and_grads  # noqa: E402

NAMES = ("logp", "lse", "grad_hidden", "grad_weight")

# (T, V, H, softcap, temperature, vocabulary columns per chunk; None = the shipped rule, one chunk
# at these sizes). Odd sizes; chunk widths that do not divide V (a narrow last chunk), down to 2.
CASES = [(1, 1, 1, None, 1.0, None), (1, 7, 3, 2.0, 1.3, 3), (7, 33, 7, 2.0, 1.3, 5), (7, 4097, 5, None, 0.7, 1000),
         (33, 7, 9, None, 1.0, 2), (33, 33, 33, 2.0, 0.7, 16), (33, 4097, 33, None, 1.0, None),
         (33, 4097, 33, 3.0, 1.3, 1500)]


@pytest.fixture(autouse=True, scope="module")
def kernels():
    from ctrlsafe.kernels import linear_logprobs as K

    if type(K._chunk_lse).__name__ != "InterpretedFunction":
        pytest.skip("ctrlsafe.kernels.linear_logprobs was imported before TRITON_INTERPRET=1 was set")
    return K


@pytest.fixture
def chunk_cols(kernels, monkeypatch):
    """chunk_cols(n): run with n vocabulary columns per chunk (None: the shipped rule)."""
    def set_cols(n):
        if n is not None:
            monkeypatch.setattr(kernels, "MIN_CHUNK_V", n)
            monkeypatch.setattr(kernels, "CHUNK_ELEMS", 0)
    return set_cols


def fp64(case):
    return tuple(x.double() if x.is_floating_point() else x for x in case)


@pytest.mark.parametrize("T,V,H,softcap,temperature,cols", CASES)
def test_fp32_matches_fp64_reference(chunk_cols, T, V, H, softcap, temperature, cols):
    """fp32 inputs: logp, lse and the gradients of a random weighted sum of both (every third row
    ignored) agree with the float64 reference to abs 1e-5 / rel 1e-4, in fp32, on odd shapes, with
    soft-cap and temperature, in one chunk and in many."""
    chunk_cols(cols)
    case = make_case(T, V, H)
    ours = values_and_grads("triton", *case, softcap=softcap, temperature=temperature)
    truth = values_and_grads("reference", *fp64(case), softcap=softcap, temperature=temperature)
    for name, x, t in zip(NAMES, ours, truth):
        assert x.dtype == torch.float32, name
        torch.testing.assert_close(x.double(), t, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_ignored_rows(chunk_cols):
    """All rows ignored: zeros and zero grads (nothing launched); one kept row among rows ignored
    with a custom ignore_index that is also a real token id: matches the reference, and only that
    row has a value or a hidden-state gradient."""
    chunk_cols(50)
    hidden, weight, _ = make_case(6, 129, 17)
    for t in values_and_grads("triton", hidden, weight, torch.full((6,), -100)):
        assert torch.equal(t, torch.zeros_like(t))
    target = torch.full((6,), 128)
    target[4] = 3
    ours = values_and_grads("triton", hidden, weight, target, ignore_index=128)
    ref = values_and_grads("reference", hidden, weight, target, ignore_index=128)
    assert ours[0].nonzero().flatten().tolist() == [4] and ours[2].abs().sum(1).nonzero().flatten().tolist() == [4]
    for name, x, y in zip(NAMES, ours, ref):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("T,V,H,softcap,temperature,cols", [(33, 301, 40, 3.0, 0.8, 100), (70, 4097, 65, None, 1.0, None)])
def test_bf16_against_fp64(chunk_cols, T, V, H, softcap, temperature, cols):
    """bf16 inputs, the fp64 truth computed from the same bf16 values: logp and lse within 1e-5
    (the logits are fp32, where the naive bf16 computation rounds them to bf16), the gradients
    come back in bf16 with a relative (Frobenius) error at most 1.25x the naive bf16 reference's."""
    chunk_cols(cols)
    case = make_case(T, V, H, dtype=torch.bfloat16)
    kw = dict(softcap=softcap, temperature=temperature)
    ours = values_and_grads("triton", *case, **kw)
    naive = values_and_grads("reference", *case, **kw)
    truth = values_and_grads("reference", *fp64(case), **kw)
    for name, x, t in zip(NAMES[:2], ours, truth):
        assert x.dtype == torch.float32, name
        torch.testing.assert_close(x.double(), t, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
    for name, x, r, t in zip(NAMES[2:], ours[2:], naive[2:], truth[2:]):
        assert x.dtype == torch.bfloat16, name
        rel, rel_naive = ((y.double() - t).norm().item() / t.norm().item() for y in (x, r))
        assert rel <= 1.25 * rel_naive, f"{name}: relative error {rel:.3g}, naive bf16 {rel_naive:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_runs_bitwise_equal(chunk_cols, dtype):
    """Two runs (values and both gradients, several chunks) are bitwise equal: besides the fixed
    reduction order, this catches any output that depends on uninitialised buffer memory."""
    chunk_cols(700)
    case = make_case(33, 4097, 33, dtype=dtype)
    first = values_and_grads("triton", *case, softcap=2.0, temperature=0.9)
    second = values_and_grads("triton", *case, softcap=2.0, temperature=0.9)
    for name, x, y in zip(NAMES, first, second):
        assert torch.equal(x, y), name


def test_gradcheck_float64(chunk_cols):
    """float64 inputs stay float64 through the kernels, and the backward equals finite differences
    (soft-cap, temperature, ignored rows, three chunks, gradient through both logp and lse)."""
    chunk_cols(4)
    hidden, weight, target = make_case(5, 11, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)

    def f(h, w):
        logp, lse = linear_logprobs(h, w, target, return_lse=True, backend="triton", softcap=2.5, temperature=0.9)
        assert logp.dtype == lse.dtype == torch.float64
        return (a * logp).sum() + (b * lse).sum()

    assert torch.autograd.gradcheck(f, (hidden.requires_grad_(), weight.requires_grad_()))


def test_chunk_widths_at_the_issue_shapes(kernels):
    """Vocabulary chunks at V=128256: T=512 in 2 chunks of 65536, T=4096 in 16 of 8192 (both about
    CHUNK_ELEMS logits), T=32768 at the 8192 floor; every width a multiple of 128 (aligned starts)."""
    V = 128256
    assert [kernels._chunk_cols(T, V) for T in (512, 4096, 32768)] == [65536, 8192, 8192]
    assert kernels._chunk_cols(7, 4097) == 4097


def test_cuda_gemm_call_is_valid(kernels):
    """The CUDA branch of the GEMM helper (bf16 x bf16 -> fp32 out, torch.mm out_dtype), checked on
    meta tensors, whose shape and dtype rules mirror the CUDA kernel's (CPU has no such mm)."""
    a = torch.empty(6, 8, dtype=torch.bfloat16, device="meta")
    b = torch.empty(8, 5, dtype=torch.bfloat16, device="meta")
    out = kernels._matmul(a, b, torch.empty(6, 5, device="meta"))
    assert out.shape == (6, 5) and out.dtype == torch.float32


# as launched on bf16 inputs: fp32 logits and per-row vectors, bf16 du, int64 targets
TYPES = {"x_ptr": "*fp32", "du_ptr": "*bf16", "tgt_ptr": "*i64", "n_cols": "i32", "v0": "i32",
         "stride_x": "i32", "stride_du": "i32", "scale": "fp32", "softcap": "fp32"}
# what the launcher specialises for every chunk but a ragged last one: torch's 16-byte aligned
# buffers, widths and row strides that are multiples of 128
ALIGNED = ("x_ptr", "du_ptr", "n_cols", "stride_x", "stride_du")


def test_row_kernels_compile_without_spills(kernels):
    """Both row kernels (soft-cap on and off, bf16 du) compile for sm_80 and sm_90 at the shipped
    BLOCK_V / NUM_WARPS with no register spills and no stack frame, load rows with 16-byte vector
    loads, and round du to bf16 to nearest even. (No tensor-core check: these kernels have no dot;
    the GEMMs are cuBLAS's.)"""
    jobs, what = [], []
    for kernel in ("_chunk_lse", "_chunk_grad"):
        for softcap in (True, False):
            constexprs = dict(HAS_SOFTCAP=softcap, BLOCK_V=kernels.BLOCK_V)
            names = getattr(kernels, kernel).arg_names
            signature = {n: "constexpr" if n in constexprs else TYPES.get(n, "*fp32") for n in names}
            for cc in (80, 90):
                jobs.append(dict(kernel=f"ctrlsafe.kernels.linear_logprobs:{kernel}", signature=signature,
                                 constexprs=constexprs, cc=cc, num_warps=kernels.NUM_WARPS,
                                 divisible_by_16=[n for n in ALIGNED if n in names]))
                what.append((kernel, softcap, cc))
    for (name, softcap, cc), r in zip(what, gpu_compile(jobs)):
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, (name, softcap, cc, r["registers"])
        assert re.search(r"ld\.global\S*\.v4", r["ptx"]), (name, cc, "row loads not vectorised")
        if name == "_chunk_grad":
            assert re.search(r"cvt\.rn\S*\.bf16", r["ptx"]), (name, cc, "du not rounded to nearest")
