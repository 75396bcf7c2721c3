"""Kernels behind one contract each (DESIGN.md §5), dispatched by device.

Each op lives in its own module with its three implementations side by side: `reference`
(plain PyTorch, the oracle), `cpu` (C++ in csrc/ or chunked PyTorch) and `triton` (CUDA kernels
in ctrlsafe.kernels). `CTRLSAFE_BACKEND=reference|cpu|triton` forces one.
"""
from .dispatch import BACKENDS, backend_for
from .linear_logprobs import linear_logprobs
from .reward_head import score_heads
from .sampling import sample_rows

__all__ = ["BACKENDS", "backend_for", "linear_logprobs", "sample_rows", "score_heads"]
