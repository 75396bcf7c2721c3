"""Triton kernels for fused linear + log-softmax gather (contract: ctrlsafe/ops/linear_logprobs.py).

All kernels work on the kept (non-ignored) rows only; the op wrapper compacts and scatters.
Logit tiles u = (h @ W.T) * scale (scale = 1/temperature), z = cap(u), are never stored:

- `_forward`: one program per BLOCK_T rows; loops over V blocks with an online max / sum and picks
  the target logit on the way; writes lse and logp.
- `_backward_h`: one program per BLOCK_T rows; recomputes each tile, forms du = dL/du and adds
  du @ W into its own rows of grad_h (fp32).
- `_backward_w`: one program per BLOCK_V vocabulary rows; recomputes each tile, forms du and adds
  du.T @ h into its own rows of grad_W (fp32).
Every output element has one owner program, so results are deterministic (no atomics), at the
price of recomputing each tile twice in the backward (5 matmuls in all instead of 4).

With upstream grads a (of logp) and b (of lse): du = (a * onehot(target) + (b - a) * p) * cap'(u)
* scale, p = exp(z - lse).
"""
import torch
import triton
import triton.language as tl

BLOCK_T = 64
BLOCK_V = 128
BLOCK_H = 64


@triton.jit
def _tanh(x):
    # tl.extra.libdevice is unavailable in the interpreter; this form saturates cleanly at +-inf
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logits_tile(h_ptr, w_ptr, offs_t, offs_v, T, V, H, stride_h, stride_w, scale, softcap,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(z, cap'(u)) for the tile rows offs_t x columns offs_v; z = -inf outside the vocabulary."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        hb = tl.load(h_ptr + offs_t[:, None] * stride_h + offs_h[None, :],
                     mask=(offs_t[:, None] < T) & (offs_h[None, :] < H), other=0.0)
        wb = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_h[None, :],
                     mask=(offs_v[:, None] < V) & (offs_h[None, :] < H), other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong
            hb = hb.to(tl.float32)
            wb = wb.to(tl.float32)
        acc = tl.dot(hb, tl.trans(wb), acc, input_precision=PRECISION)
    u = acc * scale
    if HAS_SOFTCAP:
        th = _tanh(u / softcap)
        z = softcap * th
        dcap = 1.0 - th * th
    else:
        z = u
        dcap = tl.full((BLOCK_T, BLOCK_V), 1.0, dtype=tl.float32)
    z = tl.where(offs_v[None, :] < V, z, float("-inf"))
    return z, dcap


@triton.jit
def _forward(h_ptr, w_ptr, tgt_ptr, logp_ptr, lse_ptr, T, V, H, stride_h, stride_w, scale, softcap,
             BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tgt = tl.load(tgt_ptr + offs_t, mask=offs_t < T, other=-1)
    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    z_tgt = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        z, _ = _logits_tile(h_ptr, w_ptr, offs_t, offs_v, T, V, H, stride_h, stride_w, scale, softcap,
                            BLOCK_T, BLOCK_V, BLOCK_H, HAS_SOFTCAP, UPCAST, PRECISION)
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every V block has a real column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        z_tgt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
    lse = m + tl.log(s)
    tl.store(lse_ptr + offs_t, lse, mask=offs_t < T)
    tl.store(logp_ptr + offs_t, z_tgt - lse, mask=offs_t < T)


@triton.jit
def _dlogits_tile(h_ptr, w_ptr, tgt, lse, a, coef, offs_t, offs_v, T, V, H, stride_h, stride_w, scale,
                  softcap, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dL/d(h @ W.T) on the tile: (a * onehot + (b - a) * p) * cap'(u) * scale; 0 off the edges."""
    z, dcap = _logits_tile(h_ptr, w_ptr, offs_t, offs_v, T, V, H, stride_h, stride_w, scale, softcap,
                           BLOCK_T, BLOCK_V, BLOCK_H, HAS_SOFTCAP, UPCAST, PRECISION)
    p = tl.exp(z - lse[:, None])  # 0 at the -inf columns past V
    du = coef[:, None] * p + tl.where(offs_v[None, :] == tgt[:, None], a[:, None], 0.0)
    return tl.where(offs_t[:, None] < T, du * dcap * scale, 0.0)


@triton.jit
def _backward_h(h_ptr, w_ptr, tgt_ptr, lse_ptr, a_ptr, coef_ptr, gh_ptr, T, V, H, stride_h, stride_w,
                scale, softcap, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = offs_t < T
    tgt = tl.load(tgt_ptr + offs_t, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + offs_t, mask=row_ok, other=0.0)
    a = tl.load(a_ptr + offs_t, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + offs_t, mask=row_ok, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        du = _dlogits_tile(h_ptr, w_ptr, tgt, lse, a, coef, offs_t, offs_v, T, V, H, stride_h, stride_w,
                           scale, softcap, BLOCK_T, BLOCK_V, BLOCK_H, HAS_SOFTCAP, UPCAST, PRECISION)
        du = du.to(w_ptr.dtype.element_ty)
        if UPCAST:
            du = du.to(tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            wb = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_h[None, :],
                         mask=(offs_v[:, None] < V) & (offs_h[None, :] < H), other=0.0)
            if UPCAST:
                wb = wb.to(tl.float32)
            gh_ptrs = gh_ptr + offs_t[:, None] * H + offs_h[None, :]
            gh_mask = row_ok[:, None] & (offs_h[None, :] < H)
            gh = tl.load(gh_ptrs, mask=gh_mask, other=0.0)
            gh = tl.dot(du, wb, gh, input_precision=PRECISION)
            tl.store(gh_ptrs, gh, mask=gh_mask)


@triton.jit
def _backward_w(h_ptr, w_ptr, tgt_ptr, lse_ptr, a_ptr, coef_ptr, gw_ptr, T, V, H, stride_h, stride_w,
                scale, softcap, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        row_ok = offs_t < T
        tgt = tl.load(tgt_ptr + offs_t, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + offs_t, mask=row_ok, other=0.0)
        a = tl.load(a_ptr + offs_t, mask=row_ok, other=0.0)
        coef = tl.load(coef_ptr + offs_t, mask=row_ok, other=0.0)
        du = _dlogits_tile(h_ptr, w_ptr, tgt, lse, a, coef, offs_t, offs_v, T, V, H, stride_h, stride_w,
                           scale, softcap, BLOCK_T, BLOCK_V, BLOCK_H, HAS_SOFTCAP, UPCAST, PRECISION)
        du_t = tl.trans(du.to(h_ptr.dtype.element_ty))
        if UPCAST:
            du_t = du_t.to(tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            hb = tl.load(h_ptr + offs_t[:, None] * stride_h + offs_h[None, :],
                         mask=row_ok[:, None] & (offs_h[None, :] < H), other=0.0)
            if UPCAST:
                hb = hb.to(tl.float32)
            gw_ptrs = gw_ptr + offs_v[:, None] * H + offs_h[None, :]
            gw_mask = col_ok[:, None] & (offs_h[None, :] < H)
            gw = tl.load(gw_ptrs, mask=gw_mask, other=0.0)
            gw = tl.dot(du_t, hb, gw, input_precision=PRECISION)
            tl.store(gw_ptrs, gw, mask=gw_mask)


def _config(hidden, softcap, temperature):
    """Scalar arguments and compile-time switches shared by the three kernels."""
    # fp32 inputs follow torch's matmul setting: exact unless the user allowed TF32
    precision = "tf32" if hidden.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return dict(scale=1.0 / temperature, softcap=float(softcap or 1.0), BLOCK_T=BLOCK_T, BLOCK_V=BLOCK_V,
                BLOCK_H=BLOCK_H, HAS_SOFTCAP=softcap is not None, UPCAST=bool(triton.knobs.runtime.interpret),
                PRECISION=precision)


class TritonLinearLogprobs(torch.autograd.Function):
    """(logp, lse) of the kept rows: hidden [n,H], weight [V,H], target [n] all in [0, V)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, softcap, temperature):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        T, H = hidden.shape
        V = weight.shape[0]
        logp = torch.empty(T, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        cfg = _config(hidden, softcap, temperature)
        if T:
            _forward[(triton.cdiv(T, BLOCK_T),)](hidden, weight, target, logp, lse, T, V, H, H, H, **cfg)
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.cfg = cfg
        return logp, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_lse):
        hidden, weight, target, lse = ctx.saved_tensors
        T, H = hidden.shape
        V = weight.shape[0]
        zero = torch.zeros_like(lse)
        a = grad_logp.float().contiguous() if grad_logp is not None else zero
        coef = (grad_lse.float() - a).contiguous() if grad_lse is not None else -a
        args = (hidden, weight, target, lse, a, coef)
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            gh = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
            if T:
                _backward_h[(triton.cdiv(T, BLOCK_T),)](*args, gh, T, V, H, H, H, **ctx.cfg)
            grad_h = gh.to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            gw = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
            if T:
                _backward_w[(triton.cdiv(V, BLOCK_V),)](*args, gw, T, V, H, H, H, **ctx.cfg)
            grad_w = gw.to(weight.dtype)
        return grad_h, grad_w, None, None, None

