"""Multi-control generation: ctrlsafe's Engine vs transformers' generate doing the same work.

Cases (full run), each a model x a workload, fp32, new tokens forced (min = max) so every row
runs full length, temperature 0.8 / top-k 50 / top-p 0.9:
  models: `bench-4L` (random Llama, hidden 512, 4 layers, V32000: the original benchmark model);
          `SmolLM2-135M` (real weights when `ctrlsafe convert smollm2` has run, else its config
          random-initialised; the row says which); the configs of Qwen2.5-0.5B and Llama-3.2-1B
          random-initialised with fewer layers (said in the row) to keep the run short.
  workloads: A = 8 prompts x 4 samples, no controls, 48 new; B = 8 prompts x 6 two-token
          suffixes x 2 samples, 48 new; grid = 2 prompts behind a ~100-token system prompt x 25
          two-token cells x 4 samples, 32 new (the pipeline's shape); old = the original work
          (8 prompts of 32 x 4 controls x 4 samples x 64 new) on bench-4L.
Prompts are token ids: real chat-templated requests for real SmolLM2 weights, random ids of
chat-prompt lengths otherwise. transformers gets every prompt+suffix row, left-padded, with
num_return_sequences=n.

Also printed: ctrlsafe's time split per case, the peak RSS of each provider on the first case
(fresh subprocesses), the decode step's share of the fp32 matmul rate at batch 32 / 96 / 256
(time of the step's linear layers run alone / time of the whole step), and, in a full run, the
decode step under torch.compile (first-compile time reported separately).

    python -m ctrlsafe.benchmarks.bench_generate [--quick]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ctrlsafe.benchmark import Row, compare, main, peak_memory_mb, require_cpu

SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9)
SMOLLM2_DIR = Path.home() / ".cache" / "ctrlsafe" / "models" / "SmolLM2-135M-Instruct"
REQUESTS = ["How do I bake sourdough bread at home?", "Explain photosynthesis to a ten-year-old.",
            "Write a short poem about rain in the city.", "What are the main causes of inflation?",
            "How can I pick a lock without the key?", "Give me three tips for sleeping better.",
            "Summarize the plot of Hamlet in a paragraph.", "How do vaccines train the immune system?"]
SYSTEM = ("You are a careful assistant for a public help desk. Answer clearly and briefly, cite the "
          "steps a person can take, say when a question needs a professional, refuse requests that "
          "would hurt someone and explain why, keep a friendly tone, avoid jargon, and never make up "
          "facts: when you do not know, say so and suggest where to look. Use plain sentences.")


@dataclass(frozen=True)
class Model:
    name: str
    arch: str  # LlamaForCausalLM | Qwen2ForCausalLM
    config: dict
    layers_of: int  # the real model's depth (config may run fewer)


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: int
    n: int
    suffixes: int  # 0 = no controls
    suffix_len: int
    new_tokens: int
    prompt_len: int = 24  # random-prompt length (real prompts are as long as their template makes them)
    system: bool = False
    reps: int = 1


def _llama(**kw) -> dict:
    base = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=2048, tie_word_embeddings=True)
    return {**base, **kw}


BENCH_4L = Model("bench-4L", "LlamaForCausalLM", _llama(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                                                        intermediate_size=1408, vocab_size=32000, tie_word_embeddings=False), 4)
SMOLLM2 = Model("SmolLM2-135M", "LlamaForCausalLM", _llama(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                                           intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5), 30)
QWEN25_05B = Model("Qwen2.5-0.5B", "Qwen2ForCausalLM", _llama(hidden_size=896, num_hidden_layers=8, num_attention_heads=14, num_key_value_heads=2,
                                                              intermediate_size=4864, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6), 24)
LLAMA32_1B = Model("Llama-3.2-1B", "LlamaForCausalLM", _llama(hidden_size=2048, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
                                                              head_dim=64, intermediate_size=8192, vocab_size=128256, rope_theta=500000.0,
                                                              max_position_embeddings=131072,
                                                              rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                                                high_freq_factor=4.0, original_max_position_embeddings=8192)), 16)
OLD = Workload("old", prompts=8, n=4, suffixes=4, suffix_len=2, new_tokens=64, prompt_len=32, reps=2)
A = Workload("A", prompts=8, n=4, suffixes=0, suffix_len=0, new_tokens=48)
B = Workload("B", prompts=8, n=2, suffixes=6, suffix_len=2, new_tokens=48)
GRID = Workload("grid", prompts=2, n=4, suffixes=25, suffix_len=2, new_tokens=32, system=True)
FULL = [(BENCH_4L, OLD), (SMOLLM2, A), (SMOLLM2, B), (SMOLLM2, GRID), (QWEN25_05B, A), (QWEN25_05B, B), (QWEN25_05B, GRID),
        (LLAMA32_1B, A), (LLAMA32_1B, B)]
TINY = replace(BENCH_4L, name="tiny-2L", config=dict(BENCH_4L.config, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2, intermediate_size=352, vocab_size=4000), layers_of=2)
QUICK = [(TINY, replace(B, prompts=2, new_tokens=8, reps=2)), (TINY, replace(GRID, suffixes=4, n=2, new_tokens=8, reps=2))]


def is_real(model: Model) -> bool:
    return model.name == SMOLLM2.name and (SMOLLM2_DIR / "model.safetensors").is_file()


def save_model(model: Model, path: Path) -> None:
    """The model directory: the converted real SmolLM2 (linked), else a random init (seed 0)."""
    if is_real(model):
        path.symlink_to(SMOLLM2_DIR, target_is_directory=True)
        return
    import transformers

    cfg = getattr(transformers, model.arch.replace("ForCausalLM", "Config"))(**model.config)
    torch.manual_seed(0)
    getattr(transformers, model.arch)(cfg).save_pretrained(path)


def inputs(model: Model, work: Workload, path: Path) -> tuple[list[list[int]], list[list[int]] | None]:
    """(prompt ids, suffix ids or None) of a workload."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config["vocab_size"]
    if is_real(model):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        system = [{"role": "system", "content": SYSTEM}] if work.system else []
        prompts = [list(tok.apply_chat_template(system + [{"role": "user", "content": r}], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]) for r in REQUESTS[: work.prompts]]
    else:
        system = torch.randint(3, vocab, (100,), generator=g).tolist() if work.system else []
        prompts = [system + torch.randint(3, vocab, (work.prompt_len,), generator=g).tolist() for _ in range(work.prompts)]
    suffixes = torch.randint(3, vocab, (work.suffixes, work.suffix_len), generator=g).tolist() if work.suffixes else None
    return prompts, suffixes


def ctrlsafe_fn(model: Model, work: Workload, path: Path, compile: bool = False):
    from ctrlsafe.generate import Engine, SamplingParams
    from ctrlsafe.model import Transformer

    engine = Engine(Transformer.from_pretrained(path), eos_token_ids=[model.config["eos_token_id"]], compile=compile)
    prompts, suffixes = inputs(model, work, path)

    def run():
        return engine.generate(prompts, suffixes, n=work.n, sampling=SamplingParams(**SAMPLING),
                               max_new_tokens=work.new_tokens, min_new_tokens=work.new_tokens)

    return run, engine


def transformers_fn(model: Model, work: Workload, path: Path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts, suffixes = inputs(model, work, path)
    rows = [p + s for p in prompts for s in (suffixes or [[]])]
    width = max(map(len, rows))
    pad = model.config["pad_token_id"]
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])

    @torch.no_grad()
    def run():
        return hf.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=work.n, max_new_tokens=work.new_tokens,
                           min_new_tokens=work.new_tokens, pad_token_id=pad, **SAMPLING)

    return run


PROVIDERS = {"transformers": transformers_fn, "ctrlsafe": lambda m, w, p: ctrlsafe_fn(m, w, p)[0]}


def rows_of(work: Workload) -> int:
    return work.prompts * max(1, work.suffixes) * work.n


def describe(model: Model, work: Workload) -> str:
    c = model.config
    weights = "real weights" if is_real(model) else "random init"
    depth = f"L{c['num_hidden_layers']}" + (f" of {model.layers_of}" if c["num_hidden_layers"] != model.layers_of else "")
    suffix = f" x {work.suffixes} suffixes x{work.suffix_len}" if work.suffixes else ""
    system = " + ~100-token system prompt" if work.system else ""
    return (f"{model.name} ({weights}, h{c['hidden_size']} {depth} V{c['vocab_size']}) {work.name}: "
            f"{work.prompts}p{system}{suffix} x n{work.n} x {work.new_tokens} new")


def child(case: int, quick: bool, provider: str, path: str) -> None:
    """Subprocess entry: load, run case `case` once, print the peak RSS (MiB) as JSON."""
    model, work = (QUICK if quick else FULL)[case]
    torch.manual_seed(0)
    PROVIDERS[provider](model, work, Path(path))()
    print(json.dumps({"peak_rss_mb": peak_memory_mb()}))


def peak_rss_mb(providers, quick: bool, path: Path) -> dict[str, float]:
    """Peak RSS of each provider on case 0, each in its own fresh process (run side by side: only memory is read)."""
    procs = {}
    for name in providers:
        code = f"from ctrlsafe.benchmarks.bench_generate import child; child(0, {quick!r}, {name!r}, {str(path)!r})"
        procs[name] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peaks = {}
    for name, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"peak-memory child for {name} exited with {proc.returncode}")
        peaks[name] = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
    return peaks


def run_case(i: int, model: Model, work: Workload, path: Path, quick: bool) -> list[Row]:
    ours, engine = ctrlsafe_fn(model, work, path)
    fns = {"transformers": transformers_fn(model, work, path), "ctrlsafe": ours}
    rows = compare("generate", describe(model, work), "fp32", fns, reference="transformers",
                   work_items=rows_of(work) * work.new_tokens, unit="tok/s", warmup=0, reps=work.reps)
    split = {k: round(v * 1e3, 1) for k, v in engine.timings.items()}  # of ctrlsafe's last timed call
    print(f"{model.name} {work.name}: ctrlsafe time split (ms): " + ", ".join(f"{k} {v}" for k, v in split.items()))
    peaks = peak_rss_mb(fns, quick, path) if i == 0 else {}
    for row in rows:
        if row.provider in peaks:
            row.peak_mem_mb = peaks[row.provider]
            row.extra["peak_is"] = "RSS high-water of a fresh process running the work once"
        if row.provider == "ctrlsafe":
            row.extra["time_split_ms"] = split
    return rows


def linear_weights(model) -> list[torch.Tensor]:
    """Every weight a decode step multiplies by, in order (the lm_head once)."""
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = model.lm_head.weight if getattr(model, "lm_head", None) is not None else model.embed_tokens.weight
    return ws if any(w is head for w in ws) else ws + [head]


def decode_share(model_obj, batch: int, context: int = 64, steps: int = 8) -> tuple[float, float]:
    """(ms of one decode step at `batch` rows over `context` cached tokens, ms of its linear
    layers alone on [batch, in] inputs): their ratio is the step's share of the matmul rate."""
    from ctrlsafe.generate import Engine, SamplingParams

    engine = Engine(model_obj, eos_token_ids=[0], max_rows=batch, max_batch_tokens=batch * (context + steps + 8))
    vocab = model_obj.args.vocab_size
    prompts = torch.randint(3, vocab, (batch // 4, context), generator=torch.Generator().manual_seed(0)).tolist()
    engine.generate(prompts, n=4, sampling=SamplingParams(**SAMPLING), max_new_tokens=2, min_new_tokens=2)  # warm
    engine.generate(prompts, n=4, sampling=SamplingParams(**SAMPLING), max_new_tokens=steps, min_new_tokens=steps)
    step_ms = engine.timings["decode_forward"] * 1e3 / (steps - 1)  # the first token comes from the prefill
    xs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in linear_weights(model_obj)}
    weights = linear_weights(model_obj)
    passes = []
    for _ in range(6):  # the fastest pass: a shared machine only ever makes a pass slower
        t = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(xs[w.shape[1]], w)
        passes.append(time.perf_counter() - t)
    return step_ms, min(passes[1:]) * 1e3


def decode_share_rows(path: Path, model: Model, batches) -> list[Row]:
    from ctrlsafe.model import Transformer

    m = Transformer.from_pretrained(path)
    rows = []
    for b in batches:
        step_ms, mm_ms = decode_share(m, b)
        row = Row(benchmark="decode_share", provider="ctrlsafe", shape=f"{model.name} batch {b}, 64 cached tokens", dtype="fp32",
                  median_ms=step_ms, p20_ms=step_ms, p80_ms=step_ms, extra={"linears_alone_ms": round(mm_ms, 2),
                                                                            "matmul_share": round(mm_ms / step_ms, 3)})
        rows.append(row)
        print(f"decode step {model.name} batch {b}: {step_ms:.1f} ms, its linear layers alone {mm_ms:.1f} ms "
              f"-> {mm_ms / step_ms:.0%} of the matmul rate")
    return rows


def compile_rows(model: Model, work: Workload, path: Path) -> list[Row]:
    """The decode step under torch.compile vs eager, same work; first-compile time apart."""
    ours, _ = ctrlsafe_fn(model, work, path, compile=False)
    compiled, _ = ctrlsafe_fn(model, work, path, compile=True)
    t = time.perf_counter()
    compiled()
    first_s = time.perf_counter() - t
    rows = compare("generate_compile", describe(model, work), "fp32", {"eager": ours, "compiled": compiled}, reference="eager",
                   work_items=rows_of(work) * work.new_tokens, unit="tok/s", warmup=0, reps=work.reps)
    for row in rows:
        if row.provider == "compiled":
            row.extra["first_call_s"] = round(first_s, 1)
    print(f"torch.compile decode: first call (compiling) {first_s:.1f} s")
    return rows


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    require_cpu("bench_generate", device)
    cases = QUICK if quick else FULL
    only = os.environ.get("CTRLSAFE_BENCH_CASES")  # e.g. "1,2": a subset of the full table
    picked = [int(i) for i in only.split(",")] if only else range(len(cases))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i in picked:
            model, work = cases[i]
            if model.name not in paths:
                paths[model.name] = Path(tmp) / model.name
                save_model(model, paths[model.name])
            rows += run_case(i, model, work, paths[model.name], quick)
        share_model = TINY if quick else SMOLLM2
        if share_model.name not in paths:
            paths[share_model.name] = Path(tmp) / share_model.name
            save_model(share_model, paths[share_model.name])
        rows += decode_share_rows(paths[share_model.name], share_model, (8, 16) if quick else (32, 96, 256))
        if not quick and not only:
            rows += compile_rows(SMOLLM2, A, paths[SMOLLM2.name])
    return rows


if __name__ == "__main__":
    main(run)
