"""RLHF with control-conditioned rewards: `ctrlsafe train --objective ppo|rloo` (+ AMA for PPO).

    ctrlsafe train --objective ppo --data runs/demo --model POLICY --out runs/ppo \\
        --reward helpful=RM_HP --reward harmless=RM_SF --rollouts 100 --rollout-prompts 16 --rollout-n 4

One rollout r, then `--ppo-epochs` passes over it in minibatches of `--batch-size` sequences:
  1. prompts: `--rollout-prompts` of the data set's distinct prompts, drawn by (seed, r); each
     gets one control target drawn uniformly from `--rl-controls` (default: the whole grid);
  2. generate `--rollout-n` samples of [prompt][controls] with the Engine (the n samples share the
     prompt KV) at `--temperature`;
  3. score with the reward models (`--reward NAME=SPEC`, one per control attribute), bin the
     scores into levels (the data set's bins, or `--bins`);
  4. control reward, per attribute summed: `level` (default) -|level(score) - target|; `smooth`
     -((score - centre(target)) / width)^2, centre the middle of the target's bin (the end bins:
     half a bin width past their inner edge), width the mean bin width (1 with 2 levels);
  5. log-probs of the policy (old), of the frozen initial model (reference) and the value head's
     estimates, all in one no-grad forward each, log-probs through ops.linear_logprobs at
     `--temperature` (the distribution actually sampled, as TRL does);
  6. per-token reward: -kl_coef * KL_t on every response token plus the control reward on the
     last. KL_t estimates KL(policy || reference) from the sampled token, with
     d = log p_ref(y_t) - log p_pol(y_t): k1 = -d (unbiased, can be negative per token),
     k3 = exp(d) - 1 - d (unbiased, always >= 0, lower variance; Schulman's estimator);
  7. advantages. PPO: GAE(gamma, lambda) against the value head, returns = A + V. RLOO: one
     sequence return R = control reward - kl_coef * sum_t KL_t, advantage R_i minus the mean of the
     other n-1 samples of the same prompt and control, given to every token. Then whitened over
     the rollout's response tokens (`--no-whiten` to keep raw).

The update is PPO's clipped surrogate (eps `--clip-eps`) on the ratio to the rollout's log-probs
(RLOO uses the same clipped loss, without a critic), plus for PPO the clipped value loss
0.5 * max((V - R)^2, (clip(V, V_old +- --value-clip) - R)^2) * `--vf-coef`. Both are token sums
divided by the step's response-token count (losses.Normalizer), like every objective.

AMA (Equilibrate RLHF) for PPO, `--ama`: a rollout with sequence advantage A >= 0 trains the
policy only on its tokens whose value estimate is > 0, one with A < 0 only on those < 0. The
sequence advantage is the (unwhitened) GAE advantage of its first response token. The mask
applies to the policy loss only; the critic still learns from every token. The value's sign
depends on the reward's offset (the level reward is <= 0, so a trained critic is mostly
negative and rows with A >= 0 then keep few tokens): metrics' `policy_tokens` shows the kept share.

The value head is a Linear(H, 1) on the policy's final hidden state, trained with the backbone
and saved in every checkpoint as the extra tensor `value_head.weight` (transformers ignores it).

Steps, checkpoints, resume. An optimizer step is one minibatch; a rollout takes
ppo_epochs * (rollout size / batch size) of them, and `--max-steps` is not used: the run is
`--rollouts` rollouts. Each rollout is written to OUT/rollouts/rollout-R.safetensors before it
is trained on, so `--resume` from a checkpoint inside a rollout continues on exactly that
rollout; everything random is keyed by (seed, rollout, epoch). Metrics: one row per rollout
(`rollout`, mean reward, control accuracy overall and per attribute, KL, generation / scoring /
forward seconds, generated tokens/s) and the trainer's row per optimizer step (losses, clip
fraction, approximate KL to the rollout policy, tokens/s). Single process only (no DDP yet).
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .losses import IGNORE, Batch, Normalizer, always_sync
from .ops.linear_logprobs import linear_logprobs
from .train import Trainer

def add_arguments(p) -> None:
    """The PPO / RLOO options of `ctrlsafe train` (rollouts reuse --reward, --temperature,
    --max-new-tokens; AMA is --ama)."""
    g = p.add_argument_group("PPO / RLOO")
    g.add_argument("--rollouts", type=int, default=10, help="rollouts (generate + score + ppo-epochs of updates)")
    g.add_argument("--rollout-prompts", type=int, default=16, help="prompts per rollout, each with one control target")
    g.add_argument("--rollout-n", type=int, default=4, help="samples per prompt and control (RLOO needs >= 2)")
    g.add_argument("--rl-controls", default="grid", help="control targets drawn from: 'grid' or ranges like helpful=0..4,harmless=1,3")
    g.add_argument("--bins", help="level bins JSON or data set directory (default: the --data manifest's bins)")
    g.add_argument("--control-reward", choices=("level", "smooth"), default="level",
                   help="per attribute: level = -|level(score) - target|; smooth = -((score - target bin centre) / bin width)^2")
    g.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout")
    g.add_argument("--kl-coef", type=float, default=0.05, help="weight of KL(policy || initial model) in the reward")
    g.add_argument("--kl-estimator", choices=("k1", "k3"), default="k3",
                   help="per-token KL estimator: k1 = log p_pol - log p_ref (unbiased, can be < 0); k3 = exp(-k1) - 1 + k1 (>= 0, lower variance; Schulman)")
    g.add_argument("--gamma", type=float, default=1.0, help="GAE discount per token")
    g.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip range of the policy ratio")
    g.add_argument("--value-clip", type=float, default=0.2, help="PPO: clip range of the value estimate around the rollout's")
    g.add_argument("--vf-coef", type=float, default=0.1, help="PPO: weight of the value loss")
    g.add_argument("--no-whiten", action="store_true", help="keep raw advantages (default: whiten per rollout)")


# -- the pieces, on tensors [B, T-1] aligned with SequenceLogprobs' output ----------------------------
def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens (see module doc)."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"KL estimator {estimator!r} is unknown; allowed: k1, k3")


def token_rewards(seq_reward: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * KL_t on response tokens, plus the sequence reward [B] on each row's last one."""
    rewards = -kl_coef * kl * mask
    last = mask.shape[1] - 1 - mask.flip(1).float().argmax(1)
    rewards[torch.arange(len(mask)), last] += seq_reward
    return rewards


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B,T] by GAE over each row's masked (contiguous) tokens; the value
    after a row's last token is 0. Outside the mask both are 0."""
    B, T = rewards.shape
    m = mask.float()
    adv = torch.zeros_like(rewards)
    next_adv = next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = a
        next_adv, next_value = a, values[:, t] * m[:, t]
    return adv, (adv + values) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; 0 outside the mask."""
    v = x[mask]
    if v.numel() < 2:
        return x * mask
    return (x - v.mean()) / (v.std() + eps) * mask


def rloo_advantages(returns: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """R_i minus the mean return of the other members of its group (same prompt and control)."""
    n = torch.zeros(int(groups.max()) + 1, dtype=returns.dtype).index_add_(0, groups, torch.ones_like(returns))
    if (n[groups] < 2).any():
        raise ValueError("RLOO needs >= 2 samples per prompt and control (--rollout-n)")
    total = torch.zeros_like(n).index_add_(0, groups, returns)[groups]
    return returns - (total - returns) / (n[groups] - 1)


def ama_policy_mask(seq_adv: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """AMA for PPO: rows with A >= 0 keep tokens with value > 0, rows with A < 0 those with value < 0."""
    keep = torch.where((seq_adv >= 0)[:, None], values > 0, values < 0)
    return keep & mask


def clipped_policy_loss(logp, old_logp, adv, mask, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over masked tokens of PPO's max(-r A, -clip(r, 1-eps, 1+eps) A), number of those
    tokens where the clipped term wins, i.e. whose gradient the clip stops)."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = -ratio * adv, -ratio.clamp(1 - eps, 1 + eps) * adv
    return (torch.maximum(unclipped, clipped) * mask).sum(), ((clipped > unclipped) & mask).sum()


def clipped_value_loss(values, old_values, returns, mask, clip: float) -> torch.Tensor:
    """Sum over masked tokens of 0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-clip) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return (loss * mask).sum()


def control_reward(scores, targets, bins, kind: str = "level") -> torch.Tensor:
    """Reward [N] of scores [N,K] against target levels [N,K] (bins: reward.LevelBins), summed
    over attributes (module doc, step 4)."""
    if kind == "level":
        return -(bins.to_levels(scores) - targets).abs().sum(1).float()
    if kind != "smooth":
        raise ValueError(f"control reward {kind!r} is unknown; allowed: level, smooth")
    edges = bins.edges.to(scores.device)  # [K, L-1]
    width = (edges[:, -1] - edges[:, 0]) / (edges.shape[1] - 1) if edges.shape[1] > 1 else torch.ones(len(edges))
    width = torch.where(width > 0, width, torch.ones_like(width))
    bounds = torch.cat([edges[:, :1] - width[:, None], edges, edges[:, -1:] + width[:, None]], 1)  # [K, L+1]
    centre = (bounds[:, 1:] + bounds[:, :-1]) / 2  # [K, L]
    target_centre = centre.gather(1, targets.T).T  # [N, K]
    return -(((scores - target_centre) / width) ** 2).sum(1)


# -- the model side -------------------------------------------------------------------------------
def logprobs_and_values(model, value_head: nn.Module | None, input_ids, labels, temperature: float = 1.0):
    """(logp [B,T-1] fp32, values [B,T-1] fp32 or None) from one backbone forward: logp[b,t] is
    log p(labels[b,t+1] | ids[b,:t+1]) (0 on IGNORE), values[b,t] the value of that same state."""
    b, t = input_ids.shape
    hidden = model.hidden_states(input_ids[:, :-1])
    logp = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, labels[:, 1:].reshape(-1), IGNORE,
                           temperature=temperature).view(b, t - 1)
    values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float() if value_head is not None else None
    return logp, values


@dataclass
class RolloutBatch(Batch):
    """A minibatch of rollout rows: the trainer's Batch plus what PPO needs ([B,T-1] each)."""

    old_logp: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    policy_mask: torch.Tensor | None = None  # AMA: the tokens the policy loss keeps

    def to(self, device) -> "RolloutBatch":
        extra = ("old_logp", "old_values", "advantages", "returns", "policy_mask")
        return dataclasses.replace(super().to(device), **{k: getattr(self, k).to(device) for k in extra if getattr(self, k) is not None})


class PPO:
    """The trainer objective for PPO (value_head set) and RLOO (value_head None)."""

    def __init__(self, value_head: nn.Module | None, clip_eps: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1,
                 temperature: float = 1.0):
        self.value_head, self.clip_eps, self.value_clip, self.vf_coef = value_head, clip_eps, value_clip, vf_coef
        self.temperature = temperature
        self.name = "ppo" if value_head is not None else "rloo"

    def backward(self, policy, batch: RolloutBatch, norm: Normalizer, sync=always_sync) -> dict[str, float]:
        model = policy.model  # the SequenceLogprobs wrapper's Transformer: PPO needs its hidden states
        mask = batch.labels[:, 1:] != IGNORE
        with sync(True):
            logp, values = logprobs_and_values(model, self.value_head, batch.input_ids, batch.labels, self.temperature)
            pmask = mask if batch.policy_mask is None else batch.policy_mask
            pl, clipped = clipped_policy_loss(logp, batch.old_logp, batch.advantages, pmask, self.clip_eps)
            policy_loss = pl / norm.targets
            loss = policy_loss
            stats = {}
            if values is not None:
                value_loss = self.vf_coef * clipped_value_loss(values, batch.old_values, batch.returns, mask, self.value_clip) / norm.targets
                loss = loss + value_loss
                stats["value_loss"] = value_loss.item()
            (loss * norm.world).backward()
        approx_kl = ((batch.old_logp - logp.detach()) * mask).sum().item() / norm.targets
        return {"loss": loss.item(), "policy_loss": policy_loss.item(), **stats,
                "clip_frac": clipped.item() / norm.targets, "approx_kl": approx_kl,
                "policy_tokens": int(pmask.sum()) / norm.targets}


# -- rollouts -------------------------------------------------------------------------------------

@torch.no_grad()
def make_rollout(model, value_head, reference, tokens, prompts: list, targets: list[dict], scorer, bins, args, r: int) -> tuple[dict, dict]:
    """Generate, score and evaluate one rollout: (tensors [rows, ...] for RolloutData, metrics row).

    prompts[i] is trained under control targets[i]; row order is (prompt, sample)."""
    from .controls import render_prompt
    from .generate import Engine, SamplingParams
    from .train import pad_rows

    spec, device = tokens.spec, model.embed_tokens.weight.device
    prefixes = [render_prompt(p, tokens.tok) + tokens.cells[tuple(t[a] for a in spec.attributes)] for p, t in zip(prompts, targets)]
    times = {}
    t0 = time.perf_counter()
    engine = Engine(model, tokens.tok, spec)
    outs = engine.generate(prefixes, n=args.rollout_n, sampling=SamplingParams(temperature=args.temperature),
                           max_new_tokens=args.max_new_tokens, seed=args.seed * 1_000_003 + r)
    times["generate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = scorer.score([prompts[c.prompt_index] for c in outs], [c.text or "" for c in outs])
    target = torch.tensor([[targets[c.prompt_index][a] for a in spec.attributes] for c in outs])
    seq_reward = control_reward(result.scores, target, bins, args.control_reward)
    hit = bins.to_levels(result.scores) == target
    times["score_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    seqs, labels = [], []
    for c in outs:
        response = c.token_ids + ([tokens.eos] if c.finish_reason == "eos" else [])
        seqs.append(prefixes[c.prompt_index] + response)
        labels.append([IGNORE] * len(prefixes[c.prompt_index]) + response)
    batch = pad_rows(seqs, labels, tokens.pad)
    ids, lab = batch.input_ids.to(device), batch.labels.to(device)
    mask = (lab[:, 1:] != IGNORE).cpu()
    old_logp, old_values = (x.cpu() if x is not None else None for x in logprobs_and_values(model, value_head, ids, lab, args.temperature))
    ref_logp, _ = logprobs_and_values(reference, None, ids, lab, args.temperature)
    kl = kl_per_token(old_logp, ref_logp.cpu(), args.kl_estimator) * mask
    groups = torch.tensor([c.prompt_index for c in outs])
    if value_head is not None:  # PPO
        adv, returns = gae(token_rewards(seq_reward, kl, mask, args.kl_coef), old_values, mask, args.gamma, args.lam)
        first = mask.float().argmax(1)
        policy_mask = ama_policy_mask(adv[torch.arange(len(adv)), first], old_values, mask) if args.ama else mask
    else:  # RLOO
        seq_return = seq_reward - args.kl_coef * kl.sum(1)
        adv = rloo_advantages(seq_return, groups)[:, None] * mask
        returns, old_values = torch.zeros_like(adv), torch.zeros_like(adv)  # no critic
        policy_mask = mask
    if not args.no_whiten:
        adv = whiten(adv, mask)
    times["forward_s"] = time.perf_counter() - t0

    n_tokens = int(mask.sum())
    row = {"rollout": r, "reward": seq_reward.mean().item(), "control_accuracy": hit.all(1).float().mean().item(),
           **{f"accuracy_{a}": hit[:, k].float().mean().item() for k, a in enumerate(spec.attributes)},
           **{f"score_{a}": result.scores[:, k].mean().item() for k, a in enumerate(spec.attributes)},
           "kl": kl.sum(1).mean().item(), "response_tokens": n_tokens / len(outs),
           "policy_tokens": int(policy_mask.sum()) / max(1, n_tokens), **times,
           "generate_tokens_per_s": sum(len(c.token_ids) for c in outs) / max(times["generate_s"], 1e-9)}
    tensors = {"input_ids": batch.input_ids, "labels": batch.labels, "old_logp": old_logp, "old_values": old_values,
               "advantages": adv, "returns": returns, "policy_mask": policy_mask, "groups": groups}
    return tensors, row


class RolloutData:
    """The trainer's data source inside one rollout: optimizer step s of the rollout is epoch
    s // M, minibatch s % M (M = rollout rows / batch size) of a permutation drawn from
    (seed, rollout, epoch)."""

    def __init__(self, tensors: dict, r: int, first_step: int, cfg, grad_accum: int):
        self.t, self.r, self.first_step, self.cfg = tensors, r, first_step, cfg
        self.minibatches = len(tensors["input_ids"]) // cfg.batch_size
        self.micro = cfg.batch_size // grad_accum

    def batches(self, step: int) -> list[RolloutBatch]:
        epoch, m = divmod(step - self.first_step, self.minibatches)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.r * 10_007 + epoch)
        rows = torch.randperm(self.minibatches * self.cfg.batch_size, generator=g)[m * self.cfg.batch_size : (m + 1) * self.cfg.batch_size]
        return [self.collate(rows[i : i + self.micro]) for i in range(0, len(rows), self.micro)]

    def collate(self, rows: torch.Tensor) -> RolloutBatch:
        t = {k: v[rows] for k, v in self.t.items()}
        # rows are padded to the rollout's longest; cut to this minibatch's (a row ends at its last label)
        lengths = ((t["labels"] != IGNORE) * torch.arange(1, t["labels"].shape[1] + 1)).amax(1)
        width = int(lengths.max())
        return RolloutBatch(t["input_ids"][:, :width], t["labels"][:, :width], n_tokens=int(lengths.sum()),
                            old_logp=t["old_logp"][:, : width - 1], old_values=t["old_values"][:, : width - 1],
                            advantages=t["advantages"][:, : width - 1], returns=t["returns"][:, : width - 1],
                            policy_mask=t["policy_mask"][:, : width - 1])


# -- the loop -------------------------------------------------------------------------------------
class RLTrainer(Trainer):
    """The trainer plus a value head: optimised with the policy (its own no-decay group) and
    saved beside the model as `value_head.weight`."""

    def __init__(self, *args, value_head: nn.Module | None = None, **kw):
        super().__init__(*args, **kw)
        self.value_head = value_head
        if value_head is not None:
            self.optimizer.add_param_group({"params": list(value_head.parameters()), "weight_decay": 0.0})

    def extra_tensors(self) -> dict:
        return {"value_head.weight": self.value_head.weight} if self.value_head is not None else {}


def check_rl_args(args, d) -> None:
    for name in ("rollouts", "rollout_prompts", "rollout_n", "ppo_epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.objective == "rloo" and args.rollout_n < 2:
        raise ValueError(f"--objective rloo needs --rollout-n >= 2 (the leave-one-out baseline), got {args.rollout_n}")
    if not 0 <= args.gamma <= 1 or not 0 <= args.lam <= 1:
        raise ValueError(f"--gamma ({args.gamma}) and --lam ({args.lam}) must be in [0, 1]")
    if args.clip_eps <= 0 or args.value_clip <= 0 or args.kl_coef < 0:
        raise ValueError("--clip-eps and --value-clip must be > 0 and --kl-coef >= 0")
    if d.world > 1:
        raise ValueError(f"--objective {args.objective} runs in one process for now (WORLD_SIZE is {d.world})")
    rows = args.rollout_prompts * args.rollout_n
    if rows % args.batch_size or args.batch_size % args.grad_accum:
        raise ValueError(f"--batch-size {args.batch_size} must divide the rollout's {rows} rows (--rollout-prompts x --rollout-n) "
                         f"and be divisible by --grad-accum {args.grad_accum}")


def load_bins(args, manifest: dict | None, spec):
    """The level bins of the control attributes: --bins, else the --data manifest's."""
    from .pipeline import read_bins_file
    from .reward import LevelBins

    d = read_bins_file(args.bins) if args.bins else (manifest or {}).get("bins")
    if not d:
        raise ValueError(f"--objective {args.objective} bins scores into levels: pass --bins (LevelBins JSON or a data set), "
                         "or --data with a manifest that has bins")
    bins = LevelBins.from_json(d).select(list(spec.attributes))
    if bins.levels != spec.levels:
        raise ValueError(f"the bins have {bins.levels} levels but the control spec has {spec.levels}")
    return bins


def value_head_for(model, ckpt: Path | None, seed: int) -> nn.Linear:
    """Linear(H, 1): from the checkpoint when resuming, else small random weights keyed by seed
    (not zero: AMA keeps tokens by the sign of the value estimate)."""
    from .model import load_safetensors_dir

    w = model.embed_tokens.weight
    head = nn.Linear(w.shape[1], 1, bias=False).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        if ckpt is not None:
            state = load_safetensors_dir(ckpt)
            if "value_head.weight" not in state:
                raise ValueError(f"--resume {ckpt}: the checkpoint has no value_head.weight (not a PPO run?)")
            head.weight.copy_(state["value_head.weight"])
        else:
            g = torch.Generator().manual_seed(seed)
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.02)
    return head


def reference_model(args, spec, device):
    """The frozen initial policy, with the same mean-initialised control rows training started from."""
    from transformers import AutoTokenizer

    from .model import Transformer

    ref = Transformer.from_pretrained(args.model, device=device)
    spec.add_to(AutoTokenizer.from_pretrained(args.model), ref, seed=args.seed)
    return ref.requires_grad_(False)


def rollout_path(out: Path, r: int) -> Path:
    return out / "rollouts" / f"rollout-{r:05d}.safetensors"


def prune_rollouts(out: Path, current: int) -> None:
    """On resume inside (or at the start of) rollout `current`: later rollouts a killed run left
    are deleted (they are made again, identically, and logged then), and so is the metrics row of
    any rollout from `current` on whose file is gone."""
    for f in (out / "rollouts").glob("rollout-*.safetensors"):
        if int(f.stem.split("-")[1]) > current:
            f.unlink()
    path = out / "metrics.jsonl"
    if path.is_file():
        rows = path.read_text().splitlines()
        keep = [line for line in rows if "rollout" not in (r := json.loads(line)) or r["rollout"] < current
                or rollout_path(out, r["rollout"]).is_file()]
        path.write_text("".join(line + "\n" for line in keep))


def run_rl(args, model, tokens, table, manifest, cfg, d, out: Path, ckpt: Path | None) -> RLTrainer:
    from safetensors.torch import load_file, save_file

    from .reward import Scorer
    from .train import keep_metrics_until, row_prompt

    check_rl_args(args, d)
    spec = tokens.spec
    rewards = dict(r.split("=", 1) for r in args.reward)
    missing = [a for a in spec.attributes if a not in rewards]
    if missing:
        raise ValueError(f"--objective {args.objective} needs a --reward NAME=SPEC for every control attribute; missing {missing}")
    bins = load_bins(args, manifest, spec)
    controls = spec.parse_grid(args.rl_controls)
    scorer = Scorer({a: rewards[a] for a in spec.attributes})
    unique = {json.dumps(p, sort_keys=True): p for p in map(row_prompt, table.to_pylist())}
    prompts = list(unique.values())
    if args.rollout_prompts > len(prompts):
        raise ValueError(f"--rollout-prompts {args.rollout_prompts} is more than the {len(prompts)} distinct prompts in --data")

    value_head = value_head_for(model, ckpt, args.seed) if args.objective == "ppo" else None
    reference = reference_model(args, spec, d.device)
    objective = PPO(value_head, args.clip_eps, args.value_clip, args.vf_coef, args.temperature)
    per_rollout = args.ppo_epochs * (args.rollout_prompts * args.rollout_n // cfg.batch_size)
    trainer = RLTrainer(model, tokens.tok, objective, cfg, d, out, total_steps=args.rollouts * per_rollout,
                        source_model=args.model, progress=not args.no_progress, value_head=value_head, control_spec=spec)
    if ckpt:
        trainer.load_checkpoint(ckpt)
        keep_metrics_until(out / "metrics.jsonl", trainer.step)
        prune_rollouts(out, current=trainer.step // per_rollout)

    for r in range(trainer.step // per_rollout, args.rollouts):
        path = rollout_path(out, r)
        if path.is_file():  # resume: train on the rollout that was made
            tensors = load_file(str(path))
        elif trainer.step != r * per_rollout:
            raise FileNotFoundError(f"--resume: {path} is missing; the checkpoint (step {trainer.step}) is inside that rollout")
        else:
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + r)
            pick = torch.randperm(len(prompts), generator=g)[: args.rollout_prompts].tolist()
            rng = random.Random(f"{args.seed}:{r}")
            targets = [rng.choice(controls) for _ in pick]
            tensors, row = make_rollout(model, value_head, reference, tokens, [prompts[i] for i in pick], targets, scorer, bins, args, r)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").rename(path)
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": trainer.step, **row}) + "\n")
        trainer.run(RolloutData(tensors, r, r * per_rollout, cfg, args.grad_accum), until=(r + 1) * per_rollout)
    return trainer
