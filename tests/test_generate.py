"""ctrlsafe.generate.Engine against transformers' greedy generate, a no-cache reference loop,
stories260k's published outputs, and itself under different batchings."""
import json

import pytest
import torch

from conftest import HostReads
from ctrlsafe.controls import ControlSpec
from ctrlsafe.generate import Completion, Engine, SamplingParams, kv_token_budget, row_seed
from ctrlsafe.kv_cache import PrefixCache
from ctrlsafe.model import ModelArgs, Transformer
from ctrlsafe.sampling import sample

HF_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=97)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=64, intermediate_size=80, num_attention_heads=4, num_key_value_heads=1, head_dim=24, num_hidden_layers=2, vocab_size=89, tie_word_embeddings=True)),
}
SAMPLING = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02)


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def hf_pair(request, tmp_path_factory):
    """(transformers model, our Transformer) with the same random weights, fp32."""
    import transformers

    cfg_cls, model_cls, kw = HF_CONFIGS[request.param]
    cfg = getattr(transformers, cfg_cls)(max_position_embeddings=128, eos_token_id=2, bos_token_id=1, pad_token_id=0, **kw)
    torch.manual_seed(3)
    hf = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # spread the logits so greedy choices are far from ties
        for n, p in hf.named_parameters():
            p.normal_(0, 0.02 if n.endswith("bias") else 0.3)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, Transformer.from_pretrained(path)


@pytest.fixture(scope="module")
def model():
    """A random Llama (GQA 4:2, context 128) with weights spread wide enough that sampling sees
    peaked and flat distributions alike."""
    torch.manual_seed(5)
    args = ModelArgs(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=96, head_dim=12, max_position_embeddings=128)
    m = Transformer(args).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def random_prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def reference_rows(model, prompts, suffixes, n, sampling, max_new, min_new, eos, seed=0, keys=None):
    """Every row alone, no cache, no sharing: full forward over the whole sequence each step.
    Per row: (tokens, sampler logprobs, finish reason, the model's log_softmax logprobs)."""
    out = {}
    for i, p in enumerate(prompts):
        for c, s in enumerate(suffixes):
            for j in range(n):
                rs = row_seed(seed, i if keys is None else keys[i], c, j)
                seq, toks, lps, raws, reason = list(p) + list(s), [], [], [], "length"
                for t in range(max_new):
                    logits = model(torch.tensor([seq]))[:, -1]
                    raw = torch.log_softmax(logits.double(), -1)[0]
                    if t < min_new:
                        logits[:, eos] = float("-inf")
                    o = sample(logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                               min_p=sampling.min_p, seed=torch.tensor([rs]), step=t)
                    tok = int(o.tokens[0])
                    if tok in eos:
                        reason = "eos"
                        break
                    toks.append(tok)
                    lps.append(float(o.logprobs[0]))
                    raws.append(float(raw[tok]))
                    seq.append(tok)
                out[i, c, j] = (toks, lps, reason, raws)
    return out


def key(c: Completion):
    return (c.prompt_index, c.control_index, c.sample_index, tuple(c.token_ids), c.finish_reason)


# -- exactness ---------------------------------------------------------------------------------
@torch.no_grad()
def test_greedy_equals_transformers_generate(hf_pair):
    """Temperature 0: every (prompt, control) row equals transformers' generate(do_sample=False)
    on that prompt + control alone (Llama GQA and Qwen2 qkv-bias/tied; prompt lengths 1..40 in
    one batch; control suffixes of 0, 1 and 3 tokens; EOS id 2 as in the config)."""
    hf, ours = hf_pair
    V = ours.args.vocab_size
    prompts = random_prompts(V, [3, 40, 1, 11])
    suffixes = [[5, 6, 7], [], [9]]
    engine = Engine(ours, eos_token_ids=[2])
    outs = engine.generate(prompts, suffixes, n=2, sampling=SamplingParams(temperature=0.0), max_new_tokens=12)
    assert [(c.prompt_index, c.control_index, c.sample_index) for c in outs] == [(i, c, j) for i in range(4) for c in range(3) for j in range(2)]
    for c in outs:
        ids = torch.tensor([prompts[c.prompt_index] + suffixes[c.control_index]])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12, pad_token_id=0)[0, ids.shape[1]:].tolist()
        got = c.token_ids + ([2] if c.finish_reason == "eos" else [])
        assert got == ref, (c.prompt_index, c.control_index)
        assert c.finish_reason == ("eos" if ref[-1] == 2 else "length")
        assert c.control == suffixes[c.control_index] and c.text is None


@torch.no_grad()
def test_sampling_equals_no_cache_reference_loop(model):
    """With sampling (temperature, top-k, top-p, min-p), every row's tokens equal a plain loop that
    recomputes the row alone with no cache from the same row seed; logprobs agree; EOS from a list
    of ids retires rows mid-batch (exercising compaction) and is suppressed before min_new_tokens.
    raw_logprobs are the model's own log_softmax at each token, unaffected by that suppression."""
    prompts = random_prompts(97, [2, 23, 9])
    suffixes = [[4, 5], [], [8, 9, 10]]
    eos = [3, 11, 12, 13, 14, 15]
    engine = Engine(model, eos_token_ids=eos)
    outs = engine.generate(prompts, suffixes, n=3, sampling=SAMPLING, max_new_tokens=14, min_new_tokens=2, seed=7,
                           raw_logprobs=True)
    ref = reference_rows(model, prompts, suffixes, 3, SAMPLING, 14, 2, eos, seed=7)
    reasons = set()
    for c in outs:
        toks, lps, reason, raws = ref[c.prompt_index, c.control_index, c.sample_index]
        assert torch.allclose(torch.tensor(c.raw_logprobs, dtype=torch.float64), torch.tensor(raws, dtype=torch.float64), atol=1e-4)
        assert c.token_ids == toks, (c.prompt_index, c.control_index, c.sample_index)
        assert c.finish_reason == reason
        assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(lps), atol=1e-4)
        assert c.seed == row_seed(7, c.prompt_index, c.control_index, c.sample_index)
        assert len(c.token_ids) >= 2
        reasons.add(reason)
    assert reasons == {"eos", "length"}  # the test must see both kinds of retirement


def test_stories260k_golden_greedy(stories260k):
    """The real stories260k checkpoint: greedy rows of the three golden prompts, run in one batch,
    reproduce golden.json's continuations; from BOS alone it reproduces Karpathy's published
    256-token sample and stops on BOS (id 1) from generation_config's EOS list [2, 1]."""
    from transformers import AutoTokenizer

    golden = json.loads((stories260k / "golden.json").read_text())
    tok = AutoTokenizer.from_pretrained(stories260k)
    engine = Engine(Transformer.from_pretrained(stories260k), tok)
    assert engine.eos_token_ids == [2, 1]
    prompts = [p["input_ids"] for p in golden["prompts"]]
    outs = engine.generate(prompts, sampling=SamplingParams(temperature=0.0), max_new_tokens=48)
    for c, p in zip(outs, golden["prompts"]):
        assert c.token_ids[: len(p["output_ids"])] == p["output_ids"]
        assert c.control is None and c.control_index == 0
    [c] = engine.generate([[1]], sampling=SamplingParams(temperature=0.0), max_new_tokens=400)
    bos = golden["greedy_from_bos"]
    assert c.token_ids[:256] == bos["output_ids"]
    assert (c.finish_reason, c.eos_token_id, len(c.token_ids)) == ("eos", 1, 345)
    assert c.text.startswith(bos["text"])


def test_stop_strings(stories260k):
    """Stop strings are found in the decoded text as it grows: the text ends right before the
    first stop string hit, token_ids end with the token that completed it, and the earliest of
    several stop strings wins."""
    from transformers import AutoTokenizer

    golden = json.loads((stories260k / "golden.json").read_text())["prompts"][0]
    tok = AutoTokenizer.from_pretrained(stories260k)
    engine = Engine(Transformer.from_pretrained(stories260k), tok)
    greedy = SamplingParams(temperature=0.0)
    full = tok.decode(golden["output_ids"], skip_special_tokens=True)  # ", there was a little girl named Lily. ..."
    for stop, word in ((["Lily"], "Lily"), (["park", "girl"], "girl")):
        [c] = engine.generate(["Once upon a time"], stop=stop, sampling=greedy, max_new_tokens=48)
        assert c.finish_reason == "stop"
        assert c.text == full[: full.index(word)]
        assert c.token_ids == golden["output_ids"][: len(c.token_ids)]
        assert word in tok.decode(c.token_ids) and word not in tok.decode(c.token_ids[:-1])
        assert len(c.logprobs) == len(c.token_ids)


# -- batching ----------------------------------------------------------------------------------
@torch.no_grad()
def test_batch_invariance(model):
    """The same request gives identical completions whatever max_rows / max_batch_tokens split it
    into waves or refills, and with prompt_keys the prompts' order and grouping do not matter either."""
    prompts = random_prompts(97, [5, 30, 1, 12, 7])
    suffixes = [[4], [6, 7]]
    kw = dict(n=3, sampling=SAMPLING, max_new_tokens=10, seed=3)
    eos = [3, 11, 12, 13]
    base = Engine(model, eos_token_ids=eos).generate(prompts, suffixes, **kw)
    for engine in (Engine(model, eos_token_ids=eos, max_rows=4), Engine(model, eos_token_ids=eos, max_batch_tokens=80),
                   Engine(model, eos_token_ids=eos, max_rows=4, refill=True)):
        seen = []
        got = engine.generate(prompts, suffixes, progress=seen.append, **kw)
        assert [key(c) for c in got] == [key(c) for c in base]
        assert all(torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5) for a, b in zip(got, base))
        assert seen == sorted(seen) and seen[-1] == len(base)
    order = [3, 0, 4, 2, 1]
    shuffled = Engine(model, eos_token_ids=eos, max_rows=7).generate([prompts[i] for i in order], suffixes, prompt_keys=order, **kw)
    for c in shuffled:
        c.prompt_index = order[c.prompt_index]
    assert sorted(key(c) for c in shuffled) == [key(c) for c in base]


@torch.no_grad()
def test_prefix_stored_once_per_prompt(model, monkeypatch):
    """Each prompt's KV is stored once however many controls and samples share it: the prefix
    storage is layers x K,V x prompts x Hkv x longest prompt x D, and only the per-row suffix
    storage grows with controls x n."""
    sizes = []  # at creation: the store shrinks as rows retire
    original = PrefixCache.from_prompts.__func__

    def spy(cls, *args, **kwargs):
        cache = original(cls, *args, **kwargs)
        sizes.append(cache.storage_bytes())
        return cache

    monkeypatch.setattr(PrefixCache, "from_prompts", classmethod(spy))
    prompts = random_prompts(97, [6, 19])
    engine = Engine(model, eos_token_ids=[])
    engine.generate(prompts, [[4]], n=1, max_new_tokens=3)
    engine.generate(prompts, [[4], [5], [6, 7]], n=8, max_new_tokens=3)
    a, b = sizes
    per_token = model.args.num_hidden_layers * 2 * model.args.num_key_value_heads * model.args.head_dim * 4  # K,V fp32
    assert a["prefix"] == b["prefix"] == per_token * 2 * 19  # 2 prompts x longest prompt
    assert a["rows"] == per_token * 2 * (1 + 3)  # rows x (longest suffix + max_new_tokens)
    assert b["rows"] == per_token * (2 * 3 * 8) * (2 + 3)


def test_level_dicts_grid_and_single_control(tiny_preset):
    """Chat-message prompts with level-dict controls render as [chat prompt][control tokens]:
    greedy rows equal the no-cache loop on spec.render(prompt, levels); the 'grid' gives one row per
    cell in grid order; a single control with n=1 and max_new_tokens=1 returns one token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_preset.policy)
    model = Transformer.from_pretrained(tiny_preset.policy)
    spec = ControlSpec(levels=3)
    spec.add_to(tok, model)
    engine = Engine(model, tok, spec)
    prompts = ["How do I bake bread?", [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a joke."}]]
    levels = [{"helpful": 2, "harmless": 0}, {"helpful": 0, "harmless": 1}]
    greedy = SamplingParams(temperature=0.0)
    with torch.no_grad():
        outs = engine.generate(prompts, levels, sampling=greedy, max_new_tokens=6)
        ref = {}
        for i, p in enumerate(prompts):
            for c, lv in enumerate(levels):
                rendered = spec.render(p, lv, tok)
                ref.update({(i, c, 0): reference_rows(model, [rendered], [[]], 1, greedy, 6, 0, engine.eos_token_ids)[0, 0, 0]})
        for c in outs:
            assert c.token_ids == ref[c.prompt_index, c.control_index, 0][0]
            assert c.control == levels[c.control_index]
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        grid = engine.generate(prompts[:1], "grid", sampling=greedy, max_new_tokens=1)
        assert [c.control for c in grid] == spec.grid() and len(grid) == 9
        [one] = engine.generate(prompts[:1], levels[:1], max_new_tokens=1)
        assert len(one.token_ids) + (one.finish_reason == "eos") == 1


# -- limits and errors -------------------------------------------------------------------------
@torch.no_grad()
def test_long_prompts_error_or_truncate_left(model):
    """A prompt longer than context - suffix - max_new_tokens is an error naming its index, or with
    truncate='left' runs on its last tokens (same output as passing those tokens)."""
    prompts = random_prompts(97, [4, 125])
    engine = Engine(model, eos_token_ids=[])
    with pytest.raises(ValueError, match=r"prompt 1 has 125 tokens.*leaves 117"):
        engine.generate(prompts, [[5, 6]], max_new_tokens=9)
    got = engine.generate(prompts, [[5, 6]], max_new_tokens=9, truncate="left", sampling=SAMPLING)
    want = engine.generate([prompts[0], prompts[1][-117:]], [[5, 6]], max_new_tokens=9, sampling=SAMPLING)
    assert [key(c) for c in got] == [key(c) for c in want]


@pytest.mark.parametrize("call, message", [
    (lambda e: e.generate([[3, 4], []]), "prompt 1 is empty"),
    (lambda e: e.generate(["   "]), "prompt 0 is text; a tokenizer is needed"),
    (lambda e: e.generate([[3, 400]]), r"prompt 0: token ids must be in 0\.\.96"),
    (lambda e: e.generate([[3]], [{"helpful": 1}]), "control 0 is a level dict"),
    (lambda e: e.generate([[3]], "grid"), "needs a control_spec"),
    (lambda e: e.generate([[3]], [[5], "x"]), "control 1 = 'x'"),
    (lambda e: e.generate([[3]], stop="\n"), "stop strings need a tokenizer"),
    (lambda e: e.generate([[3]], n=0), "n must be an integer >= 1"),
    (lambda e: e.generate([[3]], max_new_tokens=0), "max_new_tokens must be"),
    (lambda e: e.generate([[3]], min_new_tokens=9, max_new_tokens=4), "min_new_tokens must be in 0..max_new_tokens"),
    (lambda e: e.generate([[3]], prompt_keys=[1, 2]), "prompt_keys must hold one integer per prompt"),
    (lambda e: e.generate([[3]], truncate="right"), "truncate must be None or 'left'"),
    (lambda e: e.generate("hello"), "prompts must be a non-empty list"),
])
def test_bad_requests_raise_clear_errors(model, call, message):
    """Bad requests fail up front with a message naming the prompt, control or argument."""
    with pytest.raises(ValueError, match=message):
        call(Engine(model, eos_token_ids=[]))


def test_empty_text_prompt_names_index(tiny_preset):
    """An empty text prompt is an error naming its index (with a tokenizer)."""
    from transformers import AutoTokenizer

    engine = Engine(Transformer.from_pretrained(tiny_preset.policy), AutoTokenizer.from_pretrained(tiny_preset.policy))
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        engine.generate(["fine", " "])


# -- host syncs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["fused", "reference"])
def test_sync_every_does_not_change_results(model, monkeypatch, attention):
    """Checking the batch state only every 5 steps (finished rows decode on, their extra tokens
    dropped; compaction later) gives the same tokens, logprobs, raw logprobs, finish reasons, EOS
    ids and final progress count as checking every step, on the fused and the torch attention path
    (logprobs to float rounding: rows are compacted at other steps, so matmuls see other batches)."""
    if attention == "reference":
        monkeypatch.setattr(PrefixCache, "backend", "reference")
    prompts = random_prompts(97, [2, 23, 9, 4])
    suffixes = [[4, 5], [], [8]]
    eos = [3, 11, 12, 13, 14, 15]
    kw = dict(n=3, sampling=SAMPLING, max_new_tokens=17, min_new_tokens=1, seed=11, raw_logprobs=True)
    runs = []
    for every in (1, 5):
        seen = []
        outs = Engine(model, eos_token_ids=eos, sync_every=every).generate(prompts, suffixes, progress=seen.append, **kw)
        runs.append((outs, seen))
    (a, seen_a), (b, seen_b) = runs
    assert {c.finish_reason for c in a} == {"eos", "length"}  # rows retire mid-batch
    assert [key(c) + (c.eos_token_id,) for c in a] == [key(c) + (c.eos_token_id,) for c in b]
    for x, y in zip(a, b):
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5)
        assert torch.allclose(torch.tensor(x.raw_logprobs), torch.tensor(y.raw_logprobs), atol=1e-5)
    assert seen_a[-1] == seen_b[-1] == len(a) and seen_b == sorted(seen_b)
    assert len(seen_b) < len(seen_a)  # fewer looks: progress is reported in bigger steps


def test_decode_reads_back_once_per_check(model, monkeypatch):
    """On the torch attention path (the one CUDA runs), the decode loop reads the device only at
    its checks: 32 more steps with sync_every=8 cost at most 4 checks' worth of reads, where a
    check is at most 3 reads (non-finite flag, rows alive, and a compaction's index)."""
    monkeypatch.setattr(PrefixCache, "backend", "reference")
    prompts = random_prompts(97, [5, 9])
    counts = []
    for new in (17, 49):
        engine = Engine(model, eos_token_ids=[], sync_every=8)
        with HostReads() as reads:
            engine.generate(prompts, [[4], [6, 7]], n=2, sampling=SAMPLING, max_new_tokens=new, seed=1)
        counts.append(reads.count)
    assert counts[1] - counts[0] <= 4 * 3, counts


def test_non_finite_logits_are_reported_at_the_next_check(model):
    """A NaN in one row's logits mid-decode is still an error naming that row and the token at
    which it happened, though the host only looks every 4 steps."""
    engine = Engine(model, eos_token_ids=[], sync_every=4)
    forward, calls = engine._forward, []

    def poisoned(tokens, positions, cache):
        logits = forward(tokens, positions, cache)
        calls.append(1)
        if len(calls) == 3:  # the third decode forward gives the logits of token 3
            logits[1] = float("nan")
        return logits

    engine._forward = poisoned
    with pytest.raises(RuntimeError, match="non-finite logits for prompt 0, control 0, sample 1 at token 3"):
        engine.generate([[5, 6, 7]], n=3, sampling=SAMPLING, max_new_tokens=12, seed=2)
    assert len(calls) == 3  # found at the check after step 3, before more decoding


def test_sync_every_must_be_a_positive_integer(model):
    with pytest.raises(ValueError, match="sync_every must be an integer >= 1"):
        Engine(model, sync_every=0)


def test_kv_token_budget_fills_half_the_free_memory(model):
    """The CUDA default wave size: K/V of every layer for that many tokens is half the free
    memory, by dtype (SmolLM2-135M in bf16 on an 80 GB card: ~1.7M tokens, not CPU's 16384)."""
    a = model.args
    per_token = a.num_hidden_layers * 2 * a.num_key_value_heads * a.head_dim
    assert kv_token_budget(a, torch.float32, 10**9) == (10**9 // 2) // (per_token * 4)
    assert kv_token_budget(a, torch.bfloat16, 10**9) == (10**9 // 2) // (per_token * 2)
    smol = ModelArgs(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, head_dim=64)
    assert 1_700_000 < kv_token_budget(smol, torch.bfloat16, 80 * 10**9) < 1_800_000
    assert Engine(model).max_batch_tokens == 16384  # the CPU default


def test_cuda_graphs_need_a_cuda_model(model):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA model"):
        Engine(model, cuda_graphs=True)


@pytest.mark.cuda
def test_cuda_graphs_equal_eager_decode(model):
    """The captured decode (recaptured at each compaction as EOS retires rows) gives the eager
    engine's tokens and logprobs, bf16 weights."""
    gpu = Transformer(model.args).to("cuda", torch.bfloat16).eval()
    gpu.load_state_dict(model.state_dict())
    prompts = random_prompts(97, [2, 23, 9])
    kw = dict(n=4, sampling=SAMPLING, max_new_tokens=20, seed=5)
    eos = [3, 11, 12, 13, 14, 15]
    eager = Engine(gpu, eos_token_ids=eos).generate(prompts, [[4, 5], [], [8]], **kw)
    graphed = Engine(gpu, eos_token_ids=eos, cuda_graphs=True).generate(prompts, [[4, 5], [], [8]], **kw)
    assert {c.finish_reason for c in eager} == {"eos", "length"}
    assert [key(c) for c in graphed] == [key(c) for c in eager]
    assert all(torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-3) for a, b in zip(graphed, eager))


@torch.no_grad()
def test_refill_admits_waiting_rows_into_freed_slots(model, monkeypatch):
    """With room for 5 rows and 27 to run, rows finishing at EOS free slots that waiting rows
    (of the same and of new prompts) take mid-decode: the batch never exceeds 5, new rows join
    a running batch more than once, and every row still equals the no-cache reference loop."""
    joins, sizes = [], []
    admit, forward = Engine._admit, Engine._forward_rows

    def spy_admit(self, req, cache, store, batch, rows, step):
        joins.append((batch is not None, len(rows)))
        return admit(self, req, cache, store, batch, rows, step)

    def spy_forward(self, cache, tok, positions, graph):
        sizes.append(tok.shape[0])
        return forward(self, cache, tok, positions, graph)

    monkeypatch.setattr(Engine, "_admit", spy_admit)
    monkeypatch.setattr(Engine, "_forward_rows", spy_forward)
    prompts = random_prompts(97, [2, 23, 9])
    suffixes = [[4, 5], [], [8, 9, 10]]
    eos = [3, 11, 12, 13, 14, 15, 16, 17]
    outs = Engine(model, eos_token_ids=eos, max_rows=5, refill=True).generate(prompts, suffixes, n=3, sampling=SAMPLING,
                                                                               max_new_tokens=12, seed=7)
    ref = reference_rows(model, prompts, suffixes, 3, SAMPLING, 12, 0, eos, seed=7)
    for c in outs:
        toks, lps, reason, _ = ref[c.prompt_index, c.control_index, c.sample_index]
        assert (c.token_ids, c.finish_reason) == (toks, reason), (c.prompt_index, c.control_index, c.sample_index)
        assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(lps), atol=1e-4)
    assert len(outs) == 27 and max(sizes) <= 5
    assert sum(into_running for into_running, _ in joins) >= 2, joins
