"""Fused linear + log-softmax gather: log p(target_t) from hidden states without [T,V] logits.

Contract (all implementations): given hidden [T,H], weight [V,H] (same dtype, fp32 or bf16) and
target [T] int64, return fp32 logp [T] with

    z_t    = cap(hidden_t @ weight.T / temperature),  cap(x) = softcap * tanh(x / softcap) (if set)
    logp_t = z_t[target_t] - lse_t,                   lse_t = logsumexp(z_t)

and, with `return_lse=True`, also lse [T] fp32. Positions whose target is `ignore_index` give
logp = lse = 0 and no gradient. Both outputs are differentiable in hidden and weight (any
weighted sum of them can be backpropagated); gradients come back in the input dtype.
Products accumulate in fp32 (float64 inputs, accepted for gradcheck, stay float64 throughout).
Targets other than `ignore_index` must lie in [0, V).

Under torch.autocast the op is a matmul like F.linear and casts the same way: hidden and weight
(unless float64) go to the autocast dtype, so bf16 autocast with fp32 master weights runs the
bf16 kernels, and the weight's gradient reaches the fp32 parameter through the cast.
"""
import torch

from .dispatch import backend_for


def linear_logprobs(hidden, weight, target, ignore_index=-100, *, return_lse=False,
                    softcap: float | None = None, temperature: float = 1.0, backend=None):
    hidden, weight = autocast_operands(hidden, weight)
    check_inputs(hidden, weight, target, ignore_index, softcap, temperature)
    impl = {"reference": reference, "cpu": cpu, "triton": triton}[backend_for(hidden.device, backend)]
    logp, lse = impl(hidden, weight, target, ignore_index, softcap=softcap, temperature=temperature)
    return (logp, lse) if return_lse else logp


def autocast_operands(hidden, weight):
    """(hidden, weight) as autocast would hand them to a matmul: in the autocast dtype when it is
    enabled for their device, float64 left alone; unchanged otherwise. The op needs this itself:
    autocast only recasts the torch ops it knows, and under autocast the final hidden states are
    fp32 (the residual stream adds fp32 embeddings to bf16 layer outputs)."""
    kind = hidden.device.type
    if not torch.is_autocast_enabled(kind):
        return hidden, weight
    dtype = torch.get_autocast_dtype(kind)
    return tuple(x if x.dtype == torch.float64 else x.to(dtype) for x in (hidden, weight))


def check_inputs(hidden, weight, target, ignore_index, softcap, temperature):
    if hidden.dim() != 2 or weight.dim() != 2 or target.dim() != 1:
        raise ValueError(f"linear_logprobs wants hidden [T,H], weight [V,H], target [T]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(target.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != target.shape[0]:
        raise ValueError(f"linear_logprobs shape mismatch: hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}, target {tuple(target.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise ValueError(f"linear_logprobs wants hidden and weight both float32 or bfloat16; got "
                         f"{hidden.dtype} and {weight.dtype}")
    if target.dtype != torch.int64:
        raise ValueError(f"linear_logprobs wants int64 targets; got {target.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None; got {softcap}")
    V = weight.shape[0]
    bad = (target != ignore_index) & ((target < 0) | (target >= V))
    if bad.any():
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"target[{t}] = {int(target[t])} is outside the vocabulary [0, {V}) "
                         f"and is not ignore_index ({ignore_index})")


def reference(hidden, weight, target, ignore_index=-100, *, softcap=None, temperature=1.0):
    """The oracle: full [T,V] logits in the input dtype, log-softmax in fp32 (what naive code does;
    fp64 inputs stay fp64, which makes it the ground truth in tests)."""
    z = hidden @ weight.T
    z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    valid = target != ignore_index
    picked = z.gather(1, torch.where(valid, target, 0)[:, None]).squeeze(1)
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    return torch.where(valid, picked - lse, zero), torch.where(valid, lse, zero)


def cpu(hidden, weight, target, ignore_index=-100, *, softcap=None, temperature=1.0):
    return on_kept_rows(ChunkedLinearLogprobs.apply, hidden, weight, target, ignore_index, softcap, temperature)


def triton(hidden, weight, target, ignore_index=-100, *, softcap=None, temperature=1.0):
    from ctrlsafe.kernels.linear_logprobs import TritonLinearLogprobs

    return on_kept_rows(TritonLinearLogprobs.apply, hidden, weight, target, ignore_index, softcap, temperature)


def on_kept_rows(fn, hidden, weight, target, ignore_index, softcap, temperature):
    """Run fn(hidden, weight, target, softcap, temperature) -> (logp, lse) on the non-ignored rows
    only (prompt tokens cost nothing) and place the results back at their positions, 0 elsewhere."""
    rows = (target != ignore_index).nonzero().squeeze(1)
    logp, lse = fn(hidden[rows], weight, target[rows], softcap, temperature)
    return scatter_rows(logp, rows, len(target)), scatter_rows(lse, rows, len(target))


# Tile of the [T,V] logits computed at once (32 MB in fp32). Large, because every op on a shared
# CPU pays a fixed cost (OpenMP wake-up, ~ms under load) and each matmul should run near peak;
# small next to the [T,V] logits, and about the last-level cache for the elementwise passes.
CPU_BLOCK_T = 4096
CPU_BLOCK_V = 2048


class ChunkedLinearLogprobs(torch.autograd.Function):
    """(logp, lse) of kept rows (all targets in [0, V)), tiled over V outer, T inner.

    Forward keeps only lse [T]; backward recomputes each tile. Work runs on h_s = hidden /
    temperature in fp32 (fp64 for fp64 inputs, for gradcheck). With u = h_s @ W.T, z = cap(u),
    p = softmax(z) and upstream grads (a, b) of (logp, lse), the gradient wrt u is
        a * cap'(u) * onehot(target)  +  (b - a) * p * cap'(u):
    the sparse target term is applied with index ops, the dense term tile by tile, with the
    per-row factor (b - a) folded into the operands of the two matmuls instead of into the tile.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, softcap, temperature):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        T, V = hidden.shape[0], weight.shape[0]
        h_s = hidden.to(acc) / temperature
        lse = torch.full((T,), float("-inf"), dtype=acc, device=hidden.device)
        tile = hidden.new_empty(min(CPU_BLOCK_T, T) * min(CPU_BLOCK_V, V), dtype=acc)
        for v0 in range(0, V if T else 0, CPU_BLOCK_V):
            w = weight[v0:v0 + CPU_BLOCK_V].to(acc)
            for t0 in range(0, T, CPU_BLOCK_T):
                z = logits_tile(h_s[t0:t0 + CPU_BLOCK_T], w, tile)
                if softcap is not None:
                    z.div_(softcap).tanh_().mul_(softcap)
                m = z.amax(1)
                tile_lse = z.sub_(m[:, None]).exp_().sum(1).log_().add_(m)
                lse_rows = lse[t0:t0 + CPU_BLOCK_T]
                torch.logaddexp(lse_rows, tile_lse, out=lse_rows)
        u_tgt = (h_s * weight[target].to(acc)).sum(1)
        ctx.save_for_backward(hidden, weight, target, lse, u_tgt)
        ctx.softcap, ctx.temperature = softcap, temperature
        return cap(u_tgt, softcap) - lse, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_lse):
        hidden, weight, target, lse, u_tgt = ctx.saved_tensors
        softcap, temperature = ctx.softcap, ctx.temperature
        want_h, want_w = ctx.needs_input_grad[:2]
        acc, T = lse.dtype, len(lse)
        V, H = weight.shape
        zero = torch.zeros_like(lse)
        a = grad_logp.to(acc) if grad_logp is not None else zero
        b = grad_lse.to(acc) if grad_lse is not None else zero
        coef = b - a
        a_tgt = a * cap_grad(u_tgt, softcap)  # gradient wrt u at the target logit
        h_s = hidden.to(acc) / temperature
        h_coef = coef[:, None] * h_s

        grad_hs = torch.zeros(T, H, dtype=acc, device=hidden.device) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        # fp32 weights accumulate straight into grad_w; bf16 ones through an fp32 chunk buffer
        gw_buf = None if weight.dtype == acc else weight.new_empty(min(CPU_BLOCK_V, V), H, dtype=acc)
        tile = hidden.new_empty(min(CPU_BLOCK_T, T) * min(CPU_BLOCK_V, V), dtype=acc)
        tile2 = torch.empty_like(tile) if softcap is not None else None
        for v0 in range(0, V if T else 0, CPU_BLOCK_V):
            w = weight[v0:v0 + CPU_BLOCK_V].to(acc)
            if want_w:
                gw = grad_w[v0:v0 + len(w)] if gw_buf is None else gw_buf[:len(w)].zero_()
            for t0 in range(0, T, CPU_BLOCK_T):
                t1 = t0 + CPU_BLOCK_T
                q = probs_tile(h_s[t0:t1], w, lse[t0:t1], tile, tile2, softcap)  # p * cap'(u)
                if want_h:
                    grad_hs[t0:t1].addmm_(q, w)
                if want_w:
                    gw.addmm_(q.T, h_coef[t0:t1])
            if want_w:
                here = ((target >= v0) & (target < v0 + len(w))).nonzero().squeeze(1)
                # index_put_, not index_add_: the latter is ~50x slower into a view with an offset
                gw.index_put_((target[here] - v0,), a_tgt[here, None] * h_s[here], accumulate=True)
                if gw_buf is not None:
                    grad_w[v0:v0 + len(w)].copy_(gw)
        grad_h = None
        if want_h:
            grad_hs.mul_(coef[:, None]).addcmul_(a_tgt[:, None], weight[target].to(acc))
            grad_h = grad_hs.div_(temperature).to(hidden.dtype)
        return grad_h, grad_w, None, None, None


def logits_tile(h, w, tile):
    """h @ w.T written into the front of the preallocated buffer `tile` (no allocation)."""
    return torch.mm(h, w.T, out=tile[:len(h) * len(w)].view(len(h), len(w)))


def probs_tile(h, w, lse, tile, tile2, softcap):
    """softmax(cap(u)) * cap'(u) for the tile u = h @ w.T, given the rows' lse."""
    u = logits_tile(h, w, tile)
    if softcap is None:
        return u.sub_(lse[:, None]).exp_()
    th = u.div_(softcap).tanh_()
    p = torch.mul(th, softcap, out=tile2[:th.numel()].view_as(th)).sub_(lse[:, None]).exp_()
    return p.mul_(th.square_().neg_().add_(1))


def cap(u, softcap):
    return u if softcap is None else softcap * torch.tanh(u / softcap)


def cap_grad(u, softcap):
    return torch.ones_like(u) if softcap is None else 1 - torch.tanh(u / softcap) ** 2


def scatter_rows(values, rows, T):
    """Values of the kept rows placed into a zero vector of length T (differentiable)."""
    return values.new_zeros(T).index_copy(0, rows, values)
