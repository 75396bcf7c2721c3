"""Fused reward head op (ctrlsafe.ops.score_heads): cpu and Triton (interpreted on CPU) equal the
float64 reference on odd shapes, padded and packed inputs, edge values and NaN; the Triton kernel
compiles for sm_80 and sm_90."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on CPU tensors

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ctrlsafe.ops import score_heads  # noqa: E402
from ctrlsafe.ops.reward_head import last_token_index  # noqa: E402

BACKENDS = ["cpu", "triton"]


def make_inputs(N, T, H, K, dtype=torch.float32, bias=True, levels=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, T, H, generator=g) * 3).to(dtype)
    last = torch.randint(0, T, (N,), generator=g)
    norm_w = torch.rand(H, generator=g) + 0.5
    heads = torch.randn(K, H, generator=g) / H**0.5  # O(1) scores
    b = torch.randn(K, generator=g) if bias else None
    mean, std = torch.randn(K, generator=g), torch.rand(K, generator=g) + 0.5
    edges = torch.sort(torch.randn(K, levels - 1, generator=g), dim=1).values
    return hidden, last, norm_w, heads, b, mean, std, edges


def assert_matches_reference(got, ref, edges, margin=1e-4):
    (scores, levels), (ref_scores, ref_levels) = got, ref
    assert scores.dtype == torch.float32 and levels.dtype == torch.int8
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    # levels agree wherever the score is not within rounding distance of one of its edges
    near_edge = ((ref_scores[:, :, None] - edges[None]).abs() < margin).any(-1)
    assert ((levels == ref_levels) | near_edge).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,T,H,K,bias", [(1, 1, 7, 1, False), (7, 5, 33, 3, True), (33, 3, 4097, 2, True), (5, 2, 64, 7, False)])
def test_padded_fp32_matches_reference(backend, N, T, H, K, bias):
    """Gather + RMSNorm + K heads + bias + (x - mean)/std + bucketize equals the fp64 reference on
    odd N, T, H, K."""
    args = make_inputs(N, T, H, K, bias=bias)
    ref = score_heads(*args, eps=1e-5, backend="reference")
    assert_matches_reference(score_heads(*args, eps=1e-5, backend=backend), ref, args[-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_hidden_matches_reference(backend):
    """bf16 hidden states (and bf16 weights) are upcast and computed in fp32."""
    hidden, last, w, heads, b, mean, std, edges = make_inputs(7, 4, 257, 2, dtype=torch.bfloat16)
    args = (hidden, last, w.bfloat16(), heads.bfloat16(), b, mean, std, edges)
    ref = score_heads(*args, eps=1e-6, backend="reference")
    assert_matches_reference(score_heads(*args, eps=1e-6, backend=backend), ref, edges)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_packed_equals_padded(backend):
    """Packed [total,H] rows with offsets and absolute last_index give the padded results."""
    hidden, last, *rest = make_inputs(6, 9, 65, 3)
    lengths = torch.tensor([1, 9, 4, 7, 2, 9])
    last = lengths - 1
    packed = torch.cat([hidden[i, :n] for i, n in enumerate(lengths.tolist())])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    a = score_heads(hidden, last, *rest, eps=1e-5, backend=backend)
    b = score_heads(packed, offsets[:-1] + last, *rest, eps=1e-5, offsets=offsets, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_scores_on_edges_ties_and_clamping(backend):
    """level = number of edges <= score: a score exactly on an edge goes up, duplicate edges leave
    an empty bin, scores below/above all edges clamp to 0 / L-1."""
    hidden, last, w, heads, b, mean, std, _ = make_inputs(9, 3, 48, 2)
    scores, none = score_heads(hidden, last, w, heads, b, mean, std, None, eps=1e-5, backend=backend)
    assert none is None
    s = scores
    edges = torch.stack([torch.stack([s[2, k], s[4, k], s[4, k], s[6, k]]).sort().values for k in range(2)])
    _, levels = score_heads(hidden, last, w, heads, b, mean, std, edges, eps=1e-5, backend=backend)
    expected = (s[:, :, None] >= edges[None]).sum(-1)
    assert torch.equal(levels.long(), expected)
    for k in range(2):  # the scores that are edges take the bin above them
        for row in (2, 4, 6):
            assert levels[row, k] == int((edges[k] <= s[row, k]).sum()) >= 1
    low = s.min() - 1 + torch.zeros(2, 4)
    high = s.max() + 1 + torch.zeros(2, 4)
    assert (score_heads(hidden, last, w, heads, b, mean, std, low, eps=1e-5, backend=backend)[1] == 4).all()
    assert (score_heads(hidden, last, w, heads, b, mean, std, high, eps=1e-5, backend=backend)[1] == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_nan_and_inf_rows_are_flagged(backend):
    """A NaN or inf in a scored row gives NaN scores and level -1 for that row only; NaN at a
    position that is not scored changes nothing."""
    hidden, last, *rest = make_inputs(4, 3, 40, 2)
    clean = score_heads(hidden, last, *rest, eps=1e-5, backend=backend)
    hidden[1, last[1], 5] = float("nan")
    hidden[2, last[2], 0] = float("inf")
    hidden[3, (last[3] + 1) % 3, :] = float("nan")
    scores, levels = score_heads(hidden, last, *rest, eps=1e-5, backend=backend)
    assert torch.isnan(scores[1:3]).all() and (levels[1:3] == -1).all()
    assert torch.equal(scores[[0, 3]], clean[0][[0, 3]]) and torch.equal(levels[[0, 3]], clean[1][[0, 3]])


def test_last_token_index_follows_transformers():
    """Rightmost id != pad for right and left padding; with pad == eos real trailing EOS tokens are
    skipped; an all-pad row gives 0; without a pad id only a single row is allowed (its last)."""
    pad = 2
    ids = torch.tensor([[5, 6, 7, 2, 2], [2, 2, 5, 6, 7], [5, 2, 7, 2, 2], [2, 2, 2, 2, 2], [5, 6, 7, 8, 9]])
    assert last_token_index(ids, pad).tolist() == [2, 4, 2, 0, 4]
    assert last_token_index(ids[:1], None).tolist() == [4]
    with pytest.raises(ValueError, match="needs a pad_token_id"):
        last_token_index(ids, None)


def test_bad_inputs_are_named():
    """Indices outside their sequence and mismatched shapes raise a ValueError naming them."""
    hidden, last, *rest = make_inputs(3, 4, 16, 2)
    with pytest.raises(ValueError, match=r"last_index\[1\] = 4 is outside its sequence \[0, 4\)"):
        score_heads(hidden, torch.tensor([0, 4, 1]), *rest, eps=1e-5)
    with pytest.raises(ValueError, match=r"last_index\[0\] = 3 is outside its sequence \[0, 3\)"):
        score_heads(hidden.reshape(12, 16), torch.tensor([3, 4, 11]), *rest, eps=1e-5, offsets=torch.tensor([0, 3, 8, 12]))
    with pytest.raises(ValueError, match="heads must be"):
        score_heads(hidden, last, rest[0], rest[1][:, :8], *rest[2:], eps=1e-5)
    with pytest.raises(ValueError, match="pass offsets"):
        score_heads(hidden.reshape(12, 16), last, *rest, eps=1e-5)


COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from ctrlsafe.kernels.reward_head import reward_head_kernel, block_sizes
    for cc in (80, 90):
        for dtype, has_bias, has_edges in (("fp32", True, True), ("bf16", False, False)):
            bn, bk, bh = block_sizes(256, 2)
            sig = {"hidden_ptr": "*" + dtype, "row_offset_ptr": "*i64", "norm_w_ptr": "*" + dtype, "heads_ptr": "*" + dtype,
                   "bias_ptr": "*fp32", "mean_ptr": "*fp32", "std_ptr": "*fp32", "edges_ptr": "*fp32",
                   "scores_ptr": "*fp32", "levels_ptr": "*i8", "N": "i32", "H": "i32", "K": "i32", "n_edges": "i32",
                   "eps": "fp32", "HAS_BIAS": "constexpr", "HAS_EDGES": "constexpr",
                   "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_H": "constexpr"}
            consts = {"HAS_BIAS": has_bias, "HAS_EDGES": has_edges, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_H": bh}
            k = triton.compile(triton.compiler.ASTSource(fn=reward_head_kernel, signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", cc, 32))
            assert "ld.global" in k.asm["ptx"], cc
            print("compiled", cc, dtype)
""")


def test_triton_kernel_compiles_for_sm80_and_sm90():
    """The kernel lowers to PTX/cubin for Ampere and Hopper (catches GPU-only compile errors)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("compiled") == 4
