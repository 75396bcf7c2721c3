"""End to end self-generation: `ctrlsafe generate` vs the same pipeline written with transformers.

Models (full): the generation benchmark's policy shape (random-init Llama, hidden 512, 4 layers,
8 heads, intermediate 1408, fp32, seed 0) and two reward models of the same size
(LlamaForSequenceClassification, num_labels 1, seeds 1 and 2). The vocabulary is the real GPT-2
tokenizer's (../shared/models/gpt2-tokenizer) plus the 10 control tokens, so both pipelines run on
text, as the product does. Work: 8 shipped example prompts x 4 controls
(helpful, harmless in {0, 4}) x 4 samples x up to 64 new tokens, temperature 0.8, top_k 50, top_p 0.9.

Both providers do the whole job, models loaded inside the timed call:
  transformers  AutoModelForCausalLM.generate on the 32 left-padded prompt+control inputs with
                num_return_sequences=4; each AutoModelForSequenceClassification on right-padded
                batches of 32 (prompt + response text); quantile bins; the same MOEC rules;
                pyarrow Parquet write
  ctrlsafe      `ctrlsafe generate` in-process (weights hashed, prompt KV shared, fused scoring,
                manifest, shards)
Throughput is samples/s (128 samples per run).

    python -m ctrlsafe.benchmarks.bench_pipeline [--quick]
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctrlsafe.benchmark import Row, compare, main, require_cpu

TARGET = 3.0  # issue 6: ctrlsafe samples/s >= 3x the transformers pipeline
TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "gpt2-tokenizer"
CONTROLS = "helpful=0,4,harmless=0,4"
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9)


@dataclass(frozen=True)
class Work:
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    intermediate: int = 1408
    prompts: int = 8
    n: int = 4
    new_tokens: int = 64
    hf_batch: int = 32
    reps: int = 3

    @property
    def samples(self) -> int:
        return self.prompts * 4 * self.n


FULL = Work()
QUICK = Work(hidden=128, layers=2, heads=4, intermediate=352, prompts=2, n=2, new_tokens=8, hf_batch=8, reps=2)


def build(work: Work, root: Path) -> dict:
    """Policy and two reward model directories sharing one tokenizer (GPT-2 + control tokens)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from ctrlsafe.controls import ControlSpec

    if not TOKENIZER.is_dir():
        raise FileNotFoundError(f"{TOKENIZER} is missing; bench_pipeline needs ../shared beside the checkout")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.pad_token = tok.eos_token  # GPT-2 has no pad token; the reward models read the last non-pad token
    ControlSpec().add_to(tok)
    eos = tok.eos_token_id
    cfg = dict(hidden_size=work.hidden, num_hidden_layers=work.layers, num_attention_heads=work.heads,
               num_key_value_heads=work.heads, intermediate_size=work.intermediate, vocab_size=len(tok),
               max_position_embeddings=512, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    paths = {"policy": root / "policy", "helpful": root / "rm_helpful", "harmless": root / "rm_harmless"}
    for seed, (name, path) in enumerate(paths.items()):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**cfg)) if name == "policy" else LlamaForSequenceClassification(LlamaConfig(num_labels=1, **cfg))
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return paths


def prompts_file(work: Work, root: Path) -> Path:
    from ctrlsafe.presets import example_prompts_path

    lines = example_prompts_path().read_text().splitlines()[: work.prompts]
    path = root / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def ctrlsafe_fn(work: Work, paths: dict, prompts: Path, root: Path):
    from ctrlsafe.cli import main as cli

    runs = iter(range(1 << 30))

    def run():
        out = root / f"ours-{next(runs)}"
        argv = ["generate", "--out", str(out), "--prompts", str(prompts), "--policy", str(paths["policy"]),
                "--rm", f"helpful={paths['helpful']}", "--rm", f"harmless={paths['harmless']}", "--controls", CONTROLS,
                "--samples", str(work.n), "--max-new-tokens", str(work.new_tokens), "--chunk-size", str(work.prompts),
                "--temperature", str(SAMPLING["temperature"]), "--top-k", str(SAMPLING["top_k"]), "--top-p", str(SAMPLING["top_p"])]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if cli(argv) != 0:
                raise RuntimeError("ctrlsafe generate failed")

    return run


def transformers_fn(work: Work, paths: dict, prompts: Path, root: Path):
    """The same job written the usual way with transformers."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ctrlsafe.controls import ControlSpec
    from ctrlsafe.distill import DistillConfig, apply_rules

    spec = ControlSpec()
    texts = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    controls = spec.parse_grid(CONTROLS)
    runs = iter(range(1 << 30))

    @torch.no_grad()
    def run():
        tok = AutoTokenizer.from_pretrained(paths["policy"])
        policy = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=torch.float32).eval()
        rms = {n: AutoModelForSequenceClassification.from_pretrained(paths[n], dtype=torch.float32).eval() for n in ("helpful", "harmless")}
        inputs = [spec.render(p, c, tok) for p in texts for c in controls]
        T = max(map(len, inputs))
        ids = torch.tensor([[tok.pad_token_id] * (T - len(x)) + x for x in inputs])
        mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in inputs])
        out = policy.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=work.n,
                              max_new_tokens=work.new_tokens, pad_token_id=tok.pad_token_id, **SAMPLING)
        responses = tok.batch_decode(out[:, T:], skip_special_tokens=True)
        pairs = [texts[i // (len(controls) * work.n)] + responses[i] for i in range(len(responses))]
        scores = np.zeros((len(pairs), 2), dtype=np.float32)
        tok.padding_side = "right"
        for k, rm in enumerate(rms.values()):
            for b in range(0, len(pairs), work.hf_batch):
                enc = tok(pairs[b:b + work.hf_batch], return_tensors="pt", padding=True)
                scores[b:b + work.hf_batch, k] = rm(**enc).logits[:, 0].numpy()
        edges = np.quantile(scores, np.arange(1, 5) / 5, axis=0).T  # [K, 4]
        levels = np.stack([np.searchsorted(edges[k], scores[:, k], side="right") for k in range(2)], 1)
        rows = []
        for i, r in enumerate(responses):
            p, c, s = i // (len(controls) * work.n), (i // work.n) % len(controls), i % work.n
            rows.append({"id": f"row{p}/{c}/{s}", "prompt_id": f"row{p}", "prompt": texts[p], "messages": None,
                         "requested": controls[c], "control": {"helpful": int(levels[i, 0]), "harmless": int(levels[i, 1])},
                         "sample_index": s, "response": r, "scores": {"helpful": float(scores[i, 0]), "harmless": float(scores[i, 1])},
                         "finish_reason": "length"})
        apply_rules(rows, DistillConfig(), spec.attributes, {"helpful": edges[0].tolist(), "harmless": edges[1].tolist()})
        pq.write_table(pa.Table.from_pylist(rows), root / f"ref-{next(runs)}.parquet")

    return run


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    require_cpu("bench_pipeline", device)
    work = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(work, root)
        prompts = prompts_file(work, root)
        shape = (f"{work.prompts}p x 4c x n{work.n} x {work.new_tokens} new; policy h{work.hidden} L{work.layers}, "
                 f"2 RMs same size, V{_vocab(paths)}")
        rows = compare("pipeline", shape, "fp32",
                       {"transformers": transformers_fn(work, paths, prompts, root), "ctrlsafe": ctrlsafe_fn(work, paths, prompts, root)},
                       reference="transformers", work_items=work.samples, unit="samples/s", warmup=1, reps=work.reps)
    ref, ours = rows
    print(f"pipeline: ctrlsafe {ours.throughput:,.2f} samples/s vs transformers {ref.throughput:,.2f} samples/s: "
          f"{ours.speedup_vs_reference:.2f}x (target >= {TARGET:.0f}x)")
    return rows


def _vocab(paths) -> int:
    return json.loads((paths["policy"] / "config.json").read_text())["vocab_size"]


if __name__ == "__main__":
    main(run)
