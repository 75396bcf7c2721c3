"""A KV cache whose prompt segment is stored once per prompt and shared by all its rows.

Layout per layer:
  prefix  K/V [P, Hkv, Lp, D]  one entry per unique prompt (right-padded, lengths prefix_len[P])
  rows    K/V [S, Hkv, Ls, D]  one slot per row (control suffix + response), row_prefix[S] -> P
A row's query attends to [its prompt's prefix | its own suffix so far]; the two partial
attentions are computed separately and merged by log-sum-exp, so the prefix is never copied
into the rows' storage.

Used by the generation engine (control suffixes and decoding) and by shared-prompt reward
scoring. It implements the model's cache protocol: `attend(layer, q, k, v, positions)`.
"""
from __future__ import annotations

import math

import torch

from .model import KVCache, ModelArgs


class PrefixCache:
    def __init__(self, args: ModelArgs, prefix_k, prefix_v, prefix_len: torch.Tensor, row_prefix: torch.Tensor, suffix_capacity: int):
        self.prefix_k, self.prefix_v = prefix_k, prefix_v  # lists over layers of [P,Hkv,Lp,D]
        self.prefix_len = prefix_len.to(torch.int64)  # [P]
        self.row_prefix = row_prefix.to(torch.int64)  # [S]
        S, dtype, device = len(row_prefix), prefix_k[0].dtype, prefix_k[0].device
        shape = (S, args.num_key_value_heads, suffix_capacity, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.slots: torch.Tensor | None = None  # rows taking part in the next forward (None = all)

    @classmethod
    def from_prompts(cls, model, prompts: list[list[int]], row_prefix: torch.Tensor, suffix_capacity: int) -> "PrefixCache":
        """Prefill every unique prompt once (right-padded batch) and return the cache over them.

        Right padding never changes results: pads sit after each prompt's real tokens, so causal
        attention keeps them out of real positions, and prefix_len masks them afterwards.
        """
        device = model.embed_tokens.weight.device
        dtype = model.embed_tokens.weight.dtype
        lens = torch.tensor([len(p) for p in prompts], device=device)
        if (lens == 0).any():
            raise ValueError(f"prompt {int((lens == 0).nonzero()[0, 0])} is empty")
        Lp = int(lens.max())
        ids = torch.zeros(len(prompts), Lp, dtype=torch.int64, device=device)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.as_tensor(p, device=device)
        kv = KVCache(model.args, len(prompts), Lp, dtype=dtype, device=device)
        hidden = model.hidden_states(ids, None, kv)
        cache = cls(model.args, kv.k, kv.v, lens, row_prefix.to(device), suffix_capacity)
        cache.prefix_hidden = hidden  # [P,Lp,H]; the last real position gives each prompt's next-token logits
        return cache

    def storage_bytes(self) -> dict[str, int]:
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return {"prefix": size(self.prefix_k) + size(self.prefix_v), "rows": size(self.k) + size(self.v)}

    def suffix_positions(self, slots: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Absolute positions [R,T] of suffix offsets [R,T] in rows `slots` (prompt length + offset)."""
        return self.prefix_len[self.row_prefix[slots]][:, None] + offsets

    def attend(self, layer, q, k, v, positions):
        slots = self.slots if self.slots is not None else torch.arange(q.shape[0], device=q.device)
        R, Hq, T, D = q.shape
        prefix = self.row_prefix[slots]
        plen = self.prefix_len[prefix]
        offsets = positions - plen[:, None]  # [R,T] offsets inside each row's suffix
        if int(offsets.min()) < 0 or int(offsets.max()) >= self.k[layer].shape[2]:
            raise ValueError(f"suffix offset out of range 0..{self.k[layer].shape[2] - 1}")
        # write the new keys/values at each row's own offsets
        self.k[layer][slots[:, None].expand(R, T), :, offsets] = k.transpose(1, 2)
        self.v[layer][slots[:, None].expand(R, T), :, offsets] = v.transpose(1, 2)

        Ls = int(offsets.max()) + 1
        ks, vs = self.k[layer][slots, :, :Ls], self.v[layer][slots, :, :Ls]
        suffix_mask = torch.arange(Ls, device=q.device)[None, None, :] <= offsets[:, :, None]  # causal [R,T,Ls]
        o2, lse2 = partial_attention(q, ks, vs, suffix_mask)

        Lp = int(plen.max())
        kp, vp = self.prefix_k[layer][prefix, :, :Lp], self.prefix_v[layer][prefix, :, :Lp]
        prefix_mask = (torch.arange(Lp, device=q.device)[None, :] < plen[:, None])[:, None, :].expand(R, T, Lp)
        o1, lse1 = partial_attention(q, kp, vp, prefix_mask)
        return merge_attention(o1, lse1, o2, lse2).to(q.dtype)


def partial_attention(q, k, v, mask):
    """Attention of q [R,Hq,T,D] over k/v [R,Hkv,L,D] with mask [R,T,L] (True = attend).

    Returns the normalised output [R,Hq,T,D] (fp32) and its log-sum-exp [R,Hq,T] (fp32), so
    that partial results over disjoint key sets can be merged exactly. GQA is handled by
    viewing the query heads in groups, never by copying keys.
    """
    R, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    qg = q.float().reshape(R, Hkv, g * T, D)
    scores = (qg @ k.float().transpose(-1, -2)) * (1.0 / math.sqrt(D))  # [R,Hkv,g*T,L]
    scores = scores.view(R, Hkv, g, T, -1).masked_fill(~mask[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [R,Hkv,g,T]; -inf where nothing is attended
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe[..., None])
    out = probs.view(R, Hkv, g * T, -1) @ v.float()
    return out.view(R, Hq, T, D), lse.view(R, Hq, T)


def merge_attention(o1, lse1, o2, lse2):
    """Combine two normalised partial attentions over disjoint keys by their log-sum-exps."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0)[..., None]
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0)[..., None]
    return o1 * w1 + o2 * w2
