"""`ctrlsafe generate`: prompts in, a controllable training set out (self-generation + MOEC).

Per chunk of prompts (a fixed range `[k * chunk_size, (k + 1) * chunk_size)`):

  1. generate  C controls x N samples per prompt (engine: each prompt's KV computed once);
  2. score     every sample with every reward model;
  3. level     bin the scores into levels; the bins are calibrated once, on chunk 0's scores
               (or loaded with --bins), and stored in the manifest before any shard exists;
  4. relabel   each sample's `control` is its MEASURED levels; `requested` keeps what was asked;
  5. distill   MOEC rules 1-7 (ctrlsafe/distill.py), which only look at one prompt's samples;
  6. write     the chunk's shard (temp + rename), then the manifest's finished ranges.

After the last chunk, rule 8 (the global per-cell cap) rewrites `kept`/`drop_reason` over all
shards, and the manifest gets the final counts. Samples are a pure function of (seed, global
prompt index, control index, sample index) -- the engine's row seeds use global prompt indices
-- so chunking, resuming and the number of ranks change nothing in the output.

torchrun: rank r processes chunks r, r + W, ...; rank 0 owns chunk 0, calibrates, and broadcasts
the bins; every rank writes its own shards; rank 0 runs the final pass and writes the manifest.

Training-free control methods (`--method`, also used by `ctrlsafe eval` through
`generate_for_controls`): `tokens` appends control tokens after the prompt; `prompting` says the
request in words (ControlSpec.render_text), no control tokens; `rerank` samples N responses to the
plain prompt and keeps, per requested cell, the one whose measured levels are nearest.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import dataset, distill
from .controls import ControlSpec

METHODS = ("tokens", "prompting", "rerank")


# -- the mode logic, importable on its own -------------------------------------------------------------
@dataclass
class Generated:
    """Completions sorted by (prompt, control, sample); `control` is the requested level dict.
    `scores` [len, K] is filled by rerank (it had to score to choose), else None."""
    completions: list
    scores: np.ndarray | None = None


def sample_for_method(engine, prompts, controls, *, method="tokens", n=1, sampling=None, max_new_tokens=64,
                      seed=0, prompt_keys=None, stop=None, progress=None) -> list:
    """The raw samples of a method. tokens/prompting: n per (prompt, control). rerank: n
    candidates per prompt without controls (choose among them with `select_nearest`)."""
    from .generate import SamplingParams

    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    keys = list(prompt_keys) if prompt_keys is not None else list(range(len(prompts)))
    common = dict(n=n, sampling=sampling or SamplingParams(), max_new_tokens=max_new_tokens, seed=seed, stop=stop, progress=progress)
    if method == "tokens" or (method == "prompting" and controls is None):
        return engine.generate(prompts, controls=controls, prompt_keys=keys, **common)
    if method == "rerank":
        return engine.generate(prompts, controls=None, prompt_keys=keys, **common)
    spec, tok, C = engine.control_spec, engine.tokenizer, len(controls)
    worded = [spec.render_text(p, c, tok) for p in prompts for c in controls]
    outs = engine.generate(worded, controls=None, prompt_keys=[k * C + c for k in keys for c in range(C)], **common)
    return [replace(o, prompt_index=o.prompt_index // C, control_index=o.prompt_index % C, control=controls[o.prompt_index % C]) for o in outs]


def select_nearest(candidates, levels: np.ndarray, controls, attributes) -> list[tuple[int, int, dict]]:
    """Rerank: for every prompt and requested cell, the candidate whose measured levels are
    nearest (L1 distance; ties go to the lower sample index). Returns (candidate position,
    control index, cell) in (prompt, control) order."""
    by_prompt: dict[int, list[int]] = {}
    for i, c in enumerate(candidates):
        by_prompt.setdefault(c.prompt_index, []).append(i)
    wanted = np.array([[cell[a] for a in attributes] for cell in controls])  # [C,K]
    out = []
    for p in sorted(by_prompt):
        idx = by_prompt[p]
        dist = np.abs(levels[idx][None, :, :] - wanted[:, None, :]).sum(-1)  # [C, n]
        for ci, best in enumerate(dist.argmin(1)):  # argmin returns the first minimum
            out.append((idx[best], ci, controls[ci]))
    return out


def generate_for_controls(engine, prompts, controls, *, method="tokens", n=1, sampling=None, max_new_tokens=64, seed=0,
                          prompt_keys=None, stop=None, progress=None, scorer=None, bins=None) -> Generated:
    """Responses to `prompts` under each requested control with one of METHODS.

    engine: ctrlsafe.generate.Engine with a control_spec (tokens: control tokens already added to
    its tokenizer and model, `ControlSpec.add_to`). prompts: strings or chat lists. controls:
    level dicts. rerank needs `scorer` (ctrlsafe.reward.Scorer) and `bins` (LevelBins); it returns
    one completion per (prompt, control) chosen among n candidates, with its scores.
    """
    outs = sample_for_method(engine, prompts, controls, method=method, n=n, sampling=sampling, max_new_tokens=max_new_tokens,
                             seed=seed, prompt_keys=prompt_keys, stop=stop, progress=progress)
    if method != "rerank":
        return Generated(outs)
    if scorer is None or bins is None or not controls:
        raise ValueError("method 'rerank' needs controls, a scorer and bins")
    scores = np.asarray(scorer.score([prompts[o.prompt_index] for o in outs], [o.text for o in outs]).scores)
    picks = select_nearest(outs, np.asarray(bins.to_levels(scores)), controls, scorer.names)
    chosen = [replace(outs[i], control_index=ci, control=cell) for i, ci, cell in picks]
    return Generated(chosen, scores[[i for i, _, _ in picks]])


# -- the command ------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--prompts", help="prompt file: JSONL(.gz), JSON array, CSV(.gz) or Parquet (default: the shipped examples)")
    p.add_argument("--out", required=True, help="output directory: data/*.parquet + manifest.json")
    p.add_argument("--policy", help="policy model directory (default: the tiny preset)")
    p.add_argument("--rm", action="append", default=[], metavar="NAME=DIR_OR_MODULE:FN",
                   help="a reward model per control attribute, repeatable (default: the tiny preset's helpful and harmless)")
    p.add_argument("--levels", type=int, default=5, help="levels per attribute")
    p.add_argument("--controls", default="grid", help="grid | none | 'helpful=0..4,harmless=1,3' | a JSON(L) file of level dicts")
    p.add_argument("--method", choices=METHODS, default="tokens", help="control tokens (default), the request in words, or best-of-N rerank")
    p.add_argument("--samples", type=int, default=1, help="samples per prompt and control; rerank: candidates per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="response length limit (tokens)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens with this much probability; 1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than this fraction of the top token; 0 = off")
    p.add_argument("--stop", action="append", default=[], help="stop string, repeatable (default: none; responses end at EOS or --max-new-tokens)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; samples depend only on it and the global prompt, control and sample index")
    p.add_argument("--bins", default="calibrate", help="calibrate (on the first chunk's scores) or a JSON file: LevelBins.to_json() or a data set manifest")
    p.add_argument("--chunk-size", type=int, default=32, help="prompts per shard; the unit of progress and resume")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (same config), skipping finished chunks")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error", help="a bad prompt row stops the run (default) or is skipped and counted")
    p.add_argument("--limit", type=int, default=None, help="use the first K prompts (default: all)")
    p.add_argument("--prompt-column", default=None, help="field holding the prompt (default: prompt, else messages)")
    p.add_argument("--id-column", default="id", help="field holding the prompt id (rows without one get row<N>)")
    p.add_argument("--label-column", default=None, metavar="COLUMN|=harmful|=safe",
                   help="field saying whether a prompt is harmful (XSTest: label), or one label for the whole file; "
                        "the prompt-aware scorers safe and helps need it (default: none)")
    p.add_argument("--dialogue", choices=("context", "first-turn"), default="context",
                   help="HH dialogue strings (hh-rlhf): every turn before the last reply as a chat (default) or the first human turn")
    p.add_argument("--device", default=None, help="default: cuda (this rank's GPU) if available, else cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--max-rows", type=int, default=256, help="engine: rows decoded together")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="engine: KV-cache tokens per wave")
    distill.add_rule_arguments(p)


@dataclass
class Job:
    """Everything resolved from the command line; `config` is what must match on --resume."""
    prompts: list
    skipped: list
    spec: ControlSpec
    controls: list | None
    policy: str
    rms: dict
    distill: distill.DistillConfig
    bins_json: dict | None
    config: dict


def run(args) -> int:
    rank, world = _init_distributed()
    try:
        return _run(args, rank, world)
    finally:
        if world > 1:
            import gc

            import torch.distributed as dist

            gc.collect()  # see train.Dist.close: free what holds the process group before destroying it
            dist.destroy_process_group()


def _run(args, rank: int, world: int) -> int:
    t_start = time.perf_counter()
    job = _resolve(args, hash_weights=rank == 0)
    if world > 1:  # hashing weights is slow: rank 0 does it, everyone uses its config
        job.config = _broadcast(job.config)
    out = Path(args.out)
    manifest = dataset.check_out_dir(out, job.config, args.resume)
    _barrier(world)  # every rank has looked at --out before rank 0 writes to it
    chunk_size = args.chunk_size
    n_chunks = math.ceil(len(job.prompts) / chunk_size)
    bins = _load_bins(job.bins_json or (manifest or {}).get("bins"), job.spec)
    started = (manifest or {}).get("started_at") or _now()
    if rank == 0:
        dataset.remove_temp_files(out)
        _write_manifest(out, job, bins, "running", started, n_chunks, chunk_size, world)
    _barrier(world)
    try:
        return _produce(args, job, out, bins, started, n_chunks, rank, world, t_start)
    except Exception as e:  # the manifest says so; a run that wrote no shard may then be replaced by a corrected command
        if rank == 0:
            dataset.mark_failed(out, e)
        raise


def _produce(args, job: Job, out: Path, bins, started: str, n_chunks: int, rank: int, world: int, t_start: float) -> int:
    """Generate, score and write every chunk not finished yet, then the final pass (rank 0)."""
    chunk_size = args.chunk_size
    done = dataset.finished_chunks(out)
    mine = [c for c in range(rank, n_chunks, world) if c not in done]
    if mine:  # a finished run resumed only re-runs the final pass: no models needed
        engine, scorer = _models(job, args)
    rows_per_prompt = (len(job.controls or [None]) if args.method != "rerank" else 1) * args.samples
    progress = Progress(sum(len(_chunk(job.prompts, c, chunk_size)) for c in mine) * rows_per_prompt, enabled=rank == 0)
    stats = {"generated": 0, "tokens": 0, "generate_s": 0.0, "score_s": 0.0, "write_s": 0.0}
    need_bins = bins is None
    for c in mine:
        batch = _chunk(job.prompts, c, chunk_size)
        progress.start_chunk()
        outs, scores = _generate_and_score(engine, scorer, job, batch, c * chunk_size, args, progress.update, stats)
        if need_bins:  # chunk 0 calibrates (rank 0 owns it); the other ranks wait for its bins here
            bins = _calibrate(scores, scorer, job.spec.levels) if rank == 0 else None
            bins = _broadcast(bins.to_json() if bins is not None else None) if world > 1 else bins.to_json()
            bins = _load_bins(bins, job.spec)
            need_bins = False
            if rank == 0:
                _write_manifest(out, job, bins, "running", started, n_chunks, chunk_size, world)
        t0 = time.perf_counter()
        records = _records(job, batch, outs, scores, bins, args.method)
        dataset.write_table(dataset.records_to_table(records, job.spec.attributes), dataset.shard_path(out, c))
        stats["write_s"] += time.perf_counter() - t0
        if rank == 0:
            _write_manifest(out, job, bins, "running", started, n_chunks, chunk_size, world)
        progress.chunk_done(c)
    if need_bins and world > 1:  # this rank had no chunk to process but must take part in the broadcast
        _broadcast(None)
    progress.close()
    _barrier(world)
    if rank != 0:
        return 0
    cap = distill.apply_cell_cap(out, job.distill, job.spec.attributes)
    counts = {**distill.count(out, job.spec.attributes), "cell_cap": cap, "skipped_prompt_rows": len(job.skipped), "prompts": len(job.prompts)}
    _write_manifest(out, job, bins, "complete", started, n_chunks, chunk_size, world, counts)
    elapsed = time.perf_counter() - t_start
    print(summary(out, job, counts, stats, elapsed, args.method))
    return 0


def _resolve(args, *, hash_weights: bool) -> Job:
    from .presets import example_prompts_path, tiny
    from .prompts import read_prompts

    for name in ("samples", "max_new_tokens", "chunk_size", "levels", "max_rows", "max_batch_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from .convert import resolve_model

    args.policy = resolve_model(args.policy)
    if args.policy is None or not args.rm:
        preset = tiny()
    policy = args.policy or str(preset.policy)
    if args.rm:
        from .reward import parse_rm_args

        rms = parse_rm_args(args.rm)
    else:
        rms = {name: str(path) for name, path in preset.reward_models.items()}
    spec = ControlSpec(tuple(rms), args.levels)
    prompt_file = args.prompts or str(example_prompts_path())
    ps = read_prompts(prompt_file, prompt_column=args.prompt_column, id_column=args.id_column,
                      on_bad_row=args.on_bad_row, limit=args.limit, dialogue=args.dialogue, label_column=args.label_column)
    if not ps.prompts:
        raise ValueError(f"{prompt_file}: no prompts to generate for" + (f" ({len(ps.skipped)} bad rows skipped)" if ps.skipped else ""))
    controls = parse_controls(args.controls, spec)
    if args.method == "rerank" and controls is None:
        raise ValueError("--method rerank chooses a sample per requested cell; give --controls (not none)")
    dcfg = distill.config_from_args(args)
    dcfg.check(spec.attributes)
    bins_json = None if args.bins == "calibrate" else read_bins_file(args.bins)
    _load_bins(bins_json, spec)  # fail now, not after loading the models
    from .generate import SamplingParams

    config = {
        "prompts": {"path": str(Path(prompt_file).resolve()), "sha256": dataset.sha256_file(prompt_file), "count": len(ps.prompts),
                    "prompt_column": args.prompt_column, "id_column": args.id_column, "on_bad_row": args.on_bad_row,
                    "limit": args.limit, "dialogue": args.dialogue, "label_column": args.label_column},
        "policy": _identity(policy, hash_weights),
        "reward_models": {name: {"spec": s, **_identity(s, hash_weights)} for name, s in rms.items()},
        "control_spec": spec.to_dict(), "controls": controls, "method": args.method, "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "sampling": asdict(SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p)),
        "stop": args.stop, "seed": args.seed, "bins": bins_json or "calibrate", "distill": asdict(dcfg),
        "chunk_size": args.chunk_size, "max_rows": args.max_rows, "max_batch_tokens": args.max_batch_tokens, "dtype": args.dtype,
    }
    return Job(ps.prompts, ps.skipped, spec, controls, policy, rms, dcfg, bins_json, config)


def parse_controls(text: str, spec: ControlSpec):
    if text == "none":
        return None
    if Path(text).is_file():
        raw = Path(text).read_text()
        try:
            cells = json.loads(raw) if raw.lstrip().startswith("[") else [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"--controls {text}: not a JSON list or JSONL of level dicts ({e.msg} at line {e.lineno})") from None
        for i, cell in enumerate(cells):
            if not isinstance(cell, dict):
                raise ValueError(f"--controls {text}: entry {i} is not a level dict")
            try:
                spec.validate(cell)
            except ValueError as e:
                raise ValueError(f"--controls {text}: entry {i}: {e}") from None
        if not cells:
            raise ValueError(f"--controls {text}: no level dicts")
        return cells
    return spec.parse_grid(text)


def _identity(spec: str, hash_weights: bool) -> dict:
    """Path and sha256 of a model directory's weights, or of a module:function's source file."""
    from .refusal import BUILTIN_SCORERS

    if spec in BUILTIN_SCORERS:  # a rule in this package: the package version identifies it
        from . import __version__

        return {"builtin": spec, "ctrlsafe": __version__}
    if spec.startswith("judge:"):
        spec = spec[len("judge:"):].partition("#")[0]
    if ":" not in spec:
        from .convert import resolve_model

        spec = resolve_model(spec.partition("#")[0])
    path = Path(spec)
    if not path.exists() and ":" in spec:
        import importlib.util

        found = importlib.util.find_spec(spec.split(":", 1)[0])
        if found is None or not found.origin:
            raise ValueError(f"reward model {spec!r}: module {spec.split(':', 1)[0]!r} not found")
        path = Path(found.origin)
    if not path.exists():
        raise FileNotFoundError(f"model {spec} does not exist")
    return dataset.weights_identity(path) if hash_weights else {"path": str(path.resolve())}


def read_bins_file(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / dataset.MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"--bins {path}: no such file (give a LevelBins JSON file or a data set directory)")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--bins {path}: not JSON ({e.msg})") from None
    d = d.get("bins", d) if d.get("format") == dataset.FORMAT else d
    if not d:
        raise ValueError(f"--bins {path}: the data set has no bins yet")
    return d


def _load_bins(d, spec: ControlSpec):
    """LevelBins from JSON, ordered like the control spec's attributes; levels must match."""
    if d is None:
        return None
    from .reward import LevelBins

    bins = LevelBins.from_json(d)
    if bins.levels != spec.levels:
        raise ValueError(f"bins have {bins.levels} levels but --levels is {spec.levels}")
    return bins.select(list(spec.attributes))


def _calibrate(scores, scorer, levels):
    from .reward import LevelBins

    return LevelBins.calibrate(scores, list(scorer.names), levels=levels, values=scorer.values)


def load_engine(policy, spec: ControlSpec, *, control_tokens: bool, device: str, dtype, max_rows: int, max_batch_tokens: int):
    """An Engine over a policy directory; with control_tokens, the spec's tokens are added to the
    tokenizer and model (a no-op for a policy already trained with them)."""
    from transformers import AutoTokenizer

    from .generate import Engine
    from .model import Transformer

    model = Transformer.from_pretrained(policy, dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    if control_tokens:
        spec.add_to(tokenizer, model)
    return Engine(model, tokenizer, spec, max_batch_tokens=max_batch_tokens, max_rows=max_rows)


def _models(job: Job, args):
    """The engine (policy + tokenizer with the control tokens) and the scorer, on this rank's device."""
    import torch

    from .reward import Scorer, load_scorer

    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    engine = load_engine(job.policy, job.spec, control_tokens=args.method == "tokens" and job.controls is not None,
                         device=device, dtype=dtype, max_rows=args.max_rows, max_batch_tokens=args.max_batch_tokens)
    scorer = Scorer({name: load_scorer(s, device=device, dtype=dtype) for name, s in job.rms.items()})
    return engine, scorer


def _chunk(prompts, c: int, size: int):
    return prompts[c * size:(c + 1) * size]


def _generate_and_score(engine, scorer, job: Job, batch, start: int, args, progress, stats):
    """Stage A of a chunk (no bins needed): samples and their scores [rows, K]."""
    from .generate import SamplingParams

    t0 = time.perf_counter()
    outs = sample_for_method(
        engine, [p.value for p in batch], job.controls, method=args.method, n=args.samples,
        sampling=SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p), max_new_tokens=args.max_new_tokens,
        seed=args.seed, prompt_keys=list(range(start, start + len(batch))), stop=args.stop or None, progress=progress,
    )
    t1 = time.perf_counter()
    scores = np.asarray(scorer.score([batch[o.prompt_index].value for o in outs], [o.text for o in outs],
                                     harmful=[batch[o.prompt_index].harmful for o in outs]).scores, dtype=np.float32)
    stats["generate_s"] += t1 - t0
    stats["score_s"] += time.perf_counter() - t1
    stats["generated"] += len(outs)
    stats["tokens"] += sum(len(o.token_ids) for o in outs)
    return outs, scores


def _records(job: Job, batch, outs, scores, bins, method) -> list[dict]:
    """Stage B of a chunk: measured levels, rerank choice, records, MOEC rules 1-7."""
    attributes = job.spec.attributes
    levels = np.asarray(bins.to_levels(scores))
    if method == "rerank":
        picks = select_nearest(outs, levels, job.controls, attributes)
        outs = [replace(outs[i], control_index=ci, control=cell) for i, ci, cell in picks]
        scores, levels = scores[[i for i, _, _ in picks]], levels[[i for i, _, _ in picks]]
    rows = []
    for o, s, lv in zip(outs, scores.tolist(), levels.tolist()):
        p = batch[o.prompt_index]
        rows.append({
            "id": f"{p.id}/{o.control_index}/{o.sample_index}",
            "prompt_id": p.id,
            "prompt": p.display,
            "messages": json.dumps(list(p.messages), ensure_ascii=False) if p.messages is not None else None,
            "requested": o.control,
            "control": dict(zip(attributes, lv)),
            "sample_index": o.sample_index,
            "response": o.text,
            "scores": dict(zip(attributes, s)),
            "finish_reason": o.finish_reason,
        })
    distill.apply_rules(rows, job.distill, attributes, bins.to_json()["edges"])
    return rows


# -- manifest, progress, summary -----------------------------------------------------------------------------
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _versions() -> dict:
    import pyarrow
    import torch
    import transformers

    from . import __version__

    return {"ctrlsafe": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "pyarrow": pyarrow.__version__, "numpy": np.__version__, "python": platform.python_version()}


def _write_manifest(out: Path, job: Job, bins, status, started, n_chunks, chunk_size, world, counts=None) -> None:
    chunks = dataset.finished_chunks(out)
    dataset.write_json({
        "format": dataset.FORMAT, "format_version": dataset.FORMAT_VERSION, "kind": "records", "status": status,
        "config": job.config, "control_spec": job.spec.to_dict(), "bins": bins.to_json() if bins is not None else None,
        "models": {"policy": job.config["policy"], "reward_models": job.config["reward_models"]},
        "versions": _versions(), "world_size": world, "started_at": started, "updated_at": _now(),
        "chunks": {"size": chunk_size, "total": n_chunks, "finished": len(chunks),
                   "finished_ranges": dataset.finished_ranges(chunks, chunk_size, len(job.prompts))},
        "skipped_prompt_rows": job.skipped[:100], "counts": counts, "writer": dataset.writer_identity(),
    }, out / dataset.MANIFEST)


class Progress:
    """A tqdm bar on a terminal; plain log lines every `every` seconds otherwise (rank 0 only)."""

    def __init__(self, total: int, enabled: bool, every: float = 10.0):
        self.total, self.enabled, self.every = total, enabled, every
        self.done = self.base = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="sample", desc="generate", dynamic_ncols=True)

    def start_chunk(self):
        self.base = self.done

    def update(self, rows_in_chunk: int):
        new = self.base + rows_in_chunk
        if self.bar is not None:
            self.bar.update(new - self.done)
        self.done = new
        if self.enabled and self.bar is None and time.perf_counter() - self.last >= self.every:
            self._log()

    def chunk_done(self, chunk: int):
        if self.bar is not None:
            self.bar.set_postfix(chunk=chunk)
        elif self.enabled:
            self._log(f" (chunk {chunk} written)")

    def _log(self, note=""):
        self.last = time.perf_counter()
        rate = self.done / max(self.last - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate else float("inf")
        print(f"[generate] {self.done}/{self.total} samples, {rate:.1f} samples/s, eta {eta:.0f}s{note}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def summary(out: Path, job: Job, counts: dict, stats: dict, elapsed: float, method: str) -> str:
    attrs = job.spec.attributes
    n, kept = counts["samples"], counts["kept"]
    lines = [
        f"ctrlsafe generate: wrote {out} ({len(dataset.shard_files(out))} shards, manifest {out / dataset.MANIFEST})",
        f"  prompts {counts['prompts']} (bad rows skipped: {counts['skipped_prompt_rows']}), "
        f"controls {len(job.controls) if job.controls else 'none'}, method {method}",
        f"  samples {n}, kept {kept} ({100 * kept / max(n, 1):.1f}%)"
        + (f", cell cap {counts['cell_cap']}" if counts.get("cell_cap") else ""),
        "  dropped: " + (", ".join(f"{r} {c}" for r, c in counts["drop_reasons"].items()) or "none"),
    ]
    cells = counts["kept_per_cell"]
    if len(attrs) == 2:
        a, b = attrs
        L = job.spec.levels
        lines.append(f"  kept per measured cell (rows {a}, columns {b}):")
        lines.append("    " + f"{a}\\{b}".ljust(12) + "".join(f"{j:>6}" for j in range(L)))
        for i in range(L):
            lines.append("    " + f"{i}".ljust(12) + "".join(f"{cells.get(f'{a}={i},{b}={j}', 0):>6}" for j in range(L)))
    else:
        lines.append("  kept per measured cell: " + ", ".join(f"{k}: {v}" for k, v in cells.items()))
    if stats["generated"]:
        lines.append(
            f"  throughput: {stats['generated']} samples in {elapsed:.1f}s = {stats['generated'] / elapsed:.1f} samples/s, "
            f"{stats['tokens'] / elapsed:.0f} tokens/s (generate {stats['generate_s']:.1f}s, score {stats['score_s']:.1f}s, "
            f"write {stats['write_s']:.1f}s; rank 0)"
        )
    else:
        lines.append("  nothing left to generate: every chunk was already finished")
    return "\n".join(lines)


# -- torch.distributed helpers --------------------------------------------------------------------------------
def _init_distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
