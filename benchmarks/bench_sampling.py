"""Sampling: ctrlsafe's fused sampler vs sort-based samplers, at the shapes of LLM decoding.

Logits: fp32 [B, V], N(0, 3^2) per entry (seed 0; real LLM logits have a similar spread), for
B in {1, 8, 64, 256} x V in {32000, 128256}. Two parameter sets:
  (a) temperature 0.8 + top_k 50 + top_p 0.9     (b) top_p 0.9 alone (temperature 1)
  (flat) top_p 0.9 alone at temperature 0.8 on N(0, 1) logits (issue 17: a flat distribution)
Providers, all timed interleaved in one run:
  ctrlsafe cpu   ctrlsafe.sampling.sample(..., backend="cpu"): the C++ kernel (no sort)
  reference      the same API on the float64 sort-based oracle
  vllm-sort      vLLM's torch path (apply_top_k_top_p: full sort, masks, scatter back, softmax,
                 exponential race), written out below
  transformers   TemperatureLogitsWarper / TopKLogitsWarper / TopPLogitsWarper + softmax + multinomial
  topk           (a) only: torch.topk(k) then top-p on the k values and multinomial
  read           logits.amax(-1): one read of the logits, the physical limit of any sampler
GB/s is one read of the logits (B*V*4 bytes) / median time for every provider. After the table,
one line per case gives ctrlsafe's fraction of the plain read's bandwidth and its ratio to each
provider (the targets: issue 3, and issue 17 for flat), and on the CPU which top-p path its rows
took (flat: subsample bracket; candidates: bound + compaction as the masses are computed). The
run starts with the code the C++ kernel runs here (target clone, compaction path:
CTRLSAFE_NO_AVX512=1 / CTRLSAFE_NO_AVX2=1 narrow it).

    python -m ctrlsafe.benchmarks.bench_sampling [--quick]
"""
from __future__ import annotations

import torch

from ctrlsafe import _C
from ctrlsafe.benchmark import Row, compare, main
from ctrlsafe.sampling import sample

FULL_SHAPES = [(B, V) for V in (32000, 128256) for B in (1, 8, 64, 256)]
QUICK_SHAPES = [(1, 32000), (64, 32000)]
CASES = {"a": dict(temperature=0.8, top_k=50, top_p=0.9), "b": dict(temperature=1.0, top_k=0, top_p=0.9),
         "flat": dict(temperature=0.8, top_k=0, top_p=0.9)}
# logits std per case: "flat" is top-p alone on N(0, 1) logits (issue 17: most of the row near the cut)
STD = {"a": 3.0, "b": 3.0, "flat": 1.0}


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """vLLM's torch implementation (vllm/v1/sample/ops/topk_topp_sampler.py)."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if k is not None:
        top_k_mask = logits_sort.size(1) - k.to(torch.long)
        top_k_mask = logits_sort.gather(1, top_k_mask.unsqueeze(dim=1))
        logits_sort.masked_fill_(logits_sort < top_k_mask, -float("inf"))
    if p is not None:
        probs_sort = logits_sort.softmax(dim=-1)
        probs_sum = torch.cumsum(probs_sort, dim=-1, out=probs_sort)
        top_p_mask = probs_sum <= 1 - p.unsqueeze(dim=1)
        top_p_mask[:, -1] = False  # at least one
        logits_sort.masked_fill_(top_p_mask, -float("inf"))
    return logits_sort.scatter(dim=-1, index=logits_idx, src=logits_sort)


def vllm_sample(logits, temperature, k, p):
    logits = apply_top_k_top_p(logits / temperature[:, None], k, p)
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    q = torch.empty_like(probs).exponential_()  # vLLM's exponential race instead of multinomial
    return probs.div_(q).argmax(dim=-1)


def transformers_sample(warpers, logits):
    scores = logits
    for w in warpers:
        scores = w(None, scores)
    return torch.multinomial(scores.softmax(-1), 1).squeeze(1)


def topk_sample(logits, temperature: float, k: int, p: float):
    values, ids = torch.topk(logits, k, dim=-1)  # sorted, largest first
    probs = (values / temperature).softmax(-1)
    drop = probs.cumsum(-1) - probs >= p  # mass before a value already reaches top_p
    probs = probs.masked_fill(drop, 0.0)
    return ids.gather(1, torch.multinomial(probs, 1)).squeeze(1)


def case_rows(case: str, B: int, V: int, reps: int, device: str) -> list[Row]:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    params = CASES[case]
    T, k, p = params["temperature"], params["top_k"], params["top_p"]
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, V, generator=g) * STD[case]).to(device)
    t_rows, p_rows = torch.full((B,), T, device=device), torch.full((B,), p, device=device)
    k_rows = torch.full((B,), k, device=device) if k else None
    warpers = [TemperatureLogitsWarper(T)] + ([TopKLogitsWarper(k)] if k else []) + [TopPLogitsWarper(p)]
    step = iter(range(1 << 62))
    fns = {
        "ctrlsafe cpu": lambda: sample(logits, **params, seed=0, step=next(step), backend="cpu"),
        "reference": lambda: sample(logits, **params, seed=0, step=next(step), backend="reference"),
        "vllm-sort": lambda: vllm_sample(logits, t_rows, k_rows, p_rows),
        "transformers": lambda: transformers_sample(warpers, logits),
    }
    if k:
        fns["topk"] = lambda: topk_sample(logits, T, k, p)
    fns["read"] = lambda: logits.amax(-1)
    before = _C.sampling_counters()  # only the ctrlsafe cpu provider runs the C++ kernel
    rows = compare(f"sampling ({case})", f"B{B} V{V}", "fp32", fns, reference="reference", bytes_moved=B * V * 4,
                   work_items=B, unit="rows/s", reps=reps, device=device)
    by = {r.provider: r for r in rows}
    ours, read = by["ctrlsafe cpu"], by["read"]
    paths = {k: v - before[k] for k, v in _C.sampling_counters().items()}
    if device == "cpu":
        ours.extra["isa"] = _C.sampling_isa()
        ours.extra["top_p_paths"] = paths
    for r in rows:
        r.extra["fraction_of_plain_read"] = r.gbps / read.gbps
        r.extra["ctrlsafe_speedup"] = r.median_ms / ours.median_ms
    ratios = ", ".join(f"{r.extra['ctrlsafe_speedup']:.1f}x {name}" for name, r in by.items() if r is not ours and name != "read")
    top_p_rows = sum(paths.values())
    path_note = ("; top-p rows: " + ", ".join(f"{100 * v / top_p_rows:.0f}% {k}" for k, v in paths.items() if v)
                 if device == "cpu" and top_p_rows else "")
    print(f"({case}) B{B} V{V}: ctrlsafe {ours.median_ms:.3f} ms = {ours.gbps:.1f} GB/s = "
          f"{100 * ours.extra['fraction_of_plain_read']:.0f}% of a plain read ({read.gbps:.1f} GB/s); faster than: {ratios}"
          f"{path_note}")
    return rows


def _repeat(fn, times: int) -> None:
    for _ in range(times):
        fn()


def overhead_rows(reps: int) -> list[Row]:
    """What the Python API adds to one B=1, V=32000 call of (a): sample() against the C++ kernel
    called directly with its outputs allocated beforehand (issue 3: under 20 microseconds)."""
    from ctrlsafe import _C

    T, k, p = (CASES["a"][n] for n in ("temperature", "top_k", "top_p"))
    logits = torch.randn(1, 32000, generator=torch.Generator().manual_seed(0)) * 3
    out = torch.empty(1, dtype=torch.int64), torch.empty(1), torch.empty(1, dtype=torch.bool)
    ptrs = [t.data_ptr() for t in out]
    fns = {
        "sample()": lambda: sample(logits, temperature=T, top_k=k, top_p=p, seed=0, step=1),
        "kernel alone": lambda: _C.sample_rows(logits.data_ptr(), 0, 1, 32000, 32000, 0, T, 0, k, 0, p, 0, 0.0, 0, 0.5, *ptrs),
    }
    # one call is ~40 us: many interleaved repetitions, each the mean of 100 calls whose outputs
    # are dropped as a decode loop drops them (a list holding 300 tensors adds their GC to the API)
    many = {name: (lambda f=f: _repeat(f, 100)) for name, f in fns.items()}
    rows = compare("sampling call", "B1 V32000 (a)", "fp32", many, reference="kernel alone", work_items=100, unit="calls/s",
                   reps=reps)
    api, kernel = rows
    overhead_us = (api.median_ms - kernel.median_ms) * 10  # ms per 100 calls -> us per call
    api.extra["overhead_us"] = overhead_us
    print(f"call overhead at B1 V32000: sample() {api.median_ms * 10:.1f} us - kernel {kernel.median_ms * 10:.1f} us "
          f"= {overhead_us:.1f} us per call (target < 20 us)")
    return rows


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    shapes, reps = (QUICK_SHAPES, 3) if quick else (FULL_SHAPES, 5)
    if device == "cpu":
        print(f"C++ sampling kernel on this CPU: {_C.sampling_isa()}")
    rows = overhead_rows(reps * 4) if device == "cpu" else []
    for B, V in shapes:
        for case in CASES:
            rows += case_rows(case, B, V, reps, device)
    print("targets (issue 3): B64 V128256 >= 25% of the plain read, (a) >= 1.5x topk, (b) >= 50x vllm-sort; "
          "B1 not slower than topk; (flat) >= 50x vllm-sort (issue 17)")
    return rows


if __name__ == "__main__":
    main(run)
