"""Sampling op: per-row temperature / top-k / top-p / min-p, inverse CDF in vocabulary order.

Contract (all implementations): given logits [B,V] and per-row parameters temperature fp32, top_k
int64 (0 = off), top_p fp32 (1 = off), min_p fp32 (0 = off) and uniforms fp32 in [0,1), each a
[B] tensor or one Python number for every row (already validated), return (tokens int64,
logprobs fp32, valid bool). The kept set of a row is, on z = logits / T:
  1. top-k: z >= the k-th largest z (ties at the k-th value are all kept);
  2. top-p: on the softmax p of the top-k survivors, p >= t for the largest t whose kept mass
     sum(p >= t) reaches top_p (ties kept together; tiny top_p keeps just the max and its ties);
  3. min-p: p >= min_p * max(p).
The token is the first id (in vocabulary order) whose running kept mass exceeds u * (kept mass).
T = 0 is greedy: argmax of the raw logits (lowest id on ties). logprob is the log of the
probability, over u, that this op returns that token for that row: log(p_token / kept mass) when
sampling, 0 for greedy rows (a deterministic choice). Rows holding NaN or +inf, or only -inf,
are invalid: token -1, logprob NaN, valid False.
"""
import torch

from .. import _C
from .dispatch import backend_for


def sample_rows(logits, temperature, top_k, top_p, min_p, uniforms, *, backend=None):
    impl = {"reference": reference, "cpu": cpu, "triton": triton}[backend_for(logits.device, backend)]
    return impl(logits, temperature, top_k, top_p, min_p, uniforms)


def invalid_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.isnan(x).any(-1) | torch.isposinf(x).any(-1) | torch.isneginf(x).all(-1)


def per_row(value, B: int, dtype, device) -> torch.Tensor:
    """A parameter as a [B] tensor of `dtype` (numbers are broadcast)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype)
    return torch.full((B,), value, dtype=dtype, device=device)


@torch.no_grad()
def reference(logits, temperature, top_k, top_p, min_p, uniforms):
    """The oracle: float64, full sort allowed."""
    x = logits.double()
    B, V = x.shape
    uniforms = per_row(uniforms, B, torch.float32, x.device)
    invalid = invalid_rows(x)
    x = torch.where(invalid[:, None], torch.zeros_like(x), x)
    greedy = per_row(temperature, B, torch.float32, x.device) == 0
    q = kept_masses(x, temperature, top_k, top_p, min_p)
    total = q.sum(-1, keepdim=True)
    cdf = q.cumsum(-1)
    target = uniforms.double()[:, None] * total
    token = (cdf <= target).sum(-1)
    # u * total rounding up to the full mass: the last kept token that has mass (a kept -inf
    # logit or an underflowed exp has none and must never be drawn)
    last_kept = V - 1 - (q > 0).flip(-1).int().argmax(-1)
    token = torch.minimum(token, last_kept)
    logprob = (q.gather(1, token[:, None]) / total).log().squeeze(1)

    token = torch.where(greedy, x.argmax(-1), token)
    logprob = torch.where(greedy, torch.zeros_like(logprob), logprob)

    token = torch.where(invalid, torch.full_like(token, -1), token)
    logprob = torch.where(invalid, torch.full_like(logprob, float("nan")), logprob)
    return token, logprob.float(), ~invalid


def kept_masses(x, temperature, top_k, top_p, min_p):
    """The contract's kept set as float64 masses [B,V] of float64 logits x (valid rows: no NaN or
    +inf, not all -inf): the softmax of the tempered top-k survivors where kept, 0 elsewhere
    (greedy rows, T = 0, as T = 1). Divided by their sum they are the distribution a row is
    drawn from."""
    B, V = x.shape
    temperature, top_p, min_p = (per_row(v, B, torch.float32, x.device) for v in (temperature, top_p, min_p))
    top_k = per_row(top_k, B, torch.int64, x.device)
    greedy = temperature == 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).double()
    z = x / t[:, None]
    sorted_z = z.sort(dim=-1, descending=True).values

    keep = torch.ones_like(z, dtype=torch.bool)
    k_on = (top_k > 0) & (top_k < V)
    kth = sorted_z.gather(1, (top_k.clamp(1, V) - 1)[:, None])
    keep &= ~k_on[:, None] | (z >= kth)

    p = torch.softmax(z.masked_fill(~keep, float("-inf")), dim=-1)  # renormalised over top-k survivors
    sorted_p = p.sort(dim=-1, descending=True).values
    mass_before = sorted_p.cumsum(-1) - sorted_p
    # the cut is the smallest prefix of the sorted list whose mass reaches top_p
    n_keep = (mass_before < top_p.double()[:, None]).sum(-1).clamp(min=1)
    threshold = sorted_p.gather(1, (n_keep - 1)[:, None])
    p_on = top_p < 1
    keep &= ~p_on[:, None] | (p >= threshold)

    keep &= p >= min_p.double()[:, None] * p.max(-1, keepdim=True).values

    return torch.where(keep, p, torch.zeros_like(p))


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def cpu(logits, temperature, top_k, top_p, min_p, uniforms):
    """The C++ kernel (csrc/sampling.cpp): reads the logits in place, no sort of the vocabulary."""
    if logits.device.type != "cpu":  # forced with CTRLSAFE_BACKEND=cpu on a GPU tensor
        out = cpu(logits.cpu(), temperature, top_k, top_p, min_p, uniforms)
        return tuple(t.to(logits.device) for t in out)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    keep = []  # converted parameter tensors must outlive the call
    args = []
    for value, dtype in ((temperature, torch.float32), (top_k, torch.int64), (top_p, torch.float32), (min_p, torch.float32), (uniforms, torch.float32)):
        if isinstance(value, torch.Tensor):
            if value.dtype is not dtype or not value.is_contiguous() or value.device.type != "cpu":
                value = value.to("cpu", dtype).contiguous()
            keep.append(value)
            args += (value.data_ptr(), 0)
        else:
            args += (0, value)
    tokens = torch.empty(B, dtype=torch.int64)
    logprobs = torch.empty(B, dtype=torch.float32)
    valid = torch.empty(B, dtype=torch.bool)
    if B:
        _C.sample_rows(logits.data_ptr(), _DTYPE_CODE[logits.dtype], B, V, logits.stride(0), *args, tokens.data_ptr(), logprobs.data_ptr(), valid.data_ptr())
    return tokens, logprobs, valid


def triton(logits, temperature, top_k, top_p, min_p, uniforms):
    from ctrlsafe.kernels.sampling import sample as triton_sample

    return triton_sample(logits, temperature, top_k, top_p, min_p, uniforms)
