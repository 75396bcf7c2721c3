"""Training objectives, all built on `ctrlsafe.ops.linear_logprobs` (no [T,V] logits anywhere).

A batch is right-padded token ids [B,T] plus labels [B,T] that equal the ids on the tokens that
are trained (response + EOS) and IGNORE elsewhere (prompt, control tokens, padding). Right
padding needs no attention mask: causal attention never lets a real token see a later pad.

Every objective is a sum over the examples of a global batch divided by a global count
(`Normalizer`), so micro-batching, gradient accumulation and data parallelism give the same
gradient as one big batch (up to float summation order):

- CLM:    token-mean NLL of the response given prompt + controls.
- ExMATE: CLM + alpha * mean over examples and k counterfactuals c' of exp(-CE_i(y | x, c')),
          CE_i the example's token-mean NLL. Each counterfactual forward is followed by its own
          backward, so peak memory is one forward's activations whatever k is.
- DPO:    mean over pairs of -logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))), summed
          response log-probs. AMA masks (Equilibrate RLHF) enter as labels set to IGNORE, so the
          same mask applies to policy and reference log-probs.

Per-token rewards for AMA come from a reward model's score at every response prefix: one forward
of the reward backbone gives the hidden state at every position, and the score head applied to
position t is exactly the score the reward model gives the sequence truncated after token t.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ops.linear_logprobs import linear_logprobs

IGNORE = -100


# -- log-probs ------------------------------------------------------------------------------------
class SequenceLogprobs(nn.Module):
    """Wraps a ctrlsafe Transformer: forward(input_ids [B,T], labels [B,T]) -> logp [B,T-1] fp32,
    where logp[b,t] = log p(labels[b,t+1] | ids[b,:t+1]) and 0 where the label is IGNORE.

    It is a module (not a function) so that DistributedDataParallel can wrap it: DDP only sees
    what runs inside a wrapped module's forward().
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        b, t = input_ids.shape
        hidden = self.model.hidden_states(input_ids[:, :-1])  # the last position predicts nothing
        target = labels[:, 1:].reshape(-1)
        # under autocast the op casts hidden (fp32: the residual stream) and the fp32 master weight to bf16
        logp = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), self.model.lm_head.weight, target, IGNORE)
        return logp.view(b, t - 1)


@dataclass
class Batch:
    """Right-padded ids and labels [B,T]; for ExMATE also where each row's control tokens sit and
    the counterfactual control ids to put there ([k][B, n_controls])."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    control_start: torch.Tensor | None = None  # [B]
    counterfactual_ids: list[torch.Tensor] | None = None  # k x [B, A]
    ref_logp: torch.Tensor | None = None  # DPO: reference summed log-probs [2B]
    n_tokens: int = 0  # real (non-pad) tokens, for throughput figures

    def to(self, device) -> "Batch":
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        cf = None if self.counterfactual_ids is None else [c.to(device) for c in self.counterfactual_ids]
        return dataclasses.replace(self, input_ids=move(self.input_ids), labels=move(self.labels),
                                   control_start=move(self.control_start), counterfactual_ids=cf, ref_logp=move(self.ref_logp))

    @property
    def n_targets(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


@dataclass
class Normalizer:
    """Global counts for one optimizer step (all micro-batches, all ranks), and the factor DDP's
    gradient averaging has to be undone by."""

    targets: int  # trained tokens
    examples: int  # sequences (CLM, ExMATE) or pairs (DPO)
    world: int = 1


# -- objectives -----------------------------------------------------------------------------------
def always_sync(last: bool):
    return contextlib.nullcontext()


class CLM:
    """Token-mean NLL of the trained tokens.

    Every objective's `backward(policy, batch, norm, sync)` runs forward + backward on one
    micro-batch and returns this micro-batch's share of the step's statistics. `sync(last)` is
    the context each backward runs in: under DDP it suppresses the gradient all-reduce for every
    backward but the step's last one."""

    name = "clm"

    def backward(self, policy, batch: Batch, norm: Normalizer, sync=always_sync) -> dict[str, float]:
        with sync(True):
            logp = policy(batch.input_ids, batch.labels)
            loss = -logp.sum() / norm.targets
            (loss * norm.world).backward()
        return {"loss": loss.item(), "nll": loss.item()}


class ExMATE:
    """L = CE(y|x,c) + alpha * mean_j exp(-CE_i(y|x,c'_j)) (CausalDialogue's ExMATE on controls).

    The first term is the CLM token mean over the global batch; the counterfactual term is
    per example (exp is not linear, so it needs each example's own CE) and averaged over examples
    and the k counterfactuals. Gradients of each counterfactual are accumulated one forward at a
    time.
    """

    name = "exmate"

    def __init__(self, alpha: float = 0.05):
        self.alpha = alpha

    def backward(self, policy, batch: Batch, norm: Normalizer, sync=always_sync) -> dict[str, float]:
        k = len(batch.counterfactual_ids)
        n_passes = 1 + k
        stats = {"nll": 0.0, "cf_nll": 0.0, "loss": 0.0}
        for j in range(n_passes):
            with sync(j == n_passes - 1):
                if j == 0:
                    logp = policy(batch.input_ids, batch.labels)
                    loss = -logp.sum() / norm.targets
                    stats["nll"] = loss.item()
                else:
                    ids = with_controls(batch.input_ids, batch.control_start, batch.counterfactual_ids[j - 1])
                    logp = policy(ids, batch.labels)
                    ce = example_ce(logp, batch.labels)  # [B]
                    loss = self.alpha * torch.exp(-ce).sum() / (k * norm.examples)
                    stats["cf_nll"] += ce.sum().item() / (k * norm.examples)
                (loss * norm.world).backward()
            stats["loss"] += loss.item()
        return stats


class DPO:
    """-logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))) averaged over pairs.

    The batch holds the B chosen rows then the B rejected rows (one forward for both). Reference
    log-probs come with the batch (precomputed once, or from a frozen reference model).
    """

    name = "dpo"

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def backward(self, policy, batch: Batch, norm: Normalizer, sync=always_sync) -> dict[str, float]:
        with sync(True):
            summed = policy(batch.input_ids, batch.labels).sum(1)  # [2B]
            loss_i, margin = dpo_loss(summed, batch.ref_logp, self.beta)
            loss = loss_i.sum() / norm.examples
            (loss * norm.world).backward()
        b = margin.shape[0]
        return {
            "loss": loss.item(),
            "margin": (summed[:b] - summed[b:]).sum().item() / norm.examples,
            "accuracy": (margin > 0).float().sum().item() / norm.examples,
        }


def dpo_loss(policy_logp, ref_logp, beta):
    """Per-pair DPO loss and implicit reward margin from [2B] summed log-probs (chosen first)."""
    b = policy_logp.shape[0] // 2
    pi = policy_logp[:b] - policy_logp[b:]
    ref = ref_logp[:b] - ref_logp[b:]
    margin = beta * (pi - ref.to(pi.dtype))
    return -F.logsigmoid(margin), margin.detach()


def example_ce(logp, labels):
    """Token-mean NLL per row [B] from logp [B,T-1] (rows without trained tokens give 0)."""
    n = (labels[:, 1:] != IGNORE).sum(1).clamp(min=1)
    return -logp.sum(1) / n


def with_controls(input_ids, control_start, control_ids):
    """A copy of input_ids with each row's control tokens replaced by control_ids [B,A]."""
    out = input_ids.clone()
    cols = control_start[:, None] + torch.arange(control_ids.shape[1], device=input_ids.device)
    out.scatter_(1, cols, control_ids)
    return out


# -- counterfactual controls ----------------------------------------------------------------------
def counterfactual_cells(cell: tuple[int, ...], levels: int, k: int, mode: str, rng: random.Random):
    """k counterfactual control cells for `cell`: drawn uniformly (with replacement) from the
    other cells of the grid, or ('farthest') the cell at maximal L1 distance — each attribute at
    the extreme level farther from its own, ties (a middle level) broken by rng."""
    if mode == "uniform":
        n_cells = levels ** len(cell)
        own = sum(lv * levels ** (len(cell) - 1 - i) for i, lv in enumerate(cell))
        out = []
        for _ in range(k):
            idx = rng.randrange(n_cells - 1)
            idx += idx >= own  # skip the example's own cell
            out.append(tuple((idx // levels ** (len(cell) - 1 - i)) % levels for i in range(len(cell))))
        return out
    if mode == "farthest":
        top = levels - 1
        def far(lv):
            if 2 * lv == top:
                return rng.choice((0, top))
            return 0 if 2 * lv > top else top
        return [tuple(far(lv) for lv in cell) for _ in range(k)]
    raise ValueError(f"counterfactual mode {mode!r} is unknown; allowed: uniform, farthest")


# -- AMA ------------------------------------------------------------------------------------------
def ama_segments(rewards, tau: float = 0.3) -> list[int]:
    """Hysteresis segmentation of a per-token reward sequence: +1 once a reward exceeds +tau,
    -1 once one falls below -tau; in between the previous state holds. Tokens before the first
    crossing belong to no segment (0)."""
    state, out = 0, []
    for r in (float(x) for x in rewards):
        if r > tau:
            state = 1
        elif r < -tau:
            state = -1
        out.append(state)
    return out


def ama_mask(rewards, tau: float = 0.3, *, chosen: bool) -> list[bool]:
    """AMA's per-token mask: a chosen response trains only its positive segments, a rejected one
    only its negative segments. A response with no such segment contributes nothing."""
    keep = 1 if chosen else -1
    return [s == keep for s in ama_segments(rewards, tau)]


@torch.no_grad()
def prefix_scores(backbone, head, input_ids, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Reward-model score of every prefix [B,T] in one forward: position t scores ids[:, :t+1]
    (causal attention: the hidden state at t has seen exactly that prefix).

    backbone: the reward model's ctrlsafe Transformer; head: its score head row [H]; the score is
    normalised as (head . norm(h_t) - mean) / std, like RewardModel's sequence score."""
    hidden = backbone.hidden_states(input_ids)
    return (hidden.float() @ head.reshape(-1).float() - mean) / std


def response_token_rewards(scores_row, response_start: int, response_len: int, *, differenced: bool = False):
    """Per-token rewards of one response from its row of prefix scores.

    Raw (default): token t gets the score of the prefix ending at t — "is the response good so
    far", which is what the hysteresis segmentation tracks, and it is scale-comparable with the
    reward model's sequence score (so tau reads in the same units). Differenced: token t gets
    score(prefix ..t) - score(prefix ..t-1), the first token relative to the prompt alone: each
    token's own contribution, noisier, and its values sum to the final score minus the prompt's."""
    s = scores_row[response_start - 1 : response_start + response_len]
    return (s[1:] - s[:-1]) if differenced else s[1:]
