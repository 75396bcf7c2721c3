"""GPU linear_logprobs (contract: ctrlsafe/ops/linear_logprobs.py): cuBLAS GEMMs on tensor cores
around two Triton row kernels, over chunks of the vocabulary.

All work is on the kept (non-ignored) rows; the op wrapper compacts and scatters. For a chunk of
vocabulary rows W_c = W[v0:v1] the [T, v1-v0] logits x = h @ W_c.T are written by cuBLAS in fp32
(bf16 inputs on tensor cores, fp32 accumulation and output), into one buffer reused chunk after
chunk. With u = x / temperature, z = cap(u):

- forward, per chunk: `_chunk_lse` (one program per row) writes the chunk's logsumexp of z and,
  in the chunk holding the row's target, z[target]. The per-chunk results [chunks, T] merge in
  torch.logsumexp at the end, always in the same order.
- backward, per chunk: recompute x; `_chunk_grad` (one program per row) turns it into
  dL/dx = (a * onehot(target) + (b - a) * p) * cap'(u) / temperature, p = exp(z - lse), with a, b
  the upstream grads of logp and lse, stored in the input dtype (over x itself when that is
  fp32); then grad_W[v0:v1] = du.T @ h (complete: its sum runs over all T rows, so grad_W is
  written once, never read back) and grad_h += du @ W_c (fp32 accumulator [T, H]).

Every reduction has a fixed order: cuBLAS is bitwise reproducible for fixed shapes on one GPU
model, the row kernels reduce each row in one program, the chunk merge and grad_h sum run in
chunk order. Two runs give the same bits.

Why this design and not one fused Triton kernel, for T=4096, H=4096, V=128256 in bf16 on an H100
(990 TFLOP/s dense bf16, 3.35 TB/s); one [T,H] x [H,V] GEMM is 2*T*V*H = 4.3 TFLOP, 4.3 ms at peak:
- here: 4 GEMMs (logits, recomputed logits, grad_h, grad_W) = 17.2 TFLOP, 17.4 ms at peak, ~22-25
  ms at the 70-80% cuBLAS reaches on these shapes; plus the row kernels' traffic (read fp32 logits
  forward, read fp32 + write bf16 backward: 10 B x T*V = 5.3 GB, 1.6 ms) and the grad_h sum
  (16 chunks x 12 B x T*H = 3.2 GB, 1 ms): ~25-28 ms forward + backward, ~6-7 ms forward alone. The
  logits written and du read again by the GEMMs (12 B x T*V) ride in compute-bound GEMMs.
- fused: the forward fuses well (no logits written), but the backward cannot. A logits tile
  [BT, BV] needs the full H=4096 sum before it becomes du, and then feeds grad_h rows [BT, H] and
  grad_W rows [BV, H]: 0.5-1 MB fp32 accumulators per program, far beyond registers. The choices
  are atomics (cut-cross-entropy's; not deterministic), read-modify-write of fp32 grad tiles in
  global memory inside the loop (the previous kernels': T*V*H*8/BV + T*V*H*8/BT = 134 + 269 GB of
  traffic at BT=64, BV=128, before L2, plus register spills), or one program per (rows, H block)
  recomputing its logits for every H block (H/BH = 16-32 times the GEMM work). The cheapest
  deterministic variant recomputes the logits once per gradient: 5 GEMMs, 21.5 TFLOP, 22 ms at
  peak, ~35-45 ms at the 50-65% a Triton GEMM with a softmax epilogue sustains.
So chunked cuBLAS wins by roughly 1.5x, and its tensor-core GEMMs are NVIDIA's.

Chunks: all T rows at once and vocabulary chunks of `_chunk_cols` columns: about CHUNK_ELEMS
logits (128 MB fp32 + 64 MB bf16 du), but at least MIN_CHUNK_V columns: grad_h's fp32 sum costs
12 B per [T,H] element per chunk, ~424/cols of the chunk's GEMM time (5% at 8192). Keeping T
whole means grad_W, V x H, never needs an accumulator; only grad_h, T x H, does (fp32, plus one
product buffer: 2 x 64 MB at T = H = 4096). The price: past T = 4096 the chunk buffers grow by
48 KB per row (1.5 GB at T = 32768).

Grid sizes: the GEMMs' tiles (cuBLAS picks them per shape; at T=512 the [512, 4096] grad_h
product gets split-K) and the row kernels' T programs (512 or 4096) fill the 132 SMs. The row
kernels use one fixed config: they are memory-bound (16 KB of a row per step, 16 values per
thread, 16-byte loads when the chunk width is a multiple of 16, as every chunk at V=128256 is)
and gain nothing from autotuning, which would also need a driver.

fp32 inputs: the GEMMs follow torch's matmul setting (TF32 only if allowed); float64 inputs stay
float64 throughout. bf16 x bf16 -> fp32 GEMMs need torch.mm's out_dtype (CUDA, torch >= 2.8).
"""
import torch
import triton
import triton.language as tl

CHUNK_ELEMS = 2**25  # logits per chunk, about
MIN_CHUNK_V = 8192  # vocabulary columns per chunk, at least
BLOCK_V = 4096  # row kernels: columns per step
NUM_WARPS = 8


@triton.jit
def _tanh(x):
    # tl.extra.libdevice is unavailable in the interpreter; this form saturates cleanly at +-inf
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _cap(u, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        u = softcap * _tanh(u / softcap)
    return u


@triton.jit
def _chunk_lse(x_ptr, tgt_ptr, lse_ptr, z_tgt_ptr, n_cols, v0, stride_x, scale, softcap,
               HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row program_id of a chunk of raw logits x (columns v0 .. v0 + n_cols of the vocabulary):
    lse_ptr[row] = logsumexp(cap(x * scale)); z_tgt_ptr[row] = cap(x[target] * scale) if the
    row's target is in this chunk (left alone otherwise). Works in x's dtype (fp32 or fp64)."""
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    m = tl.full([], float("-inf"), x_ptr.dtype.element_ty)
    s = tl.zeros([], x_ptr.dtype.element_ty)
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        inside = cols < n_cols
        z = _cap(tl.load(x_row + cols, mask=inside, other=0.0) * scale, softcap, HAS_SOFTCAP)
        z = tl.where(inside, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))  # finite: every step has a real column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    tl.store(lse_ptr + row, m + tl.log(s))
    col = tl.load(tgt_ptr + row) - v0
    here = (col >= 0) & (col < n_cols)
    x_tgt = tl.load(x_row + col, mask=here, other=0.0)
    tl.store(z_tgt_ptr + row, _cap(x_tgt * scale, softcap, HAS_SOFTCAP), mask=here)


@triton.jit
def _chunk_grad(x_ptr, du_ptr, tgt_ptr, lse_ptr, a_ptr, coef_ptr, n_cols, v0, stride_x, stride_du,
                scale, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row program_id of a chunk: du = dL/dx = (a * onehot(target) + coef * p) * cap'(u) * scale
    with u = x * scale, p = exp(cap(u) - lse), coef = b - a; stored in du's dtype. du may be x
    itself: each element is read, then written, by the same program."""
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    du_row = du_ptr + row.to(tl.int64) * stride_du
    col_tgt = tl.load(tgt_ptr + row) - v0
    lse = tl.load(lse_ptr + row)
    a = tl.load(a_ptr + row)
    coef = tl.load(coef_ptr + row)
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        inside = cols < n_cols
        u = tl.load(x_row + cols, mask=inside, other=0.0) * scale
        at_target = tl.where(cols == col_tgt, a, 0.0)
        if HAS_SOFTCAP:
            th = _tanh(u / softcap)
            g = (coef * tl.exp(softcap * th - lse) + at_target) * (1.0 - th * th)
        else:
            g = coef * tl.exp(u - lse) + at_target
        tl.store(du_row + cols, (g * scale).to(du_ptr.dtype.element_ty), mask=inside)


def _chunk_cols(T, V):
    """Vocabulary columns per chunk (see the module docstring); a multiple of 128 when below V,
    so every chunk but the last starts aligned."""
    return min(V, max(MIN_CHUNK_V, CHUNK_ELEMS // max(T, 1) // 128 * 128))


def _matmul(a, b, out):
    """a @ b written into `out` (fp32, or fp64 for fp64 inputs), summed in out's precision.

    bf16 on CUDA: cuBLAS's tensor-core GEMM with an fp32 output (torch.mm out_dtype). bf16 on CPU
    (the interpreter tests; CPU torch has no bf16 -> fp32 mm): the operands upcast, which gives the
    same exact products. Always an out= call: autocast never recasts those, and backward may run
    inside an autocast region."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if a.device.type == "cpu":
        return torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)
    return torch.mm(a, b, out_dtype=out.dtype, out=out)


def _row_kernel_config(softcap, temperature):
    return dict(scale=1.0 / temperature, softcap=float(softcap or 1.0), HAS_SOFTCAP=softcap is not None,
                BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)


class TritonLinearLogprobs(torch.autograd.Function):
    """(logp, lse) of the kept rows: hidden [T,H], weight [V,H], target [T] all in [0, V)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, softcap, temperature):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        T, V = hidden.shape[0], weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        cfg = _row_kernel_config(softcap, temperature)
        cols = _chunk_cols(T, V)
        starts = range(0, V if T else 0, cols)
        chunk_lse = hidden.new_empty(len(starts), T, dtype=acc)
        z_tgt = hidden.new_empty(T, dtype=acc)  # every row's target lies in exactly one chunk
        buf = hidden.new_empty(T * cols, dtype=acc)
        for c, v0 in enumerate(starts):
            w = weight[v0:v0 + cols]
            x = _matmul(hidden, w.T, buf[:T * len(w)].view(T, len(w)))
            _chunk_lse[(T,)](x, target, chunk_lse[c], z_tgt, len(w), v0, x.stride(0), **cfg)
        lse = torch.logsumexp(chunk_lse, 0)
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.cfg = cfg
        return z_tgt - lse, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_lse):
        hidden, weight, target, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[:2]
        (T, H), V = hidden.shape, weight.shape[0]
        if T == 0:  # every row ignored: nothing to launch
            return (torch.zeros_like(hidden) if want_h else None, torch.zeros_like(weight) if want_w else None,
                    None, None, None)
        a = grad_logp.to(lse.dtype).contiguous()  # unused outputs arrive as zeros, never None
        coef = (grad_lse.to(lse.dtype) - a).contiguous()
        cols = _chunk_cols(T, V)
        buf = hidden.new_empty(T * cols, dtype=lse.dtype)
        # du in the input dtype (the GEMMs' operand type), written over the logits when that is
        # fp32. The interpreter's fp32 -> bf16 conversion truncates (the GPU's rounds to nearest
        # even), so there the kernel writes fp32 and torch rounds.
        round_on_host = hidden.dtype != lse.dtype and triton.knobs.runtime.interpret
        du_buf = buf if hidden.dtype == lse.dtype or round_on_host else hidden.new_empty(T * cols)
        grad_w = torch.empty_like(weight) if want_w else None
        grad_h = hidden.new_empty(T, H, dtype=lse.dtype) if want_h else None  # summed over chunks
        prod = torch.empty_like(grad_h) if want_h and cols < V else None
        for v0 in range(0, V, cols):
            w = weight[v0:v0 + cols]
            x = _matmul(hidden, w.T, buf[:T * len(w)].view(T, len(w)))
            du = du_buf[:T * len(w)].view(T, len(w))
            _chunk_grad[(T,)](x, du, target, lse, a, coef, len(w), v0, x.stride(0), du.stride(0), **ctx.cfg)
            if round_on_host:
                du = du.to(hidden.dtype)
            if want_w:  # summed over all T rows in fp32 inside the GEMM, rounded once
                torch.mm(du.T, hidden, out=grad_w[v0:v0 + len(w)])
            if want_h and v0 == 0:
                _matmul(du, w, grad_h)
            elif want_h:
                grad_h.add_(_matmul(du, w, prod))
        return grad_h.to(hidden.dtype) if want_h else None, grad_w, None, None, None
