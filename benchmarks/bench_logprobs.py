"""Fused linear log-probs (ctrlsafe.ops.linear_logprobs) vs naive logits + cross-entropy.

Work (full): hidden [4096,1024], lm_head weight [128256,1024] (a Llama-3 vocabulary), fp32,
random (seed 0); forward + backward of the token-mean NLL. Providers:
  naive      logits = h @ W.T, F.cross_entropy(reduction="none"), backward
  reference  linear_logprobs(backend="reference") (full logits, log-softmax, gather)
  ours       linear_logprobs on the device's fast backend (cpu: chunked autograd Function; cuda: Triton)
  + installed peers on CUDA (Liger, cut-cross-entropy).
Time is interleaved in this process (x ref = naive time / provider time). Peak memory is measured
once per provider in a fresh subprocess: the RSS high-water (VmHWM; on CUDA the allocator's peak) after running the work once, minus the same high-water taken after allocating the inputs.

bf16 rows (same work, hidden and weight in bf16; time only) run where the device has native bf16
matmuls: CUDA GPUs that support bf16, CPUs with oneDNN bf16 kernels (AVX512-BF16 / AMX); the run
prints whether they ran. On CUDA they are the tensor-core path training takes under autocast.

ExMATE-shaped rows: one CE pass plus k counterfactual passes (k = 1, 3), each pass a fresh
hidden [T,H] (the extra forward's activations), its own fwd + bwd (CE, then alpha * exp(-CE)),
weight grads accumulating. Peak memory should grow with k only by those activations and their grads.

    python -m ctrlsafe.benchmarks.bench_logprobs [--quick] [--device cuda]
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ctrlsafe.benchmark import Row, compare, main, peak_memory_mb, peers
from ctrlsafe.ops import linear_logprobs


@dataclass(frozen=True)
class Work:
    T: int = 4096
    H: int = 1024
    V: int = 128256
    reps: int = 3

    @property
    def shape(self) -> str:
        return f"T{self.T} H{self.H} V{self.V}"


FULL = Work()
QUICK = Work(T=512, H=256, V=16384, reps=3)
ALPHA = 0.05  # ExMATE's weight on exp(-CE) of the counterfactual passes
KS = (1, 3)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"memory": 1 / 8, "time": 1.2}  # issue 7: ours vs naive


def inputs(work: Work, device: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(hidden, weight, target), filled in place so that no temporary raises the RSS high-water
    (fp32; other dtypes go through one cast)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.empty(work.T, work.H).normal_(generator=g).to(device, dtype).requires_grad_()
    weight = torch.empty(work.V, work.H).normal_(0, work.H**-0.5, generator=g).to(device, dtype).requires_grad_()
    target = torch.randint(0, work.V, (work.T,), generator=g).to(device)
    return hidden, weight, target


def native_bf16_matmul(device: str) -> bool:
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()  # what torch's CPU bf16 paths check


def naive_logprobs(hidden, weight, target):
    return -F.cross_entropy(hidden @ weight.T, target, reduction="none")


def providers(device: str) -> dict:
    """name -> logprobs(hidden, weight, target), the naive baseline first."""
    fast = "triton" if torch.device(device).type == "cuda" else "cpu"
    return {
        "naive": naive_logprobs,
        "reference": lambda h, w, t: linear_logprobs(h, w, t, backend="reference"),
        f"ours ({fast})": lambda h, w, t: linear_logprobs(h, w, t, backend=fast),
        **peers("linear_logprobs", device),
    }


def exmate_step(logprobs, hidden, weight, target, k: int, work: Work, seed: int = 1):
    """CE on the given hidden, then k counterfactual passes on fresh activations; grads accumulate."""
    (-logprobs(hidden, weight, target).mean()).backward()
    g = torch.Generator().manual_seed(seed)
    for _ in range(k):
        h = torch.empty(work.T, work.H).normal_(generator=g).to(hidden.device).requires_grad_()
        (ALPHA * logprobs(h, weight, target).mean().exp()).backward()


def child(provider: str, k: int, quick: bool, device: str) -> None:
    """Subprocess entry: allocate inputs, run the work once (k = 0: one pass), print peak extra MB."""
    work = QUICK if quick else FULL
    hidden, weight, target = inputs(work, device)
    fn = providers(device)[provider]
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_memory_mb(device)
    t0 = time.perf_counter()
    exmate_step(fn, hidden, weight, target, k, work)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - t0) * 1e3
    print(json.dumps({"extra_mb": peak_memory_mb(device) - base, "ms": ms}))


def in_subprocess(provider: str, k: int, quick: bool, device: str) -> dict:
    code = f"from ctrlsafe.benchmarks.bench_logprobs import child; child({provider!r}, {k}, {quick!r}, {device!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench_logprobs child {provider} k={k} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    work = QUICK if quick else FULL
    fns = providers(device)
    flops = 3 * 2 * work.T * work.H * work.V  # the naive matmuls: logits, grad_h, grad_W

    def timed(dtype: str) -> list[Row]:
        hidden, weight, target = inputs(work, device, dtype=DTYPES[dtype])

        def fwd_bwd(fn):
            def call():
                hidden.grad = weight.grad = None
                (-fn(hidden, weight, target).mean()).backward()
            return call

        return compare("linear_logprobs fwd+bwd", work.shape, dtype, {n: fwd_bwd(f) for n, f in fns.items()},
                       reference="naive", flops=flops, work_items=work.T, unit="tok/s", reps=work.reps, device=device)

    rows = timed("fp32")
    for row in rows:
        m = in_subprocess(row.provider, 0, quick, device)
        row.peak_mem_mb = m["extra_mb"]
        row.extra["peak_is"] = "extra high-water over inputs, fresh process, one fwd+bwd"

    ours = [n for n in fns if n.startswith("ours")][0]
    for k in KS:
        runs = {name: in_subprocess(name, k, quick, device) for name in ("naive", ours)}
        for name, m in runs.items():
            rows.append(Row(benchmark=f"exmate k={k} (1+{k} passes)", provider=name, shape=work.shape, dtype="fp32",
                            median_ms=m["ms"], p20_ms=m["ms"], p80_ms=m["ms"], peak_mem_mb=m["extra_mb"],
                            speedup_vs_reference=runs["naive"]["ms"] / m["ms"],
                            extra={"peak_is": "extra high-water over inputs, fresh process, one run"}))
    if native_bf16_matmul(device):
        rows += timed("bf16")
        print(f"bf16 rows: ran on {device} (native bf16 matmul)")
    else:
        print(f"bf16 rows: skipped, {device} has no native bf16 matmul")
    print(summary(rows, ours, work))
    return rows


def summary(rows: list[Row], ours: str, work: Work) -> str:
    """The issue's targets (fp32), ours against naive."""
    by = {(r.benchmark, r.provider): r for r in rows if r.dtype == "fp32"}
    one = "linear_logprobs fwd+bwd"
    mem = by[(one, ours)].peak_mem_mb / by[(one, "naive")].peak_mem_mb
    t = by[(one, ours)].median_ms / by[(one, "naive")].median_ms
    lines = [f"{ours} vs naive: peak extra memory {mem:.3f}x (target <= {TARGETS['memory']:.3f}), "
             f"time {t:.2f}x (target <= {TARGETS['time']})"]
    activations = 2 * (KS[-1] - KS[0]) * work.T * work.H * 4 / 2**20  # fresh hidden + its grad per pass
    for name in ("naive", ours):
        lo, hi = (by[(f"exmate k={k} (1+{k} passes)", name)].peak_mem_mb for k in KS)
        lines.append(f"exmate {name}: peak extra k={KS[0]} {lo:.0f} MB, k={KS[-1]} {hi:.0f} MB "
                     f"(growth {hi - lo:.0f} MB; extra activations + grads {activations:.0f} MB)")
    return "\n".join(lines)


if __name__ == "__main__":
    main(run)
