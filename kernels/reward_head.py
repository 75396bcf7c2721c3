"""Triton fused reward head (contract: ctrlsafe/ops/reward_head.py).

One program per block of BLOCK_N sequences. It walks the hidden dimension once, loading each
sequence's last-token row chunk by chunk and accumulating both the RMSNorm statistic and the K
head dot products at the same time — RMSNorm only rescales the row, so

    score_k = rstd * sum_h x_h * w_h * W[k,h],   rstd = rsqrt(sum_h x_h^2 / H + eps)

and the row is read exactly once. The epilogue normalises and counts the edges <= score.
All arithmetic is fp32 (no tl.dot: K is tiny and TF32 would cost precision).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def reward_head_kernel(
    hidden_ptr, row_offset_ptr, norm_w_ptr, heads_ptr, bias_ptr, mean_ptr, std_ptr, edges_ptr,
    scores_ptr, levels_ptr,
    N, H, K, n_edges, eps,
    HAS_BIAS: tl.constexpr, HAS_EDGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row = tl.load(row_offset_ptr + offs_n, mask=mask_n, other=0)  # element offset of each gathered row
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K

    sumsq = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        x = tl.load(hidden_ptr + row[:, None] + offs_h[None, :], mask=mask_n[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        w = tl.load(norm_w_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        heads = tl.load(heads_ptr + offs_k[:, None] * H + offs_h[None, :], mask=mask_k[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
        xw = x * w[None, :]
        acc += tl.sum(xw[:, None, :] * heads[None, :, :], axis=2)

    rstd = 1.0 / tl.sqrt(sumsq / H + eps)
    raw = acc * rstd[:, None]
    if HAS_BIAS:
        raw += tl.load(bias_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    mean = tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    std = tl.load(std_ptr + offs_k, mask=mask_k, other=1.0).to(tl.float32)
    scores = (raw - mean[None, :]) / std[None, :]
    out = offs_n[:, None] * K + offs_k[None, :]
    mask = mask_n[:, None] & mask_k[None, :]
    tl.store(scores_ptr + out, scores, mask=mask)

    if HAS_EDGES:
        level = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
        for j in range(0, n_edges):
            edge = tl.load(edges_ptr + offs_k * n_edges + j, mask=mask_k, other=0.0)
            level += (scores >= edge[None, :]).to(tl.int32)
        level = tl.where(scores != scores, -1, level)  # NaN
        tl.store(levels_ptr + out, level.to(tl.int8), mask=mask)


def block_sizes(N: int, K: int) -> tuple[int, int, int]:
    """BLOCK_N, BLOCK_K, BLOCK_H: about 4096 fp32 partial products per chunk keeps registers modest."""
    block_k = triton.next_power_of_2(max(K, 1))
    block_n = min(8, triton.next_power_of_2(max(N, 1)))
    block_h = max(32, min(1024, 4096 // (block_n * block_k)))
    return block_n, block_k, block_h


def score_heads(hidden, last_index, norm_weight, heads, bias, mean, std, edges, *, eps, offsets=None):
    H = hidden.shape[-1]
    N, K = last_index.shape[0], heads.shape[0]
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    # element offset of each sequence's scored row, so padded and packed inputs share one kernel
    if offsets is None:
        row_offset = torch.arange(N, device=hidden.device) * hidden.stride(0) + last_index * hidden.stride(1)
    else:
        row_offset = last_index * hidden.stride(0)
    heads, norm_weight = heads.contiguous(), norm_weight.contiguous()
    scores = torch.empty(N, K, dtype=torch.float32, device=hidden.device)
    levels = None
    if edges is not None:
        edges = edges.float().contiguous()
        levels = torch.empty(N, K, dtype=torch.int8, device=hidden.device)
    block_n, block_k, block_h = block_sizes(N, K)
    reward_head_kernel[(triton.cdiv(N, block_n),)](
        hidden, row_offset, norm_weight, heads,
        bias if bias is not None else mean, mean.float().contiguous(), std.float().contiguous(),
        edges if edges is not None else scores,
        scores, levels if levels is not None else scores,
        N, H, K, edges.shape[1] if edges is not None else 0, float(eps),
        HAS_BIAS=bias is not None, HAS_EDGES=edges is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_H=block_h,
    )
    return scores, levels
