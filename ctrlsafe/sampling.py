"""The embeddable sampler: `sample(logits, temperature=..., top_k=..., ..., seed=..., step=...)`.

Every parameter is a scalar or a per-row tensor [B] (FlashInfer-style). Randomness is
counter-based: row r at step s draws the uniform `counter_uniforms(seed[r], s)`, so a row's
token never depends on which other rows share its batch, on B, or on the implementation.
This module imports torch only (never transformers).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

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
    temperature = _rows("temperature", temperature, B, torch.float32, device)
    top_k = _rows("top_k", top_k, B, torch.int64, device)
    top_p = _rows("top_p", top_p, B, torch.float32, device)
    min_p = _rows("min_p", min_p, B, torch.float32, device)
    _check("temperature", temperature, (temperature >= 0) & torch.isfinite(temperature), ">= 0")
    _check("top_k", top_k, top_k >= 0, ">= 0 (0 = off)")
    _check("top_p", top_p, (top_p > 0) & (top_p <= 1), "in (0, 1]")
    _check("min_p", min_p, (min_p >= 0) & (min_p <= 1), "in [0, 1]")
    if uniforms is None:
        if seed is None:
            seed = torch.randint(0, 2**62, (B,), dtype=torch.int64)
        uniforms = counter_uniforms(_rows("seed", seed, B, torch.int64, device), _rows("step", step, B, torch.int64, device))
    else:
        uniforms = _rows("uniforms", uniforms, B, torch.float32, device)
        _check("uniforms", uniforms, (uniforms >= 0) & (uniforms < 1), "in [0, 1)")
    tokens, logprobs, valid = sample_rows(logits, temperature, top_k, top_p, min_p, uniforms, backend=backend)
    return SampleOutput(tokens, logprobs, valid)


def counter_uniforms(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One uniform in [0,1) per row from (seed, step): murmur3's fmix32 chained over the 32-bit
    words (seed_lo, seed_hi, step_lo, step_hi), top 24 bits of the result / 2^24.

    Pure function of its inputs on any device; written with 16-bit limb multiplies so no int64
    product overflows.
    """
    seed, step = seed.to(torch.int64), step.to(torch.int64)
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


def _rows(name, value, B, dtype, device) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    if t.dim() == 0:
        return t.to(dtype).expand(B).contiguous()
    if t.shape != (B,):
        raise ValueError(f"{name} must be a scalar or shape [{B}] (one per row), got shape {tuple(t.shape)}")
    if dtype.is_floating_point is False and t.is_floating_point():
        raise ValueError(f"{name} must be an integer (tensor), got dtype {t.dtype}")
    return t.to(dtype).contiguous()


def _check(name, values, ok, allowed):
    if not bool(ok.all()):
        row = int((~ok).nonzero()[0, 0])
        raise ValueError(f"{name}[{row}] = {values[row].item()} is invalid; allowed: {allowed}")
