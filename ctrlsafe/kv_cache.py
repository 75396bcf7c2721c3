"""A KV cache whose prompt segment is stored once per prompt and shared by all its rows.

Layout per layer:
  prefix  K/V [P, Hkv, Lp, D]  one entry per unique prompt (right-padded, lengths prefix_len[P])
  rows    K/V [S, Hkv, Ls, D]  one slot per row (control suffix + response), row_prefix[S] -> P
A row's query attends to [its prompt's prefix | its own suffix so far]; the two partial
attentions are computed separately and merged by log-sum-exp, so the prefix is never copied
into the rows' storage.

The prefix part is computed per prompt, not per row: the queries of all rows of one prompt are
stacked into one matrix and multiplied by that prompt's keys once (a [P, Hkv, rows*T, Lp]
batched matmul), so no step gathers a copy of the prefix for every row.

Used by the generation engine (control suffixes and decoding) and by shared-prompt reward
scoring. It implements the model's cache protocol: `attend(layer, q, k, v, positions)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _C
from .model import KVCache, ModelArgs
from .ops.dispatch import backend_for

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 2}  # storage dtypes of the fused decode kernel


@dataclass
class _Groups:
    """Where each selected row sits in a [prompts, rows_per_prompt] grid (built once per slot set)."""

    prompts: torch.Tensor  # [P'] the distinct prompts of the selected rows
    width: int  # max rows of one prompt
    grid_rows: torch.Tensor  # [P' * width] row feeding each grid cell (padding cells repeat row 0)
    cell: torch.Tensor  # [R] grid cell of each row
    all_prompts: bool  # prompts == arange(P): the prefix tensors are used without a gather
    contiguous: slice | None  # the slots as a slice when they are a contiguous range
    Lp: int  # longest prefix of the selected prompts
    prefix_mask: torch.Tensor  # [P',1,1,Lp] key j of the prompt's prefix is real (j < its length)


def _prefill(model, prompts: list[list[int]]):
    """Each prompt's K/V per layer [P,Hkv,Lp,D] (one right-padded batch), lengths [P] and the
    hidden state at its last real token [P,H].

    Right padding never changes results: pads sit after each prompt's real tokens, so causal
    attention keeps them out of real positions, and the lengths mask them afterwards."""
    device = model.embed_tokens.weight.device
    lens = torch.tensor([len(p) for p in prompts], device=device)
    if (lens == 0).any():
        raise ValueError(f"prompt {int((lens == 0).nonzero()[0, 0])} is empty")
    ids = torch.zeros(len(prompts), int(lens.max()), dtype=torch.int64, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.as_tensor(p, device=device)
    kv = KVCache(model.args, len(prompts), ids.shape[1], dtype=model.embed_tokens.weight.dtype, device=device)
    hidden = model.hidden_states(ids, None, kv, keep=lens - 1)
    return kv.k, kv.v, lens, hidden[:, 0]


class PrefixCache:
    # "reference" forces the torch attention path (also CTRLSAFE_BACKEND=reference); None picks by device
    backend: str | None = None

    def __init__(self, args: ModelArgs, prefix_k, prefix_v, prefix_len: torch.Tensor, row_prefix: torch.Tensor, suffix_capacity: int):
        self.prefix_k, self.prefix_v = prefix_k, prefix_v  # lists over layers of [P,Hkv,Lp,D]
        self.prefix_len = prefix_len.to(torch.int64)  # [P]
        self.row_prefix = row_prefix.to(torch.int64)  # [S]
        S, dtype, device = len(row_prefix), prefix_k[0].dtype, prefix_k[0].device
        shape = (S, args.num_key_value_heads, suffix_capacity, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self._slots: torch.Tensor | None = None
        self._groups: _Groups | None = None
        self._step: tuple | None = None  # per-forward values shared by all layers (set at layer 0)
        self._fused: tuple | None = None  # per-forward arguments of the fused decode kernel (set at layer 0)
        # an upper bound on the suffix offsets of the next forward, from a caller that knows it on the
        # host (the engine's decode loop): the torch path then reads no offsets back from the device
        self.offset_bound: int | None = None
        # attend over the whole suffix capacity (masked) so a forward's shapes do not change with the
        # step: what CUDA-graph capture needs (the engine sets it with cuda_graphs=True)
        self.static_shapes = False

    @classmethod
    def from_prompts(cls, model, prompts: list[list[int]], row_prefix: torch.Tensor, suffix_capacity: int) -> "PrefixCache":
        """Prefill every unique prompt once (right-padded batch) and return the cache over them."""
        k, v, lens, hidden = _prefill(model, prompts)
        cache = cls(model.args, k, v, lens, row_prefix.to(lens.device), suffix_capacity)
        cache.prefix_hidden = hidden  # [P,H] at each prompt's last real token: its next-token logits
        return cache

    def add_prompts(self, model, prompts: list[list[int]]) -> int:
        """Prefill more prompts into the prefix store, after those there; returns the first one's index.
        (The engine's refill: rows of new prompts join a running batch.)"""
        k, v, lens, hidden = _prefill(model, prompts)
        first, Lp = len(self.prefix_len), max(self.prefix_k[0].shape[2], k[0].shape[2])
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, Lp - t.shape[2]))  # noqa: E731
        self.prefix_k = [torch.cat([pad(a), pad(b)]) for a, b in zip(self.prefix_k, k)]
        self.prefix_v = [torch.cat([pad(a), pad(b)]) for a, b in zip(self.prefix_v, v)]
        self.prefix_len = torch.cat([self.prefix_len, lens])
        self.prefix_hidden = torch.cat([self.prefix_hidden, hidden])
        self.slots = self._slots  # the groups index the prefix store
        return first

    def keep_prompts(self, keep: list[int], rows: int, Lp: int) -> None:
        """Keep prefix entries `keep` (in that order, renumbered 0..) and drop the rest; slots
        0..rows-1, which must reference kept prompts only, are renumbered with them. Lp: the
        longest kept prompt (the caller knows it: no read back)."""
        P = len(self.prefix_len)
        dev = self.prefix_len.device
        index = torch.tensor(keep, dtype=torch.int64, device=dev)
        renumber = torch.zeros(P, dtype=torch.int64, device=dev)
        renumber[index] = torch.arange(len(keep), device=dev)
        self.prefix_k = [t[index, :, :Lp] for t in self.prefix_k]
        self.prefix_v = [t[index, :, :Lp] for t in self.prefix_v]
        self.prefix_len, self.prefix_hidden = self.prefix_len[index], self.prefix_hidden[index]
        self.row_prefix[:rows] = renumber[self.row_prefix[:rows]]
        self.slots = self._slots

    def grow(self, slots: int) -> None:
        """At least `slots` row slots (new ones empty, row_prefix 0)."""
        S = len(self.row_prefix)
        if slots <= S:
            return
        more = lambda t: torch.cat([t, t.new_zeros((slots - S, *t.shape[1:]))])  # noqa: E731
        self.k, self.v = [more(t) for t in self.k], [more(t) for t in self.v]
        self.row_prefix = more(self.row_prefix)

    # -- slots --------------------------------------------------------------------------------
    @property
    def slots(self) -> torch.Tensor | None:
        """Rows taking part in the next forward (None = all), in the order of the batch's rows."""
        return self._slots

    @slots.setter
    def slots(self, value: torch.Tensor | None):
        self._slots = value
        self._groups = None

    def compact(self, keep: torch.Tensor) -> None:
        """Move slots `keep` (in that order) to slots 0..len(keep)-1; the other slots become free.

        The engine calls this when rows retire, so the live rows stay a contiguous range whose
        suffix keys are read as a view instead of a gather.
        """
        n = len(keep)
        for store in (self.k, self.v):
            for t in store:
                t[:n] = t[keep]
        self.row_prefix[:n] = self.row_prefix[keep].clone()
        self.slots = torch.arange(n, device=keep.device)

    def storage_bytes(self) -> dict[str, int]:
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return {"prefix": size(self.prefix_k) + size(self.prefix_v), "rows": size(self.k) + size(self.v)}

    def suffix_positions(self, slots: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Absolute positions [R,T] of suffix offsets [R,T] in rows `slots` (prompt length + offset)."""
        return self.prefix_len[self.row_prefix[slots]][:, None] + offsets

    # -- attention ----------------------------------------------------------------------------
    def attend(self, layer, q, k, v, positions):
        R, Hq, T, D = q.shape
        if self._slots is None:
            self.slots = torch.arange(R, device=q.device)
        if T == 1:
            if layer == 0 or self._fused is None:
                self._fused = self._prepare_decode(q, positions)
            if self._fused[0]:
                return self._attend_decode(layer, q, k, v)
        if layer == 0 or self._step is None:
            self._step = self._prepare_step(positions)
        offsets, Ls, suffix_mask, Lp, prefix_mask = self._step
        slots, groups = self._slots, self._groups
        # write the new keys/values at each row's own offsets
        self.k[layer][slots[:, None].expand(R, T), :, offsets] = k.transpose(1, 2)
        self.v[layer][slots[:, None].expand(R, T), :, offsets] = v.transpose(1, 2)

        rows = groups.contiguous if groups.contiguous is not None else slots
        ks, vs = self.k[layer][rows, :, :Ls], self.v[layer][rows, :, :Ls]
        o2, lse2 = partial_attention(q, ks, vs, suffix_mask)
        o1, lse1 = self._prefix_attention(layer, q, Lp, prefix_mask)
        return merge_attention(o1, lse1, o2, lse2).to(q.dtype)

    def _prepare_decode(self, q, positions):
        """Whether this T=1 forward runs the fused kernel, and its per-forward arguments."""
        k0 = self.k[0]
        ok = (q.device.type == "cpu" and backend_for(q.device, self.backend) == "cpu" and q.dtype in _DTYPE_CODE
              and k0.dtype == q.dtype and self.prefix_k[0].dtype == q.dtype)
        if not ok:
            return (False,)
        self.offset_bound = None  # the kernel checks every row's offset itself
        slots = self._slots.to(torch.int64).contiguous()
        if len(slots) != q.shape[0] or positions.shape[0] != q.shape[0]:
            raise ValueError(f"{q.shape[0]} query rows for {len(slots)} slots and {positions.shape[0]} positions")
        row_prefix = self.row_prefix.contiguous()
        prefix_len = self.prefix_len.contiguous()
        positions = positions.to(torch.int64)
        # the tensors are kept here so their data pointers stay valid for all layers
        return (True, slots, row_prefix, prefix_len, positions)

    def _attend_decode(self, layer, q, k, v):
        """The fused C++ kernel (csrc/decode_attention.cpp) for one new token per row: writes the
        token's K/V at each row's offset (position - prompt length) in its slot, then attends
        over [its prompt's prefix keys | its suffix keys up to and including the new one] with
        one softmax in fp32. Same result as the torch path below (the reference), up to float
        rounding; out [R,Hq,1,D] in q's dtype."""
        _, slots, row_prefix, prefix_len, positions = self._fused
        R, Hq, _, D = q.shape
        pk, pv, rk, rv = self.prefix_k[layer], self.prefix_v[layer], self.k[layer], self.v[layer]
        if not (pk.is_contiguous() and pv.is_contiguous()):
            pk, pv = pk.contiguous(), pv.contiguous()
        if q.stride(3) != 1:
            q = q.contiguous()
        if k.stride(3) != 1 or v.stride(3) != 1 or k.dtype != rk.dtype or v.dtype != rk.dtype:
            k, v = k.to(rk.dtype).contiguous(), v.to(rk.dtype).contiguous()
        out = torch.empty(R, Hq, 1, D, dtype=q.dtype)
        P, Hkv, Lp, _ = pk.shape
        _C.decode_attention(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                            v.data_ptr(), v.stride(0), v.stride(1), pk.data_ptr(), pv.data_ptr(), rk.data_ptr(),
                            rv.data_ptr(), slots.data_ptr(), row_prefix.data_ptr(), prefix_len.data_ptr(),
                            positions.data_ptr(), positions.stride(0), out.data_ptr(), _DTYPE_CODE[rk.dtype], R, Hq,
                            Hkv, D, P, Lp, rk.shape[0], rk.shape[2], True)
        return out

    def _prepare_step(self, positions):
        """Offsets, lengths and masks of one forward; the same for every layer."""
        if self._groups is None:
            self._groups = self._group(self._slots)
        g = self._groups
        plen = self.prefix_len[self.row_prefix[self._slots]]
        offsets = positions - plen[:, None]  # [R,T] offsets inside each row's suffix
        bound, self.offset_bound = self.offset_bound, None
        if self.static_shapes:  # every forward the same shapes and no read back (a CUDA graph replays it)
            hi = self.k[0].shape[2] - 1
        elif bound is not None:  # rows below the bound are masked to their own offsets
            hi = bound
            if hi >= self.k[0].shape[2]:
                raise ValueError(f"suffix offset out of range 0..{self.k[0].shape[2] - 1}")
        else:
            lo, hi = int(offsets.min()), int(offsets.max())
            if lo < 0 or hi >= self.k[0].shape[2]:
                raise ValueError(f"suffix offset out of range 0..{self.k[0].shape[2] - 1}")
        Ls = hi + 1
        suffix_mask = torch.arange(Ls, device=positions.device)[None, None, :] <= offsets[:, :, None]  # causal [R,T,Ls]
        return offsets, Ls, suffix_mask, g.Lp, g.prefix_mask

    def _group(self, slots) -> _Groups:
        rp = self.row_prefix[slots]
        prompts, inv, counts = torch.unique(rp, return_inverse=True, return_counts=True)
        R, width = len(slots), int(counts.max())
        order = torch.argsort(inv, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(inv)
        rank[order] = torch.arange(R, device=slots.device) - starts[inv[order]]
        cell = inv * width + rank
        grid_rows = torch.zeros(len(prompts) * width, dtype=torch.int64, device=slots.device)
        grid_rows[cell] = torch.arange(R, device=slots.device)
        P = len(self.prefix_len)
        all_prompts = len(prompts) == P and bool((prompts == torch.arange(P, device=prompts.device)).all())
        s0 = int(slots[0])
        contiguous = slice(s0, s0 + R) if bool((slots == torch.arange(s0, s0 + R, device=slots.device)).all()) else None
        group_len = self.prefix_len[prompts]
        Lp = int(group_len.max())
        prefix_mask = torch.arange(Lp, device=slots.device)[None, :] < group_len[:, None]
        return _Groups(prompts, width, grid_rows, cell, all_prompts, contiguous, Lp, prefix_mask[:, None, None, :])

    def _prefix_attention(self, layer, q, Lp, key_mask):
        """Attention of every row over its prompt's prefix: one matmul per (prompt, kv head) for
        all rows of that prompt. Returns out [R,Hq,T,D] and lse [R,Hq,T] (fp32)."""
        g = self._groups
        R, Hq, T, D = q.shape
        P, W = len(g.prompts), g.width
        Hkv = self.prefix_k[layer].shape[1]
        kp, vp = self.prefix_k[layer], self.prefix_v[layer]
        kp, vp = (kp[:, :, :Lp], vp[:, :, :Lp]) if g.all_prompts else (kp[g.prompts, :, :Lp], vp[g.prompts, :, :Lp])
        grid = q[g.grid_rows].view(P, W, Hq, T, D)  # a prompt's rows side by side
        if q.is_cuda and _flash_attn is not None:
            return _flash_prefix(grid, kp, vp, self.prefix_len[g.prompts], g.cell)
        # [P,W,Hkv,grp,T,D] -> [P,Hkv,W*grp*T,D]: every query of a prompt against its keys at once
        qg = grid.view(P, W, Hkv, Hq // Hkv, T, D).transpose(1, 2).reshape(P, Hkv, -1, D)
        out, lse = _attention_lse(qg, kp, vp, key_mask)
        out = out.view(P, Hkv, W, Hq // Hkv, T, D).transpose(1, 2).reshape(P * W, Hq, T, D)[g.cell]
        lse = lse.view(P, Hkv, W, Hq // Hkv, T).transpose(1, 2).reshape(P * W, Hq, T)[g.cell]
        return out, lse


try:  # flash-attn's kvcache kernel for the shared prefix on CUDA, when installed
    from flash_attn import flash_attn_with_kvcache as _flash_attn
except ImportError:
    _flash_attn = None


def _flash_prefix(grid, kp, vp, lens, cell):
    """The prefix attention with flash-attn: a prompt's W*T row queries are one query block over
    its cached keys (non-causal; cache_seqlens masks the padding). Untested here (no GPU)."""
    P, W, Hq, T, D = grid.shape
    qf = grid.permute(0, 1, 3, 2, 4).reshape(P, W * T, Hq, D)
    out, lse = _flash_attn(qf, kp.transpose(1, 2), vp.transpose(1, 2), cache_seqlens=lens.to(torch.int32),
                           causal=False, return_softmax_lse=True)
    out = out.view(P, W, T, Hq, D).permute(0, 1, 3, 2, 4).reshape(P * W, Hq, T, D)[cell]
    lse = lse.view(P, Hq, W, T).transpose(1, 2).reshape(P * W, Hq, T)[cell]
    return out.float(), lse.float()


def _attention_lse(q, k, v, mask, wide: bool | None = None):
    """Softmax attention of q [B,Hkv,M,D] over k/v [B,Hkv,L,D] with a boolean mask broadcastable
    to [B,Hkv,M,L] (True = attend). Returns out [B,Hkv,M,D] and log-sum-exp [B,Hkv,M], fp32;
    rows that attend to nothing get lse -inf and out 0.

    wide (default: on the CPU) widens q/k/v to fp32 first: the CPU's torch path is the reference
    the fused kernel is held to. Otherwise (a GPU) the two matmuls run in the cache's dtype, bf16
    K/V are never copied to fp32 and stay on tensor cores, and the softmax runs in fp32, as
    transformers' eager attention does."""
    if q.device.type == "cpu" if wide is None else wide:
        q, k, v = q.float(), k.float(), v.float()
    scores = (q @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (torch.exp(scores - safe[..., None]).to(v.dtype) @ v).float(), lse


def partial_attention(q, k, v, mask):
    """Attention of q [R,Hq,T,D] over k/v [R,Hkv,L,D] with mask [R,T,L] (True = attend).

    Returns the normalised output [R,Hq,T,D] (fp32) and its log-sum-exp [R,Hq,T] (fp32), so
    that partial results over disjoint key sets can be merged exactly. GQA is handled by
    viewing the query heads in groups, never by copying keys.
    """
    R, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    out, lse = _attention_lse(q.reshape(R, Hkv, g * T, D), k, v, mask[:, None, None].expand(R, 1, g, T, -1).reshape(R, 1, g * T, -1))
    return out.view(R, Hq, T, D), lse.view(R, Hq, T)


def merge_attention(o1, lse1, o2, lse2):
    """Combine two normalised partial attentions over disjoint keys by their log-sum-exps."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0)[..., None]
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0)[..., None]
    return o1 * w1 + o2 * w2
