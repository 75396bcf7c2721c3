"""The fused T=1 decode attention of PrefixCache (csrc/decode_attention.cpp) against the torch
path of PrefixCache.attend (the reference, forced with PrefixCache.backend = "reference")."""
import itertools
import math

import pytest
import torch

from ctrlsafe import _C
from ctrlsafe.generate import Engine, SamplingParams
from ctrlsafe.kv_cache import PrefixCache
from ctrlsafe.model import ModelArgs, Transformer

LAYERS = 2


def make_cache(prefix_lens, row_prefix, Hq, Hkv, D, Ls, dtype=torch.float32, seed=0, pad=0.0, scale=1.0):
    """A PrefixCache over random prefix and row K/V (storage beyond each prompt's length is `pad`)."""
    g = torch.Generator().manual_seed(seed)
    args = ModelArgs(vocab_size=11, hidden_size=Hq * D, num_hidden_layers=LAYERS, num_attention_heads=Hq,
                     num_key_value_heads=Hkv, intermediate_size=8, head_dim=D)
    P, Lp = len(prefix_lens), max(prefix_lens)
    pk, pv = [], []
    for _ in range(LAYERS):
        for store in (pk, pv):
            t = torch.randn(P, Hkv, Lp, D, generator=g) * scale
            for p, n in enumerate(prefix_lens):
                t[p, :, n:] = pad
            store.append(t.to(dtype))
    cache = PrefixCache(args, pk, pv, torch.as_tensor(prefix_lens), torch.as_tensor(row_prefix), Ls)
    for store in (cache.k, cache.v):
        for t in store:
            t.copy_((torch.randn(t.shape, generator=g) * scale).to(dtype))
    return cache


def clone(cache: PrefixCache) -> PrefixCache:
    other = PrefixCache.__new__(PrefixCache)
    other.__dict__.update(cache.__dict__)
    for name in ("prefix_k", "prefix_v", "k", "v"):
        setattr(other, name, [t.clone() for t in getattr(cache, name)])
    other.row_prefix = cache.row_prefix.clone()
    other._step = other._fused = None
    return other


def decode_both(cache, slots, offsets, Hq, D, seed=1, dtype=torch.float32, scale=1.0, layers=LAYERS):
    """One T=1 step on every layer, fused and reference, on two copies of `cache`: the outputs
    and the caches after the step."""
    g = torch.Generator().manual_seed(seed)
    R, Hkv = len(slots), cache.k[0].shape[1]
    slots, offsets = torch.as_tensor(slots), torch.as_tensor(offsets)
    positions = cache.prefix_len[cache.row_prefix[slots]][:, None] + offsets[:, None]
    ref = clone(cache)
    ref.backend = "reference"
    outs = []
    for c in (cache, ref):
        c.slots = slots
        outs.append([])
    for layer in range(layers):
        q = (torch.randn(R, 1, Hq, D, generator=g) * scale).to(dtype).transpose(1, 2)  # as the model's view
        k = (torch.randn(R, 1, Hkv, D, generator=g) * scale).to(dtype).transpose(1, 2)
        v = torch.randn(R, 1, Hkv, D, generator=g).to(dtype).transpose(1, 2)
        for c, o in zip((cache, ref), outs):
            o.append(c.attend(layer, q, k, v, positions))
    assert cache._fused[0] and not ref._fused[0]  # the fused kernel ran on one copy only
    return torch.stack(outs[0]), torch.stack(outs[1]), cache, ref


def assert_same_storage(a, b):
    for name in ("k", "v"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            assert torch.equal(x, y), name


SHAPES = list(itertools.product([1, 7, 33], [1, 7, 33, 257], [(1, 1), (3, 1), (9, 3), (8, 8), (8, 1)], [64, 48]))


@pytest.mark.parametrize("R,Lp,heads,D", SHAPES, ids=[f"R{r}-Lp{lp}-H{h[0]}x{h[1]}-D{d}" for r, lp, h, d in SHAPES])
def test_fused_equals_reference(R, Lp, heads, D):
    """Random K/V, rows over up to 3 prompts of different lengths (the longest Lp), suffix
    offsets varied per row (first row's suffix has just the new key)."""
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(R * 1000 + Lp)
    P = min(3, R)
    lens = [Lp] + torch.randint(1, Lp + 1, (P - 1,), generator=g).tolist()
    row_prefix = torch.randint(0, P, (R,), generator=g)
    Ls = 20
    offsets = torch.randint(0, Ls, (R,), generator=g)
    offsets[0] = 0
    cache = make_cache(lens, row_prefix, Hq, Hkv, D, Ls, seed=R + Lp)
    got, want, a, b = decode_both(cache, torch.arange(R), offsets, Hq, D)
    assert got.shape == want.shape == (LAYERS, R, Hq, 1, D) and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert_same_storage(a, b)  # the new K/V landed where the torch path's index_put puts them


def test_different_prompts_unsorted_noncontiguous_slots():
    """A subset of slots in an arbitrary order (rows of 4 prompts interleaved), then again after
    compaction (slots 0..n-1 holding moved rows)."""
    lens, Ls, Hq, Hkv, D = [5, 40, 1, 17], 30, 9, 3, 64
    row_prefix = [0, 1, 2, 3, 1, 1, 0, 3, 2, 1, 0, 2]
    cache = make_cache(lens, row_prefix, Hq, Hkv, D, Ls)
    slots = [9, 2, 7, 0, 11, 4]
    got, want, a, b = decode_both(cache, slots, [3, 0, 29, 7, 1, 12], Hq, D)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert_same_storage(a, b)
    keep = torch.tensor([11, 0, 4, 7])
    a.compact(keep)
    got, want, a2, b2 = decode_both(a, a.slots, [5, 8, 2, 28], Hq, D, seed=4)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert_same_storage(a2, b2)


def test_padding_is_never_read():
    """NaN in the prefix padding and in the suffix storage past each row's offset: the fused
    kernel never reads them (the output equals the reference's on zero padding)."""
    lens, row_prefix, Hq, Hkv, D, Ls = [3, 33, 8], [0, 1, 2, 1, 0], 8, 2, 64, 12
    offsets = [0, 4, 11, 2, 7]
    zero = make_cache(lens, row_prefix, Hq, Hkv, D, Ls, pad=0.0)
    nan = make_cache(lens, row_prefix, Hq, Hkv, D, Ls, pad=float("nan"))
    for store in (nan.k, nan.v):
        for t in store:
            for s, off in enumerate(offsets):
                t[s, :, off + 1 :] = float("nan")
    got = decode_both(nan, range(5), offsets, Hq, D)[0]
    want = decode_both(zero, range(5), offsets, Hq, D)[1]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_scores_near_overflow():
    """Scores in the thousands (exp overflows without the max shift) and a softmax nearly one-hot."""
    lens, row_prefix, Hq, Hkv, D, Ls = [50, 7], [0, 1, 0], 6, 2, 64, 16
    cache = make_cache(lens, row_prefix, Hq, Hkv, D, Ls, scale=7.0)
    got, want, *_ = decode_both(cache, range(3), [9, 0, 15], Hq, D, scale=7.0)
    assert torch.isfinite(got).all()
    # scores ~ 49 * 8 * 7 / 8 in size: their fp32 rounding (~1e-4) differs with the summation order
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_non_finite_keys_give_nan_like_the_reference():
    """An infinite key at an attended position: NaN for its kv head's query heads of that row
    (as the reference), the other rows and heads unaffected."""
    lens, row_prefix, Hq, Hkv, D, Ls = [9, 4], [0, 1, 1], 4, 2, 64, 8
    cache = make_cache(lens, row_prefix, Hq, Hkv, D, Ls)
    for t in cache.prefix_k:
        t[1, 0, 2] = float("inf")  # prompt 1, kv head 0, key 2
    got, want, *_ = decode_both(cache, range(3), [1, 3, 5], Hq, D)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isnan(got[:, 1:, :2]).all() and torch.isfinite(got[:, 0]).all() and torch.isfinite(got[:, :, 2:]).all()
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("D", [64, 48])
def test_bf16_storage(D):
    """bf16 cache and activations: both paths widen to fp32; outputs within a bf16 rounding."""
    lens, row_prefix, Hq, Hkv, Ls = [40, 140, 3], [0, 1, 2, 1, 0, 0, 1], 9, 3, 50
    cache = make_cache(lens, row_prefix, Hq, Hkv, D, Ls, dtype=torch.bfloat16)
    got, want, a, b = decode_both(cache, range(7), [0, 1, 49, 20, 2, 33, 5], Hq, D, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
    assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()  # at most ~1 bf16 ulp
    assert_same_storage(a, b)


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv("CTRLSAFE_BACKEND", "reference")
    cache = make_cache([4], [0, 0], 2, 1, 64, 4)
    cache.slots = torch.arange(2)
    q = torch.randn(2, 2, 1, 64)
    k = v = torch.randn(2, 1, 1, 64)
    cache.attend(0, q, k, v, torch.tensor([[4], [5]]))
    assert not cache._fused[0]


def test_offset_out_of_range_raises():
    cache = make_cache([4, 2], [0, 1], 2, 1, 64, 4)
    cache.slots = torch.arange(2)
    q = torch.randn(2, 2, 1, 64)
    k = v = torch.randn(2, 1, 1, 64)
    with pytest.raises(ValueError, match="suffix offset out of range"):
        cache.attend(0, q, k, v, torch.tensor([[4], [2 + 4]]))
    with pytest.raises(ValueError, match="suffix offset out of range"):
        cache.attend(0, q, k, v, torch.tensor([[3], [2]]))


def test_isa_is_reported():
    assert _C.decode_attention_isa()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_fused_equals_reference(monkeypatch, dtype):
    """Engine end to end (prompts of different lengths, suffixes of different lengths, EOS
    retiring rows = compaction): the fused decode gives the reference path's tokens."""
    torch.manual_seed(5)
    args = ModelArgs(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                     intermediate_size=96, head_dim=16, max_position_embeddings=256)
    model = Transformer(args).eval()
    for p in model.parameters():
        p.normal_(0, 0.3)
    model = model.to(dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (2, 23, 9, 40)]
    suffixes = [[4, 5], [], [8, 9, 10]]
    kw = dict(n=2, sampling=SamplingParams(temperature=0.9, top_k=20, top_p=0.9), max_new_tokens=12, seed=7)
    fused = Engine(model, eos_token_ids=[3, 11, 12]).generate(prompts, suffixes, **kw)
    monkeypatch.setattr(PrefixCache, "backend", "reference")
    ref = Engine(model, eos_token_ids=[3, 11, 12]).generate(prompts, suffixes, **kw)
    assert [c.token_ids for c in fused] == [c.token_ids for c in ref]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for a, b in zip(fused, ref):
        assert all(math.isclose(x, y, abs_tol=tol) for x, y in zip(a.logprobs, b.logprobs))
