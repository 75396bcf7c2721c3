"""Multi-control generation: ctrlsafe's Engine vs transformers' generate doing the same work.

Work (full): random-init Llama (hidden 512, 4 layers, 8 heads, intermediate 1408, vocab 32000,
fp32, seed 0); 8 prompts of 32 tokens x 4 controls (2 control tokens each) x 4 samples x 64 new
tokens, min_new_tokens = max_new_tokens so every row runs full length; temperature 0.8, top_k 50,
top_p 0.9. transformers gets the 32 prompt+control inputs with num_return_sequences=4.

Prints new tokens/s of both and the ratio (x ref), ctrlsafe's time split (prefill / decode
forward / sampling / other) and the peak RSS of each provider, measured in a fresh subprocess
that loads the model and runs the work once (the child's VmHWM).

    python -m ctrlsafe.benchmarks.bench_generate [--quick]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ctrlsafe.benchmark import Row, compare, main, peak_memory_mb, require_cpu


@dataclass(frozen=True)
class Work:
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    intermediate: int = 1408
    vocab: int = 32000
    prompts: int = 8
    prompt_len: int = 32
    controls: int = 4
    control_len: int = 2
    n: int = 4
    new_tokens: int = 64
    reps: int = 2  # each full round runs ~1-3 min per provider on 2 shared cores

    @property
    def new_total(self) -> int:
        return self.prompts * self.controls * self.n * self.new_tokens


FULL = Work()
QUICK = Work(hidden=128, layers=2, heads=4, intermediate=352, vocab=4000, prompts=2, prompt_len=16, controls=2, n=2, new_tokens=8, reps=2)
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9)
EOS = 2


def save_model(work: Work, path: Path) -> None:
    """A random-init transformers Llama (seed 0) saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=work.hidden, num_hidden_layers=work.layers, num_attention_heads=work.heads,
                      num_key_value_heads=work.heads, intermediate_size=work.intermediate, vocab_size=work.vocab,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def inputs(work: Work) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, work.vocab, (work.prompts, work.prompt_len), generator=g).tolist()
    controls = torch.randint(3, work.vocab, (work.controls, work.control_len), generator=g).tolist()
    return prompts, controls


def ctrlsafe_fn(work: Work, path: Path):
    from ctrlsafe.generate import Engine, SamplingParams
    from ctrlsafe.model import Transformer

    engine = Engine(Transformer.from_pretrained(path), eos_token_ids=[EOS])
    prompts, controls = inputs(work)

    def run():
        return engine.generate(prompts, controls, n=work.n, sampling=SamplingParams(**SAMPLING),
                               max_new_tokens=work.new_tokens, min_new_tokens=work.new_tokens)

    return run, engine


def transformers_fn(work: Work, path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts, controls = inputs(work)
    ids = torch.tensor([p + c for p in prompts for c in controls])

    @torch.no_grad()
    def run():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, num_return_sequences=work.n,
                              max_new_tokens=work.new_tokens, min_new_tokens=work.new_tokens, pad_token_id=0, **SAMPLING)

    return run


PROVIDERS = {"transformers": lambda w, p: transformers_fn(w, p), "ctrlsafe": lambda w, p: ctrlsafe_fn(w, p)[0]}


def child(provider: str, quick: bool, path: str) -> None:
    """Subprocess entry: load, run the work once, print the peak RSS (MiB) as JSON."""
    work = QUICK if quick else FULL
    torch.manual_seed(0)
    PROVIDERS[provider](work, Path(path))()
    print(json.dumps({"peak_rss_mb": peak_memory_mb()}))


def peak_rss_mb(providers, quick: bool, path: Path) -> dict[str, float]:
    """Peak RSS of each provider, each in its own fresh process (run side by side: only memory is read)."""
    procs = {}
    for name in providers:
        code = f"from ctrlsafe.benchmarks.bench_generate import child; child({name!r}, {quick!r}, {str(path)!r})"
        procs[name] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peaks = {}
    for name, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"peak-memory child for {name} exited with {proc.returncode}")
        peaks[name] = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
    return peaks


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    require_cpu("bench_generate", device)
    work = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        save_model(work, path)
        ours, engine = ctrlsafe_fn(work, path)
        shape = (f"{work.prompts}p x{work.prompt_len} x {work.controls}c x{work.control_len} x n{work.n} x {work.new_tokens} new; "
                 f"h{work.hidden} L{work.layers} V{work.vocab}")
        rows = compare("generate", shape, "fp32", {"transformers": transformers_fn(work, path), "ctrlsafe": ours},
                       reference="transformers", work_items=work.new_total, unit="tok/s", warmup=0, reps=work.reps)
        split = {k: round(v * 1e3, 1) for k, v in engine.timings.items()}  # of ctrlsafe's last timed call
        peaks = peak_rss_mb([r.provider for r in rows], quick, path)
        for row in rows:
            row.peak_mem_mb = peaks[row.provider]
            row.extra["peak_is"] = "RSS high-water of a fresh process running the work once"
            if row.provider == "ctrlsafe":
                row.extra["time_split_ms"] = split
    print("ctrlsafe time split (ms): " + ", ".join(f"{k} {v}" for k, v in split.items()))
    return rows


if __name__ == "__main__":
    main(run)
