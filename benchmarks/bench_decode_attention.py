"""Decode attention of PrefixCache (T=1 per row): the fused C++ kernel vs the torch path.

Shapes of SmolLM2-135M (9 query heads, 3 kv heads, head_dim 64, fp32), R rows in {32, 96, 256}
over R/8 prompts of ~Lp tokens (Lp in {40, 140}; each prompt's length uniform in [Lp/2, Lp]),
each row's suffix offset uniform in 2..50 (rows of one prompt adjacent, as the engine orders
them). One timed call = PrefixCache.attend on each of 8 layers (distinct K/V per layer, so the
keys stream from memory as in a real forward; per-forward preparation is paid at layer 0);
the table's ms are per layer. Providers, timed interleaved in one run:
  ctrlsafe fused   PrefixCache.attend on CPU, T=1: csrc/decode_attention.cpp (one call per layer)
  torch path       the same with PrefixCache.backend = "reference": index_put of the new K/V,
                   suffix and prefix partial attentions, log-sum-exp merge
GB/s counts the K/V bytes a row set attends over once (prefix once per prompt, suffix per row).

    python -m ctrlsafe.benchmarks.bench_decode_attention [--quick]
"""
from __future__ import annotations

import torch

from ctrlsafe import _C
from ctrlsafe.benchmark import Row, compare, main
from ctrlsafe.kv_cache import PrefixCache
from ctrlsafe.model import ModelArgs

HQ, HKV, D, LAYERS, LS = 9, 3, 64, 8, 64
FULL = [(R, Lp) for Lp in (40, 140) for R in (32, 96, 256)]
QUICK = [(32, 40), (96, 140)]


def setup(R: int, Lp: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    P = max(1, R // 8)
    lens = torch.randint(Lp // 2, Lp + 1, (P,), generator=g)
    lens[0] = Lp
    row_prefix = torch.arange(R) * P // R  # rows of a prompt adjacent
    offsets = torch.randint(2, 51, (R,), generator=g)
    args = ModelArgs(vocab_size=8, hidden_size=HQ * D, num_hidden_layers=LAYERS, num_attention_heads=HQ,
                     num_key_value_heads=HKV, intermediate_size=8, head_dim=D)
    pk = [torch.randn(P, HKV, Lp, D, generator=g).to(dtype) for _ in range(LAYERS)]
    pv = [torch.randn(P, HKV, Lp, D, generator=g).to(dtype) for _ in range(LAYERS)]
    caches = []
    for backend in (None, "reference"):
        c = PrefixCache(args, pk, pv, lens, row_prefix, LS)
        for i, store in enumerate((c.k, c.v)):
            for layer, t in enumerate(store):
                if caches:  # the same row K/V in both caches
                    t.copy_((caches[0].k, caches[0].v)[i][layer])
                else:
                    t.copy_(torch.randn(t.shape, generator=g).to(dtype))
        c.backend = backend
        c.slots = torch.arange(R)
        caches.append(c)
    positions = (lens[row_prefix] + offsets)[:, None]
    q = torch.randn(R, 1, HQ, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(R, 1, HKV, D, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(R, 1, HKV, D, generator=g).to(dtype).transpose(1, 2)
    kv_bytes = 2 * HKV * D * q.element_size() * (int(lens.sum()) + int((offsets + 1).sum()))
    return caches, (q, k, v, positions), kv_bytes


def step(cache, q, k, v, positions):
    for layer in range(LAYERS):
        cache.attend(layer, q, k, v, positions)


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    if device != "cpu":
        print("decode attention: CPU only")
        return []
    isa = _C.decode_attention_isa()
    print(f"fused kernel ISA path: {isa}; OpenMP threads: {_C.num_threads()}")
    rows = []
    for R, Lp in QUICK if quick else FULL:
        for dtype in (torch.float32, torch.bfloat16) if not quick else (torch.float32,):
            (fused, ref), inputs, kv_bytes = setup(R, Lp, dtype)
            with torch.no_grad():
                a = fused.attend(0, *inputs)
                b = ref.attend(0, *inputs)
            err = float((a.float() - b.float()).abs().max())
            fns = {"ctrlsafe fused": lambda: step(fused, *inputs), "torch path": lambda: step(ref, *inputs)}
            name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
            out = compare("decode attention", f"R{R} Lp{Lp} Hq{HQ}/{HKV} D{D}", name, fns, reference="torch path",
                          bytes_moved=kv_bytes * LAYERS, work_items=R * LAYERS, unit="row-layers/s",
                          reps=5 if quick else 9)
            for r in out:  # per layer
                r.median_ms, r.p20_ms, r.p80_ms = r.median_ms / LAYERS, r.p20_ms / LAYERS, r.p80_ms / LAYERS
                r.extra.update(isa=isa, max_abs_diff=err, layers_per_call=LAYERS)
            rows += out
            by = {r.provider: r for r in out}
            print(f"R{R} Lp{Lp} {name}: fused {by['ctrlsafe fused'].median_ms * 1e3:.0f} us/layer, torch "
                  f"{by['torch path'].median_ms * 1e3:.0f} us/layer -> {by['ctrlsafe fused'].speedup_vs_reference:.1f}x "
                  f"(max |diff| {err:.1e})")
    return rows


if __name__ == "__main__":
    main(run)
