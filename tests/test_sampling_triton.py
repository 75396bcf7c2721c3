"""Triton sampler: run under TRITON_INTERPRET=1 on CPU tensors against the float64 reference and
the C++ kernel, and compiled for sm_80 / sm_90 without a GPU (registers, spills)."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: @triton.jit reads it at decoration

import pytest
import torch

pytest.importorskip("triton")

from conftest import gpu_compile  # noqa: E402
from ctrlsafe.ops.sampling import kept_masses  # noqa: E402
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


def cap():
    from ctrlsafe.kernels.sampling import CAP

    return CAP


@pytest.fixture(params=["split stats", "fused stats"])
def stats_launch(request, monkeypatch):
    """Runs a test both ways the kernel can read a row's stats: in their own launch over the row's
    blocks (small batches), or in the sampler's first pass (large batches)."""
    from ctrlsafe.kernels import sampling as kernels

    monkeypatch.setattr(kernels, "SPLIT_STATS_ROWS", 1 << 30 if request.param == "split stats" else 0)
    return request.param


def rows(B, T, k, p, m, g):
    full = lambda v, dt=torch.float32: torch.full((B,), v, dtype=dt)  # noqa: E731
    return full(T), full(k, torch.int64), full(p), full(m), torch.rand(B, generator=g)


@pytest.mark.parametrize("V", [1, 7, 33, 4097])
def test_triton_matches_reference(V, stats_launch):
    """Tokens / valid exactly and logprobs to float precision for per-row mixed parameters (greedy,
    top-k 1 / small / >= V, top-p, min-p), with ties at the max, fp32 logits, with either stats
    launch. V = 4097 is one more than the scratch holds, so the filters first narrow their cuts over
    the row, and its max sits in the second of the row's blocks."""
    g = torch.Generator().manual_seed(V)
    B = 8 if V < 4097 else 6
    logits = torch.randn(B, V, generator=g) * 3
    if V > 1:
        logits[0, : min(V, 3)] = logits[0].max()
    if V == 4097:
        logits[1, [7, 4096]] = logits[1].max() + 1  # tied maxima in two blocks: the lowest id wins
        logits[2, 4096] = logits[2].max() + 1
    assert_matches_reference(triton_sample, logits, *random_params(B, V, g), rtol=RTOL)


@pytest.mark.parametrize("name, std, T, k, p, m, fits", [
    ("flat top-p", 1.0, 0.8, 0, 0.9, 0.0, False),  # kept set ~half the row: the cut is finished on its bracket
    ("top-k beyond the scratch + top-p", 1.0, 1.0, 6000, 0.95, 0.0, False),  # both cuts on their brackets
    ("top-k beyond the scratch + min-p", 3.0, 1.2, 9000, 1.0, 0.01, False),
    ("min-p alone", 1.0, 1.0, 0, 1.0, 0.02, False),  # no search: the stats pass, then the draw
    ("peaked top-p", 3.0, 1.0, 0, 0.9, 0.0, True),  # everything after the collect runs on the survivors
    ("peaked top-k + top-p + min-p", 3.0, 0.7, 40, 0.8, 0.05, True),
    ("tiny top-p", 1.0, 1.0, 0, 1e-6, 0.0, True),  # the max alone
])
def test_triton_large_vocabulary(name, std, T, k, p, m, fits):
    """V = 20000, five times the scratch: the values top-k and top-p keep (before min-p) do or do not
    fit in it, as each case says (checked on the reference), and tokens and logprobs are the
    reference's either way (final kept sets of ~1 to ~10000 values)."""
    g = torch.Generator().manual_seed(int(std * 10) + k)
    B, V = 3, 20000
    logits = torch.randn(B, V, generator=g) * std
    params = rows(B, T, k, p, m, g)
    before_min_p = (kept_masses(logits.double(), *params[:3], torch.zeros(B)) > 0).sum(-1)
    assert ((before_min_p <= cap()) == fits).all(), before_min_p
    assert_matches_reference(triton_sample, logits, *params, rtol=RTOL)


def test_triton_finite_mask_values():
    """Rows masked with a finite -1e9 instead of -inf (a third of the values; and a row of values
    spread over 1e-30 .. 1e30) put the cuts in a tiny part of the first bracket: the searches still
    end on the reference's cuts, for top-k, top-p, both, and min-p."""
    g = torch.Generator().manual_seed(9)
    B, V = 3, 20000
    logits = torch.randn(B, V, generator=g) * 3
    logits[:, ::3] = -1e9
    logits[2] = torch.logspace(-30, 30, V).neg()[torch.randperm(V, generator=g)]
    logits[2, :50] = torch.rand(50, generator=g) * 1e-29
    for T, k, p, m in [(1.0, 50, 1.0, 0.0), (0.8, 0, 0.9, 0.0), (1.0, 6000, 0.95, 0.0), (1.0, 0, 1.0, 0.1)]:
        assert_matches_reference(triton_sample, logits, *rows(B, T, k, p, m, g), rtol=RTOL)


def test_triton_passes_over_the_row(monkeypatch):
    """The kernel reads a row (V = 20000) as often as its docstring says, counted by wrapping the
    passes, which the interpreter looks up by name as the kernel runs: greedy 1; T only and min-p
    2; top-k 50 + top-p and top-p on peaked logits 3 (stats, probe, collect); flat top-p 4 (+ the
    draw); top-k 6000 + top-p 7 (two probes, a collect for each cut); values spread over
    1e-30 .. 1e30 no more than normal ones."""
    from ctrlsafe.kernels import sampling as kernels

    monkeypatch.setattr(kernels, "SPLIT_STATS_ROWS", 0)  # the stats pass reads the row too
    V = 20000
    reads = []
    for name, n_arg in (("_stats", 1), ("_probe_pass", 1), ("_collect", 1), ("_draw", 2)):
        def counted(*args, _pass=getattr(kernels, name), _n=n_arg):
            reads.append(int(args[_n]) == V)  # the row, not the scratch
            return _pass(*args)
        monkeypatch.setattr(kernels, name, counted)
    g = torch.Generator().manual_seed(0)
    peaked, flat = torch.randn(1, V, generator=g) * 3, torch.randn(1, V, generator=g)
    spread = -torch.logspace(-30, 30, V)[torch.randperm(V, generator=g)][None]
    cases = [(peaked, 0.0, 0, 1.0, 0.0, 1), (peaked, 1.0, 0, 1.0, 0.0, 2), (peaked, 1.0, 0, 1.0, 0.1, 2),
             (peaked, 0.8, 50, 0.9, 0.0, 3), (peaked, 1.0, 0, 0.9, 0.0, 3), (flat, 0.8, 0, 0.9, 0.0, 4),
             (flat, 1.0, 6000, 0.95, 0.0, 7), (spread, 1.0, 50, 1.0, 0.0, 4), (spread, 1.0, 6000, 0.99, 0.0, 7)]
    for logits, T, k, p, m, passes in cases:
        reads.clear()
        triton_sample(logits, *rows(1, T, k, p, m, g))
        assert sum(reads) == passes, (T, k, p, m, sum(reads))


@pytest.mark.parametrize("V", [4097, 20000])
def test_triton_ties_at_the_cut(V):
    """Integer-valued logits put hundreds of equal values at every cut: top-k keeps all the ties of
    its k-th value, top-p all the ties of its last value, and rows of one repeated value keep the
    whole row; on both sides of the scratch size."""
    g = torch.Generator().manual_seed(V + 1)
    logits = torch.randint(-6, 7, (4, V), generator=g).float()
    logits[3] = 1.5
    for T, k, p, m in [(1.0, 100, 1.0, 0.0), (1.0, 5000, 1.0, 0.0), (0.5, 0, 0.7, 0.0), (1.0, 3, 0.5, 0.0)]:
        assert_matches_reference(triton_sample, logits, *rows(4, T, k, p, m, g), rtol=RTOL)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in invalid rows
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_logits_and_invalid_rows(dtype):
    """fp16 / bf16 logits read directly (their many equal values included); NaN / +inf / all -inf
    rows are invalid and isolated; -inf entries in a valid row are never drawn."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, 40, generator=g) * 2).to(dtype)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    logits[3] = float("-inf")
    logits[4, ::3] = float("-inf")
    assert_matches_reference(triton_sample, logits, *random_params(6, 40, g), rtol=RTOL)
    wide = torch.randn(4, 5000, generator=g).to(dtype)
    assert_matches_reference(triton_sample, wide, *random_params(4, 5000, g), rtol=RTOL)


def test_triton_equals_cpu_through_the_api():
    """backend="triton" and backend="cpu" draw the same tokens from the same seeds, for a small row
    and for rows past the scratch size (both paths of each filter)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 50, generator=g)
    kwargs = dict(temperature=torch.tensor([0.7, 1.0, 0.0, 1.3]), top_k=torch.tensor([5, 0, 0, 20]), top_p=0.9,
                  min_p=torch.tensor([0.0, 0.05, 0.0, 0.0]), seed=torch.arange(4), step=11)
    assert torch.equal(sample(logits, backend="triton", **kwargs).tokens, sample(logits, backend="cpu", **kwargs).tokens)
    wide = torch.randn(4, 9000, generator=g) * torch.tensor([[1.0], [1.0], [3.0], [3.0]])
    kwargs = dict(temperature=torch.tensor([0.9, 1.0, 0.8, 1.1]), top_k=torch.tensor([0, 5000, 50, 0]),
                  top_p=torch.tensor([0.9, 0.95, 0.9, 1.0]), min_p=torch.tensor([0.0, 0.0, 0.0, 0.02]),
                  seed=torch.arange(4) + 7, step=3)
    assert torch.equal(sample(wide, backend="triton", **kwargs).tokens, sample(wide, backend="cpu", **kwargs).tokens)


def test_triton_batch_invariance(stats_launch):
    """A row's token and logprob are bitwise the same alone (its stats in their own launch) and in a
    batch whose other rows take other paths (greedy, top-k, flat top-p past the scratch, min-p),
    with either stats launch for the batch."""
    g = torch.Generator().manual_seed(5)
    B, V = 5, 6000
    logits = torch.randn(B, V, generator=g) * torch.tensor([[3.0], [1.0], [3.0], [1.0], [2.0]])
    T = torch.tensor([0.8, 0.9, 0.0, 1.0, 1.2])
    k = torch.tensor([50, 0, 0, 0, 0])
    p = torch.tensor([0.9, 0.9, 1.0, 1.0, 0.95])
    m = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.0])
    u = torch.rand(B, generator=g)
    tokens, logprobs, _ = triton_sample(logits, T, k, p, m, u)
    from ctrlsafe.kernels import sampling as kernels

    kernels.SPLIT_STATS_ROWS = 1  # rows alone always split (the fixture restores the setting)
    for r in range(B):
        sl = slice(r, r + 1)
        alone_tok, alone_lp, _ = triton_sample(logits[sl], T[sl], k[sl], p[sl], m[sl], u[sl])
        assert int(alone_tok[0]) == int(tokens[r])
        assert alone_lp[0].item() == logprobs[r].item()


SIG = {"logits_ptr": "*fp32", "stride": "i64", "V": "i32", "temp_ptr": "*fp32", "top_k_ptr": "*i64",
       "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "u_ptr": "*fp32", "tokens_ptr": "*i64",
       "logprobs_ptr": "*fp32", "valid_ptr": "*i8", "scratch_ptr": "*fp32",
       "n_blocks": "i32", "stats_f_ptr": "*fp32", "stats_i_ptr": "*i32"}
STATS_SIG = {"logits_ptr": "*fp32", "stride": "i64", "V": "i32", "stats_f_ptr": "*fp32", "stats_i_ptr": "*i32",
             "n_chunks": "i32", "BLOCK": "constexpr"}


def test_triton_kernel_compiles_for_sm80_and_sm90():
    """Both kernels (the sampler with fused or split stats, and the stats launch) lower to PTX and
    assemble for Ampere and Hopper, fp32 and bf16 logits, at their launch configuration (512
    threads) without spilling and within the registers 512 threads can each have (65536 / 512)."""
    from ctrlsafe.kernels import sampling as S

    consts = dict(BLOCK=S.BLOCK, SUB=S.SUB, UNROLL=S.UNROLL, NPROBE=S.NPROBE, BY_KEY=S.BY_KEY, CAP=S.CAP,
                  BLOCK_LIST=S.BLOCK_LIST)
    jobs = []
    for cc in (80, 90):
        for dtype in ("*fp32", "*bf16"):
            for split in (False, True):
                c = dict(consts, SPLIT_STATS=split)
                jobs.append(dict(kernel="ctrlsafe.kernels.sampling:_sample_kernel", cc=cc, num_warps=S.NUM_WARPS, constexprs=c,
                                 signature={**SIG, **{n: "constexpr" for n in c}, "logits_ptr": dtype}))
            jobs.append(dict(kernel="ctrlsafe.kernels.sampling:_stats_kernel", cc=cc, num_warps=S.NUM_WARPS,
                             constexprs={"BLOCK": S.BLOCK}, signature={**STATS_SIG, "logits_ptr": dtype}))
    threads = 32 * S.NUM_WARPS
    for job, r in zip(jobs, gpu_compile(jobs)):
        what = (job["kernel"], job["cc"], job["signature"]["logits_ptr"], job["constexprs"].get("SPLIT_STATS"), r["registers"])
        assert "ld.global" in r["ptx"], what
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, what
        assert 0 < r["registers"] <= 65536 // threads, what
