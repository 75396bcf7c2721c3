"""The sampler (ctrlsafe.sampling / ctrlsafe.ops.sampling): the C++ kernel against the float64
reference, the API's validation and randomness. Triton: tests/test_sampling_triton.py."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from ctrlsafe import _C
from ctrlsafe.ops.sampling import cpu, reference
from ctrlsafe.sampling import counter_uniforms, sample

# The C++ kernel keeps exp() as float (relative error ~1.5e-7) and sums in double: a token may
# differ from the reference only if moving u, top_p or min_p by this relative amount changes the
# reference's answer (u * mass then sits on a CDF boundary, or a kept-set boundary is that close).
RTOL = 1e-6


def random_params(B: int, V: int, g: torch.Generator):
    """Per-row parameter mixes: greedy, plain, top-k (1, small, >= V), top-p, min-p and combos."""
    temperature = torch.where(torch.rand(B, generator=g) < 0.15, 0.0, 0.2 + 1.6 * torch.rand(B, generator=g))
    choice = torch.randint(0, 4, (B,), generator=g)
    top_k = torch.where(choice == 0, 0, torch.where(choice == 1, 1, torch.where(choice == 2, torch.randint(1, 60, (B,), generator=g), V + 3)))
    top_p = torch.where(torch.rand(B, generator=g) < 0.5, 1.0, 0.05 + 0.95 * torch.rand(B, generator=g))
    min_p = torch.where(torch.rand(B, generator=g) < 0.6, 0.0, 0.3 * torch.rand(B, generator=g))
    uniforms = torch.rand(B, generator=g)
    return temperature, top_k, top_p, min_p, uniforms


def boundary_tokens(logits, temperature, top_k, top_p, min_p, uniforms, rows, rtol=RTOL):
    """For each row in `rows`, the tokens the reference returns when u, top_p and min_p move by
    +-rtol (relative): the answers a float32 implementation may legitimately give."""
    out = {}
    for r in rows:
        sl = slice(r, r + 1)
        found = set()
        for du in (-rtol, 0.0, rtol):
            for dp in (-rtol, 0.0, rtol):
                for dm in (-rtol, 0.0, rtol):
                    u = (uniforms[sl] + du).clamp(0, 1 - 2**-24)
                    p = (top_p[sl] * (1 + dp)).clamp(max=1.0) if top_p[r] < 1 else top_p[sl]
                    m = (min_p[sl] * (1 + dm)).clamp(max=1.0)
                    found.add(int(reference(logits[sl], temperature[sl], top_k[sl], p, m, u)[0]))
        out[r] = found
    return out


def assert_matches_reference(impl, logits, temperature, top_k, top_p, min_p, uniforms, rtol=RTOL):
    ref_tok, ref_lp, ref_valid = reference(logits, temperature, top_k, top_p, min_p, uniforms)
    tok, lp, valid = impl(logits, temperature, top_k, top_p, min_p, uniforms)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32 and valid.dtype == torch.bool
    assert torch.equal(valid, ref_valid)
    differ = (tok != ref_tok).nonzero().flatten().tolist()
    allowed = boundary_tokens(logits, temperature, top_k, top_p, min_p, uniforms, differ, rtol)
    for r in differ:
        assert int(tok[r]) in allowed[r], f"row {r}: token {int(tok[r])}, reference {int(ref_tok[r])} (not a rounding boundary)"
    same = (tok == ref_tok) & valid
    torch.testing.assert_close(lp[same], ref_lp[same], rtol=1e-5, atol=2e-6)
    return len(differ)


@pytest.mark.parametrize("V", [1, 7, 33, 4097, 32000])
def test_cpu_matches_reference_on_random_shapes_and_mixed_params(V):
    """Exact agreement with the float64 reference (tokens, valid; logprobs to float precision) for
    per-row different parameter mixes in one batch, injected uniforms, several logit scales."""
    g = torch.Generator().manual_seed(V)
    B = 48 if V <= 4097 else 12
    for scale in (0.5, 3.0, 12.0):
        logits = torch.randn(B, V, generator=g) * scale
        if V > 1:  # exact ties at the max and elsewhere
            logits[0, : min(V, 3)] = logits[0].max()
            logits[1] = torch.round(logits[1])
        boundary = assert_matches_reference(cpu, logits, *random_params(B, V, g))
        assert boundary <= 1  # a boundary case is a ~1e-6 event per row


def test_cpu_large_vocabulary_paths():
    """V = 128256 with B = 1 (row split over threads) and B = 3: top-k small and large, top-p,
    min-p, greedy all match the reference."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 128256, generator=g) * 3
    for params in [(0.8, 50, 0.9, 0.0), (1.0, 0, 0.9, 0.0), (1.1, 70000, 0.95, 0.0), (0.7, 0, 1.0, 0.05), (0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0)]:
        T, k, p, m = params
        for B in (1, 3):
            row = lambda v, dt=torch.float32: torch.full((B,), v, dtype=dt)  # noqa: E731
            assert_matches_reference(cpu, logits[:B], row(T), row(k, torch.int64), row(p), row(m), torch.rand(B, generator=g))


@pytest.mark.parametrize("scale", [0.3, 3.0])
@pytest.mark.parametrize("T, k, p, m", [(1.0, 0, 0.9, 0.0), (1.0, 0, 0.5, 0.4), (1.0, 0, 0.99, 1e-3), (1.0, 3000, 0.9, 0.0),
                                        (1.0, 3000, 0.999, 0.0), (2.0, 0, 1.0, 0.2), (0.5, 4000, 1.0, 0.0)])
def test_cpu_floor_compaction(scale, T, k, p, m):
    """The kernel keeps only values above a lower bound on the cut (top-p's mass bound, min-p,
    top-k) and compacts them when few: the answer is the reference's whichever floor is deepest
    (min-p above top-p's cut, top-k's, top-p's) and whether compaction happens (peaked logits,
    scale 3) or not (flat logits, scale 0.3)."""
    g = torch.Generator().manual_seed(int(scale * 10) + k)
    B, V = 64, 4097
    logits = torch.randn(B, V, generator=g) * scale
    row = lambda v, dt=torch.float32: torch.full((B,), v, dtype=dt)  # noqa: E731
    assert_matches_reference(cpu, logits, row(T), row(k, torch.int64), row(p), row(m), torch.rand(B, generator=g))


@pytest.mark.parametrize("V, B", [(20000, 6), (70000, 1), (70000, 6)])
def test_cpu_top_p_candidate_bound_layouts(V, B):
    """Top-p on a whole row keeps, block by block, only values above a bound that rises with the
    mass seen so far and the later blocks' maxima: it never drops a token the reference keeps,
    whether the mass sits early (the bound rises at once), late, in two far-apart peaks, next to
    masked (-inf) stretches, or at a partial last block; on the row-parallel (B = 6) and the
    split-row (B = 1, V = 70000) paths."""
    g = torch.Generator().manual_seed(V + B)
    base = torch.randn(V, generator=g)
    layouts = {
        "early": base.clone().index_add_(0, torch.arange(300), torch.full((300,), 8.0)),
        "late": base.clone().index_add_(0, torch.arange(V - 300, V), torch.full((300,), 8.0)),
        "two peaks": base.clone().index_add_(0, torch.tensor([5, V - 5]), torch.tensor([9.0, 9.0])),
        "masked stretches": base.masked_fill((torch.arange(V) // 3000) % 2 == 1, float("-inf")),
        "tail block only": base.clone().index_add_(0, torch.arange(V - 17, V), torch.full((17,), 6.0)),
        "flat": base * 0.05,
    }
    for name, row in layouts.items():
        logits = row.repeat(B, 1)
        for top_p in (0.01, 0.5, 0.9, 0.9999):
            for T in (0.5, 1.0, 3.0):
                params = (torch.full((B,), T), torch.zeros(B, dtype=torch.int64), torch.full((B,), top_p), torch.zeros(B),
                          torch.rand(B, generator=g))
                assert assert_matches_reference(cpu, logits, *params) <= 1, (name, top_p, T)


def top_p_paths(fn):
    """fn()'s result and how many rows each top-p path of the C++ kernel sampled meanwhile."""
    before = _C.sampling_counters()
    out = fn()
    return out, {k: v - before[k] for k, v in _C.sampling_counters().items()}


def top_p_rows(B: int, T: float, top_p: float, g: torch.Generator, min_p: float = 0.0):
    """Per-row parameters of top-p (and min-p) alone: temperature, top_k 0, top_p, min_p, uniforms."""
    return (torch.full((B,), T), torch.zeros(B, dtype=torch.int64), torch.full((B,), top_p), torch.full((B,), min_p),
            torch.rand(B, generator=g))


@pytest.mark.parametrize("V, B", [(1, 16), (7, 16), (33, 16), (4097, 8), (128256, 3), (128256, 1)])
def test_flat_top_p_matches_reference_on_odd_vocab_sizes(V, B):
    """Top-p alone on flat rows (std 1 and 0.3 logits, T 0.8 and 1) returns the reference's tokens
    and logprobs for top_p 0.3 / 0.9 / 0.999, on the row-parallel (B > 1) and split-row (B = 1)
    paths. The flat path (subsample bracket, checked) takes every row at V = 128256 and the
    std-0.3 rows at V = 4097 (at std 1 its ~800-value sample is near the effective-size limit),
    none misses, and rows below ~1000 values are too short for an estimate."""
    g = torch.Generator().manual_seed(V + B)
    flat = {}
    for std in (1.0, 0.3):
        logits = torch.randn(B, V, generator=g) * std
        for T in (0.8, 1.0):
            for top_p in (0.3, 0.9, 0.999):
                boundary, paths = top_p_paths(lambda: assert_matches_reference(cpu, logits, *top_p_rows(B, T, top_p, g)))
                assert boundary <= 1, (std, T, top_p)
                assert paths["flat_missed"] == 0
                flat[std] = flat.get(std, 0) + paths["flat"]
    rows = 6 * B  # per std
    assert flat == {1.0: rows if V == 128256 else (flat[1.0] if V == 4097 else 0), 0.3: rows if V >= 4097 else 0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_flat_top_p_edge_values(dtype):
    """Flat rows at the edges, against the reference, on the row-parallel (B = 2) and split-row
    (B = 1) paths: ties at the cut (logits on a 1/8 grid: the cut falls inside a group of ~1000
    equal values, all kept together), top_p tiny (the max and its ties), 0.9 and just below 1,
    -inf entries (every third, and a long stretch), all-equal rows (every token kept; too uniform
    for a bracket, they take the candidate path), min-p above and below the top-p cut; fp32, fp16
    and bf16 logits. The flat path takes the grid and masked rows at top_p 0.9."""
    g = torch.Generator().manual_seed(7)
    V = 70001
    base = torch.randn(V, generator=g)
    rows = {
        "grid": torch.round(base * 8) / 8,
        "every third -inf": base.masked_fill(torch.arange(V) % 3 == 1, float("-inf")),
        "-inf stretch": base.masked_fill((torch.arange(V) > 5000) & (torch.arange(V) < 45000), float("-inf")),
        "equal": torch.full((V,), 0.25),
    }
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    flat = set()
    for name, row in rows.items():
        for B in (1, 2):
            logits = row.to(dtype).repeat(B, 1)
            for top_p in (1e-7, 0.9, below_one):
                for min_p in (0.0, 0.05, 0.5):
                    params = top_p_rows(B, 0.8, top_p, g, min_p)
                    boundary, paths = top_p_paths(lambda: assert_matches_reference(cpu, logits, *params))
                    assert boundary <= 1, (name, B, top_p, min_p)
                    if paths["flat"] == B:
                        flat.add((name, B, top_p, min_p))
    assert {(name, B, 0.9, 0.0) for name in ("grid", "every third -inf", "-inf stretch") for B in (1, 2)} <= flat


def test_flat_rows_batch_invariance():
    """A flat row gives the same token and logprob alone (split-row path) and inside a batch of 64
    with other flat and peaked rows (row-parallel path), with top-p alone and with min-p."""
    g = torch.Generator().manual_seed(9)
    V = 128256
    logits = torch.randn(64, V, generator=g) * torch.linspace(0.3, 3.0, 64)[:, None]
    T, p, m = torch.full((64,), 0.8), torch.full((64,), 0.9), torch.where(torch.arange(64) % 2 == 0, 0.0, 0.01)
    seeds = torch.randint(0, 2**40, (64,), generator=g)
    batch, paths = top_p_paths(lambda: sample(logits, temperature=T, top_p=p, min_p=m, seed=seeds, step=5))
    assert paths["flat"] >= 8  # the low-std rows
    for r in (0, 1, 5, 20):
        alone, paths = top_p_paths(lambda: sample(logits[r : r + 1], temperature=T[r : r + 1], top_p=p[r : r + 1],
                                                   min_p=m[r : r + 1], seed=seeds[r : r + 1], step=5))
        assert paths["flat"] == 1
        assert int(alone.tokens[0]) == int(batch.tokens[r])
        assert alone.logprobs[0].item() == batch.logprobs[r].item()


@pytest.mark.parametrize("phase, side", [(5, "above"), (0, "below")])
def test_flat_bracket_misses_are_searched(phase, side):
    """When the subsample misjudges a flat row, the exact check catches it and the cut is searched
    on the side it is on: spikes on positions the subsample skips (phase 5) put the cut above the
    bracket, spikes on positions it samples (phase 0, weighed 31 times over) below it. Both rows
    take the flat path, miss, and return the reference's tokens."""
    g = torch.Generator().manual_seed(11)
    V = 128256
    stride = _C.flat_stride(V)
    count, height = (500, 5.0) if side == "above" else (1000, 4.0)
    row = torch.randn(V, generator=g) * 0.5
    row[torch.arange(count) * stride + phase] += height
    logits = row.repeat(4, 1)
    boundary, paths = top_p_paths(lambda: assert_matches_reference(cpu, logits, *top_p_rows(4, 1.0, 0.9, g)))
    assert boundary <= 1
    assert paths["flat_missed"] == 4 and paths["flat"] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision_logits(dtype):
    """fp16 / bf16 logits are read in place and agree with the reference on the same values."""
    g = torch.Generator().manual_seed(2)
    for V in (33, 4097, 70000):
        B = 16
        logits = (torch.randn(B, V, generator=g) * 4).to(dtype)
        assert_matches_reference(cpu, logits, *random_params(B, V, g))


def test_cpu_strided_rows_and_columns():
    """A row-strided view is read in place and a column-strided one is made contiguous: both give
    the contiguous copy's result."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 2 * 5000, generator=g)
    params = random_params(8, 5000, g)
    for view in (base[:, :5000], base[:, ::2]):
        assert all(torch.equal(a, b) for a, b in zip(cpu(view, *params), cpu(view.contiguous(), *params)))


def test_scalar_parameters_equal_per_row_tensors():
    """A Python number is the same as a [B] tensor holding it, for the API and the op."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 1000, generator=g)
    a = sample(logits, temperature=0.7, top_k=40, top_p=0.8, min_p=0.01, seed=9, step=4)
    full = lambda v, dt=torch.float32: torch.full((5,), v, dtype=dt)  # noqa: E731
    b = sample(logits, temperature=full(0.7), top_k=full(40, torch.int64), top_p=full(0.8), min_p=full(0.01),
               seed=full(9, torch.int64), step=full(4, torch.int64))
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3])) and a.raw_logprobs is b.raw_logprobs is None


def _fmix32(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _uniform_oracle(seed, step):
    """The documented stream, in plain Python: fmix32 chained over the 32-bit words."""
    h = 0x9E3779B9
    for v in (seed, step):
        v &= (1 << 64) - 1
        for word in (v & 0xFFFFFFFF, v >> 32):
            h = _fmix32(h ^ word)
    return (h >> 8) / (1 << 24)


def test_counter_uniforms_ints_equal_tensors():
    """The RNG gives the documented stream's bits for Python ints, CPU int64 tensors (C++) and
    the torch form other devices use (negative and full 64-bit seeds and steps)."""
    from ctrlsafe.sampling import _counter_uniforms_torch

    seeds = [0, 1, -1, 2**62 + 12345, -(2**63), 2**63 - 1, 987654321]
    steps = [0, 7, 2**40 + 3, 1, 5, 2**63 - 1, -2]
    expected = [_uniform_oracle(s, k) for s, k in zip(seeds, steps)]
    t = counter_uniforms(torch.tensor(seeds), torch.tensor(steps))
    assert [counter_uniforms(s, k) for s, k in zip(seeds, steps)] == t.tolist() == expected
    assert _counter_uniforms_torch(torch.tensor(seeds), torch.tensor(steps)).tolist() == expected
    assert counter_uniforms(torch.tensor(seeds), 7).tolist() == [_uniform_oracle(s, 7) for s in seeds]  # broadcast
    assert counter_uniforms(-3, torch.tensor(steps)).tolist() == [_uniform_oracle(-3, k) for k in steps]
    assert ((t >= 0) & (t < 1)).all() and len(set(t.tolist())) == len(seeds)


def test_batch_invariance():
    """A row gives the same token and logprob alone and inside a batch of 258 rows with other
    parameters (V = 128256 takes the split-row path alone and the row-parallel path in a batch)."""
    g = torch.Generator().manual_seed(5)
    for V in (32000, 128256):
        logits = torch.randn(258, V, generator=g) * 3
        T, k, p, m, _ = random_params(258, V, g)
        T[7], k[7], p[7], m[7] = 0.9, 0, 0.95, 0.0  # top-p
        T[8], k[8], p[8], m[8] = 0.0, 0, 1.0, 0.0  # greedy
        T[9], k[9], p[9], m[9] = 1.1, 0, 1.0, 0.02  # min-p
        seeds = torch.randint(0, 2**40, (258,), generator=g)
        batch = sample(logits, temperature=T, top_k=k, top_p=p, min_p=m, seed=seeds, step=3)
        for r in (7, 8, 9):
            alone = sample(logits[r : r + 1], temperature=T[r : r + 1], top_k=k[r : r + 1], top_p=p[r : r + 1],
                           min_p=m[r : r + 1], seed=seeds[r : r + 1], step=3)
            assert int(alone.tokens[0]) == int(batch.tokens[r])
            assert alone.logprobs[0].item() == batch.logprobs[r].item()


def test_edge_cases():
    """Greedy (ties -> lowest id, logprob 0, raw logprob the untempered log-softmax), top_k=1,
    top_k >= V, tiny top_p (max and its ties only), min_p = 1, V = 1."""
    x = torch.tensor([[0.5, 2.0, -1.0, 2.0, 1.9]])
    lsm = torch.log_softmax(x.double(), -1)
    out = sample(x, temperature=0.0, uniforms=0.999, raw_logprobs=True)
    assert out.tokens.tolist() == [1] and out.logprobs.item() == 0.0
    assert out.raw_logprobs.item() == pytest.approx(lsm[0, 1].item(), rel=1e-6)
    for u in (0.0, 0.3, 0.999):
        assert sample(x, top_k=1, uniforms=u).tokens.tolist() in ([1], [3])  # the two tied maxima
        assert sample(x, top_p=1e-9, uniforms=u).tokens.tolist() == ([1] if u < 0.5 else [3])
        assert sample(x, min_p=1.0, uniforms=u).tokens.tolist() == ([1] if u < 0.5 else [3])
        assert torch.equal(sample(x, top_k=5, uniforms=u).tokens, sample(x, top_k=0, uniforms=u).tokens)
        assert torch.equal(sample(x, top_k=99, uniforms=u).tokens, sample(x, uniforms=u).tokens)
    assert sample(x, min_p=1.0, uniforms=0.2).logprobs.item() == pytest.approx(math.log(0.5))
    one = sample(torch.tensor([[3.0], [-2.0]]), temperature=torch.tensor([0.7, 0.0]), top_p=0.3, uniforms=0.5)
    assert one.tokens.tolist() == [0, 0] and one.logprobs.tolist() == [0.0, 0.0] and one.valid.all()


def test_invalid_rows_are_isolated():
    """Rows with NaN, +inf or only -inf give valid=False, token -1, NaN logprob; -inf entries in a
    valid row are never drawn; the other rows are unchanged."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 300, generator=g)
    x[1, 17] = float("nan")
    x[2, 5] = float("inf")
    x[3] = float("-inf")
    x[4, ::2] = float("-inf")
    seeds = torch.arange(6) + 100
    out = sample(x, temperature=1.0, top_p=0.95, seed=seeds)
    assert out.valid.tolist() == [True, False, False, False, True, True]
    assert out.tokens[1:4].tolist() == [-1, -1, -1] and torch.isnan(out.logprobs[1:4]).all()
    assert int(out.tokens[4]) % 2 == 1
    for r in (0, 4, 5):
        alone = sample(x[r : r + 1], temperature=1.0, top_p=0.95, seed=seeds[r : r + 1])
        assert int(alone.tokens[0]) == int(out.tokens[r])
    for u in (0.0, 0.5, 1 - 2**-24):  # plain sampling keeps the -inf entries but never draws them
        assert int(sample(x[4:5], uniforms=u).tokens[0]) % 2 == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=torch.tensor([1.0, -0.5, 1.0])), r"temperature\[1\] = -0.5"),
        (dict(temperature=float("nan")), r"temperature = nan"),
        (dict(top_k=torch.tensor([0, 0, -2])), r"top_k\[2\] = -2"),
        (dict(top_k=2.5), r"top_k must be an integer"),
        (dict(top_p=0.0), r"top_p = 0.0 is invalid"),
        (dict(top_p=torch.tensor([0.5, 1.5, 1.0])), r"top_p\[1\] = 1.5"),
        (dict(min_p=torch.tensor([0.0, 0.0, 1.5])), r"min_p\[2\] = 1.5"),
        (dict(top_p=torch.ones(4)), r"top_p must be a scalar or shape \[3\]"),
        (dict(uniforms=torch.tensor([0.1, 1.0, 0.2])), r"uniforms\[1\] = 1.0"),
        (dict(seed="abc"), r"seed must be a number"),
    ],
)
def test_parameter_errors_name_parameter_and_row(kwargs, message):
    """Invalid parameters raise ValueError naming the parameter (and the row for [B] tensors)."""
    with pytest.raises(ValueError, match=message):
        sample(torch.zeros(3, 10), **kwargs)


def test_logits_shape_and_dtype_errors():
    """Logits that are not [B, V>=1] float32/16/bf16 raise ValueError saying what is allowed."""
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample(torch.zeros(10))
    with pytest.raises(ValueError, match="allowed: float32, float16, bfloat16"):
        sample(torch.zeros(2, 10, dtype=torch.float64))


def reference_distribution(logits_row, T, k, p, m, grid: int = 1 << 16):
    """{token: probability} of the tokens the reference draws for a grid of uniforms (each kept
    token of probability >= 1/grid is hit; its logprob gives its exact probability)."""
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    rows = logits_row.expand(grid, -1)
    full = lambda v, dt=torch.float32: torch.full((grid,), v, dtype=dt)  # noqa: E731
    tok, lp, _ = reference(rows, full(T), full(k, torch.int64), full(p), full(m), u.float())
    first = {}
    for t, l in zip(tok.tolist(), lp.double().exp().tolist()):
        first.setdefault(t, l)
    return first


def chi2_quantile(df: int, z: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal quantile z."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("V, params", [(64, (1.0, 0, 1.0, 0.0)), (64, (0.7, 10, 0.9, 0.0)), (37, (1.3, 0, 0.8, 0.02)), (64, (0.5, 0, 0.97, 0.05))])
def test_distribution_matches_reference(V, params):
    """200k seeded draws per row follow the reference's renormalised probabilities: chi-square over
    the tokens (those with expected count < 5 pooled with the unseen mass) below its 1 - 1e-6
    quantile (false-failure rate ~1e-6 per case); and, where the filters leave a kept set the
    reference grid covers, no draw outside it."""
    T, k, p, m = params
    N = 200_000
    g = torch.Generator().manual_seed(V + k)
    row = torch.randn(1, V, generator=g) * 2
    probs = reference_distribution(row[0], T, k, p, m)
    out = sample(row.expand(N, V), temperature=T, top_k=k, top_p=p, min_p=m, seed=torch.arange(N) + 7 * V, step=1, backend="cpu")
    counts = torch.bincount(out.tokens, minlength=V).double()
    big = [t for t, q in probs.items() if q * N >= 5]
    expected = torch.tensor([probs[t] * N for t in big] + [N - sum(probs[t] * N for t in big)], dtype=torch.float64)
    observed = torch.cat([counts[big], (N - counts[big].sum()).reshape(1)])
    if expected[-1] < 5:  # nothing left to pool
        expected, observed = expected[:-1], observed[:-1]
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert stat < chi2_quantile(len(expected) - 1, 4.753), (stat, len(expected))
    if sum(probs.values()) > 1 - 1e-9:  # the grid hit every kept token: check the support exactly
        kept = torch.zeros(V, dtype=torch.bool)
        kept[list(probs)] = True
        assert kept[out.tokens].all()


def test_support_of_known_kept_sets():
    """Draws stay inside kept sets known by construction: the 5 largest (top_k=5), the tokens with
    p >= 0.1 * max p (min_p=0.1), and {0.5, 0.3} of a designed distribution (top_p=0.75)."""
    g = torch.Generator().manual_seed(8)
    N = 20_000
    x = torch.randn(1, 50, generator=g) * 2
    top5 = set(x[0].topk(5).indices.tolist())
    ratio = (x[0].double() - x[0].max()).exp()
    min_p_set = set((ratio >= 0.1).nonzero().flatten().tolist())
    designed = torch.full((1, 50), float("-inf"))
    designed[0, [40, 3, 17, 28]] = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()
    cases = [(x, dict(top_k=5), top5), (x, dict(min_p=0.1), min_p_set), (designed, dict(top_p=0.75), {3, 28})]
    for logits, kwargs, support in cases:
        tokens = sample(logits.expand(N, -1), seed=torch.arange(N), **kwargs).tokens
        assert set(tokens.tolist()) == support


def test_import_does_not_pull_transformers():
    """`import ctrlsafe.sampling` stays light: transformers is never imported."""
    code = "import sys, ctrlsafe.sampling; sys.exit(1 if 'transformers' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_compaction_paths_give_identical_tokens():
    """The three compaction paths (AVX-512, AVX2, portable; CTRLSAFE_NO_AVX512=1 and
    CTRLSAFE_NO_AVX2=1 force the narrower ones in a fresh process, as the choice is made once) each
    report themselves and give the same tokens and logprobs, bit for bit, on the cases that compact:
    flat rows (bracket), peaked rows (top-p candidates), top-k, min-p, a large top-k with top-p, and
    a missed bracket."""
    code = """
import json, torch
from ctrlsafe import _C
from ctrlsafe.ops.sampling import cpu
g = torch.Generator().manual_seed(5)
B, V = 8, 40961
spiked = torch.randn(V, generator=g) * 0.5
spiked[torch.arange(300) * _C.flat_stride(V) + 5] += 5.0
logits = {"flat": torch.randn(B, V, generator=g), "peaked": torch.randn(B, V, generator=g) * 3, "spiked": spiked.repeat(B, 1)}
row = lambda v, dt=torch.float32: torch.full((B,), v, dtype=dt)
outs = [cpu(x, row(0.8), row(k, torch.int64), row(p), row(m), torch.rand(B, generator=g))
        for x in logits.values() for k, p, m in [(0, 0.9, 0.0), (50, 1.0, 0.0), (0, 1.0, 0.1), (3000, 0.95, 0.0), (0, 0.5, 0.02)]]
print(json.dumps({"isa": _C.sampling_isa(), "paths": _C.sampling_counters(),
                  "out": [(t.tolist(), lp.tolist()) for t, lp, _ in outs]}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("CTRLSAFE_NO_AVX512", "CTRLSAFE_NO_AVX2")}
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=e).stdout)
            for e in (env, {**env, "CTRLSAFE_NO_AVX512": "1"}, {**env, "CTRLSAFE_NO_AVX512": "1", "CTRLSAFE_NO_AVX2": "1"})]
    paths = [r["isa"].rsplit("compaction ", 1)[1] for r in runs]
    # each switch narrows the path by one step where the CPU has it
    expected = {"avx512": ["avx512", "avx2", "scalar"], "avx2": ["avx2", "avx2", "scalar"], "scalar": ["scalar"] * 3}
    assert paths == expected[paths[0]]
    assert all(r["paths"]["flat"] > 0 and r["paths"]["flat_missed"] > 0 and r["paths"]["candidates"] > 0 for r in runs)
    assert runs[0]["out"] == runs[1]["out"] == runs[2]["out"]
