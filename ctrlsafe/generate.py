"""Multi-control generation: many control settings x many samples per prompt, prompt KV stored once.

    engine = Engine(model, tokenizer, ControlSpec())
    outs = engine.generate(prompts, controls="grid", n=4, sampling=SamplingParams(0.8, top_k=50),
                           max_new_tokens=256, stop=["\\n\\nUser:"], seed=1234)

Order of work (see `Engine._run`):
  1. each prompt is rendered once; the distinct prompts of the rows admitted are prefilled once,
     right-padded, into a `PrefixCache` that stores each prompt's KV once;
  2. each (prompt, control) suffix is prefilled ONCE on top of its prompt's cached prefix, in the
     slot of its first row, and its few suffix K/V entries are copied into the slots of its other
     n-1 rows (copying 1-3 control tokens per row is cheaper than recomputing them n times and
     keeps every row's storage uniform for decoding);
  3. all rows decode together: one model forward and one sampler call per step for all live
     rows, with per-row seed and step tensors. Each row attends over [its prompt's shared prefix |
     its own suffix] without a copy of the prefix (kv_cache.py: one fused C++ kernel per layer on
     CPU). Nothing is read back to the host between checks (every `sync_every` steps).
  4. at a check, rows that finished (EOS, stop string, max_new_tokens) retire once they are
     COMPACT_FRACTION of the batch: the live rows are compacted, the prefix store keeps only their
     prompts, and (with refill, the CUDA default) rows still waiting (max_rows, max_batch_tokens)
     are admitted into the freed slots as in 1-2, so the batch stays full until the request runs
     out; without refill they start as the next wave once the batch is done.

Determinism: row (prompt key k, control c, sample j) samples token t with the sampler's
counter-based RNG keyed by (row_seed(seed, k, c, j), t). Nothing else enters, so results do not
depend on batch size, on which prompts run together or on their order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

import torch

from .controls import ControlSpec, render_prompt
from .kv_cache import PrefixCache
from .model import generation_eos_ids
from .sampling import sample

_M64 = (1 << 64) - 1


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off


REASONS = ("length", "eos", "stop")  # Completion.finish_reason values, by the codes the decode loop keeps


@dataclass
class Completion:
    prompt_index: int  # index into the `prompts` list given
    control_index: int  # index into the `controls` list (0 when controls is None)
    control: dict | list[int] | None  # the level dict, raw suffix ids, or None
    sample_index: int
    token_ids: list[int]  # generated ids; the EOS token that ended the row is NOT included
    text: str | None  # decoded token_ids (special tokens skipped), cut before a stop string; None without tokenizer
    logprobs: list[float]  # one per token_ids entry: log-prob under the processed distribution it was drawn from
    finish_reason: str  # "eos" | "stop" | "length"
    seed: int  # the row seed (row_seed(seed, prompt_key, control_index, sample_index))
    eos_token_id: int | None = None  # which EOS id ended the row (finish_reason "eos")
    # with generate(raw_logprobs=True): the model's log_softmax(logits)[token] per token (untempered,
    # unfiltered, before control tokens / early EOS are masked: the policy's own log-prob, as RL
    # objectives compute it); None otherwise
    raw_logprobs: list[float] | None = None


def row_seed(seed: int, prompt_key: int, control_index: int, sample_index: int) -> int:
    """The sampler seed of one row: splitmix64 chained over the four integers (each taken mod
    2^64), top 63 bits, so it is a non-negative int64 and a stable function of its inputs."""
    h = seed & _M64
    for x in (prompt_key, control_index, sample_index):
        h = _splitmix64(h ^ (x & _M64))
    return h >> 1


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


@dataclass
class _Row:
    prompt: int
    control: int
    sample: int
    seed: int


@dataclass
class _Request:
    """A validated generate() call: rendered prompts, control suffixes and the rows to run."""

    prompts: list[list[int]]
    suffixes: list[list[int]]
    controls: list
    rows: list[_Row]
    sampling: SamplingParams
    max_new_tokens: int
    min_new_tokens: int
    stop: list[str]
    progress: Callable[[int], None] | None
    raw_logprobs: bool = False
    done: int = 0  # rows completed so far (for progress)
    results: list[Completion] = field(default_factory=list)

    @property
    def suffix_capacity(self) -> int:
        """Cache slots per row: the longest control suffix plus max_new_tokens."""
        return max(map(len, self.suffixes)) + self.max_new_tokens


@dataclass
class _Batch:
    """The rows decoding together, in batch order (= cache slots 0..n-1), and their state. A
    row's token count is the loop's step minus its admission step, so the host knows it without
    reading the device; everything a step changes stays on the device."""

    rows: list[_Row]
    admitted: list[int]  # loop step at which each row joined
    suffix_len: list[int]
    admitted_at: torch.Tensor  # [n] the same on the device
    seeds: torch.Tensor  # [n]
    position0: torch.Tensor  # [n] position of the row's first new token (prompt + suffix length)
    logits: torch.Tensor  # [n,V] next-token logits
    tokens: torch.Tensor  # [n,max_new] ids drawn so far
    logprobs: torch.Tensor  # [n,max_new]
    raw: torch.Tensor | None  # [n,max_new] the model's log_softmax at each token (raw_logprobs)
    tok: torch.Tensor  # [n] the last token drawn: the next forward's input
    alive: torch.Tensor  # [n] bool
    length: torch.Tensor  # [n] tokens kept (max_new until the row ends)
    reason: torch.Tensor  # [n] index into REASONS
    eos_hit: torch.Tensor  # [n] the EOS id that ended the row, -1 if none
    invalid_at: torch.Tensor  # [n] first step with non-finite logits, -1 if none

    @classmethod
    def new(cls, req: _Request, rows: list[_Row], step: int, position0, logits) -> "_Batch":
        n, dev, max_new = len(rows), logits.device, req.max_new_tokens
        zeros = lambda dtype: torch.zeros(n, max_new, dtype=dtype, device=dev)  # noqa: E731
        full = lambda v: torch.full((n,), v, dtype=torch.int64, device=dev)  # noqa: E731
        return cls(rows, [step] * n, [len(req.suffixes[r.control]) for r in rows], full(step),
                   torch.tensor([r.seed for r in rows], dtype=torch.int64, device=dev), position0, logits,
                   zeros(torch.int64), zeros(torch.float32), zeros(torch.float32) if req.raw_logprobs else None,
                   full(0), torch.ones(n, dtype=torch.bool, device=dev), full(max_new), full(0), full(-1), full(-1))

    def select(self, keep: list[int]) -> "_Batch":
        index = torch.tensor(keep, dtype=torch.int64, device=self.seeds.device)
        pick = lambda v: [v[i] for i in keep] if isinstance(v, list) else None if v is None else v[index]  # noqa: E731
        return _Batch(*(pick(getattr(self, f.name)) for f in fields(self)))

    def concat(self, other: "_Batch") -> "_Batch":
        join = lambda a, b: a + b if isinstance(a, list) else None if a is None else torch.cat([a, b])  # noqa: E731
        return _Batch(*(join(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)))

    def record(self, out, t_rows, logits, lse, eos, max_new: int):
        """Keep the tokens just drawn (rows still alive only) and end rows at EOS or max_new."""
        rows = torch.arange(len(self.rows), device=t_rows.device)
        col = t_rows.clamp(max=max_new - 1)  # finished rows decode on until the next check
        alive = self.alive
        self.invalid_at = torch.where(~out.valid & alive & (self.invalid_at < 0), t_rows, self.invalid_at)
        self.tokens[rows, col] = torch.where(alive, out.tokens, self.tokens[rows, col])
        self.logprobs[rows, col] = torch.where(alive, out.logprobs, self.logprobs[rows, col])
        if self.raw is not None:  # a drawn token is never a masked one: its logit is still the model's
            self.raw[rows, col] = torch.where(alive, logits.gather(1, out.tokens.clamp(min=0)[:, None])[:, 0].float() - lse,
                                              self.raw[rows, col])
        is_eos = torch.isin(out.tokens, eos) & alive
        self.length = torch.where(is_eos, t_rows, self.length)
        self.reason = torch.where(is_eos, 1, self.reason)
        self.eos_hit = torch.where(is_eos, out.tokens, self.eos_hit)
        self.alive = alive & ~is_eos & (t_rows + 1 < max_new)
        self.tok = out.tokens.clamp(min=0)


class _GraphedDecode:
    """The decode forward of one batch (its rows, slots and prompt groups fixed) captured as a
    CUDA graph: a replay is one launch where eager decode is ~20 per layer. Built with a warm-up
    forward on a side stream (it settles the cache's slot groups and the allocator, and its
    logits are this step's), then captured into the engine's graph memory pool."""

    def __init__(self, forward, tok, positions, cache, pool):
        self.tok, self.positions = tok.clone(), positions.clone()
        cache.static_shapes = True
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.out = forward(self.tok, self.positions, cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        warm = self.out.clone()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = forward(self.tok, self.positions, cache)
        self.out.copy_(warm)

    def __call__(self, tok, positions):
        self.tok.copy_(tok)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.out


def kv_token_budget(args, dtype: torch.dtype, free_bytes: int, fraction: float = 0.5) -> int:
    """Cached tokens whose K/V (every layer) fit `fraction` of `free_bytes`: a wave's size on a
    GPU, leaving the rest to activations, logits and the allocator."""
    per_token = args.num_hidden_layers * 2 * args.num_key_value_heads * args.head_dim * torch.empty(0, dtype=dtype).element_size()
    return int(fraction * free_bytes) // per_token


class Engine:
    """Batched generation over prompts x controls x samples with a shared prompt KV cache."""

    # retire finished rows from the batch once they are this fraction of it (compaction copies
    # the live rows' suffix cache, so doing it for every single finished row would cost more)
    COMPACT_FRACTION = 1 / 8

    def __init__(self, model, tokenizer=None, control_spec: ControlSpec | None = None, *, max_batch_tokens: int | None = None,
                 max_rows: int = 256, eos_token_ids=None, compile: bool = False, sync_every: int | None = None,
                 refill: bool | None = None, cuda_graphs: bool = False, profile: bool = False):
        """max_batch_tokens: cached tokens (prefix + row suffixes) per wave; default 16384 on CPU, on
        CUDA what half the free device memory holds (`kv_token_budget`).
        sync_every: decode steps between host reads of the batch state (errors, progress,
        retiring finished rows). Between them nothing waits for the device, and a finished row
        runs on for up to sync_every - 1 steps whose tokens are discarded; results do not depend
        on it. Default 1 on CPU (no device to wait for), 8 on CUDA. Stop strings check every step.
        refill: admit waiting rows into the slots finished rows free (continuous refill) rather
        than starting a new wave when the batch is done. Default on CUDA, where a step costs about
        the same for any batch; off on CPU, where a step's cost grows with its rows and refill
        measured 0.95x of waves (SmolLM2-135M, 64 rows, max_rows 32, 128 tokens, natural EOS).
        cuda_graphs: on CUDA, replay the decode forward as one captured graph (recaptured when the
        batch changes: each compaction) instead of launching ~20 kernels per layer per step.
        profile: synchronise CUDA around each phase so `timings` measure the device (costs the
        overlap); on CPU timings are exact anyway."""
        self.device = model.embed_tokens.weight.device
        if max_batch_tokens is None:
            max_batch_tokens = 16384
            if self.device.type == "cuda":
                max_batch_tokens = max(max_batch_tokens, kv_token_budget(model.args, model.embed_tokens.weight.dtype,
                                                                         torch.cuda.mem_get_info(self.device)[0]))
        if max_rows < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_rows ({max_rows}) and max_batch_tokens ({max_batch_tokens}) must be >= 1")
        if sync_every is not None and (not isinstance(sync_every, int) or sync_every < 1):
            raise ValueError(f"sync_every must be an integer >= 1 (or None for the device default), got {sync_every!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.control_spec = control_spec
        self.max_rows, self.max_batch_tokens = max_rows, max_batch_tokens
        self.eos_token_ids = self._resolve_eos(eos_token_ids)
        self.sync_every = sync_every or (8 if self.device.type == "cuda" else 1)
        if cuda_graphs and (self.device.type != "cuda" or compile or model.args.sliding_window is not None):
            raise ValueError("cuda_graphs needs a CUDA model, compile=False and no sliding_window")
        self.cuda_graphs = cuda_graphs
        self.refill = self.device.type == "cuda" if refill is None else bool(refill)
        self._graph_pool = None  # one memory pool for every captured decode graph
        self.profile = profile
        self._eos = torch.tensor(self.eos_token_ids, dtype=torch.int64, device=self.device)
        self._suppress = torch.tensor(self._control_token_ids(), dtype=torch.int64, device=self.device)
        self._forward = torch.compile(self._decode_forward, dynamic=True) if compile else self._decode_forward
        self.timings: dict[str, float] = {}  # seconds spent in the last generate(), by phase

    def _control_token_ids(self) -> list[int]:
        if self.control_spec is None or self.tokenizer is None:
            return []
        vocab = self.tokenizer.get_vocab()
        return [vocab[t] for t in self.control_spec.all_tokens() if t in vocab and vocab[t] < self.model.args.vocab_size]

    def _resolve_eos(self, eos_token_ids) -> list[int]:
        """Given ids (int or list), else the model directory's generation_config, else the tokenizer's."""
        if eos_token_ids is not None:
            ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
        elif getattr(self.model, "source_path", None) and generation_eos_ids(self.model.source_path):
            ids = generation_eos_ids(self.model.source_path)
        elif self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids = [self.tokenizer.eos_token_id]
        else:
            ids = []
        if not all(isinstance(i, int) and 0 <= i < self.model.args.vocab_size for i in ids):
            raise ValueError(f"eos_token_ids {ids} must be token ids in 0..{self.model.args.vocab_size - 1}")
        return ids

    # -- request ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence, controls=None, n: int = 1, sampling: SamplingParams = SamplingParams(),
                 max_new_tokens: int = 64, stop: str | Sequence[str] | None = None, seed: int = 0,
                 min_new_tokens: int = 0, truncate: str | None = None, prompt_keys: Sequence[int] | None = None,
                 progress: Callable[[int], None] | None = None, raw_logprobs: bool = False) -> list[Completion]:
        """Sample `n` responses for every (prompt, control); sorted by (prompt, control, sample).

        prompts: strings or chat message lists (rendered with the tokenizer's chat template), or
        token-id lists (used as is). controls: level dicts (rendered with control_spec), "grid"
        (every cell of control_spec), raw token-id suffixes, or None (no control tokens).
        truncate="left" keeps the last tokens of prompts too long for the context (else an error).
        prompt_keys: a stable integer per prompt used in the seed instead of its list index.
        progress: called with the number of completed rows after each batch of retirements.
        raw_logprobs: also return each token's log_softmax(logits) log-prob (Completion.raw_logprobs).
        """
        req = self._request(prompts, controls, n, sampling, max_new_tokens, stop, seed, min_new_tokens, truncate, prompt_keys, progress)
        req.raw_logprobs = bool(raw_logprobs)
        self.timings = dict.fromkeys(("prefill", "decode_forward", "sampling", "other"), 0.0)
        start = time.perf_counter()
        self._run(req)
        self.timings["other"] = time.perf_counter() - start - sum(self.timings.values())
        return sorted(req.results, key=lambda c: (c.prompt_index, c.control_index, c.sample_index))

    def _request(self, prompts, controls, n, sampling, max_new_tokens, stop, seed, min_new_tokens, truncate, prompt_keys, progress) -> _Request:
        if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list (of strings, chat message lists or token-id lists)")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"min_new_tokens must be in 0..max_new_tokens ({max_new_tokens}), got {min_new_tokens!r}")
        if truncate not in (None, "left"):
            raise ValueError(f"truncate must be None or 'left', got {truncate!r}")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (Engine(model, tokenizer, ...))")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        if prompt_keys is None:
            prompt_keys = list(range(len(prompts)))
        elif len(prompt_keys) != len(prompts) or not all(isinstance(k, int) for k in prompt_keys):
            raise ValueError(f"prompt_keys must hold one integer per prompt ({len(prompts)}), got {len(prompt_keys)}")
        suffixes, controls = self._suffixes(controls)
        rendered = self._render(prompts, max_new_tokens + max(map(len, suffixes)), truncate)
        rows = [_Row(i, c, j, row_seed(seed, prompt_keys[i], c, j))
                for i in range(len(rendered)) for c in range(len(suffixes)) for j in range(n)]
        return _Request(rendered, suffixes, controls, rows, sampling, max_new_tokens, min_new_tokens, stop, progress)

    def _render(self, prompts, reserved: int, truncate) -> list[list[int]]:
        """Token ids of every prompt, checked against the context (reserved = suffix + new tokens)."""
        limit = self.model.args.max_position_embeddings - reserved
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, (list, tuple)) and all(isinstance(x, int) for x in p):
                ids = list(p)
                if not ids:
                    raise ValueError(f"prompt {i} is empty")
                if any(not 0 <= x < self.model.args.vocab_size for x in ids):
                    raise ValueError(f"prompt {i}: token ids must be in 0..{self.model.args.vocab_size - 1}")
            else:
                if self.tokenizer is None:
                    raise ValueError(f"prompt {i} is text; a tokenizer is needed (or pass token-id lists)")
                try:
                    ids = render_prompt(p, self.tokenizer)
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from None
            if len(ids) > limit:
                if truncate != "left" or limit < 1:
                    raise ValueError(
                        f"prompt {i} has {len(ids)} tokens; the context ({self.model.args.max_position_embeddings}) "
                        f"leaves {max(limit, 0)} after the control suffix and max_new_tokens; pass truncate='left' to keep its end"
                    )
                ids = ids[-limit:]
            out.append(ids)
        return out

    def _suffixes(self, controls) -> tuple[list[list[int]], list]:
        """(control token ids, control as reported) for every control index."""
        if controls is None:
            return [[]], [None]
        spec = self.control_spec
        if isinstance(controls, str):
            if controls != "grid":
                raise ValueError(f"controls={controls!r}: the only string allowed is 'grid'")
            if spec is None:
                raise ValueError("controls='grid' needs a control_spec")
            controls = spec.grid()
        if not isinstance(controls, Sequence) or len(controls) == 0:
            raise ValueError("controls must be None, 'grid', or a non-empty list of level dicts or token-id lists")
        suffixes = []
        for c, ctrl in enumerate(controls):
            if isinstance(ctrl, dict):
                if spec is None or self.tokenizer is None:
                    raise ValueError(f"control {c} is a level dict; that needs a control_spec and a tokenizer")
                suffixes.append(spec.control_ids(ctrl, self.tokenizer))
            elif isinstance(ctrl, (list, tuple)) and all(isinstance(x, int) and 0 <= x < self.model.args.vocab_size for x in ctrl):
                suffixes.append(list(ctrl))
            else:
                raise ValueError(f"control {c} = {ctrl!r} is neither a level dict nor a list of token ids in 0..{self.model.args.vocab_size - 1}")
        return suffixes, [dict(c) if isinstance(c, dict) else list(c) for c in controls]

    # -- scheduling ---------------------------------------------------------------------------
    def _admissible(self, req: _Request, batch: _Batch | None, start: int) -> int:
        """How many of req.rows[start:] can join the batch (none into a running one without
        refill): at most max_rows rows in all, and cached tokens within max_batch_tokens:
        (distinct prompts) x (longest prompt) for the prefix store plus rows x req.suffix_capacity
        for the row slots. A row over budget on its own runs alone. Rows are in (prompt, control,
        sample) order, so a prompt's rows stay together."""
        if batch is not None and not self.refill:
            return 0
        n = len(batch.rows) if batch is not None else 0
        prompts = {r.prompt for r in batch.rows} if batch is not None else set()
        longest = max((len(req.prompts[p]) for p in prompts), default=0)
        slot, m = req.suffix_capacity, 0
        for row in req.rows[start:]:
            grown = prompts | {row.prompt}
            new_longest = max(longest, len(req.prompts[row.prompt]))
            rows = n + m + 1
            if rows > 1 and (rows > self.max_rows or len(grown) * new_longest + rows * slot > self.max_batch_tokens):
                break
            prompts, longest, m = grown, new_longest, m + 1
        return m

    # -- decoding -----------------------------------------------------------------------------
    def _run(self, req: _Request):
        """Decode every row of the request, refilling as rows finish: at a check, finished rows
        retire (once they are COMPACT_FRACTION of the batch) and rows still waiting are admitted
        into the freed slots (new prompts prefilled into the shared prefix store, suffixes on
        top), so the batch stays full until the request runs out of rows."""
        cache, store, batch, waiting = None, [], None, 0  # store: the request's prompt of each prefix entry
        graph = None  # the captured decode forward (cuda_graphs)
        step = 0
        check_every = 1 if req.stop else self.sync_every  # stop strings are matched on the host anyway
        while batch is not None or waiting < len(req.rows):
            if batch is None:  # the start, or every row retired
                batch, cache, store, waiting = self._refill(req, cache, store, None, waiting, step)
            self._sample_step(req, batch, step)
            step += 1
            refill = False
            oldest_done = step - min(batch.admitted) >= req.max_new_tokens  # the host knows: those rows finished
            if step % check_every == 0 or oldest_done:
                kept = self._retire(req, cache, store, batch, force=oldest_done)
                if kept is not batch:  # rows retired: the batch changed
                    batch, graph, refill = kept, None, True
                    if not batch.rows:
                        batch = None
                        continue
            t2 = time.perf_counter()
            t_rows = step - 1 - batch.admitted_at  # the index of the token each row feeds in
            # finished rows that decode on until the next check rewrite their own last slot
            positions = batch.position0 + t_rows.clamp(max=req.max_new_tokens - 1)
            cache.offset_bound = max(s + min(step - 1 - a, req.max_new_tokens - 1)  # the host knows it: no device read
                                     for s, a in zip(batch.suffix_len, batch.admitted))
            batch.logits, graph = self._forward_rows(cache, batch.tok[:, None], positions[:, None], graph)
            self._sync()
            self.timings["decode_forward"] += time.perf_counter() - t2
            if refill and waiting < len(req.rows):  # the new rows' first logits come from their prefill
                joined, cache, store, waiting = self._refill(req, cache, store, batch, waiting, step)
                graph = None if joined is not batch else graph
                batch = joined

    def _refill(self, req: _Request, cache, store, batch: _Batch | None, waiting: int, step: int):
        """Admit as many waiting rows as fit; returns (batch, cache, store, waiting)."""
        t0 = time.perf_counter()
        m = self._admissible(req, batch, waiting)
        if m:
            cache, store, batch = self._admit(req, cache, store, batch, req.rows[waiting : waiting + m], step)
        self.timings["prefill"] += time.perf_counter() - t0
        return batch, cache, store, waiting + m

    def _sample_step(self, req: _Request, batch: _Batch, step: int):
        """Draw every row's next token from batch.logits and record it."""
        t1 = time.perf_counter()
        sp = req.sampling
        t_rows = step - batch.admitted_at  # [n] tokens each row has so far
        logits = batch.logits
        lse = torch.logsumexp(logits.float(), -1) if batch.raw is not None else None  # before masking: the model's own
        if req.min_new_tokens and len(self._eos):
            early = (t_rows < req.min_new_tokens)[:, None]
            logits[:, self._eos] = torch.where(early, float("-inf"), logits[:, self._eos])
        if len(self._suppress):  # a control token is an input, never a response token
            logits[:, self._suppress] = float("-inf")
        out = sample(logits, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, min_p=sp.min_p, seed=batch.seeds, step=t_rows)
        batch.record(out, t_rows, logits, lse, self._eos, req.max_new_tokens)
        if req.stop:
            stopped = self._stop_hit(req, batch, t_rows) & batch.alive
            batch.length = torch.where(stopped, t_rows + 1, batch.length)
            batch.reason = torch.where(stopped, 2, batch.reason)
            batch.alive = batch.alive & ~stopped
        self._sync()
        self.timings["sampling"] += time.perf_counter() - t1

    def _retire(self, req: _Request, cache: PrefixCache, store: list[int], batch: _Batch, force: bool) -> _Batch:
        """The host looks (two reads): errors, then finished rows. Once they are enough (or all, or
        forced), their completions are kept and the live rows compacted to slots 0..n-1 with the
        prefix store trimmed to their prompts; returns the new batch (the same one if nothing retired)."""
        self._raise_invalid(batch)
        alive = batch.alive.tolist()
        done = [i for i, a in enumerate(alive) if not a]
        if not done or not (force or len(done) == len(alive) or len(done) >= self.COMPACT_FRACTION * len(alive)):
            return batch
        self._finish(req, batch.select(done))
        self._report(req, len(done))
        keep = [i for i, a in enumerate(alive) if a]
        cache.compact(torch.tensor(keep, dtype=torch.int64, device=self.device))
        batch = batch.select(keep)
        live = {r.prompt for r in batch.rows}
        kept = [i for i, p in enumerate(store) if p in live]
        cache.keep_prompts(kept, len(keep), max((len(req.prompts[store[i]]) for i in kept), default=0))
        store[:] = [store[i] for i in kept]
        return batch

    def _admit(self, req: _Request, cache: PrefixCache | None, store: list[int], batch: _Batch | None, rows: list[_Row], step: int):
        """Rows join the batch in slots n..n+m-1: their new prompts prefilled into the prefix store,
        each (prompt, control) suffix once on top. Returns (cache, store, batch)."""
        dev, n = self.device, len(batch.rows) if batch is not None else 0
        new = sorted({r.prompt for r in rows} - set(store))
        store = store + new  # new prompts go after those in the prefix store
        local = {p: i for i, p in enumerate(store)}
        prefix_of = torch.tensor([local[r.prompt] for r in rows], device=dev)
        if cache is None:
            cache = PrefixCache.from_prompts(self.model, [req.prompts[p] for p in new], prefix_of, req.suffix_capacity)
        else:
            if new:
                cache.add_prompts(self.model, [req.prompts[p] for p in new])
            cache.grow(n + len(rows))
            cache.row_prefix[n : n + len(rows)] = prefix_of
        units = sorted({(r.prompt, r.control) for r in rows})  # (prompt, control) pairs, each prefilled once
        unit_index = {u: i for i, u in enumerate(units)}
        row_unit = torch.tensor([unit_index[(r.prompt, r.control)] for r in rows], device=dev)
        slots = torch.arange(n, n + len(rows), device=dev)
        logits = self._prefill_suffixes(req, cache, units, row_unit, slots)[row_unit]
        suffix_len = torch.tensor([len(req.suffixes[r.control]) for r in rows], device=dev)
        joined = _Batch.new(req, rows, step, cache.prefix_len[cache.row_prefix[slots]] + suffix_len, logits)
        cache.slots = torch.arange(n + len(rows), device=dev)
        self._sync()
        return cache, store, joined if batch is None else batch.concat(joined)

    def _forward_rows(self, cache: PrefixCache, tok, positions, graph):
        """Next-token logits of the batch rows: eager, or replaying (capturing first) its CUDA graph."""
        if not self.cuda_graphs:
            return self._forward(tok, positions, cache), None
        if graph is None:  # a new batch
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = _GraphedDecode(self._forward, tok, positions, cache, self._graph_pool)
            return graph.out, graph  # holds the warm-up's logits: this step's
        return graph(tok, positions), graph

    def _prefill_suffixes(self, req: _Request, cache: PrefixCache, units, row_unit, slots) -> torch.Tensor:
        """Next-token logits [U,V] of every (prompt, control) unit, and its suffix K/V in all its
        rows (row i in slot slots[i]).

        Each unit's suffix runs once, in the slot of its first row, on top of its cached prompt;
        the K/V of those few tokens are then copied to the unit's other rows.
        """
        dev, model = self.device, self.model
        first_slot = torch.zeros(len(units), dtype=torch.int64, device=dev)
        first_slot.scatter_reduce_(0, row_unit, slots, "amin", include_self=False)
        prompt_local = cache.row_prefix[first_slot]
        hidden = cache.prefix_hidden[prompt_local]  # [U,H] for units without a suffix
        lens = [len(req.suffixes[c]) for _, c in units]
        with_suffix = [u for u, n in enumerate(lens) if n]
        if with_suffix:
            Lc = max(lens)
            ids = torch.zeros(len(with_suffix), Lc, dtype=torch.int64, device=dev)
            for i, u in enumerate(with_suffix):  # right-padded: pads sit after the real tokens
                ids[i, : lens[u]] = torch.tensor(req.suffixes[units[u][1]], device=dev)
            idx = torch.tensor(with_suffix, device=dev)
            cache.slots = first_slot[idx]
            positions = cache.suffix_positions(cache.slots, torch.arange(Lc, device=dev).expand(len(idx), Lc))
            last = torch.tensor([lens[u] - 1 for u in with_suffix], device=dev)
            hidden[idx] = model.hidden_states(ids, positions, cache, keep=last)[:, 0]
            src = first_slot[row_unit]
            for store in (cache.k, cache.v):
                for layer in store:
                    layer[slots, :, :Lc] = layer[src, :, :Lc]
        return model.lm_head(hidden)

    def _decode_forward(self, tok, positions, cache):
        return self.model(tok, positions, cache)[:, -1]

    def _stop_hit(self, req: _Request, batch: _Batch, t_rows) -> torch.Tensor:
        """Rows whose text ends with a stop string after their latest token (the decoded tail is
        checked: 4 tokens per character covers byte-fallback tokenizers)."""
        window = 4 * max(map(len, req.stop)) + 2
        cols = t_rows[:, None] - torch.arange(window - 1, -1, -1, device=t_rows.device)  # [n,window] ending at each row's token
        tails = batch.tokens.gather(1, cols.clamp(0, req.max_new_tokens - 1)).tolist()
        texts = self.tokenizer.batch_decode([row[max(0, window - 1 - t) :] for row, t in zip(tails, t_rows.tolist())],
                                            skip_special_tokens=True)
        return torch.tensor([any(s in text for s in req.stop) for text in texts], device=self.device)

    @staticmethod
    def _raise_invalid(batch: _Batch):
        """The first row (by step) whose logits were not finite, as an error (one host read)."""
        bad = batch.invalid_at >= 0
        if bool(bad.any()):
            w = int(torch.where(bad, batch.invalid_at, batch.invalid_at.max() + 1).argmin())
            r = batch.rows[w]
            raise RuntimeError(f"non-finite logits for prompt {r.prompt}, control {r.control}, sample {r.sample} at token {int(batch.invalid_at[w])}")

    @staticmethod
    def _report(req: _Request, finished: int):
        req.done += finished
        if req.progress is not None:
            req.progress(req.done)

    def _finish(self, req: _Request, batch: _Batch):
        """Completions of the (finished) rows of `batch`."""
        tokens, logprobs = batch.tokens.tolist(), batch.logprobs.tolist()
        raw = batch.raw.tolist() if batch.raw is not None else None
        length, eos_hit = batch.length.tolist(), batch.eos_hit.tolist()
        reason = [REASONS[i] for i in batch.reason.tolist()]
        for w, row in enumerate(batch.rows):
            ids = tokens[w][: length[w]]
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                if reason[w] == "stop":
                    text = text[: min(i for i in (text.find(s) for s in req.stop) if i >= 0)]
            req.results.append(Completion(
                prompt_index=row.prompt, control_index=row.control, control=req.controls[row.control],
                sample_index=row.sample, token_ids=ids, text=text, logprobs=logprobs[w][: length[w]],
                finish_reason=reason[w], seed=row.seed, eos_token_id=eos_hit[w] if eos_hit[w] >= 0 else None,
                raw_logprobs=raw[w][: length[w]] if raw is not None else None,
            ))

    def _sync(self):
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize()
