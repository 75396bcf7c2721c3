"""PPO step anatomy on the tiny preset, and the rollout's generation vs transformers' generate.

Models: the tiny preset (policy: random Llama, 4 layers, hidden 256; reward models helpful and
harmless: LlamaForSequenceClassification, 2 layers, hidden 128), fp32. Work (full): 16 shipped
example prompts x 1 control target each (uniform over the 5x5 grid) x 4 samples x up to 64 new
tokens, temperature 1; 2 PPO epochs over the 64 rows in minibatches of 32.

1. `rlhf_step`: `ctrlsafe train --objective ppo` in-process for a few rollouts; the time of each
   rollout split into generation (Engine), scoring (both reward models), the rollout forwards
   (policy + value, reference) and optimisation (4 optimizer steps). One row per part: median /
   p20 / p80 over rollouts in ms, and `extra.share` of the whole step.
2. `rollout_generate`: the same rollout's generation, interleaved: ctrlsafe's Engine (n samples
   share the [prompt][control] KV) vs transformers' `generate` on the left-padded
   [prompt][control] batch with num_return_sequences=n (reference). Throughput: generated
   sequences per second.

On CPU both run with one intra-op thread: these models are small, and on the shared 2-core
machine two threads mostly measure spinning contention, not the code.

    python -m ctrlsafe.benchmarks.bench_rlhf [--quick]
"""
from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ctrlsafe.benchmark import Row, compare, main, quantile


@dataclass(frozen=True)
class Work:
    prompts: int = 16
    n: int = 4
    new_tokens: int = 64
    batch: int = 32
    rollouts: int = 3
    reps: int = 3


FULL = Work()
QUICK = Work(prompts=4, n=2, new_tokens=8, batch=8, rollouts=2, reps=2)


def _dataset(root: Path, spec) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctrlsafe.presets import example_prompts_path

    rows = [{"prompt": json.loads(line)["prompt"]} for line in example_prompts_path().read_text().splitlines()]
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "chunk-000000.parquet")
    edges = [-1.5, -0.5, 0.5, 1.5]  # the timing does not depend on where the levels fall
    bins = {"levels": spec.levels, "edges": {a: edges for a in spec.attributes}}
    (root / "manifest.json").write_text(json.dumps({"format": "ctrlsafe-dataset", "control_spec": spec.to_dict(), "bins": bins}))
    return root


def step_rows(preset, w: Work, device: str, tmp: Path) -> list[Row]:
    from ctrlsafe.cli import main as cli
    from ctrlsafe.controls import ControlSpec

    data = _dataset(tmp / "data", ControlSpec())
    out = tmp / "ppo"
    argv = ["train", "--no-progress", "--objective", "ppo", "--data", data, "--model", preset.policy, "--out", out,
            "--reward", f"helpful={preset.reward_models['helpful']}", "--reward", f"harmless={preset.reward_models['harmless']}",
            "--rollouts", w.rollouts, "--rollout-prompts", w.prompts, "--rollout-n", w.n, "--batch-size", w.batch,
            "--max-new-tokens", w.new_tokens, "--device", device, "--lr", "1e-5"]
    if cli([str(a) for a in argv]) != 0:
        raise RuntimeError("ctrlsafe train --objective ppo failed")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    parts: dict[str, list[float]] = {"generate": [], "score": [], "rollout_forward": [], "optimise": []}
    rollouts = [x for x in lines if "rollout" in x]
    per_rollout = rollouts[1]["step"] - rollouts[0]["step"]
    for roll in rollouts:
        steps = [x for x in lines if "rollout" not in x and roll["step"] < x["step"] <= roll["step"] + per_rollout]
        parts["generate"].append(roll["generate_s"])
        parts["score"].append(roll["score_s"])
        parts["rollout_forward"].append(roll["forward_s"])
        parts["optimise"].append(sum(x["tokens"] / x["tokens_per_s"] for x in steps))
    whole = sum(statistics.median(v) for v in parts.values())
    shape = f"{w.prompts}x{w.n} rows, {w.new_tokens} new tokens, batch {w.batch}"
    rows = []
    for name, secs in parts.items():
        ms = [s * 1e3 for s in secs]
        rows.append(Row(benchmark="rlhf_step", provider=name, shape=shape, dtype="fp32", median_ms=statistics.median(ms),
                        p20_ms=quantile(ms, 0.2), p80_ms=quantile(ms, 0.8),
                        extra={"share": round(statistics.median(secs) / whole, 3), "rollouts": w.rollouts}))
    return rows


def generate_rows(preset, w: Work, device: str) -> list[Row]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctrlsafe.controls import ControlSpec
    from ctrlsafe.generate import Engine, SamplingParams
    from ctrlsafe.model import Transformer
    from ctrlsafe.presets import example_prompts_path

    spec = ControlSpec()
    tok = AutoTokenizer.from_pretrained(preset.policy)
    ours = Transformer.from_pretrained(preset.policy, device=device)
    spec.add_to(tok, ours, seed=0)
    hf = AutoModelForCausalLM.from_pretrained(preset.policy).to(device).eval()
    hf.resize_token_embeddings(len(tok))
    with torch.no_grad():  # the same control rows in both models
        hf.get_input_embeddings().weight.copy_(ours.embed_tokens.weight)
        hf.get_output_embeddings().weight.copy_(ours.lm_head.weight)
    prompts = [json.loads(line)["prompt"] for line in example_prompts_path().read_text().splitlines()][: w.prompts]
    g = torch.Generator().manual_seed(0)
    cells = spec.grid()
    prefixes = [spec.render(p, cells[int(torch.randint(len(cells), (1,), generator=g))], tok) for p in prompts]
    engine = Engine(ours, tok, spec)

    width = max(map(len, prefixes))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes], device=device)
    attn = (torch.arange(width) >= torch.tensor([width - len(p) for p in prefixes])[:, None]).long().to(device)

    def ctrlsafe_engine():
        return engine.generate(prefixes, n=w.n, sampling=SamplingParams(temperature=1.0), max_new_tokens=w.new_tokens, seed=1)

    @torch.no_grad()
    def transformers_generate():
        return hf.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=w.new_tokens, num_return_sequences=w.n, pad_token_id=pad)

    shape = f"{w.prompts} prompts x {w.n} samples, {w.new_tokens} new tokens"
    return compare("rollout_generate", shape, "fp32", {"transformers": transformers_generate, "ctrlsafe": ctrlsafe_engine},
                   reference="transformers", work_items=w.prompts * w.n, unit="seq/s", reps=w.reps, device=device)


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    from ctrlsafe.presets import tiny

    w = QUICK if quick else FULL
    threads = torch.get_num_threads()
    if device == "cpu":  # see the module doc
        torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            preset = tiny(root=Path(tmp) / "preset")
            return step_rows(preset, w, device, Path(tmp)) + generate_rows(preset, w, device)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main(run)
