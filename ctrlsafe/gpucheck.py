"""One-command GPU acceptance run: `python -m ctrlsafe.gpucheck --out DIR [--dry-run]` (`make gpu-check`).

Made for an H100 lent for ten minutes on a fresh machine: it finishes in under 8 minutes,
writes DIR/results.jsonl (one JSON row per check: stage, name, ok, figures, seconds) and
DIR/trace.json (a short torch.profiler chrome trace of ctrlsafe's decode loop), prints a summary
table and exits 1 if any correctness check failed (throughput checks fail only if they crash).

Stages (one function each, run in this order):
  environment  versions, device, which SDPA backends take a masked GQA call
  sampler      compiled Triton sampler vs the float64 reference (dtypes x V x B, mixed per-row
               parameters), invalid rows, Triton == C++ for the same seeds, batch invariance,
               chi-square of sampled frequencies against `processed_logprobs`
  logprobs     linear_logprobs (fp32 and bf16) vs float64, gradients, run-to-run bitwise equality
  reward       fused reward head vs its reference; RewardModel.score_ids vs transformers (fp32, bf16)
  engine       Engine greedy == transformers generate; sampling == a no-cache loop
  throughput   sampler vs sort / top-k-first / FlashInfer / a plain read; linear_logprobs vs naive
               (and Liger / CCE); decode of a random Llama-3.2-1B vs transformers with a static
               cache, with kernel launches and host syncs per step from torch.profiler

`--dry-run` runs every stage's code on tiny shapes; without CUDA it runs the Triton kernels in
the interpreter (TRITON_INTERPRET=1, set here before triton is imported), so this file cannot
arrive broken. Without CUDA and without --dry-run it exits 2 saying a GPU is needed.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

STAGES = ("environment", "sampler", "logprobs", "reward", "engine", "throughput")
BUDGET_S = 8 * 60


class Checks:
    """Runs checks and records them: each row is written to results.jsonl as soon as it is known,
    so a run cut short still leaves its results. `fail` names checks ("stage.name") forced to
    fail: the seam the tests use to exercise the failure exit."""

    def __init__(self, out: Path, fail: tuple[str, ...] = ()):
        self.path = out / "results.jsonl"
        self.path.write_text("")
        self.rows: list[dict] = []
        self.fail = set(fail)

    def run(self, stage: str, name: str, fn: Callable[[], tuple[bool, dict]]) -> bool:
        """fn() -> (ok, figures); an exception is a failed check with the error as its figure."""
        start = time.perf_counter()
        try:
            ok, figures = fn()
        except Exception as e:  # a crash is a failure of this check, not of the whole run
            ok, figures = False, {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
        if f"{stage}.{name}" in self.fail:
            ok, figures = False, {**figures, "injected_failure": True}
        row = {"stage": stage, "name": name, "ok": bool(ok), "figures": _plain(figures),
               "seconds": round(time.perf_counter() - start, 3)}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  [{'ok' if ok else 'FAIL'}] {stage}.{name} ({row['seconds']:.1f}s) {_short(row['figures'])}", flush=True)
        return bool(ok)


class Context:
    def __init__(self, device, dry: bool, out: Path, checks: Checks):
        self.device, self.dry, self.out, self.checks = device, dry, out, checks
        self.cuda = device.type == "cuda"
        self.tmp = Path(tempfile.mkdtemp(prefix="models-", dir=out))

    def run(self, stage, name, fn):
        return self.checks.run(stage, name, fn)

    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)


# -- 1. environment -----------------------------------------------------------------------------

def stage_environment(ctx: Context):
    import torch

    def versions():
        v = {pkg: _version(pkg) for pkg in ("torch", "triton", "transformers", "flash-attn", "flashinfer-python",
                                            "liger-kernel", "cut-cross-entropy", "ctrlsafe")}
        v["python"] = sys.version.split()[0]
        v["cuda"] = torch.version.cuda
        if ctx.cuda:
            v["device"] = torch.cuda.get_device_name(ctx.device)
            v["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(ctx.device)
            v["memory_gb"] = round(torch.cuda.get_device_properties(ctx.device).total_memory / 2**30, 1)
        else:
            v["device"] = "cpu (dry run)"
        v["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
        return v["torch"] is not None and v["triton"] is not None, v

    ctx.run("environment", "versions", versions)
    ctx.run("environment", "sdpa_backends", lambda: sdpa_backends(ctx))


def sdpa_backends(ctx: Context):
    """Which SDPA backends accept the model's masked GQA call (boolean mask, 32 query heads on 8 KV
    heads, as ctrlsafe.model.attention sees during prefill) with and without expanding K/V, and
    which one the dispatcher picks. ok: the math backend works and every working one agrees."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D = 2, 32, 8, 64, 64
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(ctx.device, dtype) for h in (Hq, Hkv, Hkv))
    mask = torch.ones(T, T, dtype=torch.bool).tril().to(ctx.device)
    figures, outs = {}, {}
    for gqa in (True, False):
        kk, vv = (k, v) if gqa else (k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1))
        label = "gqa" if gqa else "expanded"
        works = []
        for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=gqa)
                ctx.sync()
                works.append(backend.name)
                outs[label, backend.name] = out.float()
            except RuntimeError:
                pass
        figures[f"masked_{label}_works"] = works
        try:
            choice = torch._fused_sdp_choice(q, kk, vv, mask, 0.0, False, scale=None, enable_gqa=gqa)
            names = {int(b.value): n for n, b in SDPBackend.__members__.items()}
            figures[f"masked_{label}_default"] = names.get(int(choice), str(choice))
        except Exception as e:  # private API: report, do not fail
            figures[f"masked_{label}_default"] = f"unknown ({type(e).__name__})"
    base = outs.get(("gqa", "MATH"))
    err = max(((o - base).abs().max().item() for o in outs.values()), default=0.0) if base is not None else float("nan")
    figures["max_diff_between_backends"] = err
    return base is not None and err < (5e-2 if dtype == torch.bfloat16 else 1e-4), figures


# -- 2. sampler ---------------------------------------------------------------------------------

def mixed_params(B: int, V: int, g):
    """Per-row parameter mixes in one batch: greedy, plain, top-k (1, small, >= V), top-p, min-p."""
    import torch

    temperature = torch.where(torch.rand(B, generator=g) < 0.15, 0.0, 0.2 + 1.6 * torch.rand(B, generator=g))
    choice = torch.randint(0, 4, (B,), generator=g)
    small_k = torch.randint(1, 60, (B,), generator=g)
    top_k = torch.where(choice == 0, 0, torch.where(choice == 1, 1, torch.where(choice == 2, small_k, V + 3)))
    top_p = torch.where(torch.rand(B, generator=g) < 0.5, 1.0, 0.05 + 0.95 * torch.rand(B, generator=g))
    min_p = torch.where(torch.rand(B, generator=g) < 0.6, 0.0, 0.3 * torch.rand(B, generator=g))
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def on_boundary(logits_row, params_row: dict, u: float, token: int, rtol: float = 1e-5) -> bool:
    """Whether the reference returns `token` when u, top_p or min_p move by +-rtol (relative): a
    float32 kernel may legitimately land on either side of such a rounding boundary."""
    import torch

    from .ops.sampling import reference

    T, k, p, m = (params_row[n] for n in ("temperature", "top_k", "top_p", "min_p"))
    for du in (-rtol, 0.0, rtol):
        for dp in (-rtol, 0.0, rtol):
            for dm in (-rtol, 0.0, rtol):
                uu = torch.tensor([min(max(u * (1 + du), 0.0), 1 - 2**-24)])
                pp = torch.tensor([min(p * (1 + dp), 1.0) if p < 1 else p])
                mm = torch.tensor([min(m * (1 + dm), 1.0)])
                got = reference(logits_row[None].cpu(), torch.tensor([T]), torch.tensor([k]), pp, mm, uu)[0]
                if int(got[0]) == token:
                    return True
    return False


def compare_tokens(logits, params: dict, uniforms, tokens, logprobs=None, valid=None) -> dict:
    """Tokens of an implementation against the float64 reference for the same uniforms: the
    count of rows that differ other than on a rounding boundary (must be 0), of boundary rows,
    and the largest logprob difference on rows that agree."""
    from .ops.sampling import reference

    ref_tok, ref_lp, ref_valid = reference(logits, params["temperature"], params["top_k"], params["top_p"], params["min_p"], uniforms)
    differ = (tokens.cpu() != ref_tok.cpu()).nonzero().flatten().tolist()
    cpu_params = {n: v.cpu() for n, v in params.items()}
    bad = [r for r in differ if not on_boundary(logits[r], {n: v[r].item() for n, v in cpu_params.items()},
                                                 float(uniforms[r]), int(tokens[r]))]
    fig = {"rows": len(tokens), "mismatch": len(bad), "boundary": len(differ) - len(bad)}
    if valid is not None:
        fig["valid_differs"] = int((valid.cpu() != ref_valid.cpu()).sum())
    if logprobs is not None:
        same = (tokens.cpu() == ref_tok.cpu()) & ref_valid.cpu()
        d = (logprobs.cpu()[same] - ref_lp.cpu()[same]).abs()
        fig["max_logprob_diff"] = d.max().item() if d.numel() else 0.0
    return fig


def stage_sampler(ctx: Context):
    import torch

    from .sampling import counter_uniforms, processed_logprobs, sample

    dev = ctx.device
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    Vs = (7, 4097) if ctx.dry else (7, 4097, 32000, 50257, 128256)
    Bs = (1, 7) if ctx.dry else (1, 64, 256)

    def grid():
        cases, worst = 0, {"mismatch": 0, "boundary": 0, "max_logprob_diff": 0.0, "valid_differs": 0}
        failures = []
        for dtype in dtypes:
            for V in Vs:
                for B in Bs:
                    if ctx.dry and V > 7 and dtype != torch.float32:
                        continue  # the interpreter is slow: half dtypes on the small V only
                    g = torch.Generator().manual_seed(V * 1000 + B)
                    logits = (torch.randn(B, V, generator=g) * 3)
                    if V > 2:
                        logits[0, :3] = logits[0].max()  # exact ties at the max
                    logits = logits.to(dev, dtype)
                    params = {n: t.to(dev) for n, t in mixed_params(B, V, g).items()}
                    seeds = torch.randint(0, 2**40, (B,), generator=g).to(dev)
                    out = sample(logits, **params, seed=seeds, step=5, backend="triton")
                    u = counter_uniforms(seeds, 5)
                    fig = compare_tokens(logits, params, u, out.tokens, out.logprobs, out.valid)
                    cases += 1
                    for key in ("mismatch", "boundary", "valid_differs"):
                        worst[key] += fig[key]
                    worst["max_logprob_diff"] = max(worst["max_logprob_diff"], fig["max_logprob_diff"])
                    if fig["mismatch"] or fig["valid_differs"] or fig["max_logprob_diff"] > 1e-4:
                        failures.append(f"{dtype} V{V} B{B}: {fig}")
        return not failures, {"cases": cases, **worst, "failures": failures[:5]}

    ctx.run("sampler", "triton_vs_reference", grid)

    def invalid_rows():
        V = 300
        g = torch.Generator().manual_seed(6)
        x = torch.randn(6, V, generator=g)
        x[1, 17] = float("nan")
        x[2, 5] = float("inf")
        x[3] = float("-inf")
        x[4, ::2] = float("-inf")
        x = x.to(dev)
        seeds = (torch.arange(6) + 100).to(dev)
        out = sample(x, temperature=1.0, top_p=0.95, seed=seeds, backend="triton")
        valid = out.valid.tolist() == [True, False, False, False, True, True]
        flagged = out.tokens[1:4].tolist() == [-1, -1, -1] and bool(torch.isnan(out.logprobs[1:4]).all())
        never_inf = int(out.tokens[4]) % 2 == 1
        isolated = all(int(sample(x[r:r + 1], temperature=1.0, top_p=0.95, seed=seeds[r:r + 1], backend="triton").tokens[0])
                       == int(out.tokens[r]) for r in (0, 4, 5))
        return valid and flagged and never_inf and isolated, {"valid_flags": valid, "token_-1_logprob_nan": flagged,
                                                              "neg_inf_never_drawn": never_inf, "others_unchanged": isolated}

    ctx.run("sampler", "invalid_rows", invalid_rows)

    def triton_equals_cpu():
        V, B = (4097, 5) if ctx.dry else (128256, 256)
        g = torch.Generator().manual_seed(2)
        logits = torch.randn(B, V, generator=g) * 3
        params = mixed_params(B, V, g)
        seeds = torch.randint(0, 2**40, (B,), generator=g)
        gpu = sample(logits.to(dev), **{n: t.to(dev) for n, t in params.items()}, seed=seeds.to(dev), step=11, backend="triton")
        cpu = sample(logits, **params, seed=seeds, step=11, backend="cpu")
        differ = (gpu.tokens.cpu() != cpu.tokens).nonzero().flatten().tolist()
        u = counter_uniforms(seeds, 11)
        bad = [r for r in differ if not on_boundary(logits[r], {n: v[r].item() for n, v in params.items()}, float(u[r]), int(gpu.tokens[r]))]
        return not bad, {"rows": B, "V": V, "equal": B - len(differ), "boundary": len(differ) - len(bad), "mismatch": len(bad)}

    ctx.run("sampler", "triton_equals_cpp", triton_equals_cpu)

    def batch_invariance():
        V, B = (4097, 6) if ctx.dry else (128256, 258)
        g = torch.Generator().manual_seed(5)
        logits = (torch.randn(B, V, generator=g) * 3).to(dev)
        params = {n: t.to(dev) for n, t in mixed_params(B, V, g).items()}
        seeds = torch.randint(0, 2**40, (B,), generator=g).to(dev)
        batch = sample(logits, **params, seed=seeds, step=3, backend="triton")
        rows = range(B) if ctx.dry else range(0, B, 16)
        bad = 0
        for r in rows:
            alone = sample(logits[r:r + 1], **{n: t[r:r + 1] for n, t in params.items()}, seed=seeds[r:r + 1], step=3, backend="triton")
            same_lp = alone.logprobs[0].item() == batch.logprobs[r].item() or (math.isnan(alone.logprobs[0].item()) and math.isnan(batch.logprobs[r].item()))
            bad += int(alone.tokens[0]) != int(batch.tokens[r]) or not same_lp
        return bad == 0, {"rows_checked": len(rows), "batch": B, "V": V, "differ": bad}

    ctx.run("sampler", "batch_invariance", batch_invariance)

    def chi_square():
        V, N = (8, 150) if ctx.dry else (64, 200_000)
        cases = [(1.0, 0, 1.0, 0.0), (0.7, 10, 0.9, 0.0), (1.3, 0, 0.8, 0.02)]
        cases = cases[:2] if ctx.dry else cases  # the interpreter runs one row per ~50 ms
        figs, ok = [], True
        for T, k, p, m in cases:
            g = torch.Generator().manual_seed(V + k)
            row = (torch.randn(1, V, generator=g) * 2).to(dev)
            q = processed_logprobs(row, temperature=T, top_k=k, top_p=p, min_p=m).exp()[0].double().cpu()
            out = sample(row.expand(N, V), temperature=T, top_k=k, top_p=p, min_p=m, seed=torch.arange(N, device=dev) + 7 * V, step=1,
                         backend="triton")
            counts = torch.bincount(out.tokens.cpu(), minlength=V).double()
            outside = int(counts[q == 0].sum())
            big = (q * N >= 5).nonzero().flatten()
            expected = torch.cat([q[big] * N, (N - q[big].sum() * N).reshape(1)])
            observed = torch.cat([counts[big], (N - counts[big].sum()).reshape(1)])
            if expected[-1] < 5:  # nothing left to pool
                expected, observed = expected[:-1], observed[:-1]
            stat = float(((observed - expected) ** 2 / expected).sum())
            df = max(len(expected) - 1, 1)
            limit = chi2_quantile(df, 4.753)  # 1 - 1e-6: a false failure is a one-in-a-million event per case
            ok &= stat < limit and outside == 0
            figs.append({"params": [T, k, p, m], "chi2": round(stat, 2), "df": df, "limit": round(limit, 2), "draws_outside_kept_set": outside})
        return ok, {"draws": N, "V": V, "cases": figs}

    ctx.run("sampler", "chi_square", chi_square)


def chi2_quantile(df: int, z: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal quantile z."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# -- 3. linear_logprobs -------------------------------------------------------------------------

def values_and_grads(backend, hidden, weight, target, coef):
    """(logp, lse, grad_hidden, grad_weight) of sum(coef[0] * logp + coef[1] * lse)."""
    import torch

    from .ops import linear_logprobs

    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, lse = linear_logprobs(h, w, target, return_lse=True, backend=backend)
    (logp * coef[0].to(logp) + lse * coef[1].to(lse)).sum().backward()
    return logp.detach(), lse.detach(), h.grad, w.grad


def logprobs_case(T, V, H, dtype, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) * H**-0.5 * 4).to(device, dtype)
    target = torch.randint(0, V, (T,), generator=g)
    target[::7] = -100  # ignored positions
    coef = torch.randn(2, T, generator=g).to(device)
    return hidden, weight, target.to(device), coef


def stage_logprobs(ctx: Context):
    import torch

    shapes = {"fp32": (33, 301, 40), "bf16": (70, 4097, 65)} if ctx.dry else {"fp32": (512, 32000, 1024), "bf16": (2048, 128256, 4096)}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        T, V, H = shapes[name]

        def accuracy(T=T, V=V, H=H, dtype=dtype, name=name):
            hidden, weight, target, coef = logprobs_case(T, V, H, dtype, ctx.device)
            ours = values_and_grads("triton", hidden, weight, target, coef)
            truth = values_and_grads("reference", hidden.double(), weight.double(), target, coef)
            naive = values_and_grads("reference", hidden, weight, target, coef) if dtype == torch.bfloat16 else None
            figs, ok = {"shape": f"T{T} V{V} H{H}"}, True
            for i, part in enumerate(("logp", "lse", "grad_hidden", "grad_weight")):
                x, t = ours[i].double(), truth[i]
                scale = t.abs().max().item() + 1e-12
                err = (x - t).abs().max().item()
                figs[f"{part}_max_err"] = err
                if naive is None:  # fp32: close to float64 in absolute/relative terms
                    ok &= err <= 1e-4 * scale + 1e-5
                else:  # bf16: relative (Frobenius) error no worse than the naive bf16 computation
                    rel = ((x - t).norm() / (t.norm() + 1e-12)).item()
                    rel_naive = ((naive[i].double() - t).norm() / (t.norm() + 1e-12)).item()
                    figs[f"{part}_rel_err"], figs[f"{part}_naive_bf16_rel_err"] = rel, rel_naive
                    ok &= rel <= max(1.25 * rel_naive, 4e-3)  # 4e-3: bf16 outputs round by up to 2^-8
                ok &= ours[i].dtype == (torch.float32 if i < 2 else dtype)
            return ok, figs

        ctx.run("logprobs", f"{name}_vs_fp64", accuracy)
        del accuracy

    def deterministic():
        T, V, H = shapes["fp32" if ctx.dry else "bf16"]  # the dry run's interpreter is slow on the bf16 shape
        hidden, weight, target, coef = logprobs_case(T, V, H, torch.bfloat16, ctx.device, seed=1)
        a = values_and_grads("triton", hidden, weight, target, coef)
        b = values_and_grads("triton", hidden, weight, target, coef)
        same = [torch.equal(x, y) for x, y in zip(a, b)]
        return all(same), dict(zip(("logp", "lse", "grad_hidden", "grad_weight"), same), shape=f"T{T} V{V} H{H}")

    ctx.run("logprobs", "bitwise_rerun", deterministic)


# -- 4. reward ----------------------------------------------------------------------------------

def hf_reward_model(path: Path, vocab: int, num_labels: int, seed: int = 0):
    """A random tiny transformers LlamaForSequenceClassification saved to `path` (weights scaled so
    scores are O(1); norm weights != 1 so the fused norm matters)."""
    import torch
    import transformers

    labels = [f"head{i}" for i in range(num_labels)]
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=2, bos_token_id=1,
                                   num_labels=num_labels, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(seed)
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0, 0.15 if "score" not in name else 1.0)
    model.save_pretrained(path)
    return model


def stage_reward(ctx: Context):
    import torch

    from .ops import score_heads

    def head_op():
        N, T, H, K = (7, 5, 33, 3) if ctx.dry else (512, 64, 4096, 3)
        g = torch.Generator().manual_seed(0)
        hidden = (torch.randn(N, T, H, generator=g) * 3).to(ctx.device, torch.bfloat16)
        last = torch.randint(0, T, (N,), generator=g).to(ctx.device)
        norm_w, heads = (torch.rand(H, generator=g) + 0.5).to(ctx.device), (torch.randn(K, H, generator=g) / H**0.5).to(ctx.device)
        bias, mean, std = torch.randn(K, generator=g), torch.randn(K, generator=g), torch.rand(K, generator=g) + 0.5
        edges = torch.sort(torch.randn(K, 4, generator=g), dim=1).values
        args = [t.to(ctx.device) for t in (bias, mean, std, edges)]
        s, lv = score_heads(hidden, last, norm_w, heads, *args, eps=1e-5, backend="triton")
        rs, rl = score_heads(hidden, last, norm_w, heads, *args, eps=1e-5, backend="reference")
        err = (s - rs).abs().max().item()
        near = ((rs[:, :, None] - args[3][None]).abs() < 1e-4).any(-1)
        levels_ok = bool(((lv == rl) | near).all())
        return err <= 1e-4 and levels_ok and s.dtype == torch.float32, {"shape": f"N{N} T{T} H{H} K{K}", "max_score_err": err,
                                                                      "levels_agree": levels_ok}

    ctx.run("reward", "head_vs_reference_bf16", head_op)

    def vs_transformers():
        from .reward import RewardModel

        vocab = 101
        path = ctx.tmp / "rm"
        hf = hf_reward_model(path, vocab, num_labels=3).to(ctx.device)
        g = torch.Generator().manual_seed(0)
        n_pairs = 8 if ctx.dry else 64
        prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(2, 20, (n_pairs,), generator=g)]
        responses = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (n_pairs,), generator=g)]
        seqs = [p + r for p, r in zip(prompts, responses)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=ctx.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=ctx.device)
        with torch.no_grad():
            truth = hf(input_ids=ids, attention_mask=mask).logits.float()
            hf_bf16 = hf.to(torch.bfloat16)(input_ids=ids, attention_mask=mask).logits.float()
        figs, ok = {"pairs": n_pairs, "score_scale": truth.abs().max().item()}, True
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            ours = RewardModel.from_pretrained(path, dtype=dtype, device=ctx.device).score_ids(prompts, responses, batch_tokens=256)
            err = (ours - truth).abs().max().item()
            figs[f"{name}_max_err_vs_hf_fp32"] = err
            if dtype == torch.float32:
                ok &= err <= (1e-3 if ctx.cuda else 1e-4)
            else:
                hf_err = (hf_bf16 - truth).abs().max().item()
                figs["hf_bf16_max_err_vs_hf_fp32"] = hf_err
                ok &= err <= 2 * hf_err + 2e-2
        return ok, figs

    ctx.run("reward", "score_ids_vs_transformers", vs_transformers)


# -- 5. engine ----------------------------------------------------------------------------------

def stage_engine(ctx: Context):
    import torch
    import transformers

    from .generate import Engine, SamplingParams, row_seed
    from .model import Transformer
    from .sampling import sample

    V = 97
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=V, max_position_embeddings=128, eos_token_id=2, bos_token_id=1,
                                   pad_token_id=0)
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # spread the logits so greedy choices are far from ties
        for p in hf.parameters():
            p.normal_(0, 0.3)
    path = ctx.tmp / "lm"
    hf.save_pretrained(path)
    hf = hf.to(ctx.device)
    ours = Transformer.from_pretrained(path, device=ctx.device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in ([3, 40, 1, 11] if not ctx.dry else [3, 17])]
    suffixes = [[5, 6, 7], [], [9]]
    new = 8 if ctx.dry else 24

    @torch.no_grad()
    def greedy():
        outs = Engine(ours, eos_token_ids=[2]).generate(prompts, suffixes, n=2, sampling=SamplingParams(temperature=0.0), max_new_tokens=new)
        bad = 0
        for c in outs:
            ids = torch.tensor([prompts[c.prompt_index] + suffixes[c.control_index]], device=ctx.device)
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new, pad_token_id=0)[0, ids.shape[1]:].tolist()
            bad += c.token_ids + ([2] if c.finish_reason == "eos" else []) != ref
        return bad == 0, {"rows": len(outs), "differ": bad, "new_tokens": new}

    ctx.run("engine", "greedy_equals_hf_generate", greedy)

    @torch.no_grad()
    def sampled():
        sp = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02)
        eos = [3, 11, 12, 13, 14, 15]
        outs = Engine(ours, eos_token_ids=eos).generate(prompts, suffixes, n=3, sampling=sp, max_new_tokens=new, min_new_tokens=2, seed=7)
        bad, lp_err = 0, 0.0
        for c in outs:  # the same row alone, no cache: a full forward over the sequence every step
            seq, toks, lps = prompts[c.prompt_index] + suffixes[c.control_index], [], []
            rs = row_seed(7, c.prompt_index, c.control_index, c.sample_index)
            for t in range(new):
                logits = ours(torch.tensor([seq], device=ctx.device))[:, -1]
                if t < 2:
                    logits[:, eos] = float("-inf")
                o = sample(logits, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, min_p=sp.min_p,
                           seed=torch.tensor([rs], device=ctx.device), step=t)
                tok = int(o.tokens[0])
                if tok in eos:
                    break
                toks.append(tok)
                lps.append(float(o.logprobs[0]))
                seq.append(tok)
            bad += c.token_ids != toks
            if c.token_ids == toks and toks:
                lp_err = max(lp_err, max(abs(a - b) for a, b in zip(c.logprobs, lps)))
        return bad == 0 and lp_err <= 1e-3, {"rows": len(outs), "differ": bad, "max_logprob_diff": lp_err}

    ctx.run("engine", "sampling_equals_no_cache_loop", sampled)

    @torch.no_grad()
    def graphs():
        if not ctx.cuda:  # the static-shape decode they replay is tested on the CPU (tests/test_kv_cache.py)
            return True, {"skipped": "CUDA graphs need a GPU"}
        sp = SamplingParams(temperature=0.9, top_k=20, top_p=0.9)
        kw = dict(n=3, sampling=sp, max_new_tokens=new, seed=7)
        eager = Engine(ours, eos_token_ids=[3, 11, 12, 13]).generate(prompts, suffixes, **kw)  # EOS: compactions recapture
        graphed = Engine(ours, eos_token_ids=[3, 11, 12, 13], cuda_graphs=True).generate(prompts, suffixes, **kw)
        bad = sum(a.token_ids != b.token_ids for a, b in zip(eager, graphed))
        return bad == 0, {"rows": len(eager), "differ": bad, "eos_rows": sum(c.finish_reason == "eos" for c in eager)}

    ctx.run("engine", "cuda_graphs_equal_eager", graphs)


# -- 6. throughput ------------------------------------------------------------------------------

def stage_throughput(ctx: Context):
    import torch

    from .benchmark import compare, peers

    dev = str(ctx.device)
    reps = 3 if ctx.dry else 10

    def sampler(B):
        from ctrlsafe.benchmarks.bench_sampling import topk_sample, vllm_sample

        from .sampling import sample

        V = 1000 if ctx.dry else 128256
        T, k, p = 0.8, 50, 0.9
        logits = (torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 3).to(ctx.device)
        t_rows, k_rows, p_rows = (torch.full((B,), v, device=ctx.device) for v in (T, k, p))
        step = iter(range(1 << 62))
        fns = {"ctrlsafe": lambda: sample(logits, temperature=T, top_k=k, top_p=p, seed=0, step=next(step), backend="triton"),
               "torch sort (vllm)": lambda: vllm_sample(logits, t_rows, k_rows, p_rows),
               "top-k first": lambda: topk_sample(logits, T, k, p)}
        for name, fn in peers("sampling", dev).items():
            fns[name] = lambda fn=fn: fn(logits, t_rows, k_rows, p_rows)
        fns["read"] = lambda: logits.amax(-1)
        rows = compare("sampling", f"B{B} V{V}", "fp32", fns, reference="ctrlsafe", bytes_moved=B * V * 4, reps=reps, device=dev)
        by = {r.provider: r for r in rows}
        figs = {"shape": f"B{B} V{V} T{T} k{k} p{p}"}
        figs.update({f"{n}_ms": round(r.median_ms, 4) for n, r in by.items()})
        figs["ctrlsafe_gbps"] = round(by["ctrlsafe"].gbps, 1)
        figs["ctrlsafe_fraction_of_read"] = round(by["ctrlsafe"].gbps / by["read"].gbps, 3)
        return True, figs

    for B in (1, 2) if ctx.dry else (1, 64, 256):  # B=1: latency; B=256: throughput
        ctx.run("throughput", f"sampler_B{B}", lambda B=B: sampler(B))

    def logprobs():
        from ctrlsafe.benchmarks.bench_logprobs import Work, inputs, providers

        work = Work(T=64, H=32, V=1000) if ctx.dry else Work(T=2048, H=4096, V=128256)
        hidden, weight, target = (t.detach() for t in inputs(work, dev))
        hidden = hidden.to(torch.bfloat16).requires_grad_()
        weight = weight.to(torch.bfloat16).requires_grad_()

        def fwd_bwd(fn):
            def run():
                hidden.grad = weight.grad = None
                fn(hidden, weight, target).float().sum().backward()
            return run

        fns = {n: fwd_bwd(f) for n, f in providers(dev).items() if n != "reference"}
        flops = 3 * 2 * work.T * work.H * work.V  # forward + two backward matmuls
        rows = compare("linear_logprobs fwd+bwd", work.shape, "bf16", fns, reference="naive", flops=flops,
                       reps=max(2, reps // 3), device=dev)
        figs = {"shape": work.shape}
        for r in rows:
            figs[f"{r.provider}_ms"] = round(r.median_ms, 3)
            figs[f"{r.provider}_peak_mb"] = None if r.peak_mem_mb is None else round(r.peak_mem_mb, 1)
        return True, figs

    ctx.run("throughput", "linear_logprobs", logprobs)
    ctx.run("throughput", "decode_1b", lambda: decode(ctx))


def decode(ctx: Context):
    """Decode throughput of a random-init Llama-3.2-1B (16 layers, bf16) through ctrlsafe's Engine
    and transformers' generate with a static cache, same rows and lengths; then a profiled short
    run of each for kernel launches and host syncs per step (ctrlsafe's trace -> DIR/trace.json)."""
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    from ctrlsafe.benchmarks.bench_generate import LLAMA32_1B

    from .generate import Engine, SamplingParams
    from .model import Transformer

    if ctx.dry:
        config = dict(LLAMA32_1B.config, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=128, vocab_size=512)
        rows, prompt_len, new = 4, 8, 8
    else:
        config = dict(LLAMA32_1B.config, num_hidden_layers=LLAMA32_1B.layers_of)
        rows, prompt_len, new = 16, 128, 128
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    cfg = transformers.LlamaConfig(**config)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        hf = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    path = ctx.tmp / "llama-1b"
    hf.save_pretrained(path)
    ours = Transformer.from_pretrained(path, dtype=dtype, device=ctx.device)
    engines = {"ctrlsafe": Engine(ours, eos_token_ids=[cfg.eos_token_id])}
    if ctx.cuda:
        engines["ctrlsafe_graphs"] = Engine(ours, eos_token_ids=[cfg.eos_token_id], cuda_graphs=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(rows)]
    ids = torch.tensor(prompts, device=ctx.device)
    sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)  # transformers' default top_k=50, so both do the same work

    def run_ours(n, engine):
        return engine.generate(prompts, None, n=1, sampling=sp, max_new_tokens=n, min_new_tokens=n)

    @torch.no_grad()
    def run_hf(n):
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0, cache_implementation="static")

    figs = {"model": f"Llama-3.2-1B config, {config['num_hidden_layers']} layers, random init, {str(dtype).removeprefix('torch.')}",
            "rows": rows, "prompt_len": prompt_len, "new_tokens": new}
    runs = {name: (lambda n, e=e: run_ours(n, e)) for name, e in engines.items()}
    runs["hf_static"] = run_hf
    for name, fn in runs.items():
        fn(4)  # warm-up (allocations, static cache, kernel compilation)
        ctx.sync()
        start = time.perf_counter()
        fn(new)
        ctx.sync()
        sec = time.perf_counter() - start
        figs[f"{name}_tokens_per_s"] = round(rows * new / sec, 1)
        figs[f"{name}_ms_per_step"] = round(1e3 * sec / new, 3)
    steps = 4 if ctx.dry else 16
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    for name, fn in runs.items():
        with profile(activities=activities) as prof:
            fn(steps)
            ctx.sync()
        launches, syncs = count_events(prof)
        figs[f"{name}_launches_per_step"] = round(launches / steps, 1)
        figs[f"{name}_syncs_per_step"] = round(syncs / steps, 2)
        if name == "ctrlsafe":
            prof.export_chrome_trace(str(ctx.out / "trace.json"))
    return True, figs


LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize", "cuCtxSynchronize")


def count_events(prof) -> tuple[int, int]:
    """(kernel launches, host syncs) in a profile: CUDA runtime/driver launch and synchronize calls
    (a blocking device-to-host copy shows up as cudaStreamSynchronize or cudaMemcpy)."""
    launches = syncs = 0
    for e in prof.events():
        if e.name in LAUNCH_EVENTS:
            launches += 1
        elif e.name in SYNC_EVENTS or e.name == "cudaMemcpy":
            syncs += 1
    return launches, syncs


# -- main ---------------------------------------------------------------------------------------

def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _plain(x):
    """figures as JSON: tensors and other numbers to Python numbers, NaN/inf to strings."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if hasattr(x, "item") and getattr(x, "numel", lambda: 1)() == 1:
        return _plain(x.item())
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _short(figures: dict, width: int = 110) -> str:
    parts = [f"{k}={v}" for k, v in figures.items() if k not in ("traceback", "failures", "cases") and not isinstance(v, (dict, list))]
    if "error" in figures:
        parts = [f"error={figures['error']}"]
    text = ", ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


def summary(rows: list[dict]) -> str:
    lines = [f"{'stage':<12} {'check':<32} {'ok':<5} {'s':>7}  figures", "-" * 100]
    for r in rows:
        lines.append(f"{r['stage']:<12} {r['name']:<32} {'ok' if r['ok'] else 'FAIL':<5} {r['seconds']:>7.1f}  {_short(r['figures'], 70)}")
    failed = [f"{r['stage']}.{r['name']}" for r in rows if not r["ok"]]
    lines.append("-" * 100)
    lines.append(f"{len(rows) - len(failed)}/{len(rows)} checks passed" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctrlsafe.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for results.jsonl and trace.json")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes; on a machine without CUDA, Triton runs in its interpreter")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--fail", action="append", default=[], metavar="STAGE.NAME", help=argparse.SUPPRESS)  # test seam
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("ctrlsafe.gpucheck needs a CUDA GPU (none is visible to torch). "
              "Use --dry-run to run every stage on tiny CPU shapes instead.", file=sys.stderr)
        return 2
    if not cuda:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("triton was imported before TRITON_INTERPRET=1 could be set; run the dry run in a fresh process", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's import: @triton.jit reads it at decoration
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    args.out.mkdir(parents=True, exist_ok=True)
    checks = Checks(args.out, tuple(args.fail))
    ctx = Context(torch.device("cuda" if cuda else "cpu"), args.dry_run, args.out, checks)
    print(f"ctrlsafe gpu check on {torch.cuda.get_device_name() if cuda else 'cpu'}" + (" (dry run)" if args.dry_run else "")
          + f" -> {args.out}", flush=True)
    start = time.perf_counter()
    for stage in stages:
        print(f"== {stage}", flush=True)
        t0 = time.perf_counter()
        try:
            globals()[f"stage_{stage}"](ctx)
        except Exception as e:  # setup outside a check (model build, imports)
            error = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
            checks.run(stage, "setup", lambda error=error: (False, error))
        if cuda:
            torch.cuda.empty_cache()
        print(f"   {stage}: {time.perf_counter() - t0:.1f}s", flush=True)
    wall = time.perf_counter() - start
    shutil.rmtree(ctx.tmp, ignore_errors=True)  # the saved models (2.5 GB for the 1B Llama)
    print()
    print(summary(checks.rows))
    over = " (over the 8-minute budget)" if wall > BUDGET_S and not args.dry_run else ""
    print(f"wall time {wall:.1f}s{over}; results: {checks.path}" + (f"; trace: {args.out / 'trace.json'}" if (args.out / "trace.json").exists() else ""))
    return 0 if checks.rows and all(r["ok"] for r in checks.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
