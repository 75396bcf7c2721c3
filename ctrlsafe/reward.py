"""Reward scoring: Hugging Face reward models, Python callables, level bins, `ctrlsafe score`.

Text layout for a `*ForSequenceClassification` reward model (RewardModel.score):

    [render_prompt(prompt, rm_tokenizer)] [response tokens] [turn-closing tokens]

The prompt is rendered with the RM's own tokenizer (chat template + generation prompt when it has
one). The response is tokenized alone without special tokens. The turn-closing tokens are what
the RM's chat template writes after an assistant message (`<|eot_id|>` for Llama 3,
`<|im_end|>\\n` for Qwen2, `<|end|>\\n` for the tiny preset), found once by rendering a probe
conversation; that is the sequence `apply_chat_template(messages + [assistant reply])` gives,
which is how chat reward models are trained and documented, except that BPE never merges across
the response's edges (the response is tokenized as generated). A tokenizer without a chat
template closes nothing. `score_ids` takes already tokenized sequences and scores them as given.

Which token is scored: transformers' rule, the last token whose id != config.pad_token_id (the
last token when pad_token_id is unset). When pad_token_id equals EOS, a real trailing EOS counts
as padding, so the score is read at the token before it — even when that token is in the
prompt. We know every sequence's length, so there is no padding to guess around; we apply the
same id rule to the unpadded sequence and so equal transformers on it, padded either way.

Shared-prompt scoring: pairs are grouped by identical prompt ids; each prompt is prefilled once
(ctrlsafe.kv_cache.PrefixCache.from_prompts) and the responses run as suffix rows on top of its
KV (SuffixBlock), sorted by length so batches carry little padding. The backbone's pre-norm hidden state at each row's
scored token goes through the fused head (ctrlsafe.ops.score_heads: final norm, all heads in one
matmul, (score - mean) / std). This equals scoring each pair alone.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .controls import render_prompt
from .kv_cache import PrefixCache
from .model import CLASSIFIER_ARCHITECTURES, Transformer, attention, read_config
from .ops.reward_head import bucketize, score_heads

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_PROBE = "CTRLSAFE_PROBE_REPLY"
# Tokens per scoring forward on a CPU: 2048 keeps a small reward model's activations (MLP
# intermediates included) in the last-level cache: 14% faster than 4096 in bench_reward here.
BATCH_TOKENS = 2048


def default_batch_tokens(model: Transformer) -> int:
    """Tokens per scoring forward: BATCH_TOKENS on a CPU, sized from free memory on a GPU."""
    weight = model.embed_tokens.weight
    if weight.device.type != "cuda":
        return BATCH_TOKENS
    return batch_tokens_for_memory(torch.cuda.mem_get_info(weight.device)[0], model.args, weight.element_size())


def batch_tokens_for_memory(free_bytes: int, args, element_size: int) -> int:
    """What a quarter of `free_bytes` holds of one layer's activations per token (q/k/v/o and
    the MLP's gate/up/act, twice over for the gathered prompt keys and the mask), 2048..65536."""
    per_token = 2 * (4 * args.hidden_size + 3 * args.intermediate_size) * element_size
    return int(min(65536, max(BATCH_TOKENS, free_bytes // 4 // per_token)))


class RewardModel:
    """A `*ForSequenceClassification` checkpoint: backbone via ctrlsafe.model + score head [K,H]."""

    def __init__(self, backbone: Transformer, head: torch.Tensor, names: list[str], *, pad_token_id: int | None,
                 tokenizer=None, mean=None, std=None):
        self.model = backbone
        self.head = head  # [K,H]; transformers' `score` Linear has no bias
        self.names = list(names)
        self.pad_token_id = pad_token_id
        self.tokenizer = tokenizer
        self.close_ids = turn_close_ids(tokenizer) if tokenizer is not None else []
        self.set_normalization(0.0 if mean is None else mean, 1.0 if std is None else std)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", *, mean=None, std=None) -> "RewardModel":
        path = Path(path)
        cfg = read_config(path)
        arch = (cfg.get("architectures") or [None])[0]
        if arch not in CLASSIFIER_ARCHITECTURES:
            raise ValueError(f"{path}: architecture {arch!r} is not a reward model; expected one of {', '.join(CLASSIFIER_ARCHITECTURES)}")
        backbone = Transformer.from_pretrained(path, dtype=dtype, device=device)
        head = _read_tensor(path, "score.weight").to(device=device, dtype=dtype)
        if head.dim() != 2 or head.shape[1] != backbone.args.hidden_size:
            raise ValueError(f"{path}: score.weight has shape {list(head.shape)}, expected [num_labels, {backbone.args.hidden_size}]")
        tokenizer = None
        if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        pad = cfg.get("pad_token_id")
        return cls(backbone, head, head_names(cfg, head.shape[0]), pad_token_id=pad, tokenizer=tokenizer, mean=mean, std=std)

    def set_normalization(self, mean, std) -> None:
        """Per-head (score - mean) / std applied by the head; scalars broadcast to all heads."""
        K = len(self.names)
        mean = torch.as_tensor(mean, dtype=torch.float32).expand(K).clone()
        std = torch.as_tensor(std, dtype=torch.float32).expand(K).clone()
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"normalization needs finite mean and std > 0, got mean={mean.tolist()} std={std.tolist()}")
        device = self.head.device
        self.mean, self.std = mean.to(device), std.to(device)

    def calibrate(self, prompts: list, responses: list[str], **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """Set mean/std to those of the raw scores of these pairs; returns (mean, std)."""
        self.set_normalization(0.0, 1.0)
        raw = self.score(prompts, responses, **kw)
        if len(raw) < 2:
            raise ValueError("calibrate needs at least 2 pairs")
        std = raw.std(0)
        self.set_normalization(raw.mean(0), torch.where(std > 0, std, torch.ones_like(std)))
        return self.mean, self.std

    # -- scoring ------------------------------------------------------------------------------
    def score(self, prompts: list, responses: list[str], *, batch_tokens: int | None = None) -> torch.Tensor:
        """Scores [N,K] fp32 of (prompt, response) pairs; prompts are strings or chat message lists.
        batch_tokens: tokens per forward (None: default_batch_tokens for the model's device)."""
        if self.tokenizer is None:
            raise ValueError(f"{getattr(self.model, 'source_path', 'this reward model')} has no tokenizer files; use score_ids")
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rendered: dict[str, list[int]] = {}
        prompt_ids = []
        for p in prompts:
            key = p if isinstance(p, str) else json.dumps(p, sort_keys=True)
            if key not in rendered:
                rendered[key] = render_prompt(p, self.tokenizer)
            prompt_ids.append(rendered[key])
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise ValueError(f"response {i} must be a string, got {type(r).__name__}")
        encoded = self.tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
        return self.score_ids(prompt_ids, [list(r) + self.close_ids for r in encoded], batch_tokens=batch_tokens)

    @torch.no_grad()
    def score_ids(self, prompt_ids: list[list[int]], response_ids: list[list[int]], *, batch_tokens: int | None = None) -> torch.Tensor:
        """Scores [N,K] fp32 of the token sequences prompt_ids[i] + response_ids[i], as given."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        batch_tokens = default_batch_tokens(self.model) if batch_tokens is None else batch_tokens
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        out = torch.empty(len(prompt_ids), len(self.names), dtype=torch.float32, device=self.head.device)
        if not prompt_ids:
            return out
        split = [self._split(i, p, r) for i, (p, r) in enumerate(zip(prompt_ids, response_ids))]
        groups: dict[tuple, list[int]] = {}
        for i, (prefix, _) in enumerate(split):
            groups.setdefault(prefix, []).append(i)
        for chunk in _chunks(list(groups), lambda p: len(p), batch_tokens):
            self._score_prompt_chunk(chunk, groups, split, out, batch_tokens)
        return out

    def _split(self, i, prompt, response) -> tuple[tuple, list[int]]:
        """(shared prefix, suffix ending at the scored token) of pair i."""
        if not prompt:
            raise ValueError(f"pair {i}: the prompt has no tokens")
        seq = list(prompt) + list(response)
        vocab = self.model.args.vocab_size
        if min(seq) < 0 or max(seq) >= vocab:
            raise ValueError(f"pair {i}: token id {max(seq) if max(seq) >= vocab else min(seq)} is outside the vocabulary 0..{vocab - 1}")
        last = len(seq) - 1
        if self.pad_token_id is not None:
            while last >= 0 and seq[last] == self.pad_token_id:
                last -= 1
            if last < 0:
                raise ValueError(f"pair {i}: every token is the pad token {self.pad_token_id}")
        # tokens after the scored one cannot change its (causal) hidden state: drop them. When the
        # scored token lies in the prompt, it becomes a one-token suffix of a shorter prefix.
        cut = min(last, len(prompt))
        if cut == 0:
            raise ValueError(f"pair {i}: the only scored token is the first one; a sequence needs 2+ tokens before its trailing pads")
        return tuple(seq[:cut]), seq[cut : last + 1]

    def _score_prompt_chunk(self, prompts, groups, split, out, batch_tokens):
        """Prefill these prompts once, then run their rows in length-sorted batches on top."""
        model, device = self.model, self.head.device
        prefix = PrefixCache.from_prompts(model, [list(p) for p in prompts], torch.zeros(0, dtype=torch.int64), 0)
        rows = [(i, j) for j, p in enumerate(prompts) for i in groups[p]]
        rows.sort(key=lambda r: len(split[r[0]][1]))
        for batch in _chunks(rows, lambda r: len(split[r[0]][1]), batch_tokens, padded=True):
            suffixes = [split[i][1] for i, _ in batch]
            Ls = max(map(len, suffixes))
            ids = torch.tensor([s + [0] * (Ls - len(s)) for s in suffixes], device=device)  # right pads are never read
            lengths = torch.tensor([len(s) for s in suffixes], device=device)
            block = SuffixBlock(prefix, torch.tensor([j for _, j in batch], device=device), Ls)
            # the last layer finishes only each row's scored token
            hidden = model.hidden_states(ids, block.positions, block, norm=False, keep=lengths - 1)
            scores, _ = score_heads(hidden, torch.zeros_like(lengths), model.norm.weight, self.head, None, self.mean, self.std, None,
                                    eps=model.norm.eps)
            out[torch.tensor([i for i, _ in batch], device=device)] = scores


class SuffixBlock:
    """Cache for one forward of whole response blocks [R, Ls] on top of a PrefixCache's prompt KV.

    Each row attends to [its prompt's keys | its own block, causal] in one fused SDPA call, with
    the prompt's keys gathered per row. PrefixCache.attend (two partial attentions merged by
    log-sum-exp, no gather) is built for decoding a token at a time; for blocks of ~100 tokens
    per row the gather is cheap next to the block's own work and one SDPA is faster (measured in
    benchmarks/bench_reward.py: 2.3x vs 1.9x transformers' pairs/s). The prompt KV is still
    computed once per prompt.
    """

    def __init__(self, prefix: PrefixCache, row_prefix: torch.Tensor, block_len: int):
        self.prefix, self.row_prefix = prefix, row_prefix
        plen = prefix.prefix_len[row_prefix]
        self.Lp = int(plen.max())
        R, device = len(row_prefix), row_prefix.device
        self.positions = plen[:, None] + torch.arange(block_len, device=device)  # [R, Ls]
        prompt_mask = (torch.arange(self.Lp, device=device) < plen[:, None])[:, None, :].expand(R, block_len, self.Lp)
        causal = torch.ones(block_len, block_len, dtype=torch.bool, device=device).tril().expand(R, block_len, block_len)
        self.mask = torch.cat([prompt_mask, causal], -1)[:, None]  # [R, 1, Ls, Lp + Ls]

    def attend(self, layer, q, k, v, positions):
        kp = self.prefix.prefix_k[layer][self.row_prefix, :, : self.Lp]
        vp = self.prefix.prefix_v[layer][self.row_prefix, :, : self.Lp]
        return attention(q, torch.cat([kp, k], 2), torch.cat([vp, v], 2), self.mask)


def head_names(cfg: dict, k: int) -> list[str]:
    """id2label when it names the heads, else "score" (one head) or "score_0".. (several)."""
    labels = cfg.get("id2label") or {}
    names = [labels.get(str(i), labels.get(i)) for i in range(k)]
    if all(isinstance(n, str) for n in names) and not all(n == f"LABEL_{i}" for i, n in enumerate(names)) and len(set(names)) == k:
        return names
    return ["score"] if k == 1 else [f"score_{i}" for i in range(k)]


def turn_close_ids(tokenizer) -> list[int]:
    """Tokens the chat template writes after an assistant message (EOS when the template cannot
    render a reply; nothing without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # templates may refuse a trailing assistant turn; EOS is then the closing
        text = ""
    if _PROBE not in text:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return list(tokenizer(text[text.rindex(_PROBE) + len(_PROBE):], add_special_tokens=False)["input_ids"])


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor from a safetensors directory, without loading the others."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    file = path / (json.loads(index.read_text())["weight_map"].get(name, "") if index.is_file() else "model.safetensors")
    if not file.is_file():
        raise ValueError(f"{path}: checkpoint has no {name!r} (not a sequence-classification checkpoint?)")
    with safe_open(str(file), framework="pt") as f:
        if name not in f.keys():
            raise ValueError(f"{path}: checkpoint has no {name!r} (not a sequence-classification checkpoint?)")
        return f.get_tensor(name)


def _chunks(items: list, size: Callable, budget: int, padded: bool = False):
    """Consecutive runs of items whose cost fits `budget` tokens: the sum of sizes, or (padded)
    count x largest size. A single item over budget forms its own run."""
    run, cost_max, cost_sum = [], 0, 0
    for it in items:
        s = size(it)
        new_max, new_sum = max(cost_max, s), cost_sum + s
        if run and (new_max * (len(run) + 1) if padded else new_sum) > budget:
            yield run
            run, new_max, new_sum = [], s, s
        run.append(it)
        cost_max, cost_sum = new_max, new_sum
    if run:
        yield run


# -- level bins ----------------------------------------------------------------------------------
class LevelBins:
    """Per-attribute bin edges: level = number of edges <= score (the op's rule, shared code).

    A score exactly on an edge goes to the upper bin; below the first edge is level 0, above the
    last is L-1; equal scores always share a level. Edges must be non-decreasing; equal edges
    (from calibrating on tied scores) leave the bins between them empty.
    """

    def __init__(self, edges, names=None):
        if isinstance(edges, dict):
            if names is not None and list(names) != list(edges):
                raise ValueError(f"names {list(names)} disagree with the edges' keys {list(edges)}")
            names = list(edges)
            rows = [list(map(float, edges[n])) for n in names]
            if len({len(r) for r in rows}) > 1:
                raise ValueError(f"every attribute needs the same number of edges, got {dict(zip(names, map(len, rows)))}")
            edges = torch.tensor(rows, dtype=torch.float32)
        edges = torch.as_tensor(edges, dtype=torch.float32)
        if edges.dim() != 2 or edges.shape[1] < 1:
            raise ValueError(f"edges must be [attributes, levels-1] with levels >= 2, got shape {list(edges.shape)}")
        names = [str(i) for i in range(edges.shape[0])] if names is None else list(names)
        if len(names) != edges.shape[0]:
            raise ValueError(f"{len(names)} names for {edges.shape[0]} rows of edges")
        for n, row in zip(names, edges):
            if not torch.isfinite(row).all() or (row[1:] < row[:-1]).any():
                raise ValueError(f"edges of {n!r} must be finite and non-decreasing, got {row.tolist()}")
        self.edges, self.names = edges, names
        self.levels = edges.shape[1] + 1

    @classmethod
    def calibrate(cls, scores: torch.Tensor, names: list[str], levels: int = 5, values: dict | None = None) -> "LevelBins":
        """Quantile edges: edge j of an attribute is the j/levels quantile of its scores. An
        attribute whose scorer declares its values (values[name], e.g. refusal's (0, 1)) gets the
        midpoints between them instead. Quantiles that collapse (fewer distinct scores than
        levels, or an edge sitting on a value that holds a whole level's share of the scores)
        are an error naming the attribute: relabelling such data would be silent garbage."""
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        scores = _check_scores(scores, names, "calibrate")
        if len(scores) == 0:
            raise ValueError("calibrate needs at least one score")
        q = torch.arange(1, levels, dtype=torch.float64) / levels
        rows = []
        for k, name in enumerate(names):
            declared = (values or {}).get(name)
            rows.append(_value_edges(name, declared, levels) if declared is not None
                        else _quantile_edges(name, scores[:, k].double(), q))
        return cls(torch.stack(rows).float(), names)

    def to_levels(self, scores: torch.Tensor) -> torch.Tensor:
        """Levels int64 [N,K] in 0..levels-1."""
        scores = _check_scores(scores, self.names, "to_levels")
        return bucketize(scores.float(), self.edges.to(scores.device))

    def select(self, names: list[str]) -> "LevelBins":
        """These bins reordered (or subset) to `names`."""
        missing = [n for n in names if n not in self.names]
        if missing:
            raise ValueError(f"bins have no edges for {missing}; they cover {self.names}")
        return LevelBins(self.edges[[self.names.index(n) for n in names]], names)

    def to_json(self) -> dict:
        return {"levels": self.levels, "rule": "level = number of edges <= score",
                "edges": {n: row.tolist() for n, row in zip(self.names, self.edges)}}

    @classmethod
    def from_json(cls, d: dict) -> "LevelBins":
        if not isinstance(d, dict) or not isinstance(d.get("edges"), dict):
            raise ValueError("bins JSON must be an object with an 'edges' object {attribute: [edges]}")
        bins = cls(d["edges"])
        if "levels" in d and d["levels"] != bins.levels:
            raise ValueError(f"bins JSON says levels={d['levels']} but its edges give {bins.levels}")
        return bins


def _value_edges(name: str, values, levels: int) -> torch.Tensor:
    """Value i of n goes to level round(i (L-1) / (n-1)): the lowest value is level 0, the highest
    L-1 (refusal with 5 levels: 0 or 4), the levels between them stay empty; each edge is a midpoint."""
    v = sorted({float(x) for x in values})
    if not 2 <= len(v) <= levels:
        raise ValueError(f"attribute {name!r}: its scorer has {len(v)} values {v}, which cannot fill --levels {levels}; "
                         f"use --levels {max(len(v), 2)} or give edges with --bins FILE")
    level_of = [round(i * (levels - 1) / (len(v) - 1)) for i in range(len(v))]
    edges = [(v[i] + v[i + 1]) / 2 for i in range(len(v) - 1) for _ in range(level_of[i + 1] - level_of[i])]
    return torch.tensor(edges, dtype=torch.float64)


def _quantile_edges(name: str, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    edges = torch.quantile(s, q)
    distinct = torch.unique(s)
    shown = ", ".join(f"{x:g}" for x in distinct[:8].tolist()) + (", ..." if len(distinct) > 8 else "")
    way_out = f"give edges with --bins FILE or use fewer --levels (the scores of {name!r} take {len(distinct)} distinct values: {shown})"
    if len(distinct) < len(q) + 1:
        raise ValueError(f"attribute {name!r}: cannot calibrate {len(q) + 1} levels from quantiles; {way_out}")
    for e in edges.tolist():
        if (s == e).double().mean() * (len(q) + 1) >= 1:
            raise ValueError(f"attribute {name!r}: the quantile edge {e:g} sits on a value that holds "
                             f"{(s == e).double().mean():.0%} of the scores, so levels around it are arbitrary; {way_out}")
    return edges


def _check_scores(scores, names, what) -> torch.Tensor:
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[1] != len(names):
        raise ValueError(f"{what}: scores must be [N, {len(names)}] for {names}, got {list(scores.shape)}")
    nan = torch.isnan(scores).nonzero()
    if len(nan):
        row, col = int(nan[0, 0]), int(nan[0, 1])
        raise ValueError(f"{what}: score of row {row} ({names[col]!r}) is NaN ({len(nan)} NaN scores in all)")
    return scores


# -- several scorers -----------------------------------------------------------------------------
@dataclass
class ScoreResult:
    names: list[str]
    scores: torch.Tensor  # [N,K] fp32
    levels: torch.Tensor | None  # [N,K] int64, when bins are set


class Scorer:
    """Scores pairs with several named scorers. A value is a RewardModel with one head, a
    (RewardModel, head name) pair, a callable(prompts, responses) -> list[float], or a spec string
    for load_scorer. A RewardModel used for several heads runs once per call."""

    def __init__(self, scorers: dict, bins: LevelBins | None = None):
        if not scorers:
            raise ValueError("Scorer needs at least one scorer")
        self.names = list(scorers)
        self._columns = []  # per name: (source, head index or None for a callable)
        for name, s in scorers.items():
            if isinstance(s, str):
                s = load_scorer(s)
            self._columns.append(_column(name, s))
        self.bins = bins.select(self.names) if bins is not None else None
        # a scorer that declares its values (refusal: 0 or 1) is binned between them, not by quantiles
        self.values = {n: getattr(src, "values", None) for n, (src, _) in zip(self.names, self._columns)}
        self.needs_labels = [n for n, (src, _) in zip(self.names, self._columns) if getattr(src, "needs_labels", False)]

    def score(self, prompts: list, responses: list[str], harmful: list[bool | None] | None = None) -> ScoreResult:
        """harmful: per prompt, whether it is a harmful request (for the prompt-aware scorers)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if self.needs_labels and (harmful is None or any(h is None for h in harmful)):
            raise ValueError(f"scorer(s) {self.needs_labels} need each prompt's harmful/safe label: "
                             f"give --label-column COLUMN (or =harmful / =safe for the whole file)")
        done: dict[int, torch.Tensor] = {}
        cols = []
        for name, (source, head) in zip(self.names, self._columns):
            if id(source) not in done:
                done[id(source)] = (source.score(prompts, responses).cpu() if head is not None
                                    else _callable_scores(name, source, prompts, responses, harmful))
            out = done[id(source)]
            cols.append(out[:, head] if head is not None else out)
        scores = torch.stack(cols, 1) if prompts else torch.empty(0, len(self.names))
        levels = self.bins.to_levels(scores) if self.bins is not None else None
        return ScoreResult(self.names, scores, levels)


def _column(name, s):
    if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], RewardModel):
        rm, head = s
        if head not in rm.names:
            raise ValueError(f"scorer {name!r}: reward model has no head {head!r}; heads: {rm.names}")
        return rm, rm.names.index(head)
    if isinstance(s, RewardModel):
        if len(s.names) != 1:
            raise ValueError(f"scorer {name!r}: reward model has {len(s.names)} heads {s.names}; pass (model, head name)")
        return s, 0
    if callable(s):
        return s, None
    raise ValueError(f"scorer {name!r}: expected a RewardModel, (RewardModel, head), a callable or a spec string, got {type(s).__name__}")


def _callable_scores(name, fn, prompts, responses, harmful) -> torch.Tensor:
    values = list(fn(prompts, responses, harmful) if getattr(fn, "needs_labels", False) else fn(prompts, responses))
    if len(values) != len(prompts):
        raise ValueError(f"scorer {name!r} returned {len(values)} scores for {len(prompts)} pairs")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ValueError(f"scorer {name!r}: score {i} is {v!r}, expected a number")
    return torch.tensor(values, dtype=torch.float32)


def load_scorer(spec: str, **kw):
    """A scorer from a spec: "refusal" (ctrlsafe.refusal.refusal_score), a reward model directory
    ("DIR", or "DIR#HEAD" for one head of a multi-head model; kw such as dtype and device go to
    RewardModel.from_pretrained and are ignored by the other kinds), or "package.module:function"."""
    from .refusal import BUILTIN_SCORERS

    if spec in BUILTIN_SCORERS:
        return BUILTIN_SCORERS[spec]
    if spec.startswith("judge:"):
        from .judge import load_judge

        return load_judge(spec, **kw)
    from .convert import resolve_model

    path, _, head = spec.partition("#")
    if ":" not in path:
        path = resolve_model(path)
    if Path(path).is_dir():
        rm = RewardModel.from_pretrained(path, **kw)
        return (rm, head) if head else rm
    module, colon, attr = spec.partition(":")
    if not colon or not module or not attr:
        raise ValueError(f"scorer spec {spec!r} is not a reward model directory, 'module:function' or one of {sorted(BUILTIN_SCORERS)}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ValueError(f"scorer spec {spec!r}: cannot import module {module!r} ({e})") from None
    except AttributeError:
        raise ValueError(f"scorer spec {spec!r}: module {module!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"scorer spec {spec!r}: {attr!r} is not callable")
    return fn


def parse_rm_args(items: list[str]) -> dict[str, str]:
    """["helpful=DIR", "harmless=pkg.mod:fn"] -> {"helpful": "DIR", "harmless": "pkg.mod:fn"}."""
    out = {}
    for item in items:
        name, eq, spec = item.partition("=")
        name, spec = name.strip(), spec.strip()
        if not eq or not spec:
            raise ValueError(f"--rm {item!r} must look like NAME=SPEC (SPEC: a directory, module:function, or refusal / safe / helps)")
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"--rm {item!r}: name {name!r} must match [A-Za-z_][A-Za-z0-9_-]*")
        if name in out:
            raise ValueError(f"--rm {item!r}: {name!r} is given twice")
        out[name] = spec
    return out


# -- `ctrlsafe score` ----------------------------------------------------------------------------
# Input: (prompt, response) rows from anywhere (vLLM, TGI, a human-labelled set), one file or a folder
# of files. Output: either the input rows plus `scores` (a .jsonl / .parquet file), or a ctrlsafe data
# set directory (shards in the generate schema + a manifest with control spec and bins) that
# `ctrlsafe distill` filters and pairs exactly like the output of `ctrlsafe generate`.
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".csv", ".csv.gz", ".parquet", ".pq")
FILE_OUTPUTS = (".jsonl", ".parquet")


def add_arguments(p) -> None:
    from .distill import add_rule_arguments

    p.add_argument("--data", required=True,
                   help="a JSONL/JSON/CSV/Parquet file or a folder of them (e.g. vLLM / TGI output) with 'prompt' (text or chat "
                        "list) or 'messages', and 'response'; optional 'id', 'prompt_id', 'finish_reason' and 'scores' "
                        "(attribute -> number, kept as attributes next to the --rm ones)")
    p.add_argument("--rm", action="append", default=[], metavar="NAME=SPEC",
                   help="a scorer: NAME=DIR (reward model, DIR#HEAD for one head), NAME=module:function or a built-in rule "
                        "(refusal, safe, helps); repeat. Optional when the rows already carry 'scores'")
    p.add_argument("--bins", help="level bins: a LevelBins JSON file or a data set directory (its manifest's bins); "
                                  "a directory --out calibrates them when this is not given")
    p.add_argument("--calibrate-bins", metavar="FILE", help="calibrate quantile bins on these scores, write them to FILE and add levels")
    p.add_argument("--levels", type=int, default=5, help="levels per attribute when bins are calibrated")
    p.add_argument("--label-column", metavar="COLUMN|=harmful|=safe", help="whether each prompt is harmful, for the scorers safe and helps")
    p.add_argument("--out", required=True,
                   help="a directory: a ctrlsafe data set (data/*.parquet in the generate schema + manifest.json with the "
                        "control spec and bins) for `ctrlsafe distill` and `ctrlsafe train`; or a .jsonl / .parquet file: "
                        "the input rows plus 'scores' (and 'levels' with --bins / --calibrate-bins)")
    p.add_argument("--chunk-size", type=int, default=1000, help="with a directory --out: prompts per shard")
    p.add_argument("--device", default="cpu", help="where the reward models run: cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="reward model weights and activations")
    add_rule_arguments(p)  # a directory --out applies the MOEC rules like generate (rejected rows stay, kept=false)


def run(args) -> int:
    if args.bins and args.calibrate_bins:
        raise ValueError("give --bins or --calibrate-bins, not both")
    out = Path(args.out)
    to_dir = out.suffix not in FILE_OUTPUTS
    if to_dir and out.suffix in DATA_SUFFIXES + (".gz",):
        raise ValueError(f"--out {out}: write a .jsonl or .parquet file, or a data set directory (a name without a file suffix)")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    cfg = None
    if to_dir:
        from .distill import config_from_args

        cfg = config_from_args(args)  # bad MOEC options stop here, before any scoring
        from . import dataset

        dataset.claim_out_dir(out, "score")

    rows, prompts, where = read_inputs(args.data)
    given_names, given = _given_scores(rows, where)
    specs = parse_rm_args(args.rm)
    if not specs and not given_names:
        raise ValueError(f"{args.data}: give at least one --rm NAME=SPEC (the rows carry no 'scores' to level)")
    if cfg is not None:
        cfg.check(list(given_names) + [n for n in specs if n not in given_names])  # --harmless-floor needs harmless
    harmful = None
    if args.label_column:
        from .prompts import parse_label

        harmful = [parse_label(args.label_column[1:] if args.label_column.startswith("=") else r.get(args.label_column),
                               f"{w}: field {args.label_column!r}") for r, w in zip(rows, where)]
    names, scores, values = list(given_names), given, {}
    if specs:
        kw = {"device": args.device, "dtype": getattr(torch, args.dtype)}
        scorer = Scorer({n: load_scorer(s, **kw) for n, s in specs.items()})
        result = scorer.score([p.value for p in prompts], [r["response"] for r in rows], harmful=harmful)
        values = {n: v for n, v in scorer.values.items() if v is not None}
        cols = {n: given[:, i] for i, n in enumerate(given_names)} if given is not None else {}
        cols.update({n: result.scores[:, i] for i, n in enumerate(scorer.names)})  # an --rm replaces a given score
        names = list(given_names) + [n for n in scorer.names if n not in given_names]
        scores = torch.stack([cols[n] for n in names], 1) if rows else torch.empty(0, len(names))
    bins = None
    if args.bins:
        from .pipeline import read_bins_file

        bins = LevelBins.from_json(read_bins_file(args.bins)).select(names)
    elif args.calibrate_bins or to_dir:
        bins = LevelBins.calibrate(scores, names, args.levels, values=values)
        if args.calibrate_bins:
            _write_atomic(Path(args.calibrate_bins), lambda f: Path(f).write_text(json.dumps(bins.to_json(), indent=2) + "\n"))
    levels = bins.to_levels(scores) if bins is not None else None
    if to_dir:
        counts = _write_dataset(out, args, rows, prompts, where, names, scores, levels, bins, specs, cfg)
        print(f"scored {len(rows)} pairs ({', '.join(names)}; {bins.levels} levels) -> {out}: kept {counts['kept']} of "
              f"{counts['samples']}" + "".join(f", {k} {v}" for k, v in counts["drop_reasons"].items()))
        return 0
    for n, row in enumerate(rows):
        row["scores"] = dict(zip(names, scores[n].tolist()))
        if levels is not None:
            row["levels"] = dict(zip(names, levels[n].tolist()))
    write_rows(out, rows, names, input_schema=_parquet_input_schema(args.data))
    print(f"scored {len(rows)} pairs with {', '.join(names)} -> {args.out}")
    return 0


def input_files(path) -> list[Path]:
    """The data files of --data: the file itself, or a folder's JSONL/JSON/CSV/Parquet files in name order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"data file {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{path}: no data files ({', '.join(DATA_SUFFIXES)}) in this folder")
    return files


def read_inputs(path) -> tuple[list[dict], list, list[str]]:
    """(rows, prompts, locations): every row with a prompt (a 'prompt' string or chat list, or a
    'messages' chat, read by the prompt loader's rules) and a 'response' string. Errors name the
    file, the line/row and the field; a Parquet file without the columns names the columns it has."""
    import pyarrow.parquet as pq

    from .prompts import PromptError, _pick_column, _to_prompt, detect_format, iter_rows

    rows, prompts, where = [], [], []
    for f in input_files(path):
        if detect_format(f) == "parquet":
            cols = pq.read_schema(f).names
            missing = [c for c, ok in (("prompt' or 'messages", {"prompt", "messages"} & set(cols)), ("response", "response" in cols)) if not ok]
            if missing:
                raise ValueError(f"{f}: no '{missing[0]}' column (columns: {', '.join(cols) or 'none'})")
        for n, (loc, row) in enumerate(iter_rows(f)):
            at = f"{f}:{loc}"
            if isinstance(row, Exception):
                raise ValueError(f"{at}: {row}")
            if not isinstance(row, dict):
                raise ValueError(f"{at}: expected an object with fields, got {type(row).__name__}")
            try:
                # a chat wins over the flat prompt text when a row has both (ctrlsafe's own records do)
                column = "messages" if row.get("messages") is not None else _pick_column(row)
                prompt = _to_prompt(row, n, column, "id", "context")
            except PromptError as e:
                raise ValueError(f"{at}: {e}") from None
            response = row.get("response")
            if not isinstance(response, str):
                got = f"got {response!r:.60}" if "response" in row else f"the row has none (fields: {', '.join(map(str, row))})"
                raise ValueError(f"{at}: field 'response' must be a string, {got}")
            rows.append(row)
            prompts.append(prompt)
            where.append(at)
    return rows, prompts, where


def read_pairs(path) -> list[dict]:
    """Rows with a prompt and a 'response' string (see read_inputs); errors name the file and line."""
    return read_inputs(path)[0]


def _given_scores(rows, where) -> tuple[list[str], torch.Tensor | None]:
    """Scores the rows already carry ('scores': attribute -> number; a struct or a map column):
    the attribute names and a [N, K] tensor, or ([], None) when no row has them."""
    if not any(r.get("scores") is not None for r in rows):
        return [], None
    names, out = None, []
    for r, at in zip(rows, where):
        s = r.get("scores")
        if isinstance(s, list) and all(isinstance(kv, (tuple, list)) and len(kv) == 2 for kv in s):
            s = dict(s)  # a Parquet map<string, double> column reads as key/value pairs
        if not isinstance(s, dict) or not s:
            raise ValueError(f"{at}: field 'scores' must be an object attribute -> number (or absent in every row), got {s!r:.60}")
        if names is None:
            names = list(s)
        elif set(s) != set(names):
            raise ValueError(f"{at}: field 'scores' has attributes {sorted(s)}, earlier rows have {sorted(names)}")
        for k in names:
            v = s[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"{at}: field 'scores.{k}' is {v!r}, expected a number")
        out.append([float(s[k]) for k in names])
    return names, torch.tensor(out, dtype=torch.float32).reshape(len(out), len(names))


def _prompt_key(prompt) -> str:
    """A stable prompt id from the prompt itself, so the samples of one prompt group together."""
    import hashlib

    value = prompt.text if prompt.messages is None else json.dumps(list(prompt.messages), ensure_ascii=False, sort_keys=True)
    return "p" + hashlib.sha256(value.encode()).hexdigest()[:16]


def _write_dataset(out: Path, args, rows, prompts, where, names, scores, levels, bins, specs, cfg) -> dict:
    """The scored rows as a ctrlsafe data set: one record per row in the generate schema (control =
    the measured levels, requested null), shards of --chunk-size prompts (a prompt's samples never
    span shards, as `distill` needs), the MOEC rules, and a manifest that `distill` reads."""
    from . import dataset, distill
    from .controls import ControlSpec
    from .pipeline import _identity, _now

    try:
        spec = ControlSpec(tuple(names), bins.levels)
    except ValueError as e:
        raise ValueError(f"{args.data}: the score attributes {names} cannot become controls ({e})") from None
    groups: dict[str, list[int]] = {}
    for i, (r, p) in enumerate(zip(rows, prompts)):
        pid = r.get("prompt_id")
        groups.setdefault(str(pid) if pid not in (None, "") else _prompt_key(p), []).append(i)
    records, seen = {}, {}
    for pid, members in groups.items():
        for k, i in enumerate(members):
            r, p = rows[i], prompts[i]
            rid = str(r["id"]) if r.get("id") not in (None, "") else f"{pid}/{k}"
            if rid in seen:
                raise ValueError(f"{where[i]}: field 'id': duplicate id {rid!r} (first at {seen[rid]})")
            seen[rid] = where[i]
            finish = r.get("finish_reason")
            records[i] = {
                "id": rid, "prompt_id": pid, "prompt": p.display,
                "messages": json.dumps(list(p.messages), ensure_ascii=False) if p.messages is not None else None,
                "requested": None, "control": dict(zip(names, levels[i].tolist())), "sample_index": k,
                "response": r["response"], "scores": dict(zip(names, scores[i].tolist())),
                "finish_reason": None if finish is None else str(finish),
            }
    options = {k: v for k, v in sorted(vars(args).items()) if k not in ("command", "out", "device")}
    started = _now()
    manifest = {
        "format": dataset.FORMAT, "format_version": dataset.FORMAT_VERSION, "kind": "records",
        "source": str(Path(args.data).resolve()), "config": {"score": options}, "control_spec": spec.to_dict(),
        "bins": bins.to_json(), "models": {"reward_models": {n: {"spec": s, **_identity(s, hash_weights=True)} for n, s in specs.items()},
                                           "given_scores": [n for n in names if n not in specs]},
        "started_at": started, "writer": dataset.writer_identity(),
    }
    dataset.write_json({**manifest, "status": "running", "updated_at": started}, out / dataset.MANIFEST)
    try:
        pids = list(groups)
        for c in range(0, len(pids), args.chunk_size):
            chunk = [records[i] for pid in pids[c:c + args.chunk_size] for i in groups[pid]]
            distill.apply_rules(chunk, cfg, names, bins.to_json()["edges"])
            dataset.write_table(dataset.records_to_table(chunk, names), dataset.shard_path(out, c // args.chunk_size))
        cap = distill.apply_cell_cap(out, cfg, names) if rows else None
        counts = {**distill.count(out, names), "cell_cap": cap} if rows else {"samples": 0, "kept": 0, "drop_reasons": {}}
    except Exception as e:  # the manifest says so; the corrected command may then reuse --out
        dataset.mark_failed(out, e)
        raise
    dataset.write_json({**manifest, "status": "complete", "updated_at": _now(), "counts": counts}, out / dataset.MANIFEST)
    return counts


def _parquet_input_schema(path):
    """The Arrow schema of a Parquet --data (every file of a folder must agree), else None."""
    import pyarrow.parquet as pq

    from .prompts import detect_format

    files = [f for f in input_files(path) if detect_format(f) == "parquet"]
    if not files or len(files) != len(input_files(path)):
        return None
    schemas = [pq.read_schema(f) for f in files]
    return schemas[0] if all(s.remove_metadata().equals(schemas[0].remove_metadata()) for s in schemas) else None


def write_rows(path: Path, rows: list[dict], names: list[str] | None = None, *, input_schema=None) -> None:
    """A .jsonl, or a .parquet with an explicit schema: the input's own column types when it was
    Parquet (so every file scored from one producer's shards has the same schema), 'scores' as
    struct<name: float32> and 'levels' as struct<name: int32>; an input column that is null in
    every row is typed string (not Arrow's `null`), so such files still load as one dataset."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist(rows, schema=_output_schema(rows, names, input_schema))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(f"--out {path}: these rows do not fit one Parquet schema ({e}); write .jsonl instead") from None
        _write_atomic(path, lambda f: pq.write_table(table, f))
    elif path.suffix == ".jsonl":
        _write_atomic(path, lambda f: Path(f).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    else:
        raise ValueError(f"--out {path}: expected a .jsonl or .parquet file name")


def _output_schema(rows, names, input_schema):
    import pyarrow as pa

    columns = list(dict.fromkeys(k for r in rows for k in r))
    for r in rows:  # every row gets every column (null where a JSONL row lacks it)
        for k in columns:
            r.setdefault(k, None)
    inferred = pa.Table.from_pylist(rows).schema if rows else pa.schema([])
    fields = []
    for k in columns:
        if k == "scores" and names is not None:
            fields.append(pa.field(k, pa.struct([(n, pa.float32()) for n in names])))
        elif k == "levels" and names is not None:
            fields.append(pa.field(k, pa.struct([(n, pa.int32()) for n in names])))
        else:
            t = input_schema.field(k).type if input_schema is not None and k in input_schema.names else inferred.field(k).type
            fields.append(pa.field(k, pa.string() if pa.types.is_null(t) else t))
    return pa.schema(fields)


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
