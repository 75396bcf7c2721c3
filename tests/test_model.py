"""ctrlsafe.model against transformers' own classes and the real stories260k checkpoint."""
import json

import pytest
import torch

from ctrlsafe.model import KVCache, Transformer, attention

CONFIGS = {
    # GQA 4:2, untied, odd sizes
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=48, intermediate_size=100, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=97)),
    # attention bias on q,k,v,o + Llama-3 rope scaling + tied embeddings
    "llama3-bias-tied": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, vocab_size=101, attention_bias=True, tie_word_embeddings=True, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2, vocab_size=131, sliding_window=None)),
    # qkv bias, tied embeddings, head_dim != hidden/heads
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=64, intermediate_size=80, num_attention_heads=4, num_key_value_heads=1, head_dim=24, num_hidden_layers=3, vocab_size=89, tie_word_embeddings=True)),
}


def hf_model(name, tmp_path):
    import transformers

    cfg_cls, model_cls, kw = CONFIGS[name]
    cfg = getattr(transformers, cfg_cls)(max_position_embeddings=256, **kw)
    torch.manual_seed(1)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # biases start at zero; make them matter
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / name)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    """Loading an HF checkpoint gives the logits of transformers' own implementation (fp32, 1e-4)."""
    ref = hf_model(name, tmp_path)
    ours = Transformer.from_pretrained(tmp_path / name)
    ids = torch.randint(0, ref.config.vocab_size, (2, 37))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2"])
def test_save_roundtrip_loads_in_transformers(name, tmp_path):
    """save_pretrained writes a directory AutoModelForCausalLM loads with identical logits."""
    from transformers import AutoModelForCausalLM

    hf_model(name, tmp_path)
    ours = Transformer.from_pretrained(tmp_path / name)
    ours.save_pretrained(tmp_path / "saved")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(0, ours.args.vocab_size, (1, 19))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, back(ids).logits)
        assert (back(ids).logits - ours(ids)).abs().max() <= 1e-5


def test_kv_cache_decoding_matches_full_forward(tmp_path):
    """Prefill (causal, no mask), a later 3-token block (the masked path) and one-token steps
    (no mask) through KVCache give the logits of one full forward pass."""
    hf_model("llama-gqa", tmp_path)
    model = Transformer.from_pretrained(tmp_path / "llama-gqa")
    ids = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.args, 3, 16)
        steps = [model(ids[:, :5], torch.arange(5).expand(3, 5), cache)]
        steps.append(model(ids[:, 5:8], torch.arange(5, 8).expand(3, 3), cache))
        for t in range(8, 12):
            steps.append(model(ids[:, t : t + 1], torch.full((3, 1), t), cache))
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2"])
def test_keep_computes_one_position_per_row(name, tmp_path):
    """hidden_states(keep=idx) (the last layer run only where it is read) gives the full pass's
    hidden state at idx for every row, including positions 0 and T-1, with and without a cache."""
    hf_model(name, tmp_path)
    model = Transformer.from_pretrained(tmp_path / name)
    ids = torch.randint(0, model.args.vocab_size, (4, 13))
    keep = torch.tensor([0, 12, 5, 12])
    with torch.no_grad():
        full = model.hidden_states(ids)
        kept = model.hidden_states(ids, keep=keep)
        cached = model.hidden_states(ids, torch.arange(13).expand(4, 13), KVCache(model.args, 4, 16), keep=keep)
    assert kept.shape == (4, 1, model.args.hidden_size)
    torch.testing.assert_close(kept[:, 0], full[torch.arange(4), keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached[:, 0], full[torch.arange(4), keep], rtol=1e-5, atol=1e-5)


def greedy(model, ids, n, dtype=torch.float32):
    cache = KVCache(model.args, 1, len(ids) + n, dtype=dtype)
    x = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(x, pos, cache)[0, -1].argmax())
            out.append(tok)
            x, pos = torch.tensor([[tok]]), pos[:, -1:] + 1
    return out


def test_stories260k_golden_greedy(stories260k):
    """Our model + KV cache reproduces Karpathy's published greedy sample and the golden prompts."""
    golden = json.loads((stories260k / "golden.json").read_text())
    model = Transformer.from_pretrained(stories260k)
    g = golden["greedy_from_bos"]
    assert greedy(model, g["input_ids"], g["max_new_tokens"]) == g["output_ids"]
    for p in golden["prompts"]:
        assert greedy(model, p["input_ids"], len(p["output_ids"])) == p["output_ids"]


def test_stories260k_logits(stories260k):
    """Last-position top-5 logits and logsumexp of 'Once upon a time' match the float64 port."""
    golden = json.loads((stories260k / "golden.json").read_text())
    model = Transformer.from_pretrained(stories260k)
    ref = golden["logits"]
    with torch.no_grad():
        logits = model(torch.tensor([ref["input_ids"]]))[0, -1]
    top = logits.topk(5)
    ids, values = zip(*ref["last_position_top5"])
    assert top.indices.tolist() == list(ids)
    # golden values are rounded to 5 decimals
    assert torch.allclose(top.values, torch.tensor(values), atol=1e-4)
    assert abs(float(logits.logsumexp(-1)) - ref["last_position_logsumexp"]) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_top1_agreement(stories260k, dtype):
    """bf16/fp16 forward runs and agrees with fp32 on the next token for most golden positions."""
    golden = json.loads((stories260k / "golden.json").read_text())
    ref = Transformer.from_pretrained(stories260k)
    low = Transformer.from_pretrained(stories260k, dtype=dtype)
    g = golden["greedy_from_bos"]
    ids = torch.tensor([g["input_ids"] + g["output_ids"]])
    with torch.no_grad():
        agree = (ref(ids).argmax(-1) == low(ids).argmax(-1)).float().mean()
    assert agree >= 0.95


def test_refuses_pickle_and_unknown_architecture(tmp_path):
    """.bin checkpoints and unsupported architectures get clear errors naming the problem."""
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        Transformer.from_pretrained(tmp_path)


def _attention_fp64(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return (s.masked_fill(~mask, float("-inf")).softmax(-1) @ v).float()


@pytest.mark.parametrize("t,s_len", [(1, 1), (1, 33), (7, 7), (7, 40), (33, 33)])
@pytest.mark.parametrize("expand_kv", [False, True])
def test_attention_helper_matches_reference(t, s_len, expand_kv):
    """attention() on GQA (9 query heads over 3 KV heads) equals fp64 softmax attention, with a
    padding+causal mask (K/V expanded or not: the CUDA and CPU routes), and causal=True from
    position 0 equals the explicit lower-triangular mask."""
    g = torch.Generator().manual_seed(t * 100 + s_len)
    q = torch.randn(2, 9, t, 16, generator=g)
    k, v = torch.randn(2, 3, s_len, 16, generator=g), torch.randn(2, 3, s_len, 16, generator=g)
    mask = torch.ones(t, s_len, dtype=torch.bool).tril(diagonal=s_len - t).expand(2, 1, t, s_len).clone()
    mask[1, ..., 0] = False  # row 1's first key is padding
    mask[1, ..., -1] = True  # keep every query row attending to something
    got = attention(q, k, v, mask, expand_kv=expand_kv)
    assert (got - _attention_fp64(q, k, v, mask)).abs().max() <= 1e-5
    if t == s_len:
        causal = torch.ones(t, t, dtype=torch.bool).tril().expand(2, 1, t, t)
        got = attention(q, k, v, causal=True, expand_kv=expand_kv)
        assert (got - _attention_fp64(q, k, v, causal)).abs().max() <= 1e-5
