"""Reward head op: gather each sequence's last real token -> final RMSNorm -> all K heads in one
matmul -> (score - mean) / std -> bucketize into levels, in one pass.

Contract (all implementations):

    score_heads(hidden, last_index, norm_weight, heads, bias, mean, std, edges, *, eps, offsets=None)
        -> (scores [N,K] fp32, levels [N,K] int8 or None)

- `hidden` is the backbone's PRE-norm output, fp32 or bf16, either padded [N,T,H] with
  `last_index[N]` in 0..T-1, or packed [total,H] with `offsets[N+1]` (cumulative sequence starts)
  and `last_index[N]` absolute rows with offsets[n] <= last_index[n] < offsets[n+1].
- `norm_weight[H]` is the final RMSNorm weight: x * rsqrt(mean(x^2) + eps) * norm_weight.
- `heads[K,H]` and optional `bias[K]`: raw score = normed @ heads.T + bias. `mean[K]`, `std[K]`:
  score = (raw - mean) / std. All arithmetic is fp32 (the reference uses fp64).
- `edges[K,L-1]` (non-decreasing per head) or None: level = number of edges <= score, so a score
  exactly on an edge goes to the upper bin, scores below the first edge get 0 and above the last
  get L-1 (clamped by construction), and tied scores always share a level. A NaN score (NaN or
  inf in the hidden state) gets level -1; LevelBins.to_levels turns that into an error.

`last_token_index(input_ids, pad_token_id)` gives `last_index` for a padded [N,T] batch with
transformers' *ForSequenceClassification rule: the rightmost token whose id != pad_token_id
(position 0 when a row is all pads). When pad_token_id is the EOS id, real trailing EOS tokens
count as padding too, so the score is read at the token before them — transformers does exactly
that, and we match it.
"""
from __future__ import annotations

import torch

from .dispatch import backend_for


def score_heads(hidden, last_index, norm_weight, heads, bias, mean, std, edges, *, eps: float, offsets=None, backend=None):
    _check(hidden, last_index, norm_weight, heads, bias, mean, std, edges, offsets)
    impl = {"reference": reference, "cpu": cpu, "triton": triton}[backend_for(hidden.device, backend)]
    return impl(hidden, last_index, norm_weight, heads, bias, mean, std, edges, eps=eps, offsets=offsets)


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Index [N] of each row's last real token in a padded [N,T] batch (transformers' rule)."""
    N, T = input_ids.shape
    if pad_token_id is None:
        if N != 1:
            raise ValueError("a padded batch of more than one row needs a pad_token_id to find each row's last token")
        return torch.full((N,), T - 1, dtype=torch.int64, device=input_ids.device)
    positions = torch.arange(T, device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def bucketize(scores: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Levels int64 [N,K]: the number of edges [K,L-1] <= each score; NaN scores get -1."""
    levels = (scores[:, :, None] >= edges[None].to(scores.dtype)).sum(-1)
    return torch.where(torch.isnan(scores), torch.full_like(levels, -1), levels)


def _rows(hidden, last_index, offsets):
    """The [N,H] hidden rows the heads read."""
    if offsets is None:  # padded [N,T,H]: rows of the flattened [N*T,H] view (index_select is the fast gather)
        last_index = torch.arange(hidden.shape[0], device=hidden.device) * hidden.shape[1] + last_index
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, last_index)


@torch.no_grad()
def reference(hidden, last_index, norm_weight, heads, bias, mean, std, edges, *, eps, offsets=None):
    """The oracle: gather, then every step in float64."""
    x = _rows(hidden, last_index, offsets).double()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    raw = x @ heads.double().T
    if bias is not None:
        raw = raw + bias.double()
    scores = ((raw - mean.double()) / std.double()).float()
    levels = None if edges is None else bucketize(scores, edges.float()).to(torch.int8)
    return scores, levels


@torch.no_grad()
def cpu(hidden, last_index, norm_weight, heads, bias, mean, std, edges, *, eps, offsets=None):
    """fp32 PyTorch with one [N,H] temporary (the gathered rows): RMSNorm only rescales a row, so
    score = rstd * (x @ (heads * norm_weight).T) with rstd from the row's 2-norm, and no
    normalised copy of the rows is made (big temporaries cost page faults on CPU; dropping them
    took N=256 H=4096 from 30 ms to 3 ms). A C++ loop could still skip the gathered copy; it is
    not written yet (benchmarks/bench_reward.py reports this path's share of read bandwidth)."""
    x = _rows(hidden, last_index, offsets).float()
    H = x.shape[1]
    rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / H + eps)
    raw = (x @ (heads.float() * norm_weight.float()).T) * rstd
    if bias is not None:
        raw = raw + bias.float()
    scores = (raw - mean.float()) / std.float()
    levels = None if edges is None else bucketize(scores, edges.float()).to(torch.int8)
    return scores, levels


def triton(hidden, last_index, norm_weight, heads, bias, mean, std, edges, *, eps, offsets=None):
    from ctrlsafe.kernels.reward_head import score_heads as triton_score_heads

    return triton_score_heads(hidden, last_index, norm_weight, heads, bias, mean, std, edges, eps=eps, offsets=offsets)


def _check(hidden, last_index, norm_weight, heads, bias, mean, std, edges, offsets):
    """Shapes, dtypes and index ranges, so that no implementation reads out of bounds."""
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"score_heads: hidden must be fp32/bf16/fp16, got {hidden.dtype}")
    H = hidden.shape[-1]
    K = heads.shape[0] if heads.dim() == 2 else -1
    if heads.dim() != 2 or heads.shape[1] != H:
        raise ValueError(f"score_heads: heads must be [K,{H}], got {list(heads.shape)}")
    for name, t, shape in (("norm_weight", norm_weight, [H]), ("mean", mean, [K]), ("std", std, [K]), ("bias", bias, [K])):
        if t is not None and list(t.shape) != shape:
            raise ValueError(f"score_heads: {name} must have shape {shape}, got {list(t.shape)}")
    if edges is not None and (edges.dim() != 2 or edges.shape[0] != K):
        raise ValueError(f"score_heads: edges must be [K={K}, L-1], got {list(edges.shape)}")
    if last_index.dim() != 1 or last_index.dtype != torch.int64:
        raise ValueError(f"score_heads: last_index must be int64 [N], got {last_index.dtype} {list(last_index.shape)}")
    N = last_index.shape[0]
    if offsets is None:
        if hidden.dim() != 3 or hidden.shape[0] != N:
            raise ValueError(f"score_heads: padded hidden must be [N={N},T,H], got {list(hidden.shape)} (pass offsets for packed [total,H])")
        lo, hi = torch.zeros_like(last_index), torch.full_like(last_index, hidden.shape[1])
    else:
        if hidden.dim() != 2 or offsets.shape != (N + 1,):
            raise ValueError(f"score_heads: packed hidden must be [total,H] with offsets [N+1={N + 1}], got {list(hidden.shape)} and {list(offsets.shape)}")
        if int(offsets[-1]) > hidden.shape[0]:
            raise ValueError(f"score_heads: offsets end at {int(offsets[-1])} but hidden has {hidden.shape[0]} rows")
        lo, hi = offsets[:-1].to(last_index), offsets[1:].to(last_index)
    bad = ((last_index < lo) | (last_index >= hi)).nonzero()
    if len(bad):
        n = int(bad[0, 0])
        raise ValueError(f"score_heads: last_index[{n}] = {int(last_index[n])} is outside its sequence [{int(lo[n])}, {int(hi[n])})")
