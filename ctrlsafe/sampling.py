"""The embeddable sampler: `sample(logits, temperature=..., top_k=..., ..., seed=..., step=...)`.

Every parameter is a scalar or a per-row tensor [B] (FlashInfer-style). Randomness is
counter-based: row r at step s draws the uniform `counter_uniforms(seed[r], s)`, so a row's
token never depends on which other rows share its batch, on B, or on the implementation.
This module imports torch only (never transformers).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from . import _C
from .ops.sampling import sample_rows

_M32 = 0xFFFFFFFF


class SampleOutput(NamedTuple):
    tokens: torch.Tensor  # [B] int64, -1 where invalid
    logprobs: torch.Tensor  # [B] fp32, log p(token) under the final (tempered, filtered) distribution
    valid: torch.Tensor  # [B] bool, False for rows with NaN / +inf / all -inf logits


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
    backend: str | None = None,
) -> SampleOutput:
    """Sample one token per row of `logits` [B,V] (fp32, fp16 or bf16).

    temperature 0 = greedy; top_k 0, top_p 1, min_p 0 = off. `seed` (scalar or [B] int) and
    `step` (scalar or [B] int) key the counter-based RNG; seed=None draws seeds from torch's
    global generator. `uniforms` [B] in [0,1) replaces the RNG (tests, custom streams).
    """
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [B, V] with V >= 1, got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits dtype {logits.dtype} is not supported; allowed: float32, float16, bfloat16")
    B, device = logits.shape[0], logits.device
    # Numbers stay numbers (validated in Python, broadcast by the kernel): a B=1 decode step
    # then costs no tensor allocations beyond the outputs.
    temperature = _param("temperature", temperature, B, torch.float32, device, lambda t: (t >= 0) & (t < float("inf")), ">= 0")
    top_k = _param("top_k", top_k, B, torch.int64, device, lambda k: k >= 0, ">= 0 (0 = off)")
    top_p = _param("top_p", top_p, B, torch.float32, device, lambda p: (p > 0) & (p <= 1), "in (0, 1]")
    min_p = _param("min_p", min_p, B, torch.float32, device, lambda p: (p >= 0) & (p <= 1), "in [0, 1]")
    if uniforms is None:
        if seed is None:
            seed = torch.randint(0, 2**62, (B,), dtype=torch.int64, device=device)
        seed = _param("seed", seed, B, torch.int64, device, _fits_int64, "a 64-bit integer")
        step = _param("step", step, B, torch.int64, device, _fits_int64, "a 64-bit integer")
        uniforms = counter_uniforms(seed, step)
    else:
        uniforms = _param("uniforms", uniforms, B, torch.float32, device, lambda u: (u >= 0) & (u < 1), "in [0, 1)")
    tokens, logprobs, valid = sample_rows(logits, temperature, top_k, top_p, min_p, uniforms, backend=backend)
    return SampleOutput(tokens, logprobs, valid)


def counter_uniforms(seed, step):
    """One uniform in [0,1) per row from (seed, step): murmur3's fmix32 chained over the 32-bit
    words (seed_lo, seed_hi, step_lo, step_hi) of their 64-bit two's complement, top 24 bits of
    the result / 2^24.

    Pure function of its inputs on any device (C++ on the CPU, torch ops elsewhere). Takes [B]
    int tensors (returns fp32 [B]) or Python ints (returns a float, the same value).
    """
    tensors = [v for v in (seed, step) if isinstance(v, torch.Tensor)]
    if not tensors:
        return _C.counter_uniform(_int64(seed), _int64(step))
    if any(t.device.type != "cpu" for t in tensors):
        seed, step = torch.broadcast_tensors(torch.as_tensor(seed).to(torch.int64), torch.as_tensor(step).to(torch.int64))
        return _counter_uniforms_torch(seed, step)
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


def _fits_int64(v):
    return torch.ones_like(v, dtype=torch.bool) if isinstance(v, torch.Tensor) else -(2**63) <= v < 2**63


def _param(name, value, B, dtype, device, ok, allowed):
    """A validated parameter: a Python number, or a [B] tensor of `dtype` on `device`."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.item()
        else:
            if value.shape != (B,):
                raise ValueError(f"{name} must be a scalar or shape [{B}] (one per row), got shape {tuple(value.shape)}")
            if not dtype.is_floating_point and value.is_floating_point():
                raise ValueError(f"{name} must be an integer (tensor), got dtype {value.dtype}")
            value = value.to(device, dtype)
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
    if not ok(value):
        raise ValueError(f"{name} = {value} is invalid (all rows); allowed: {allowed}")
    return value
