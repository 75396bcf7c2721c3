"""Triton sampler (contract: ctrlsafe/ops/sampling.py): one launch, one program per row, no sort.

Every filter keeps the logits at or above a value threshold, so a program finds the thresholds
by bisection over the float bit patterns of the row's values (exact: <= 32 passes over the row,
which stays in L2): top-k on counts, top-p on the mass exp((x - max) / T) of the top-k
survivors; min-p is x >= max + T log(min_p). One last pass walks the kept mass in vocabulary
order (block cumsum) to the first token past u * (kept mass). Masses are summed per block in
fp32 and across blocks in fp64.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _key(v):
    """Order-preserving int32 of a float32 (scalar)."""
    b = v.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _unkey(k):
    k = k.to(tl.int32)
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _tally(row, V, v, floor, mx, invt, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    """Weight of {x >= v and x >= floor}: their count, or their sum of exp((x - mx) * invt)."""
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((), dtype=tl.float64)
    for start in range(0, V, BLOCK):
        x = tl.load(row + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        keep = (x >= v) & (x >= floor)
        if WEIGHTED:
            w = tl.where(keep, tl.exp((x - mx) * invt), 0.0)
        else:
            w = keep.to(tl.float32)
        total += tl.sum(w, axis=0).to(tl.float64)
    return total


@triton.jit
def _threshold(row, V, lo, hi, floor, target, mx, invt, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    """The largest value tau of the row with weight(x >= tau) >= target, given weight(x >= lo)
    >= target > weight(x >= hi): bisection on the bit patterns until lo and hi are adjacent,
    when lo is a value of the row."""
    lo_k = _key(lo).to(tl.int64)
    hi_k = _key(hi).to(tl.int64)
    while hi_k - lo_k > 1:
        mid_k = lo_k + (hi_k - lo_k) // 2
        w = _tally(row, V, _unkey(mid_k), floor, mx, invt, WEIGHTED, BLOCK)
        lo_k = tl.where(w >= target, mid_k, lo_k)
        hi_k = tl.where(w >= target, hi_k, mid_k)
    return _unkey(lo_k)


@triton.jit
def _sample_kernel(logits_ptr, stride, V, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, u_ptr,
                   tokens_ptr, logprobs_ptr, valid_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = logits_ptr + pid.to(tl.int64) * stride
    T = tl.load(temp_ptr + pid)
    top_k = tl.load(top_k_ptr + pid)
    top_p = tl.load(top_p_ptr + pid)
    min_p = tl.load(min_p_ptr + pid)
    u = tl.load(u_ptr + pid)
    offs = tl.arange(0, BLOCK)
    inf = float("inf")

    # Pass 1: max (and its first index), smallest finite value, NaN / +inf.
    mx = tl.full((), -inf, tl.float32)
    lo = tl.full((), inf, tl.float32)
    argmax = tl.full((), 0, tl.int32)
    bad = tl.full((), 0, tl.int32)
    for start in range(0, V, BLOCK):
        in_row = start + offs < V
        x = tl.load(row + start + offs, mask=in_row, other=-inf).to(tl.float32)
        bad = tl.maximum(bad, tl.max(((x != x) | (x == inf)).to(tl.int32), axis=0))
        bm = tl.max(x, axis=0)
        first = tl.min(tl.where(x == bm, offs, BLOCK), axis=0)
        argmax = tl.where(bm > mx, start + first, argmax)
        mx = tl.maximum(mx, bm)
        lo = tl.minimum(lo, tl.min(tl.where(x == -inf, inf, x), axis=0))
    valid = (bad == 0) & (mx > -inf)
    greedy = T == 0.0
    invt = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, T))
    above = _unkey(_key(mx) + 1)  # the next float above the max: weight 0 at or above it

    tau = tl.full((), -inf, tl.float32)  # the kept set is {x >= tau}
    if valid & (~greedy) & (top_k > 0) & (top_k < V):
        n_finite = _tally(row, V, lo, -inf, mx, invt, False, BLOCK)
        if n_finite >= top_k.to(tl.float64):  # else top-k keeps every finite logit
            tau = _threshold(row, V, lo, above, -inf, top_k.to(tl.float64), mx, invt, False, BLOCK)
    if valid & (~greedy) & (top_p < 1.0):
        floor = tl.maximum(tau, lo)
        kept = _tally(row, V, floor, floor, mx, invt, True, BLOCK)
        tau = tl.maximum(tau, _threshold(row, V, floor, above, floor, top_p.to(tl.float64) * kept, mx, invt, True, BLOCK))
    if valid & (~greedy) & (min_p > 0.0):
        tau = tl.maximum(tau, mx + T * tl.log(min_p))

    # Inverse CDF in vocabulary order over {x >= tau} (unused by greedy rows).
    total = _tally(row, V, tau, tau, mx, invt, True, BLOCK)
    target = u.to(tl.float64) * total
    cum = tl.zeros((), dtype=tl.float64)
    token = tl.full((), -1, tl.int32)
    last = tl.full((), -1, tl.int32)
    p_token = tl.full((), 0.0, tl.float32)
    p_last = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(row + start + offs, mask=start + offs < V, other=-inf).to(tl.float32)
        e = tl.where(x >= tau, tl.exp((x - mx) * invt), 0.0)
        run = cum + tl.cumsum(e, axis=0).to(tl.float64)
        hit = tl.min(tl.where((run > target) & (e > 0.0), offs, BLOCK), axis=0)
        take = (token < 0) & (hit < BLOCK)
        p_token = tl.where(take, tl.sum(tl.where(offs == hit, e, 0.0), axis=0), p_token)
        token = tl.where(take, start + hit, token)
        lb = tl.max(tl.where(e > 0.0, offs, -1), axis=0)
        p_last = tl.where(lb >= 0, tl.sum(tl.where(offs == lb, e, 0.0), axis=0), p_last)
        last = tl.where(lb >= 0, start + lb, last)
        cum += tl.sum(e, axis=0).to(tl.float64)
    p_token = tl.where(token < 0, p_last, p_token)
    token = tl.where(token < 0, last, token)  # u * total rounded up to the full mass
    logprob = tl.log((p_token.to(tl.float64) / total).to(tl.float32))
    token = tl.where(greedy, argmax, token)
    logprob = tl.where(greedy, 0.0, logprob)  # greedy draws its token with probability 1
    tl.store(tokens_ptr + pid, tl.where(valid, token, -1).to(tl.int64))
    tl.store(logprobs_ptr + pid, tl.where(valid, logprob, float("nan")))
    tl.store(valid_ptr + pid, valid.to(tl.int8))


def sample(logits, temperature, top_k, top_p, min_p, uniforms):
    """ops.sampling contract on a CUDA (or, under TRITON_INTERPRET=1, CPU) tensor."""
    from ctrlsafe.ops.sampling import per_row

    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    dev = logits.device
    temperature, top_p, min_p, uniforms = (per_row(v, B, torch.float32, dev).contiguous() for v in (temperature, top_p, min_p, uniforms))
    top_k = per_row(top_k, B, torch.int64, dev).contiguous()
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    valid = torch.empty(B, dtype=torch.int8, device=dev)
    if B:
        _sample_kernel[(B,)](logits, logits.stride(0), V, temperature, top_k, top_p, min_p, uniforms,
                             tokens, logprobs, valid, BLOCK=min(BLOCK, triton.next_power_of_2(V)))
    return tokens, logprobs, valid.bool()
