"""Reward scoring: ctrlsafe shared-prompt scoring vs transformers, and the fused reward head.

Scoring (full): a random-init LlamaForSequenceClassification (hidden 512, 4 layers, 8 heads,
intermediate 1376, vocab 32000, num_labels 1, fp32, seed 0) saved once to a temp directory and
loaded by both sides. Work: 8 prompts of 64 tokens x 16 responses each, response lengths uniform
in 32..128 tokens (seed 0), pairs in prompt order. Providers:
  transformers  LlamaForSequenceClassification on right-padded batches of 32 (attention mask),
                batches built before timing
  ctrlsafe      RewardModel.score_ids: each prompt prefilled once, responses as length-sorted
                suffix rows on top (PrefixCache), fused head
Before timing, the two sides' scores are compared (max abs diff is printed). Throughput is
pairs/s; tokens/s counts every real token of every pair (prompt + response).

Head (full): hidden [256, 512, 4096] fp32 (pre-norm), K=2 heads, last index random. Providers:
  full-seq   what transformers does: final RMSNorm and the head over all T positions, then gather
  reference  ops.score_heads(backend="reference"): gather first, fp64
  ours       ops.score_heads on the device's backend (cpu: fp32 PyTorch; cuda: Triton)
GB/s counts the bytes the fused op must read (N gathered rows + weights) for every provider.

    python -m ctrlsafe.benchmarks.bench_reward [--quick] [--device cuda]
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from ctrlsafe.benchmark import Row, compare, main
from ctrlsafe.ops import score_heads
from ctrlsafe.reward import RewardModel

TARGET = 2.0  # issue 5: ctrlsafe pairs/s >= 2x transformers'


@dataclass(frozen=True)
class Work:
    hidden: int = 512
    layers: int = 4
    vocab: int = 32000
    prompts: int = 8
    prompt_len: int = 64
    per_prompt: int = 16
    min_len: int = 32
    max_len: int = 128
    hf_batch: int = 32
    head_N: int = 256
    head_T: int = 512
    head_H: int = 4096
    head_K: int = 2
    reps: int = 3

    @property
    def pairs(self) -> int:
        return self.prompts * self.per_prompt


FULL = Work()
QUICK = Work(hidden=128, layers=2, vocab=1000, prompts=2, per_prompt=8, min_len=8, max_len=32, hf_batch=8,
             head_N=32, head_T=64, head_H=512, reps=3)


def build_models(work: Work, path: str, device: str):
    """(transformers model, ctrlsafe RewardModel) of one random checkpoint."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=work.vocab, hidden_size=work.hidden, intermediate_size=work.hidden * 43 // 16,
                      num_hidden_layers=work.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=1024, pad_token_id=0, num_labels=1)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    hf = LlamaForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return hf, RewardModel.from_pretrained(path, device=device)


def pairs(work: Work, seed: int = 0):
    """prompt_ids, response_ids (token ids 1.. so that no real token is the pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, work.vocab, (work.prompt_len,), generator=g).tolist() for _ in range(work.prompts)]
    lengths = torch.randint(work.min_len, work.max_len + 1, (work.pairs,), generator=g).tolist()
    responses = [torch.randint(1, work.vocab, (n,), generator=g).tolist() for n in lengths]
    return [p for p in prompts for _ in range(work.per_prompt)], responses


def hf_batches(seqs, batch: int, device: str):
    out = []
    for b in range(0, len(seqs), batch):
        chunk = seqs[b : b + batch]
        T = max(map(len, chunk))
        ids = torch.zeros(len(chunk), T, dtype=torch.int64)
        mask = torch.zeros(len(chunk), T, dtype=torch.int64)
        for i, s in enumerate(chunk):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        out.append((ids.to(device), mask.to(device)))
    return out


def scoring_rows(work: Work, device: str) -> list[Row]:
    with tempfile.TemporaryDirectory() as path:
        hf, rm = build_models(work, path, device)
    prompt_ids, response_ids = pairs(work)
    batches = hf_batches([p + r for p, r in zip(prompt_ids, response_ids)], work.hf_batch, device)

    @torch.no_grad()
    def transformers_scores():
        return torch.cat([hf(input_ids=ids, attention_mask=mask).logits for ids, mask in batches])

    def ctrlsafe_scores():
        return rm.score_ids(prompt_ids, response_ids)

    diff = float((transformers_scores().float() - ctrlsafe_scores()).abs().max())
    tokens = sum(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    shape = f"{work.prompts}x{work.prompt_len} prompts x {work.per_prompt} resp {work.min_len}..{work.max_len}; H{work.hidden} L{work.layers} V{work.vocab}"
    rows = compare("reward scoring", shape, "fp32", {"transformers": transformers_scores, "ctrlsafe": ctrlsafe_scores},
                   reference="transformers", work_items=work.pairs, unit="pairs/s", reps=work.reps, device=device)
    for r in rows:
        r.extra.update(tokens_per_s=tokens / (r.median_ms * 1e-3), max_abs_diff_vs_transformers=diff)
    hf_row, ours = rows
    print(f"reward scoring: ctrlsafe {ours.throughput:,.1f} pairs/s ({ours.extra['tokens_per_s']:,.0f} tokens/s) vs "
          f"transformers {hf_row.throughput:,.1f} pairs/s ({hf_row.extra['tokens_per_s']:,.0f} tokens/s): "
          f"{ours.speedup_vs_reference:.2f}x (target >= {TARGET:.0f}x); max |diff| {diff:.2e}")
    return rows


def full_sequence_head(hidden, last_index, norm_weight, heads, mean, std, eps):
    """The transformers order: norm and project every position, then pick the last one."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight
    logits = x @ heads.T  # [N,T,K]
    return (logits[torch.arange(len(last_index), device=hidden.device), last_index] - mean) / std


def head_rows(work: Work, device: str) -> list[Row]:
    N, T, H, K = work.head_N, work.head_T, work.head_H, work.head_K
    g = torch.Generator().manual_seed(0)
    hidden = torch.empty(N, T, H).normal_(generator=g).to(device)
    last = torch.randint(0, T, (N,), generator=g).to(device)
    norm_w = (torch.rand(H, generator=g) + 0.5).to(device)
    heads = (torch.randn(K, H, generator=g) / H**0.5).to(device)
    mean, std = torch.zeros(K, device=device), torch.ones(K, device=device)
    fast = "triton" if torch.device(device).type == "cuda" else "cpu"
    op = lambda backend: lambda: score_heads(hidden, last, norm_w, heads, None, mean, std, None, eps=1e-5, backend=backend)  # noqa: E731
    fns = {"full-seq": lambda: full_sequence_head(hidden, last, norm_w, heads, mean, std, 1e-5),
           "reference": op("reference"), f"ours ({fast})": op(fast)}
    useful_bytes = (N * H + K * H + H) * 4
    return compare("reward head", f"N{N} T{T} H{H} K{K}", "fp32", fns, reference="full-seq", bytes_moved=useful_bytes,
                   work_items=N, unit="seq/s", reps=work.reps, device=device)


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    work = QUICK if quick else FULL
    return scoring_rows(work, device) + head_rows(work, device)


if __name__ == "__main__":
    main(run)
