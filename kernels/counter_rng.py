"""The counter RNG of ctrlsafe.sampling.counter_uniforms as one Triton launch (its docstring is
the spec): on a GPU the torch form is ~90 tiny elementwise ops per decode step, each a launch."""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _counter_uniforms_kernel(seed_ptr, step_ptr, out_ptr, n, SEED_STRIDE: tl.constexpr, STEP_STRIDE: tl.constexpr,
                             BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    seed = tl.load(seed_ptr + offs * SEED_STRIDE, mask=mask, other=0)
    step = tl.load(step_ptr + offs * STEP_STRIDE, mask=mask, other=0)
    h = tl.full((BLOCK,), 0x9E3779B9, tl.uint32)
    # the four 32-bit words of the two int64s: a cast to uint32 keeps the low word
    for word in tl.static_range(4):
        v = seed if word < 2 else step
        if word % 2 == 1:
            v = v >> 32
        h = _fmix32(h ^ v.to(tl.uint32))
    tl.store(out_ptr + offs, (h >> 8).to(tl.float32) * (1.0 / (1 << 24)), mask=mask)


def counter_uniforms(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms of int64 tensors seed and step (broadcast together; a one-element operand,
    the usual step, is read once rather than expanded)."""
    shape = torch.broadcast_shapes(seed.shape, step.shape)
    n = shape.numel()
    seed, step = (v.reshape(1) if v.numel() == 1 else v.expand(shape).reshape(-1) for v in (seed.to(torch.int64), step.to(torch.int64)))
    out = torch.empty(shape, dtype=torch.float32, device=seed.device)
    if n:
        _counter_uniforms_kernel[(triton.cdiv(n, BLOCK),)](seed.contiguous(), step.contiguous(), out, n,
                                                           SEED_STRIDE=int(seed.numel() > 1), STEP_STRIDE=int(step.numel() > 1),
                                                           BLOCK=BLOCK)
    return out
