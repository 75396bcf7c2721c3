"""The sampler's documented log-probabilities on every backend (reference, C++, Triton under
TRITON_INTERPRET=1), `processed_logprobs`, the FlashInfer-compatible entry points and the
transformers LogitsProcessor adapter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (as test_sampling_triton.py)

import math

import pytest
import torch

from ctrlsafe.ops.sampling import cpu, reference
from ctrlsafe.sampling import (
    counter_uniforms,
    processed_logprobs,
    sample,
    top_k_top_p_sampling_from_logits,
    top_k_top_p_sampling_from_probs,
    top_p_sampling_from_probs,
)
from test_sampling import boundary_tokens, chi2_quantile, reference_distribution


def _triton_interpreted() -> bool:
    try:
        from ctrlsafe.kernels import sampling as kernels
    except ImportError:
        return False
    return type(kernels._sample_kernel).__name__ == "InterpretedFunction"


BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not _triton_interpreted(), reason="triton missing, or its kernels were imported before TRITON_INTERPRET=1"))]


def edge_batch(V: int, g: torch.Generator):
    """Logits [B,V] with ties at the max, -inf entries, a flat row, and per-row parameters that
    cover greedy, top_k 0 / 1 / V, top_p 1.0 / tiny, min_p, and combinations."""
    rows = [  # (temperature, top_k, top_p, min_p)
        (0.0, 0, 1.0, 0.0), (0.0, 5, 0.5, 0.1), (1.0, 0, 1.0, 0.0), (0.7, 1, 1.0, 0.0), (1.3, V, 1.0, 0.0),
        (1.0, 0, 1e-7, 0.0), (0.9, 0, 0.9, 0.0), (1.1, 3, 0.8, 0.05), (0.5, 0, 1.0, 0.2), (2.0, 0, 1.0, 0.0),
    ]
    B = len(rows)
    x = torch.randn(B, V, generator=g) * 3
    if V > 1:
        x[0, : min(V, 3)] = x[0].max()  # greedy over tied maxima: lowest id
        x[5, [0, V // 2, V - 1]] = x[5].max() + 1  # tiny top_p over 3 tied maxima
        x[2, ::2] = float("-inf")  # masked entries are never drawn
        x[6, 1::3] = float("-inf")
        x[9] = 0.25  # flat
    T, k, p, m = (torch.tensor(c) for c in zip(*rows))
    return x, T.float(), k.long(), p.float(), m.float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [1, 7, 33, 4097])
def test_logprobs_have_one_meaning_on_every_backend(backend, V):
    """On every backend: a sampled row's `logprobs` is log q(token) of the processed
    distribution q = processed_logprobs(...).exp() it was drawn from (token inside q's support);
    a greedy row's is 0 with the lowest-id argmax; `raw_logprobs` is log_softmax(logits)[token]
    for both kinds; edge values (ties, -inf entries, top_k 0 / 1 / V, top_p 1 / tiny, V = 1)."""
    g = torch.Generator().manual_seed(V)
    x, T, k, p, m = edge_batch(V, g)
    seeds = torch.arange(len(T)) + 17
    out = sample(x, temperature=T, top_k=k, top_p=p, min_p=m, seed=seeds, step=3, raw_logprobs=True, backend=backend)
    assert out.valid.all() and out.logprobs.dtype == out.raw_logprobs.dtype == torch.float32
    q = processed_logprobs(x, temperature=T, top_k=k, top_p=p, min_p=m)
    at = q.gather(1, out.tokens[:, None]).squeeze(1)
    assert torch.isfinite(at).all()  # every token is in its row's kept set
    torch.testing.assert_close(out.logprobs, at, rtol=1e-5, atol=2e-6)
    greedy = T == 0
    assert (out.logprobs[greedy] == 0).all()
    first_max = (x == x.max(-1, keepdim=True).values).int().argmax(-1)
    assert torch.equal(out.tokens[greedy], first_max[greedy])
    raw = torch.log_softmax(x.double(), -1).gather(1, out.tokens[:, None]).squeeze(1).float()
    torch.testing.assert_close(out.raw_logprobs, raw, rtol=1e-5, atol=2e-6)
    if V > 1:
        assert out.logprobs[5].item() == pytest.approx(-math.log(3), abs=1e-6)  # tiny top_p keeps the 3 tied maxima
        assert out.logprobs[3].item() == 0.0  # top_k = 1 over a unique max: probability 1
    # without raw_logprobs nothing else changes
    plain = sample(x, temperature=T, top_k=k, top_p=p, min_p=m, seed=seeds, step=3, backend=backend)
    assert plain.raw_logprobs is None and torch.equal(plain.tokens, out.tokens) and torch.equal(plain.logprobs, out.logprobs)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_logprobs_on_a_hand_computed_distribution(backend):
    """Probabilities {0.5, 0.3, 0.15, 0.05} (rest -inf), top_p 0.75 keeps {0.5, 0.3}: tokens get
    logprob log(0.5 / 0.8) and log(0.3 / 0.8) and raw logprob log 0.5 and log 0.3; greedy gets 0
    and raw log 0.5; T -> 0 (1e-3) is the greedy limit: logprob -> 0, same token."""
    x = torch.full((1, 50), float("-inf"))
    x[0, [40, 3, 17, 28]] = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()
    N = 64
    out = sample(x.expand(N, -1), top_p=0.75, seed=torch.arange(N), raw_logprobs=True, backend=backend)
    assert set(out.tokens.tolist()) == {3, 28}
    for tok, q, r in ((3, 0.5 / 0.8, 0.5), (28, 0.3 / 0.8, 0.3)):
        sel = out.tokens == tok
        torch.testing.assert_close(out.logprobs[sel], torch.full((int(sel.sum()),), math.log(q)))
        torch.testing.assert_close(out.raw_logprobs[sel], torch.full((int(sel.sum()),), math.log(r)))
    greedy = sample(x, temperature=0.0, raw_logprobs=True, backend=backend)
    assert greedy.tokens.item() == 3 and greedy.logprobs.item() == 0.0
    assert greedy.raw_logprobs.item() == pytest.approx(math.log(0.5), rel=1e-6)
    cold = sample(x, temperature=1e-3, seed=5, backend=backend)
    assert cold.tokens.item() == 3 and cold.logprobs.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_invalid_rows_have_nan_logprobs_of_both_kinds():
    """NaN / +inf / all -inf rows: NaN logprobs and raw_logprobs, NaN processed_logprobs rows;
    the valid rows beside them are unaffected."""
    x = torch.randn(4, 9)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    x[3] = float("-inf")
    out = sample(x, seed=1, raw_logprobs=True)
    assert out.valid.tolist() == [True, False, False, False]
    assert torch.isnan(out.logprobs[1:]).all() and torch.isnan(out.raw_logprobs[1:]).all()
    assert torch.isfinite(out.raw_logprobs[0])
    q = processed_logprobs(x)
    assert torch.isnan(q[1:]).all() and torch.allclose(q[0], torch.log_softmax(x[0], -1))


@pytest.mark.parametrize("V, params", [(64, (1.0, 0, 1.0, 0.0)), (64, (0.7, 10, 0.9, 0.0)), (37, (1.3, 0, 0.8, 0.02)),
                                       (33, (0.5, 1, 1.0, 0.0)), (33, (1.0, 33, 1e-7, 0.0)), (7, (0.0, 0, 1.0, 0.0))])
def test_processed_logprobs_is_the_distribution_sample_draws_from(V, params):
    """exp(processed_logprobs) equals the reference sampler's probabilities over a grid of
    uniforms (every kept token, its probability), sums to 1, and is -inf exactly off the
    tokens the reference can return; greedy: a point mass at the lowest-id argmax."""
    T, k, p, m = params
    g = torch.Generator().manual_seed(V + k)
    row = torch.randn(1, V, generator=g) * 2
    row[0, 1] = row[0, 0] = row[0].max()  # ties at the max
    q = processed_logprobs(row, temperature=T, top_k=k, top_p=p, min_p=m)[0].double().exp()
    assert q.sum().item() == pytest.approx(1.0, abs=1e-6)
    probs = reference_distribution(row[0], T, k, p, m, grid=1 << 14)
    if T == 0:
        assert probs == {0: 1.0} and q[0] == 1 and (q[1:] == 0).all()
        return
    for t, pr in probs.items():
        assert q[t].item() == pytest.approx(pr, rel=1e-5)
    if sum(probs.values()) > 1 - 1e-9:
        assert set((q > 0).nonzero().flatten().tolist()) == set(probs)


def test_processed_logprobs_validates_like_sample():
    """Bad parameters and shapes raise the same ValueErrors as sample()."""
    with pytest.raises(ValueError, match=r"top_p\[1\] = 1.5"):
        processed_logprobs(torch.zeros(3, 4), top_p=torch.tensor([0.5, 1.5, 1.0]))
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        processed_logprobs(torch.zeros(4))


# -- FlashInfer-compatible entry points ---------------------------------------------------------

def _seeds_from(generator: torch.Generator, B: int):
    return torch.randint(0, 2**62, (B,), dtype=torch.int64, generator=generator)


@pytest.mark.parametrize("V", [1, 7, 33, 4097])
def test_flashinfer_signature_matches_reference(V):
    """top_k_top_p_sampling_from_logits(logits, top_k, top_p, indices, generator=g) returns int32
    ids [len(indices)]: output i is the reference's draw from logits[indices[i]] with its own
    top_k[i] / top_p[i] and the counter uniform of the i-th seed drawn from g (edge values
    top_k 0 / 1 / V, top_p 1 / tiny, -inf entries, rows reused by several outputs)."""
    g = torch.Generator().manual_seed(V)
    R = 5
    logits = torch.randn(R, V, generator=g) * 3
    if V > 2:
        logits[1, ::2] = float("-inf")
    indices = torch.tensor([0, 1, 1, 4, 2, 3, 3, 3, 0], dtype=torch.int32)
    B = len(indices)
    top_k = torch.tensor([0, 1, V, 3, 0, 0, 2, V + 5, 1], dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 0.9, 1e-7, 0.5, 1.0, 0.99, 0.3, 1.0])
    out = top_k_top_p_sampling_from_logits(logits, top_k, top_p, indices, generator=torch.Generator().manual_seed(7))
    assert out.dtype == torch.int32 and out.shape == (B,)
    u = counter_uniforms(_seeds_from(torch.Generator().manual_seed(7), B), 0)
    rows = logits[indices.long()]
    args = (rows, torch.ones(B), top_k.long(), top_p, torch.zeros(B), u)
    ref = reference(*args)[0]
    differ = (out.long() != ref).nonzero().flatten().tolist()
    allowed = boundary_tokens(*args, differ)
    assert all(int(out[r]) in allowed[r] for r in differ)
    assert torch.isfinite(rows.gather(1, out.long()[:, None])).all()  # never a masked entry


def test_flashinfer_scalars_generator_seed_and_offset():
    """Scalar top_k / top_p equal per-row tensors holding them; a generator seeded the same
    reproduces the draws and advances (the next call draws anew); seed + offset are
    reproducible and a new offset is a fresh stream; deterministic=False changes nothing."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g)
    call = lambda **kw: top_k_top_p_sampling_from_logits(logits, 40, 0.9, **kw)  # noqa: E731
    a = call(generator=torch.Generator().manual_seed(3))
    b = top_k_top_p_sampling_from_logits(logits, torch.full((64,), 40), torch.full((64,), 0.9),
                                         generator=torch.Generator().manual_seed(3), deterministic=False)
    assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(3)
    first, second = call(generator=gen), call(generator=gen)
    assert torch.equal(first, a) and not torch.equal(first, second)
    assert torch.equal(call(seed=11, offset=2), call(seed=11, offset=2))
    assert not torch.equal(call(seed=11, offset=2), call(seed=11, offset=3))
    seeds = _seeds_from(torch.Generator().manual_seed(11), 64)
    assert torch.equal(call(seed=11, offset=2).long(), sample(logits, top_k=40, top_p=0.9, seed=seeds, step=2).tokens)


def test_flashinfer_probs_forms_equal_logits_form_on_log_probs():
    """top_k_top_p_sampling_from_probs / top_p_sampling_from_probs draw what the logits form
    draws from log(probs) (zeros included: never drawn), for the same generator state."""
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(16, 33, generator=g) * 2, -1)
    probs[:, 5] = 0.0
    fresh = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    want = top_k_top_p_sampling_from_logits(probs.log(), 7, 0.8, generator=fresh())
    assert torch.equal(top_k_top_p_sampling_from_probs(probs, 7, 0.8, generator=fresh()), want)
    want_p = top_k_top_p_sampling_from_logits(probs.log(), 0, 0.8, generator=fresh())
    got_p = top_p_sampling_from_probs(probs, 0.8, generator=fresh())
    assert torch.equal(got_p, want_p) and (got_p != 5).all()


def test_flashinfer_errors():
    """joint filter order, NaN with check_nan, out-of-range or float indices raise ValueError."""
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="top_k_first"):
        top_k_top_p_sampling_from_logits(x, 3, 0.9, filter_apply_order="joint")
    with pytest.raises(ValueError, match=r"indices must be in \[0, 3\)"):
        top_k_top_p_sampling_from_logits(x, 3, 0.9, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer"):
        top_k_top_p_sampling_from_logits(x, 3, 0.9, torch.tensor([0.0]))
    x[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        top_k_top_p_sampling_from_logits(x, 3, 0.9, check_nan=True)
    assert top_k_top_p_sampling_from_logits(x, 3, 0.9, seed=0).tolist()[1] == -1  # unchecked: reported as -1


# -- transformers adapter ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama():
    """A random LlamaForCausalLM (GQA 4:2, V 97) with weights spread so its logits are peaked."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=97, max_position_embeddings=128, eos_token_id=2,
                                   bos_token_id=1, pad_token_id=0)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.3)
    return model


PARAMS = dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02)


@torch.no_grad()
def test_hf_generate_applies_exactly_ctrlsafe_processing(tiny_llama):
    """model.generate(**generate_kwargs(...)): each step's scores are processed_logprobs of that
    step's raw logits (transformers' own warpers, including a model generation_config's, stay
    off) and every generated token lies in ctrlsafe's kept set."""
    from ctrlsafe.hf_sampling import generate_kwargs

    tiny_llama.generation_config.top_k = 50  # a model default that would otherwise apply
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, pad_token_id=0,
                              eos_token_id=None, output_scores=True, output_logits=True, return_dict_in_generate=True,
                              **generate_kwargs(**PARAMS))
    new = out.sequences[:, ids.shape[1]:]
    for t, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        want = processed_logprobs(logits, **PARAMS)
        assert torch.equal(scores, want)
        assert torch.isfinite(want.gather(1, new[:, t : t + 1])).all()


@torch.no_grad()
def test_hf_processor_at_temperature_zero_is_greedy(tiny_llama):
    """CtrlsafeLogitsProcessor(temperature=0) under do_sample=True leaves only the argmax: the
    sequences equal transformers' greedy generate (do_sample=False)."""
    from ctrlsafe.hf_sampling import generate_kwargs

    ids = torch.tensor([[3, 14, 15, 92, 65], [35, 89, 79, 32, 38]])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    greedy = tiny_llama.generate(ids, do_sample=False, **kw)
    assert torch.equal(tiny_llama.generate(ids, **kw, **generate_kwargs(temperature=0.0, top_k=5)), greedy)


@torch.no_grad()
def test_hf_draws_follow_ctrlsafe_distribution(tiny_llama):
    """4000 one-token HF draws with the processor (torch's RNG) and 4000 ctrlsafe sample() draws
    (counter RNG) from the same logits both follow q = exp(processed_logprobs): chi-square over
    the kept tokens below the 1 - 1e-6 quantile, and no draw outside the kept set."""
    from ctrlsafe.hf_sampling import generate_kwargs

    N = 4000
    ids = torch.tensor([[7, 21, 33]])
    logits = tiny_llama(ids).logits[:, -1].float()
    q = processed_logprobs(logits, **PARAMS)[0].double().exp()
    kept = (q > 0).nonzero().flatten()
    assert 3 <= len(kept) < 97
    torch.manual_seed(0)
    hf = tiny_llama.generate(ids.expand(N, -1), attention_mask=torch.ones(N, 3, dtype=torch.long), max_new_tokens=1,
                             pad_token_id=0, eos_token_id=None, **generate_kwargs(**PARAMS))[:, -1]
    ours = sample(logits.expand(N, -1), **PARAMS, seed=torch.arange(N)).tokens
    for draws in (hf, ours):
        counts = torch.bincount(draws, minlength=97).double()
        assert counts[q == 0].sum() == 0
        expected = q[kept] * N
        big = expected >= 5
        obs = torch.cat([counts[kept][big], counts[kept][~big].sum().reshape(1)])
        exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
        if exp[-1] < 5:
            obs, exp = obs[:-1], exp[:-1]
        stat = float(((obs - exp) ** 2 / exp).sum())
        assert stat < chi2_quantile(len(exp) - 1, 4.753), stat


def test_hf_processor_validates_parameters():
    """Invalid numbers fail when the processor is built, naming the parameter."""
    from ctrlsafe.hf_sampling import CtrlsafeLogitsProcessor

    with pytest.raises(ValueError, match="top_p = 0.0"):
        CtrlsafeLogitsProcessor(top_p=0.0)


def _no_cache_rows(model, prompts, seeds, max_new, eos, penalty, params):
    """Each row alone, full forward each step: repetition penalty, then ctrlsafe's sample with the
    row's seed at step t; stops after an EOS id."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rows = []
    for prompt, seed in zip(prompts, seeds.tolist()):
        seq = list(prompt)
        for t in range(max_new):
            ids = torch.tensor([seq])
            logits = RepetitionPenaltyLogitsProcessor(penalty)(ids, model(ids).logits[:, -1].float())
            tok = int(sample(logits, **params, seed=torch.tensor([seed]), step=t).tokens[0])
            seq.append(tok)
            if tok in eos:
                break
        rows.append(seq[len(prompt):])
    return rows


@torch.no_grad()
def test_custom_generate_equals_a_no_cache_ctrlsafe_loop(tiny_llama):
    """model.generate(..., custom_generate=ctrlsafe_generate, ctrlsafe_seed=[B]): with left-padded
    prompts of different lengths, a repetition penalty (a non-warper processor, applied first)
    and EOS ids that end rows early (then padded), every row equals a plain loop that samples it
    alone with ctrlsafe from the same seed; a row's tokens do not depend on its batch."""
    from ctrlsafe.hf_sampling import ctrlsafe_generate

    prompts = [[5, 6, 7, 8, 9, 10], [40, 41], [70, 71, 72, 73]]
    seeds = torch.tensor([101, 202, 303])
    eos, max_new, penalty = [3, 11, 12, 13, 14, 15, 16, 17], 10, 1.3
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(do_sample=True, max_new_tokens=max_new, pad_token_id=0, eos_token_id=eos, repetition_penalty=penalty,
              custom_generate=ctrlsafe_generate, **PARAMS)
    out = tiny_llama.generate(ids, attention_mask=mask, ctrlsafe_seed=seeds, **kw)[:, L:].tolist()
    want = _no_cache_rows(tiny_llama, prompts, seeds, max_new, eos, penalty, PARAMS)
    ended = 0
    for got, ref in zip(out, want):
        assert got[: len(ref)] == ref and all(t == 0 for t in got[len(ref):])
        ended += ref[-1] in eos
    assert ended >= 2 and any(len(ref) < len(out[0]) for ref in want)  # early EOS, then padding
    alone = tiny_llama.generate(torch.tensor([prompts[2]]), ctrlsafe_seed=seeds[2:], **kw)[0, len(prompts[2]):].tolist()
    assert alone == want[2]


@torch.no_grad()
def test_custom_generate_greedy_scores_and_seeds(tiny_llama):
    """do_sample=False through ctrlsafe_generate equals transformers' greedy generate;
    return_dict_in_generate gives scores = processed_logprobs of the raw logits; an int
    ctrlsafe_seed reproduces its draws; typical_p (not implemented) raises ValueError."""
    from ctrlsafe.hf_sampling import ctrlsafe_generate

    ids = torch.tensor([[3, 14, 15, 92, 65], [35, 89, 79, 32, 38]])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=7, pad_token_id=0, eos_token_id=None)
    assert torch.equal(tiny_llama.generate(ids, do_sample=False, custom_generate=ctrlsafe_generate, **kw),
                       tiny_llama.generate(ids, do_sample=False, **kw))
    run = lambda seed: tiny_llama.generate(ids, do_sample=True, custom_generate=ctrlsafe_generate, ctrlsafe_seed=seed,  # noqa: E731
                                           output_scores=True, output_logits=True, return_dict_in_generate=True, **kw, **PARAMS)
    a, b = run(9), run(9)
    assert torch.equal(a.sequences, b.sequences) and len(a.scores) == len(a.logits) == 7
    for t, (scores, logits) in enumerate(zip(a.scores, a.logits)):
        assert torch.equal(scores, processed_logprobs(logits, **PARAMS))
        assert torch.isfinite(scores.gather(1, a.sequences[:, 5 + t, None])).all()
    with pytest.raises(ValueError, match="TypicalLogitsWarper"):
        tiny_llama.generate(ids, do_sample=True, typical_p=0.5, custom_generate=ctrlsafe_generate, **kw)
