"""Multi-control generation: many control settings x many samples per prompt, prompt KV stored once.

    engine = Engine(model, tokenizer, ControlSpec())
    outs = engine.generate(prompts, controls="grid", n=4, sampling=SamplingParams(0.8, top_k=50),
                           max_new_tokens=256, stop=["\\n\\nUser:"], seed=1234)

Order of work for one wave of rows (see `Engine._run_wave`):
  1. each prompt is rendered once; the wave's distinct prompts are prefilled once, right-padded,
     into a `PrefixCache` that stores each prompt's KV once;
  2. each (prompt, control) suffix is prefilled ONCE on top of its prompt's cached prefix, in the
     slot of its first row, and its few suffix K/V entries are copied into the slots of its other
     n-1 rows (copying 1-3 control tokens per row is cheaper than recomputing them n times and
     keeps every row's storage uniform for decoding);
  3. all rows decode together: one model forward and one sampler call per step for all live
     rows, with per-row seed tensors. Each row attends over [its prompt's shared prefix | its own
     suffix] without a copy of the prefix (kv_cache.py: one fused C++ kernel per layer on CPU).
  4. rows that finish (EOS, stop string, max_new_tokens) retire; when enough have retired the
     live rows are compacted so finished rows stop costing compute.
More rows than fit (max_rows, max_batch_tokens) run in consecutive waves.

Determinism: row (prompt key k, control c, sample j) samples token t with the sampler's
counter-based RNG keyed by (row_seed(seed, k, c, j), t). Nothing else enters, so results do not
depend on batch size, on which prompts run together or on their order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
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


class _GraphedDecode:
    """The decode forward of one batch (its rows, slots and prompt groups fixed) captured as a
    CUDA graph: a replay is one launch where eager decode is ~20 per layer. Built with a warm-up
    forward on a side stream (it settles the cache's slot groups and the allocator, and its
    logits are this step's), then captured into the previous graph's memory pool."""

    def __init__(self, forward, tok, positions, cache, previous: "_GraphedDecode | None"):
        self.rows = tok.shape[0]
        self.tok, self.positions = tok.clone(), positions.clone()
        cache.static_shapes = True
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.out = forward(self.tok, self.positions, cache)
        torch.cuda.current_stream().wait_stream(side)
        self.pool = previous.pool if previous is not None else torch.cuda.graph_pool_handle()
        self.graph = torch.cuda.CUDAGraph()
        warm = self.out.clone()
        with torch.cuda.graph(self.graph, pool=self.pool):
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
                 cuda_graphs: bool = False, profile: bool = False):
        """max_batch_tokens: cached tokens (prefix + row suffixes) per wave; default 16384 on CPU, on
        CUDA what half the free device memory holds (`kv_token_budget`).
        sync_every: decode steps between host reads of the batch state (errors, progress,
        retiring finished rows). Between them nothing waits for the device, and a finished row
        runs on for up to sync_every - 1 steps whose tokens are discarded; results do not depend
        on it. Default 1 on CPU (no device to wait for), 8 on CUDA. Stop strings check every step.
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
        for wave in self._waves(req):
            self._run_wave(req, wave)
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
    def _waves(self, req: _Request):
        """Consecutive runs of rows that fit max_rows and max_batch_tokens together.

        Cost of a wave in cached tokens: (distinct prompts) x (longest prompt) for the prefix plus
        rows x (longest suffix + max_new_tokens) for the rows. A row over budget on its own runs
        alone. Rows are in (prompt, control, sample) order, so a prompt's rows stay together.
        """
        wave: list[_Row] = []
        prompts: set[int] = set()
        longest = cap = 0
        for row in req.rows:
            p_len, r_cap = len(req.prompts[row.prompt]), len(req.suffixes[row.control]) + req.max_new_tokens
            new_longest, new_cap = max(longest, p_len), max(cap, r_cap)
            cost = (len(prompts) + (row.prompt not in prompts)) * new_longest + (len(wave) + 1) * new_cap
            if wave and (len(wave) >= self.max_rows or cost > self.max_batch_tokens):
                yield wave
                wave, prompts, new_longest, new_cap = [], set(), p_len, r_cap
            wave.append(row)
            prompts.add(row.prompt)
            longest, cap = new_longest, new_cap
        yield wave

    # -- one wave -----------------------------------------------------------------------------
    def _run_wave(self, req: _Request, rows: list[_Row]):
        dev, R = self.device, len(rows)
        t0 = time.perf_counter()
        prompt_ids = sorted({r.prompt for r in rows})
        local = {p: i for i, p in enumerate(prompt_ids)}
        units = sorted({(r.prompt, r.control) for r in rows})  # (prompt, control) pairs, each prefilled once
        unit_index = {u: i for i, u in enumerate(units)}
        row_unit = torch.tensor([unit_index[(r.prompt, r.control)] for r in rows], device=dev)
        row_prefix = torch.tensor([local[r.prompt] for r in rows], device=dev)
        suffix_len = torch.tensor([len(req.suffixes[r.control]) for r in rows], device=dev)
        cache = PrefixCache.from_prompts(self.model, [req.prompts[p] for p in prompt_ids], row_prefix,
                                         int(suffix_len.max()) + req.max_new_tokens)
        logits = self._prefill_suffixes(req, cache, units, row_unit)[row_unit]  # [R,V] next-token logits
        self._sync()
        self.timings["prefill"] += time.perf_counter() - t0

        tokens = torch.zeros(R, req.max_new_tokens, dtype=torch.int64, device=dev)
        logprobs = torch.zeros(R, req.max_new_tokens, dtype=torch.float32, device=dev)
        raw = torch.zeros(R, req.max_new_tokens, dtype=torch.float32, device=dev) if req.raw_logprobs else None
        # per wave row, kept on the device: no host read per step (see sync_every)
        length = torch.full((R,), req.max_new_tokens, dtype=torch.int64, device=dev)
        reason = torch.zeros(R, dtype=torch.int64, device=dev)  # index into REASONS
        eos_hit = torch.full((R,), -1, dtype=torch.int64, device=dev)
        invalid_at = torch.full((R,), -1, dtype=torch.int64, device=dev)  # first step with non-finite logits
        # live batch state, compacted together with the cache
        live = torch.arange(R, device=dev)  # wave row of each batch position
        alive = torch.ones(R, dtype=torch.bool, device=dev)
        seeds = torch.tensor([r.seed for r in rows], dtype=torch.int64, device=dev)
        position = cache.prefix_len[row_prefix] + suffix_len  # position of the next token fed in
        longest_suffix = int(suffix_len.max())
        cache.slots = torch.arange(R, device=dev)
        sp = req.sampling
        check_every = 1 if req.stop else self.sync_every  # stop strings are matched on the host anyway
        finished = 0  # wave rows known (on the host) to have finished
        graph = None  # the captured decode forward (cuda_graphs)
        for t in range(req.max_new_tokens):
            t1 = time.perf_counter()
            if raw is not None:  # normalised before the masking below: the model's own distribution
                lse = torch.logsumexp(logits.float(), -1)
            if t < req.min_new_tokens and len(self._eos):
                logits[:, self._eos] = float("-inf")
            if len(self._suppress):  # a control token is an input, never a response token
                logits[:, self._suppress] = float("-inf")
            out = sample(logits, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, min_p=sp.min_p, seed=seeds, step=t)
            self._sync()
            self.timings["sampling"] += time.perf_counter() - t1
            seen = invalid_at[live]
            invalid_at[live] = torch.where(~out.valid & alive & (seen < 0), t, seen)
            tokens[live, t] = out.tokens
            logprobs[live, t] = out.logprobs
            if raw is not None:  # a sampled token is never a masked one: its logit is still the model's
                raw[live, t] = logits.gather(1, out.tokens[:, None])[:, 0].float() - lse
            is_eos = torch.isin(out.tokens, self._eos) & alive
            stopped = self._stop_hit(req, tokens, live, t) & alive if req.stop else torch.zeros_like(alive)
            length[live] = torch.where(is_eos, t, torch.where(stopped, t + 1, length[live]))
            reason[live] = torch.where(is_eos, 1, torch.where(stopped, 2, reason[live]))
            eos_hit[live] = torch.where(is_eos, out.tokens, eos_hit[live])
            alive = alive & ~(is_eos | stopped)
            tok = out.tokens
            if t + 1 == req.max_new_tokens:
                break
            if (t + 1) % check_every == 0:  # the host looks: errors, progress, retiring finished rows
                self._raise_invalid(invalid_at, rows)
                n_alive = int(alive.sum())
                finished = self._report(req, finished, R - n_alive)
                if n_alive == 0:
                    break
                if len(alive) - n_alive >= self.COMPACT_FRACTION * len(alive):
                    keep = alive.nonzero()[:, 0]
                    cache.compact(keep)
                    live, alive, seeds, position, tok = live[keep], alive[keep], seeds[keep], position[keep], tok[keep]
            t2 = time.perf_counter()
            cache.offset_bound = longest_suffix + t  # the host knows it: no device read in the cache
            if self.cuda_graphs:
                if graph is None or graph.rows != len(tok):  # a new batch (compaction only shrinks it): capture
                    graph = _GraphedDecode(self._forward, tok[:, None], (position + t)[:, None], cache, graph)
                    logits = graph.out  # holds the warm-up's logits: this step's
                else:
                    logits = graph(tok[:, None], (position + t)[:, None])
            else:
                logits = self._forward(tok[:, None], (position + t)[:, None], cache)
            self._sync()
            self.timings["decode_forward"] += time.perf_counter() - t2
        self._raise_invalid(invalid_at, rows)
        self._report(req, finished, R)
        self._finish(req, rows, tokens, logprobs, raw, length, reason, eos_hit)

    def _prefill_suffixes(self, req: _Request, cache: PrefixCache, units, row_unit) -> torch.Tensor:
        """Next-token logits [U,V] of every (prompt, control) unit, and its suffix K/V in all its rows.

        Each unit's suffix runs once, in the slot of its first row, on top of its cached prompt;
        the K/V of those few tokens are then copied to the unit's other rows.
        """
        dev, model = self.device, self.model
        first_slot = torch.zeros(len(units), dtype=torch.int64, device=dev)
        first_slot.scatter_reduce_(0, row_unit, torch.arange(len(row_unit), device=dev), "amin", include_self=False)
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
            slots = first_slot[idx]
            cache.slots = slots
            positions = cache.suffix_positions(slots, torch.arange(Lc, device=dev).expand(len(slots), Lc))
            last = torch.tensor([lens[u] - 1 for u in with_suffix], device=dev)
            hidden[idx] = model.hidden_states(ids, positions, cache, keep=last)[:, 0]
            src = first_slot[row_unit]
            for store in (cache.k, cache.v):
                for layer in store:
                    layer[:, :, :Lc] = layer[src, :, :Lc]
        return model.lm_head(hidden)

    def _decode_forward(self, tok, positions, cache):
        return self.model(tok, positions, cache)[:, -1]

    def _stop_hit(self, req: _Request, tokens, live, t) -> torch.Tensor:
        """Rows whose text ends with a stop string after token t (the decoded tail is checked:
        4 tokens per character covers byte-fallback tokenizers)."""
        window = 4 * max(map(len, req.stop)) + 2
        tails = self.tokenizer.batch_decode(tokens[live, max(0, t + 1 - window) : t + 1].tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in text for s in req.stop) for text in tails], device=self.device)

    @staticmethod
    def _raise_invalid(invalid_at, rows):
        """The first row (by step) whose logits were not finite, as an error (one host read)."""
        bad = invalid_at >= 0
        if bool(bad.any()):
            w = int(torch.where(bad, invalid_at, invalid_at.max() + 1).argmin())
            r = rows[w]
            raise RuntimeError(f"non-finite logits for prompt {r.prompt}, control {r.control}, sample {r.sample} at token {int(invalid_at[w])}")

    @staticmethod
    def _report(req: _Request, before: int, now: int) -> int:
        if now > before:
            req.done += now - before
            if req.progress is not None:
                req.progress(req.done)
        return now

    def _finish(self, req: _Request, rows, tokens, logprobs, raw, length, reason, eos_hit):
        tokens, logprobs = tokens.tolist(), logprobs.tolist()
        raw = raw.tolist() if raw is not None else None
        length, eos_hit = length.tolist(), eos_hit.tolist()
        reason = [REASONS[i] for i in reason.tolist()]
        for w, row in enumerate(rows):
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
