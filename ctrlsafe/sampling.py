"""The embeddable sampler: `sample(logits, temperature=..., top_k=..., ..., seed=..., step=...)`.

Every parameter is a scalar or a per-row tensor [B] (FlashInfer-style). Randomness is
counter-based: row r at step s draws the uniform `counter_uniforms(seed[r], s)`, so a row's
token never depends on which other rows share its batch, on B, or on the implementation.

Log-probabilities (one meaning for every row and every backend):
  - `SampleOutput.logprobs`: log P(sample() returns this token), over the row's uniform: the
    log-probability of the token under the processed distribution it was drawn from (logits / T,
    then top-k, top-p, min-p, renormalised; `processed_logprobs` gives that whole distribution).
    Greedy rows (T = 0) choose deterministically, so their logprob is 0.
  - `SampleOutput.raw_logprobs` (with `raw_logprobs=True`): log_softmax(logits)[token] of the
    logits as given (no temperature, no filter), for greedy and sampled rows alike.
  Invalid rows get NaN in both.

FlashInfer-compatible entry points: `top_k_top_p_sampling_from_logits`,
`top_k_top_p_sampling_from_probs`, `top_p_sampling_from_probs` (same arguments, int32 ids).
This module imports torch only (never transformers; its adapters are in ctrlsafe.hf_sampling).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from . import _C
from .ops.sampling import invalid_rows, kept_masses, sample_rows

_M32 = 0xFFFFFFFF


class SampleOutput(NamedTuple):
    tokens: torch.Tensor  # [B] int64, -1 where invalid
    # [B] fp32: log P(sample() returns the token): its log-probability under the processed
    # (tempered, top-k/top-p/min-p filtered, renormalised) distribution; 0 for greedy rows
    logprobs: torch.Tensor
    valid: torch.Tensor  # [B] bool, False for rows with NaN / +inf / all -inf logits
    # [B] fp32 log_softmax(logits)[token] (untempered, unfiltered), or None unless raw_logprobs=True
    raw_logprobs: torch.Tensor | None = None


def sample(
    logits: torch.Tensor,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seed=None,
    step=0,
    uniforms: torch.Tensor | None = None,
    raw_logprobs: bool = False,
    backend: str | None = None,
) -> SampleOutput:
    """Sample one token per row of `logits` [B,V] (fp32, fp16 or bf16).

    temperature 0 = greedy; top_k 0, top_p 1, min_p 0 = off. `seed` (scalar or [B] int) and
    `step` (scalar or [B] int) key the counter-based RNG; seed=None draws seeds from torch's
    global generator. `uniforms` [B] in [0,1) replaces the RNG (tests, custom streams).

    Returns SampleOutput(tokens, logprobs, valid, raw_logprobs). `logprobs` is the log of the
    probability that this call returns the token: log q(token) for the processed distribution
    q = `processed_logprobs(...).exp()` the row was drawn from, 0 for greedy rows (the
    T -> 0 limit away from ties). `raw_logprobs=True` also returns log_softmax(logits)[token]
    (the model's own log-probability, one extra pass over the logits); otherwise it is None.
    """
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [B, V] with V >= 1, got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits dtype {logits.dtype} is not supported; allowed: float32, float16, bfloat16")
    B, device = logits.shape[0], logits.device
    # Numbers stay numbers (validated in Python, broadcast by the kernel): a B=1 decode step
    # then costs no tensor allocations beyond the outputs.
    temperature, top_k, top_p, min_p = _filters(temperature, top_k, top_p, min_p, B, device)
    if uniforms is None:
        if seed is None:
            seed = torch.randint(0, 2**62, (B,), dtype=torch.int64, device=device)
        seed = _param("seed", seed, B, torch.int64, device, None, "a 64-bit integer")
        step = _param("step", step, B, torch.int64, device, None, "a 64-bit integer")
        uniforms = counter_uniforms(seed, step)
    else:
        uniforms = _param("uniforms", uniforms, B, torch.float32, device, lambda u: (u >= 0) & (u < 1), "in [0, 1)")
    tokens, logprobs, valid = sample_rows(logits, temperature, top_k, top_p, min_p, uniforms, backend=backend)
    raw = None
    if raw_logprobs:
        x = logits.float()
        raw = x.gather(1, tokens.clamp(min=0)[:, None]).squeeze(1) - torch.logsumexp(x, -1)
        raw = torch.where(valid, raw, torch.full_like(raw, float("nan")))
    return SampleOutput(tokens, logprobs, valid, raw)


@torch.no_grad()
def processed_logprobs(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """log q [B,V] fp32 of the distribution `sample` draws each row from with these parameters
    (same rules and validation): log_softmax(logits / T) of the tempered top-k survivors,
    filtered by top-p and min-p and renormalised; -inf outside the kept set. Greedy rows (T = 0):
    0 at the argmax (lowest id on ties), -inf elsewhere. Invalid rows: NaN. `sample`'s
    `logprobs` is this at its token. Sort-based, in float64 (the reference's kept set)."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [B, V] with V >= 1, got shape {tuple(logits.shape)}")
    B, device = logits.shape[0], logits.device
    temperature, top_k, top_p, min_p = _filters(temperature, top_k, top_p, min_p, B, device)
    x = logits.double()
    invalid = invalid_rows(x)
    x = torch.where(invalid[:, None], torch.zeros_like(x), x)
    q = kept_masses(x, temperature, top_k, top_p, min_p)
    out = (q / q.sum(-1, keepdim=True)).log()
    greedy = temperature == 0 if isinstance(temperature, torch.Tensor) else torch.full((B,), temperature == 0, device=device)
    point = torch.full_like(out, float("-inf")).scatter_(1, x.argmax(-1, keepdim=True), 0.0)
    out = torch.where(greedy[:, None], point, out)
    return out.masked_fill(invalid[:, None], float("nan")).float()


# -- FlashInfer-compatible entry points ---------------------------------------------------------

def top_k_top_p_sampling_from_logits(logits, top_k, top_p, indices=None, filter_apply_order="top_k_first",
                                     deterministic=True, generator=None, check_nan=False, seed=None, offset=None,
                                     *, backend=None):
    """flashinfer.sampling.top_k_top_p_sampling_from_logits on ctrlsafe's sampler.

    logits [R,V] pre-softmax (fp32/fp16/bf16, no temperature applied here); top_k (int, 0 or
    >= V = off) and top_p (float, 1 = off) are scalars or one per output [B]; `indices` [B]
    (int32/int64) maps output i to logits row indices[i] (default: B = R, row i); returns the
    sampled ids [B] int32 (-1 for a row with NaN / +inf / all -inf logits). Only
    filter_apply_order="top_k_first" (top-p on the renormalised top-k survivors) is supported.
    The sampler is always deterministic (`deterministic` is accepted and ignored).

    Randomness: output i uses ctrlsafe's counter RNG with its own seed. With `generator` (a
    torch.Generator) the B seeds are drawn from it (advancing it, as FlashInfer advances its
    Philox offset), so a seeded generator reproduces the draws; with `seed` they are drawn from
    torch.Generator().manual_seed(seed) and `offset` is the counter step (same seed, new offset:
    fresh draws); with neither, from torch's global generator.
    """
    if filter_apply_order != "top_k_first":
        raise ValueError(f"filter_apply_order={filter_apply_order!r} is not supported; allowed: 'top_k_first'")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if check_nan and bool(torch.isnan(logits).any()):
        raise ValueError("Input logits contains NaN.")
    if indices is not None:
        if indices.dim() != 1 or indices.is_floating_point() or indices.dtype is torch.bool:
            raise ValueError(f"indices must be a 1-D integer tensor, got shape {tuple(indices.shape)} dtype {indices.dtype}")
        indices = indices.to(logits.device, torch.int64)
        if indices.numel() and not bool(((indices >= 0) & (indices < logits.shape[0])).all()):
            raise ValueError(f"indices must be in [0, {logits.shape[0]}) (rows of logits)")
        logits = logits.index_select(0, indices)
    B = logits.shape[0]
    step = 0 if offset is None else offset
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    seeds = None
    if generator is not None:
        seeds = torch.randint(0, 2**62, (B,), dtype=torch.int64, generator=generator, device=generator.device).to(logits.device)
    return sample(logits, top_k=top_k, top_p=top_p, seed=seeds, step=step, backend=backend).tokens.to(torch.int32)


def top_k_top_p_sampling_from_probs(probs, top_k, top_p, indices=None, filter_apply_order="top_k_first",
                                    deterministic=True, generator=None, check_nan=False, seed=None, offset=None,
                                    *, backend=None):
    """flashinfer.sampling.top_k_top_p_sampling_from_probs: as the `_from_logits` form on
    log(probs) (same kept set and distribution: top-k by probability, top-p on the
    renormalised survivors; rows need not sum to 1)."""
    if check_nan and bool(torch.isnan(probs).any()):
        raise ValueError("Input probs contains NaN.")
    return top_k_top_p_sampling_from_logits(probs.log(), top_k, top_p, indices, filter_apply_order, deterministic,
                                            generator, False, seed, offset, backend=backend)


def top_p_sampling_from_probs(probs, top_p, indices=None, deterministic=True, generator=None, check_nan=False,
                              seed=None, offset=None, *, backend=None):
    """flashinfer.sampling.top_p_sampling_from_probs: top-p (nucleus) sampling from probabilities."""
    return top_k_top_p_sampling_from_probs(probs, 0, top_p, indices, "top_k_first", deterministic, generator,
                                           check_nan, seed, offset, backend=backend)


def counter_uniforms(seed, step):
    """One uniform in [0,1) per row from (seed, step): murmur3's fmix32 chained over the 32-bit
    words (seed_lo, seed_hi, step_lo, step_hi) of their 64-bit two's complement, top 24 bits of
    the result / 2^24.

    Pure function of its inputs on any device (C++ on the CPU, one Triton kernel on CUDA, torch
    ops elsewhere). Takes [B] int tensors (returns fp32 [B]) or Python ints (returns a float,
    the same value).
    """
    tensors = [v for v in (seed, step) if isinstance(v, torch.Tensor)]
    if not tensors:
        return _C.counter_uniform(_int64(seed), _int64(step))
    device = next((t.device for t in tensors if t.device.type != "cpu"), None)
    if device is not None:
        seed, step = (torch.as_tensor(_int64(v) if isinstance(v, int) else v, device=device).to(torch.int64) for v in (seed, step))
        if device.type == "cuda":  # one launch instead of ~90 elementwise ops
            from .kernels.counter_rng import counter_uniforms as fused

            return fused(seed, step)
        return _counter_uniforms_torch(*torch.broadcast_tensors(seed, step))
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    args, keep = [], []  # a Python int stays one value for every row (the usual step)
    for v in (seed, step):
        if isinstance(v, torch.Tensor):
            keep.append(v.to(torch.int64).expand(shape).contiguous())
            args += (keep[-1].data_ptr(), 0)
        else:
            args += (0, _int64(v))
    out = torch.empty(shape, dtype=torch.float32)
    _C.counter_uniforms(*args, out.numel(), out.data_ptr())
    return out


def _int64(v: int) -> int:
    """v's low 64 bits as a signed integer (the words the hash reads)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _counter_uniforms_torch(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """counter_uniforms in torch ops, with 16-bit limb multiplies so no int64 product overflows."""
    h = torch.full_like(seed, 0x9E3779B9)
    for word in (seed & _M32, (seed >> 32) & _M32, step & _M32, (step >> 32) & _M32):
        h = _fmix32(h ^ word)
    return ((h >> 8).to(torch.float32) * (1.0 / (1 << 24))).to(torch.float32)


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    return ((x & 0xFFFF) * c + (((x >> 16) * (c & 0xFFFF)) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mulmod32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mulmod32(h, 0xC2B2AE35)
    return h ^ (h >> 16)




def _filters(temperature, top_k, top_p, min_p, B, device):
    """The four sampling parameters checked (numbers stay numbers, tensors become [B])."""
    return (_param("temperature", temperature, B, torch.float32, device, lambda t: (t >= 0) & (t < float("inf")), ">= 0"),
            _param("top_k", top_k, B, torch.int64, device, lambda k: k >= 0, ">= 0 (0 = off)"),
            _param("top_p", top_p, B, torch.float32, device, lambda p: (p > 0) & (p <= 1), "in (0, 1]"),
            _param("min_p", min_p, B, torch.float32, device, lambda p: (p >= 0) & (p <= 1), "in [0, 1]"))


def _param(name, value, B, dtype, device, ok, allowed):
    """A validated parameter: a Python number, or a [B] tensor of `dtype` on `device`. ok(value)
    says which values are allowed (None: any value of the dtype)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.item()
        else:
            if value.shape != (B,):
                raise ValueError(f"{name} must be a scalar or shape [{B}] (one per row), got shape {tuple(value.shape)}")
            if not dtype.is_floating_point and value.is_floating_point():
                raise ValueError(f"{name} must be an integer (tensor), got dtype {value.dtype}")
            value = value.to(device, dtype)
            if ok is None:  # every value of the dtype is allowed: no host read (the decode loop's seeds)
                return value.contiguous()
            good = ok(value)
            if not bool(good.all()):
                row = int((~good).nonzero()[0, 0])
                raise ValueError(f"{name}[{row}] = {value[row].item()} is invalid; allowed: {allowed}")
            return value.contiguous()
    kind = type(value)
    if kind is not float and kind is not int:  # plain numbers skip the slower ABC checks
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a number or a [{B}] tensor, got {type(value).__name__}")
        kind = int if isinstance(value, numbers.Integral) else float
    if not dtype.is_floating_point and kind is not int:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = float(value) if dtype.is_floating_point else int(value)
    if not dtype.is_floating_point and not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} = {value} does not fit a 64-bit integer")
    if ok is not None and not ok(value):
        raise ValueError(f"{name} = {value} is invalid (all rows); allowed: {allowed}")
    return value
