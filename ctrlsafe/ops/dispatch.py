"""Choosing an implementation: CUDA tensors -> triton, anything else -> cpu, unless forced."""
import os

import torch

BACKENDS = ("reference", "cpu", "triton")


def backend_for(device: torch.device | str, override: str | None = None) -> str:
    """The backend to run on `device`: `override`, else $CTRLSAFE_BACKEND, else by device type."""
    choice = override or os.environ.get("CTRLSAFE_BACKEND") or None
    if choice is None:
        kind = device.type if isinstance(device, torch.device) else torch.device(device).type
        return "triton" if kind == "cuda" else "cpu"
    if choice not in BACKENDS:
        raise ValueError(f"CTRLSAFE_BACKEND={choice!r} is not a backend; allowed: {', '.join(BACKENDS)}")
    return choice
