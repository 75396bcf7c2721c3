"""PrefixCache: shared-prompt attention equals recomputing each row's full sequence alone."""
import torch

from ctrlsafe.kv_cache import PrefixCache, _attention_lse, merge_attention, partial_attention
from ctrlsafe.model import ModelArgs, Transformer


def tiny_model(seed=0):
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=48, head_dim=8)
    model = Transformer(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_merge_of_partials_equals_full_attention():
    """Splitting the keys in two and merging by log-sum-exp gives full softmax attention."""
    q, k, v = torch.randn(3, 4, 5, 8), torch.randn(3, 2, 11, 8), torch.randn(3, 2, 11, 8)
    full, _ = partial_attention(q, k, v, torch.ones(3, 5, 11, dtype=torch.bool))
    a = partial_attention(q, k[:, :, :4], v[:, :, :4], torch.ones(3, 5, 4, dtype=torch.bool))
    b = partial_attention(q, k[:, :, 4:], v[:, :, 4:], torch.ones(3, 5, 7, dtype=torch.bool))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.allclose(merge_attention(*a, *b), full, atol=1e-5)
    assert torch.allclose(full, ref, atol=1e-5)


def test_native_dtype_attention_is_within_bf16_rounding():
    """The GPU form (wide=False: bf16 matmuls, fp32 softmax) on bf16 q/k/v of odd sizes (M 1, 7;
    L 1, 33) stays within bf16 rounding of the widened (fp32) form, returns fp32, and gives a row that
    attends to nothing lse -inf and output 0."""
    g = torch.Generator().manual_seed(0)
    for M, L in ((1, 1), (7, 33)):
        q, k, v = (torch.randn(2, 3, n, 16, generator=g).bfloat16() for n in (M, L, L))
        mask = torch.rand(2, 1, M, L, generator=g) < 0.7
        mask[..., 0] = True
        mask[1, 0, 0] = False  # a query with no key at all
        out, lse = _attention_lse(q, k, v, mask, wide=False)
        ref_out, ref_lse = (t.double() for t in _attention_lse(q.double(), k.double(), v.double(), mask))
        assert out.dtype == lse.dtype == torch.float32
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and bool((out[1, :, 0] == 0).all())
        fin = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=0.05, rtol=0.02)
        torch.testing.assert_close(out.double(), ref_out, atol=0.03, rtol=0.03)


def test_prefix_shared_rows_equal_full_forward():
    """Rows of different prompts (lengths 3, 9, 1) with suffixes prefilled then decoded one token
    at a time give the logits of a plain forward over prompt + suffix, and each prompt's KV is
    stored once (prefix storage scales with prompts, not rows)."""
    model = tiny_model()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11]]
    row_prefix = torch.tensor([0, 0, 1, 1, 1, 2])
    suffixes = torch.randint(0, 53, (6, 6))
    with torch.no_grad():
        cache = PrefixCache.from_prompts(model, prompts, row_prefix, suffix_capacity=8)
        slots = torch.arange(6)
        cache.slots = slots
        out = [model(suffixes[:, :2], cache.suffix_positions(slots, torch.arange(2).expand(6, 2)), cache)]
        for t in range(2, 6):
            out.append(model(suffixes[:, t : t + 1], cache.suffix_positions(slots, torch.full((6, 1), t)), cache))
        got = torch.cat(out, 1)
        for r in range(6):
            seq = torch.tensor([prompts[row_prefix[r]] + suffixes[r].tolist()])
            expected = model(seq)[0, -6:]
            assert (got[r] - expected).abs().max() < 1e-4, r
    sizes = cache.storage_bytes()
    assert sizes["prefix"] == 2 * 2 * 3 * 2 * 9 * 8 * 4  # K,V x layers x P prompts x Hkv x Lp x D x fp32


def test_subset_of_slots_decodes_independently():
    """Running a forward on some slots only leaves the other slots' cache untouched."""
    model = tiny_model(1)
    with torch.no_grad():
        cache = PrefixCache.from_prompts(model, [[3, 4]], torch.zeros(3, dtype=torch.long), 4)
        cache.slots = torch.tensor([1])
        before = cache.k[0][[0, 2]].clone()
        model(torch.tensor([[7]]), cache.suffix_positions(cache.slots, torch.zeros(1, 1, dtype=torch.long)), cache)
        assert torch.equal(cache.k[0][[0, 2]], before)
        assert cache.k[0][1, :, 0].abs().sum() > 0


def test_unsorted_slots_over_some_prompts_equal_full_forward():
    """Rows given in any order, covering only some prompts (unequal rows per prompt, so the
    per-prompt query grid has padding cells), still get the plain forward's logits."""
    model = tiny_model(2)
    prompts = [[5, 6, 7, 8], [1, 2], [9, 10, 11, 12, 13, 14, 15], [4]]
    row_prefix = torch.tensor([0, 2, 2, 3, 2, 0, 1])
    suffixes = torch.randint(0, 53, (7, 3))
    slots = torch.tensor([4, 0, 1, 6])  # prompts 2, 0, 2, 1: prompt 3 absent, prompt 2 twice
    with torch.no_grad():
        cache = PrefixCache.from_prompts(model, prompts, row_prefix, suffix_capacity=3)
        cache.slots = slots
        got = torch.cat([model(suffixes[slots, t : t + 1], cache.suffix_positions(slots, torch.full((4, 1), t)), cache) for t in range(3)], 1)
        for i, r in enumerate(slots.tolist()):
            expected = model(torch.tensor([prompts[row_prefix[r]] + suffixes[r].tolist()]))[0, -3:]
            assert (got[i] - expected).abs().max() < 1e-4, r


def test_compact_keeps_live_rows_decoding():
    """compact(keep) moves the kept rows' suffix K/V to the front slots; decoding them further
    gives the plain forward's logits, as if the dropped rows had never been there."""
    model = tiny_model(3)
    prompts = [[5, 6, 7], [8, 9]]
    row_prefix = torch.tensor([0, 0, 1, 1, 1])
    suffixes = torch.randint(0, 53, (5, 4))
    with torch.no_grad():
        cache = PrefixCache.from_prompts(model, prompts, row_prefix, suffix_capacity=4)
        cache.slots = torch.arange(5)
        model(suffixes[:, :2], cache.suffix_positions(cache.slots, torch.arange(2).expand(5, 2)), cache)
        keep = torch.tensor([4, 1])
        cache.compact(keep)
        assert torch.equal(cache.slots, torch.arange(2)) and cache.row_prefix[:2].tolist() == [1, 0]
        got = model(suffixes[keep, 2:], cache.suffix_positions(cache.slots, torch.arange(2, 4).expand(2, 2)), cache)
        for i, r in enumerate(keep.tolist()):
            expected = model(torch.tensor([prompts[row_prefix[r]] + suffixes[r].tolist()]))[0, -2:]
            assert (got[i] - expected).abs().max() < 1e-4, r


def test_static_shapes_decode_equals_dynamic_and_reads_nothing_back(monkeypatch):
    """static_shapes (what CUDA-graph capture needs): attending over the whole suffix capacity,
    masked, gives the logits of the step-sized path, and a decode forward then reads nothing
    back from the device once the slot groups are built (torch path, the one CUDA runs)."""
    from conftest import HostReads

    monkeypatch.setattr(PrefixCache, "backend", "reference")
    model = tiny_model(1)
    prompts, row_prefix = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]], torch.tensor([0, 1, 1, 0, 1])
    tokens = torch.randint(0, 53, (5, 6), generator=torch.Generator().manual_seed(0))
    runs = []
    with torch.no_grad():
        for static in (False, True):
            cache = PrefixCache.from_prompts(model, prompts, row_prefix, suffix_capacity=11)
            cache.static_shapes = static
            cache.slots = slots = torch.arange(5)
            steps, reads = [], []
            for t in range(6):
                with HostReads() as r:
                    steps.append(model(tokens[:, t : t + 1], cache.suffix_positions(slots, torch.full((5, 1), t)), cache))
                reads.append(r.count)
            runs.append((torch.cat(steps, 1), reads))
    (dynamic, _), (static, reads) = runs
    torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=1e-5)
    assert reads[1:] == [0] * 5, reads
