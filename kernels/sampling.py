"""Triton sampler (contract: ctrlsafe/ops/sampling.py): one program of 512 threads per row, no sort.

Every filter keeps the logits at or above a value threshold, so a row is a search for the top-k
and top-p thresholds (min-p's is max + T log(min_p)) followed by one inverse-CDF draw over the
kept set {x >= tau} in vocabulary order. The search never bisects over the whole row: a *probe
pass* reads the values once and, for 8 thresholds spread over the bracket [lo, hi) that holds the
cut, sums the count (top-k) or the mass exp((x - max) / T) (top-p) of the values above each, and
keeps the part between two thresholds that holds the cut, usually a ninth of it (the thresholds
are spread evenly in value, and two of them in float order, while the bracket is wide; all in
float order once it is narrow; and the bracket is cut to the smallest and largest value it
holds, so ties and gaps such as -1e9 mask values end it at once). As soon as the values at or
above the bracket (the survivors), or failing
that the bracket alone, number at most CAP, one *collect* pass copies them in vocabulary order to
a per-row scratch buffer in global memory (L2), and the exact cut is finished there by probe
passes over at most CAP values; when the survivors fit, the draw runs on the scratch too.

Passes over the row (V values; the scratch's few KB are not counted):
  stats    1   max (and its lowest id), smallest finite value, finite count, NaN / +inf. Greedy
               and invalid rows stop here. For B <= SPLIT_STATS_ROWS it is its own launch of
               one program per row and 4096 values, so a small batch reads HBM with many SMs.
  probe    per filter, until the survivors or the bracket fit: none when they already do
               (V <= CAP, or top-p after a top-k cut that keeps <= CAP), usually 1-3, and at
               most 21 whatever the values (each pass keeps <= 1/3 of the bracket's floats).
  collect  1 per filter that needed probes.
  draw     1, unless the survivors are on the scratch: per-block kept mass, then the one block
               the draw falls in is read again.
Counted at V = 128256 (interpreter): greedy 1; T only or min-p only 2; top-k 50 or 1000 (+ top-p)
3; top-p 0.95 on peaked LLM-like logits 3; top-p 0.9 on N(0, 3^2) logits 5 (5207 kept, over
CAP) and on flat N(0, 1) logits 5 (most of the row kept); a third of the row masked with -1e9
4-5; top-k 20000 + top-p 9. At most 1 + 2 x (21 + 1) + 1 = 46 for any row.

Cost per value (SASS, sm_90): stats 18 instructions, draw 16, count probe 36, mass probe 59,
collect 50-76. An H100 (132 SMs, 3.35 TB/s) allows ~40 per fp32 value (~80 per bf16 value) at
full bandwidth, so with fp32 logits the mass probes and the collect run at ~0.55-0.8x of it.

Expected H100 time, V = 128256 fp32 (513 KB per row), top-k 50 + top-p 0.9 (3 passes):
  B = 256: (39 + 39 + 49) us = ~130 us per batch, 0.5 us per row (bytes / 3.35 TB/s, the collect
           at its instruction rate; L2 keeps part of a row between its passes). Top-p alone on
           N(0, 3^2) logits (5 passes, 2 of them mass probes): ~270 us, ~1 us per row.
  B = 1:   stats over 32 SMs ~2 us + a launch; then one SM with 16 KB of loads in flight reads
           the row from L2 at ~70-100 GB/s: ~5-7 us per pass, ~5 us of scratch passes (latency
           bound, ~0.5 us each) -> ~20 us. Only the stats pass is split over several programs.

Sums: counts are exact; masses are summed in fp32 per thread or per block and in fp64 across, the
same precision everywhere. A probe pass over the row only chooses the next bracket, with a
margin larger than the difference its sums can have from the collect pass's and the scratch's,
which make the decisions; so the cut is the one those sums give (unless the margin would keep
a third of a bracket, when the plain comparison decides so that the pass count stays bounded:
the cut is then right to within that rounding, as any float implementation's). Batch-invariant:
a row's arithmetic depends only on the row and its parameters.
"""
import torch
import triton
import triton.language as tl

NUM_WARPS = 16
SUB = 32 * NUM_WARPS  # values per probe load: one per thread
UNROLL = 8  # probe loads in flight per thread
BLOCK = SUB * UNROLL  # values per iteration of the other passes (8 per thread)
NPROBE = 8  # thresholds per probe pass
BY_KEY = 2  # of them spaced evenly in float order while the bracket is wide (see _probes)
CAP = 4096  # survivors per row that the scratch holds
BLOCK_LIST = 256  # per-block masses (or per-chunk stats) read at once
# Up to this many rows the stats pass runs as its own launch over (B, cdiv(V, BLOCK)) programs:
# one SM alone pulls a row from HBM at ~25 GB/s, so a small batch would leave the GPU idle
# behind it. Max, lowest-id argmax, min and counts combine exactly in any order, so both ways
# give the same bits and a row's result still does not depend on the batch.
SPLIT_STATS_ROWS = 16


@triton.jit
def _key(v):
    """Order-preserving int32 of a float32 (scalar or tensor): -0.0 maps to -1, +0.0 to 0."""
    b = v.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _unkey(k):
    k = k.to(tl.int32)
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _next_up(v):
    """The smallest float above v (skipping -0.0 -> +0.0, which compare equal)."""
    k = _key(v)
    return _unkey(k + 1 + (k == -1).to(tl.int32))


@triton.jit
def _span(lo, hi):
    """How many floats lie in [lo, hi) (counting -0.0 and +0.0 apart)."""
    return _key(hi).to(tl.int64) - _key(lo).to(tl.int64)


@triton.jit
def _mass(x, mx, scale):
    """exp((x - max) / T) = 2^((x - max) * scale), scale = log2(e) / T: the unnormalised probability,
    1 at the max, 0 for x = -inf. One expression for every pass, so every pass computes the same
    masses."""
    return tl.exp2((x - mx) * scale)


@triton.jit
def _stats(row, V, BLOCK: tl.constexpr):
    """max, its lowest id, smallest finite value, count of finite values, and whether any value is
    NaN or +inf; per thread over the row, reduced once."""
    offs = tl.arange(0, BLOCK)
    inf = float("inf")
    best = tl.full([BLOCK], -inf, tl.float32)
    first = tl.zeros([BLOCK], tl.int32)  # where each lane first saw its best
    low = tl.full([BLOCK], inf, tl.float32)
    finite = tl.zeros([BLOCK], tl.int32)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        i = start + offs
        x = tl.load(row + i, mask=i < V, other=-inf).to(tl.float32)
        first = tl.where(x > best, i, first)
        best = tl.maximum(best, x)
        fin = x > -inf
        low = tl.minimum(low, tl.where(fin, x, inf))
        finite += fin.to(tl.int32)
        bad |= ((x != x) | (x == inf)).to(tl.int32)
    mx = tl.max(best, axis=0)
    argmax = tl.min(tl.where(best == mx, first, V), axis=0)
    return mx, argmax, tl.min(low, axis=0), tl.sum(finite, axis=0), tl.max(bad, axis=0)


@triton.jit
def _stats_kernel(logits_ptr, stride, V, stats_f_ptr, stats_i_ptr, n_chunks, BLOCK: tl.constexpr):
    """The stats of block c = program_id(1) of row program_id(0): (max, smallest finite) to
    stats_f[row, c], (lowest-id argmax, finite count, NaN / +inf) to stats_i[row, c]."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    start = c * BLOCK
    row = logits_ptr + pid.to(tl.int64) * stride + start
    mx, argmax, low, n_finite, bad = _stats(row, tl.minimum(V - start, BLOCK), BLOCK)
    at = pid.to(tl.int64) * n_chunks + c
    tl.store(stats_f_ptr + 2 * at, mx)
    tl.store(stats_f_ptr + 2 * at + 1, low)
    tl.store(stats_i_ptr + 3 * at, start + argmax)
    tl.store(stats_i_ptr + 3 * at + 1, n_finite)
    tl.store(stats_i_ptr + 3 * at + 2, bad)


@triton.jit
def _combine_stats(stats_f, stats_i, n_chunks, V, BLOCK_LIST: tl.constexpr):
    """_stats of a row from its blocks' stats (stats_f / stats_i point at the row's first block)."""
    offs = tl.arange(0, BLOCK_LIST)
    inf = float("inf")
    mx = tl.full((), -inf, tl.float32)
    argmax = tl.zeros((), tl.int32)
    low = tl.full((), inf, tl.float32)
    n_finite = tl.zeros((), tl.int32)
    bad = tl.zeros((), tl.int32)
    for c0 in range(0, n_chunks, BLOCK_LIST):
        c = c0 + offs
        there = c < n_chunks
        m = tl.load(stats_f + 2 * c, mask=there, other=-inf)
        bm = tl.max(m, axis=0)
        first = tl.min(tl.where(there & (m == bm), tl.load(stats_i + 3 * c, mask=there, other=V), V), axis=0)
        argmax = tl.where(bm > mx, first, argmax)  # an earlier block keeps a tie
        mx = tl.maximum(mx, bm)
        low = tl.minimum(low, tl.min(tl.load(stats_f + 2 * c + 1, mask=there, other=inf), axis=0))
        n_finite += tl.sum(tl.load(stats_i + 3 * c + 1, mask=there, other=0), axis=0)
        bad = tl.maximum(bad, tl.max(tl.load(stats_i + 3 * c + 2, mask=there, other=0), axis=0))
    return mx, argmax, low, n_finite, bad


@triton.jit
def _probes(lo, hi, NPROBE: tl.constexpr, BY_KEY: tl.constexpr):
    """NPROBE thresholds in [lo, hi): while the range holds many floats, NPROBE - BY_KEY of them
    split it evenly in value (logits crowd near the max, and a range across zero is mostly tiny
    floats in float order) and BY_KEY evenly in float order (so the range always shrinks
    (BY_KEY + 1)x in floats, whatever the values' spread); once it is narrow, all of them split it
    evenly in float order (even value steps would round onto each other)."""
    j = tl.arange(0, NPROBE)
    span = _span(lo, hi)
    narrow = span <= 1 << 16
    lo64 = lo.to(tl.float64)
    frac = (j + 1).to(tl.float64) / (NPROBE - BY_KEY + 1)
    by_value = (lo64 + (hi.to(tl.float64) - lo64) * frac).to(tl.float32)
    step = tl.where(narrow, j + 1, j - (NPROBE - BY_KEY) + 1)
    parts = tl.where(narrow, NPROBE + 1, BY_KEY + 1)
    by_key = _unkey(_key(lo).to(tl.int64) + span * step // parts)
    return tl.where(narrow | (j >= NPROBE - BY_KEY), by_key, by_value)


@triton.jit
def _probe_pass(ptr, n, t, lo, hi, floor, mx, scale, WEIGHTED: tl.constexpr, NPROBE: tl.constexpr,
                SUB: tl.constexpr, UNROLL: tl.constexpr):
    """One read of ptr[0:n]: for each threshold t[j] (in [lo, hi), and lo >= floor), the count and
    (WEIGHTED, else 0) the mass of {x >= t[j]}; the mass of {x >= floor}; the smallest and largest
    value in [lo, hi) (+inf / -inf if none). Each thread accumulates its own values (fp32 masses)
    and the totals are reduced once at the end: a reduction per block would cost more than the
    probes."""
    offs = tl.arange(0, SUB)
    inf = float("inf")
    counts = tl.zeros([NPROBE, SUB], tl.int32)
    masses = tl.zeros([NPROBE, SUB], tl.float32)
    floor_mass = tl.zeros([SUB], tl.float32)
    seen_lo = tl.full([SUB], inf, tl.float32)
    seen_hi = tl.full([SUB], -inf, tl.float32)
    for start in range(0, n, SUB * UNROLL):
        for u in tl.static_range(UNROLL):  # independent loads, all in flight at once
            i = start + u * SUB + offs
            x = tl.load(ptr + i, mask=i < n, other=-inf).to(tl.float32)
            above = x[None, :] >= t[:, None]
            counts += above.to(tl.int32)
            if WEIGHTED:
                e = tl.where(x >= floor, _mass(x, mx, scale), 0.0)
                masses += tl.where(above, e[None, :], 0.0)
                floor_mass += e
            inside = (x >= lo) & (x < hi)
            seen_lo = tl.minimum(seen_lo, tl.where(inside, x, inf))
            seen_hi = tl.maximum(seen_hi, tl.where(inside, x, -inf))
    return (tl.sum(counts, axis=1), tl.sum(masses.to(tl.float64), axis=1), tl.sum(floor_mass.to(tl.float64), axis=0),
            tl.min(seen_lo, axis=0), tl.max(seen_hi, axis=0))


@triton.jit
def _search(ptr, n, lo, hi, c_lo, c_hi, floor, target, p_scale, base_c, base_w, mx, scale, margin, stop,
            WEIGHTED: tl.constexpr, NPROBE: tl.constexpr, BY_KEY: tl.constexpr, SUB: tl.constexpr,
            UNROLL: tl.constexpr):
    """Narrows [lo, hi) around tau, the largest value whose weight W(tau) reaches the goal, where
    W(t) = base + the count (or WEIGHTED, the mass) of {x >= t, x >= floor} in ptr[0:n] and the goal
    is target + p_scale * W(floor) (top-p: a fraction of the top-k survivors' mass). On entry
    W(lo) >= goal > W(hi), with c_lo / c_hi the counts at lo / hi. Stops when lo is tau (a single
    float is left), or when no more than `stop` values lie at or above lo, or in [lo, hi).

    Over the row the probes' fp32 sums only pick the next bracket: a probe counts as reaching (or
    short of) the goal only by more than `margin`, so the exact sums made later agree. If probes
    within the margin would keep more than a third of the bracket (in floats), the plain
    comparison decides instead: every pass keeps at most a third of the bracket's floats, so a
    search ends within 21 passes (3^21 > 2^33) whatever the values."""
    go = (_span(lo, hi) > 1) & (c_lo > stop) & (c_lo - c_hi > stop)
    while go:
        t = _probes(lo, hi, NPROBE, BY_KEY)
        count, mass, floor_mass, seen_lo, seen_hi = _probe_pass(ptr, n, t, lo, hi, floor, mx, scale, WEIGHTED,
                                                                NPROBE, SUB, UNROLL)
        count += base_c
        if WEIGHTED:
            weight = mass + base_w
        else:
            weight = count.to(tl.float64)
        goal = target + p_scale * (floor_mass + base_w)
        reach = weight >= goal * (1.0 + margin)
        short = weight < goal * (1.0 - margin)
        span = _span(lo, hi)
        wide = _span(tl.max(tl.where(reach, t, lo), axis=0), tl.min(tl.where(short, t, hi), axis=0)) > (span + 2) // 3
        reach = tl.where(wide, weight >= goal, reach)
        short = tl.where(wide, weight < goal, short)
        # weights fall as t rises: the bracket runs from the highest reaching probe to the lowest short one
        new_lo = tl.max(tl.where(reach, t, lo), axis=0)
        c_lo = tl.min(tl.where(reach, count, c_lo), axis=0)
        new_hi = tl.min(tl.where(short, t, hi), axis=0)
        c_hi = tl.max(tl.where(short, count, c_hi), axis=0)
        # no value lies in [lo, seen_lo) or above seen_hi: moving the ends there keeps their weights
        found = seen_lo <= seen_hi
        lo = tl.where(found, tl.maximum(new_lo, seen_lo), new_lo)
        hi = tl.where(found, tl.minimum(new_hi, _next_up(seen_hi)), new_hi)
        go = found & (_span(lo, hi) > 1) & (c_lo > stop) & (c_lo - c_hi > stop)
    return lo, hi, c_lo, c_hi


@triton.jit
def _collect(row, V, lo, hi, floor, mx, scale, kept_x, kept_id, CAP: tl.constexpr, WEIGHTED: tl.constexpr,
             SUB: tl.constexpr, RUN: tl.constexpr):
    """Copies the values in [lo, hi) at or above floor (known to be at most CAP) with their ids to
    the scratch, in vocabulary order; returns their count and (WEIGHTED) the mass of {x >= floor}
    and of {x >= hi, x >= floor} (fp32 per block, fp64 across blocks). A block is SUB
    runs of RUN values: a value's slot is the kept count of the runs before its run plus that of
    the values before it in its run, which costs half of one scan over the whole block."""
    tl.debug_barrier()  # earlier readers of the scratch are done
    run = tl.arange(0, SUB)[:, None]
    col = tl.arange(0, RUN)[None, :]
    bottom = tl.maximum(lo, floor)
    n = tl.zeros((), tl.int32)
    floor_mass = tl.zeros((), tl.float64)
    hi_mass = tl.zeros((), tl.float64)
    for start in range(0, V, SUB * RUN):
        i = start + run * RUN + col
        x = tl.load(row + i, mask=i < V, other=-float("inf")).to(tl.float32)
        keep = ((x >= bottom) & (x < hi)).to(tl.int32)
        per_run = tl.sum(keep, axis=1)
        pos = n + (tl.cumsum(per_run, axis=0) - per_run)[:, None] + tl.cumsum(keep, axis=1) - 1
        ok = (keep > 0) & (pos < CAP)
        tl.store(kept_x + pos, x, mask=ok)
        tl.store(kept_id + pos, i, mask=ok)
        n += tl.sum(per_run, axis=0)
        if WEIGHTED:
            e = tl.where(x >= floor, _mass(x, mx, scale), 0.0)
            floor_mass += tl.sum(tl.sum(e, axis=1), axis=0).to(tl.float64)
            hi_mass += tl.sum(tl.sum(tl.where(x >= hi, e, 0.0), axis=1), axis=0).to(tl.float64)
    tl.debug_barrier()  # the scratch is written before anyone reads it
    return n, floor_mass, hi_mass


@triton.jit
def _mass_above(ptr, n, t, mx, scale, BLOCK: tl.constexpr):
    """Mass of {x >= t} in ptr[0:n] (the scratch): fp32 per thread, fp64 across."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        x = tl.load(ptr + start + offs, mask=start + offs < n, other=-float("inf"))
        acc += tl.where(x >= t, _mass(x, mx, scale), 0.0)
    return tl.sum(acc.to(tl.float64), axis=0)


@triton.jit
def _draw(xs, ids, n, tau, mx, scale, u, block_mass, n_blocks, HAS_IDS: tl.constexpr, BLOCK: tl.constexpr,
          BLOCK_LIST: tl.constexpr):
    """Inverse CDF over {x >= tau} of xs[0:n] in order: the first value whose running mass exceeds
    u * (kept mass), or the last with mass if rounding leaves u * (kept mass) at the total. One pass
    stores each block's kept mass (fp32 sum, fp64 across), the block lists locate the block, and
    that block alone is read again. Returns the position (or ids[position]), its mass and the total."""
    offs = tl.arange(0, BLOCK)
    inf = float("inf")
    total = tl.zeros((), tl.float64)
    for start in range(0, n, BLOCK):
        x = tl.load(xs + start + offs, mask=start + offs < n, other=-inf).to(tl.float32)
        s = tl.sum(tl.where(x >= tau, _mass(x, mx, scale), 0.0), axis=0).to(tl.float64)
        b = start // BLOCK
        tl.store(block_mass + b, s, mask=b < n_blocks)
        total += s
    tl.debug_barrier()
    target = u.to(tl.float64) * total
    nb = tl.cdiv(n, BLOCK)
    boffs = tl.arange(0, BLOCK_LIST)
    carry = tl.zeros((), tl.float64)
    hit = tl.full((), -1, tl.int32)  # the block the draw falls in
    hit_before = tl.zeros((), tl.float64)  # kept mass before it
    last = tl.full((), -1, tl.int32)  # the last block with mass (rounding fallback)
    last_before = tl.zeros((), tl.float64)
    for b0 in range(0, nb, BLOCK_LIST):
        bi = b0 + boffs
        s = tl.load(block_mass + bi, mask=bi < nb, other=0.0)
        run = carry + tl.cumsum(s, axis=0)
        first = tl.min(tl.where((run > target) & (s > 0), bi, nb), axis=0)
        take = (hit < 0) & (first < nb)
        hit_before = tl.where(take, tl.sum(tl.where(bi == first, run - s, 0.0), axis=0), hit_before)
        hit = tl.where(take, first, hit)
        lb = tl.max(tl.where(s > 0, bi, -1), axis=0)
        last_before = tl.where(lb >= 0, tl.sum(tl.where(bi == lb, run - s, 0.0), axis=0), last_before)
        last = tl.where(lb >= 0, lb, last)
        carry = tl.max(run, axis=0)  # masses are >= 0: the running sum's last value
    before = tl.where(hit >= 0, hit_before, last_before)
    b = tl.where(hit >= 0, hit, last)
    i = b * BLOCK + offs
    x = tl.load(xs + i, mask=i < n, other=-inf).to(tl.float32)
    e = tl.where(x >= tau, _mass(x, mx, scale), 0.0)
    run = before + tl.cumsum(e.to(tl.float64), axis=0)
    pos = tl.min(tl.where((run > target) & (e > 0.0), offs, BLOCK), axis=0)
    pos = tl.where(pos < BLOCK, pos, tl.max(tl.where(e > 0.0, offs, -1), axis=0))
    p = tl.sum(tl.where(offs == pos, e, 0.0), axis=0)
    at = b * BLOCK + pos
    if HAS_IDS:
        at = tl.load(ids + at)
    return at, p, total


@triton.jit
def _sample_row(row, V, mx, low, n_finite, T, top_k, top_p, min_p, u, scratch, n_blocks, BLOCK: tl.constexpr,
                SUB: tl.constexpr, UNROLL: tl.constexpr, NPROBE: tl.constexpr, BY_KEY: tl.constexpr,
                CAP: tl.constexpr, BLOCK_LIST: tl.constexpr):
    """A valid row at T > 0: the top-k cut, then top-p's, then min-p's, then the draw. Returns the
    token and its logprob. The row's scratch holds CAP values, their CAP ids, then n_blocks fp64
    block masses: one base pointer, as every register held through the passes counts."""
    kept_x = scratch
    kept_id = (scratch + CAP).to(tl.pointer_type(tl.int32), bitcast=True)
    block_mass = (scratch + 2 * CAP).to(tl.pointer_type(tl.float64), bitcast=True)
    inf = float("inf")
    scale = 1.4426950408889634 / T
    above = _next_up(mx)  # nothing weighs anything at or above it
    tau_k = tl.full((), -inf, tl.float32)
    tau_p = tl.full((), -inf, tl.float32)
    tau_m = tl.where(min_p > 0.0, mx + T * tl.log(tl.maximum(min_p, 1e-30)), -inf)
    no = tl.zeros((), tl.int1)
    zero = tl.zeros((), tl.int32)
    zero_mass = tl.zeros((), tl.float64)
    # k >= the finite count keeps every finite value (and the -inf ones, which weigh nothing)
    k_on = (top_k > 0) & (top_k < n_finite)
    k = top_k.to(tl.int32)  # (used only when below the finite count)
    p_on = top_p < 1.0
    k_pending = k_on  # top-k's cut is still to be found on the scratch
    on_scratch = no  # the scratch holds every value that may be kept (from s_lo up)
    s_lo = low  # with s_hi and s_c_hi: the bracket the search on the scratch starts from
    s_hi = above
    s_c_hi = zero
    n_kept = zero
    k_mass = zero_mass  # mass of the top-k survivors, once top-k's cut is known
    k_count = n_finite  # how many values are at or above tau_k

    if k_on:
        lo, hi, c_lo, c_hi = _search(row, V, low, above, n_finite, zero, -inf, k, 0.0, zero, zero_mass,
                                     mx, scale, 0.0, CAP, False, NPROBE, BY_KEY, SUB, UNROLL)
        if _span(lo, hi) <= 1:  # one value left: the k-th largest
            tau_k = lo
            k_count = c_lo
            k_pending = no
        elif c_lo <= CAP:  # the survivors fit: every later step runs on them
            n_kept = _collect(row, V, lo, inf, -inf, mx, scale, kept_x, kept_id, CAP, False, SUB, UNROLL)[0]
            on_scratch = ~no
            s_lo = lo
            s_hi = hi
            s_c_hi = c_hi
        else:  # only the bracket fits: finish the cut on it (c_hi values lie above it)
            n_bracket = _collect(row, V, lo, hi, -inf, mx, scale, kept_x, kept_id, CAP, False, SUB, UNROLL)[0]
            cut = _search(kept_x, n_bracket, lo, hi, c_lo, c_hi, -inf, k, 0.0, c_hi, zero_mass, mx, scale, 0.0, 0,
                          False, NPROBE, BY_KEY, SUB, 1)
            tau_k = cut[0]
            k_count = cut[2]
            k_pending = no

    if p_on & (~on_scratch):  # s_lo is still the smallest finite value here
        floor = tau_k
        # An fp32 sum of m masses is off by at most m * 2^-24 (relative). A probe pass sums
        # <= V / SUB per thread; the collect pass (a block's tree) and the scratch (<= CAP / SUB
        # per thread) fewer than 64; the fp64 sums across threads and blocks add nothing that
        # matters. A probe decides only by more than twice all of it, so the sums that make the
        # decisions later agree with every decision it makes.
        margin = ((V * (2.0 / SUB) + 128.0) * 2.0**-23).to(tl.float32)
        lo, hi, c_lo, c_hi = _search(row, V, tl.maximum(s_lo, tau_k), above, k_count, zero, floor, 0.0,
                                     top_p, zero, zero_mass, mx, scale, margin, CAP, True, NPROBE, BY_KEY,
                                     SUB, UNROLL)
        if _span(lo, hi) <= 1:
            tau_p = lo
        elif c_lo <= CAP:  # min-p's cut can only shrink what is kept: leave out what it drops
            s_lo = tl.maximum(lo, tau_m)
            s_hi = hi
            got = _collect(row, V, s_lo, inf, floor, mx, scale, kept_x, kept_id, CAP, True, SUB, UNROLL)
            n_kept = got[0]
            k_mass = got[1]
            on_scratch = ~no
        else:
            got = _collect(row, V, lo, hi, floor, mx, scale, kept_x, kept_id, CAP, True, SUB, UNROLL)
            tau_p = _search(kept_x, got[0], lo, hi, c_lo, c_hi, floor, top_p.to(tl.float64) * got[1], 0.0,
                            c_hi, got[2], mx, scale, 0.0, 0, True, NPROBE, BY_KEY, SUB, 1)[0]

    if on_scratch:
        if k_pending:
            tau_k = _search(kept_x, n_kept, s_lo, s_hi, n_kept, s_c_hi, -inf, k, 0.0, zero, zero_mass, mx, scale,
                            0.0, 0, False, NPROBE, BY_KEY, SUB, 1)[0]
            s_hi = above
            k_mass = _mass_above(kept_x, n_kept, tau_k, mx, scale, BLOCK)
        if p_on:
            # if the survivors weigh less than the goal (min-p cut them deeper than top-p
            # would), this ends at their smallest value and min-p's cut decides
            tau_p = _search(kept_x, n_kept, tl.maximum(s_lo, tau_k), s_hi, n_kept, zero, tau_k,
                            top_p.to(tl.float64) * k_mass, 0.0, zero, zero_mass, mx, scale, 0.0, 0, True,
                            NPROBE, BY_KEY, SUB, 1)[0]
        tau = tl.maximum(tl.maximum(tau_k, tau_p), tau_m)
        token, p_token, total = _draw(kept_x, kept_id, n_kept, tau, mx, scale, u, block_mass, n_blocks,
                                      True, BLOCK, BLOCK_LIST)
    else:
        tau = tl.maximum(tl.maximum(tau_k, tau_p), tau_m)
        token, p_token, total = _draw(row, row, V, tau, mx, scale, u, block_mass, n_blocks, False,
                                      BLOCK, BLOCK_LIST)
    return token, tl.log((p_token.to(tl.float64) / total).to(tl.float32))


@triton.jit
def _sample_kernel(logits_ptr, stride, V, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, u_ptr,
                   tokens_ptr, logprobs_ptr, valid_ptr, scratch_ptr, n_blocks, stats_f_ptr, stats_i_ptr,
                   BLOCK: tl.constexpr, SUB: tl.constexpr, UNROLL: tl.constexpr,
                   NPROBE: tl.constexpr, BY_KEY: tl.constexpr, CAP: tl.constexpr, BLOCK_LIST: tl.constexpr,
                   SPLIT_STATS: tl.constexpr):
    pid = tl.program_id(0)
    row = logits_ptr + pid.to(tl.int64) * stride
    if SPLIT_STATS:  # _stats_kernel ran first, n_blocks programs per row
        at = pid.to(tl.int64) * n_blocks
        mx, argmax, low, n_finite, bad = _combine_stats(stats_f_ptr + 2 * at, stats_i_ptr + 3 * at, n_blocks, V,
                                                        BLOCK_LIST)
    else:
        mx, argmax, low, n_finite, bad = _stats(row, V, BLOCK)
    valid = (bad == 0) & (mx > -float("inf"))
    T = tl.load(temp_ptr + pid)
    if valid & (T != 0.0):
        token, logprob = _sample_row(row, V, mx, low, n_finite, T, tl.load(top_k_ptr + pid), tl.load(top_p_ptr + pid),
                                     tl.load(min_p_ptr + pid), tl.load(u_ptr + pid),
                                     scratch_ptr + pid.to(tl.int64) * (2 * CAP + 2 * n_blocks), n_blocks,
                                     BLOCK, SUB, UNROLL, NPROBE, BY_KEY, CAP, BLOCK_LIST)
        tl.store(tokens_ptr + pid, token.to(tl.int64))
        tl.store(logprobs_ptr + pid, logprob)
    else:  # greedy: the lowest-id argmax, drawn with probability 1; invalid: -1, NaN
        tl.store(tokens_ptr + pid, tl.where(valid, argmax, -1).to(tl.int64))
        tl.store(logprobs_ptr + pid, tl.where(valid, 0.0, float("nan")))
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
        n_blocks = triton.cdiv(V, BLOCK)
        scratch = torch.empty(B, 2 * CAP + 2 * n_blocks, dtype=torch.float32, device=dev)  # see _sample_row
        split = B <= SPLIT_STATS_ROWS
        # (without the split the kernel never reads them: any pointers of their types do)
        stats_f = torch.empty(B, n_blocks, 2, dtype=torch.float32, device=dev) if split else scratch
        stats_i = torch.empty(B, n_blocks, 3, dtype=torch.int32, device=dev) if split else tokens.view(torch.int32)
        if split:
            _stats_kernel[(B, n_blocks)](logits, logits.stride(0), V, stats_f, stats_i, n_blocks, BLOCK=BLOCK,
                                         num_warps=NUM_WARPS)
        _sample_kernel[(B,)](logits, logits.stride(0), V, temperature, top_k, top_p, min_p, uniforms,
                             tokens, logprobs, valid, scratch, n_blocks, stats_f, stats_i,
                             BLOCK=BLOCK, SUB=SUB, UNROLL=UNROLL, NPROBE=NPROBE, BY_KEY=BY_KEY, CAP=CAP,
                             BLOCK_LIST=BLOCK_LIST,
                             SPLIT_STATS=split, num_warps=NUM_WARPS)
    return tokens, logprobs, valid.bool()
