"""Triton kernels for CUDA, installed as ctrlsafe.kernels. Import lazily: triton is optional."""
