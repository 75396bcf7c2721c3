"""One Llama-family decoder (Llama 2/3, Mistral, Qwen2) that loads and saves Hugging Face directories.

Module names follow the Hugging Face checkpoint layout (`embed_tokens`, `layers.N.self_attn.q_proj`,
...), so a safetensors state dict loads without a name map. Attention goes through a pluggable
cache object: `None` means plain causal attention over the given tokens; `KVCache` is the simple
static cache used for single-sequence decoding; the generation engine brings its own cache with a
shared prompt segment (see ctrlsafe/generate.py). The cache protocol is one method:

    cache.attend(layer: int, q, k, v, positions) -> out      # q [B,Hq,T,D], k/v [B,Hkv,T,D]
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
CLASSIFIER_ARCHITECTURES = {
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "MistralForSequenceClassification": "MistralForCausalLM",
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3 style {"rope_type": "llama3", "factor": ...}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # Llama attention_bias=True puts a bias on o_proj too
    mlp_bias: bool = False
    sliding_window: int | None = None
    architecture: str = "LlamaForCausalLM"
    hf_config: dict = field(default_factory=dict, repr=False)  # kept so save_pretrained round-trips

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        arch = CLASSIFIER_ARCHITECTURES.get(arch, arch)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: architecture {archs or cfg.get('model_type')!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (and their *ForSequenceClassification)"
            )
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{source}: rope_type {rope_type!r} is not supported; supported: default, llama3")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        n_heads = cfg["num_attention_heads"]
        is_qwen = arch == "Qwen2ForCausalLM"
        attn_bias = bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", not is_qwen) else None
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or n_heads,
            intermediate_size=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen or attn_bias,
            o_bias=attn_bias and not is_qwen,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=window,
            architecture=arch,
            hf_config=dict(cfg),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics, like the reference implementations, so bf16 runs stay close to fp32
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3 wavelength-dependent scaling when configured."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if s:
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotate_half pairing (j, j + d/2), the Hugging Face layout
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def attention(q, k, v, mask=None, *, causal=False, expand_kv: bool | None = None):
    """SDPA on [B,H,T,D] queries and [B,Hkv,S,D] keys/values (GQA when Hkv < H).

    Pass no mask where none is needed (decode, or causal from position 0). On CUDA only the
    flash kernel takes GQA, and it takes neither a mask nor fp32; anywhere else SDPA would fall
    back to the math backend and its full score matrix, so K/V are expanded to H heads for the
    memory-efficient kernel instead. expand_kv: None = that rule; CPU kernels take masked GQA
    in every dtype without a copy.
    """
    gqa = k.shape[1] != q.shape[1]
    if expand_kv is None:
        flash = mask is None and q.dtype in (torch.float16, torch.bfloat16)
        expand_kv = q.is_cuda and not flash
    if gqa and expand_kv:
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        h = args.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=args.o_bias)

    def forward(self, x, cos, sin, positions, cache, keep=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = attention(q, k, v, causal=True)
        else:
            out = cache.attend(self.layer, q, k, v, positions)
        if keep is not None:  # [B] one position per row: the rest of the layer runs on those alone
            out = out[torch.arange(b, device=x.device), :, keep][:, :, None]
        return self.o_proj(out.transpose(1, 2).reshape(b, out.shape[2], -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, i, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, positions, cache, keep=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, keep)
        x = (x if keep is None else x[torch.arange(x.shape[0], device=x.device), keep][:, None]) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # a plain attribute, not a buffer: RoPE frequencies stay fp32 when the weights go to bf16
        self.inv_freq = rope_frequencies(args)
        self.gradient_checkpointing = False

    # -- forward ------------------------------------------------------------------------------
    def hidden_states(self, input_ids, positions=None, cache=None, *, norm: bool = True, keep=None):
        """Final hidden states [B,T,H] (after the final RMSNorm unless norm=False).

        keep: [B] positions (indices into T) when only one hidden state per row is wanted (a
        score at the last token, the next-token logits of a prompt): the last layer then runs
        its output projection and MLP for those alone, and the result is [B,1,H].
        """
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        self._check_positions(positions)
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # [B,T,D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B,1,T,D]
        x = self.embed_tokens(input_ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer_keep = keep if i == last else None
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, positions, None, layer_keep, use_reentrant=False)
            else:
                x = layer(x, cos, sin, positions, cache, layer_keep)
        return self.norm(x) if norm else x

    def forward(self, input_ids, positions=None, cache=None):
        """Logits [B,T,V]."""
        return self.lm_head(self.hidden_states(input_ids, positions, cache))

    def _check_positions(self, positions):
        w = self.args.sliding_window
        if w is not None and positions.numel() and int(positions.max()) >= w:
            raise ValueError(
                f"sequence reaches position {int(positions.max())}, beyond this model's sliding_window={w}; "
                "sliding-window attention is not implemented"
            )

    # -- vocabulary ---------------------------------------------------------------------------
    def resize_vocab(self, new_size: int):
        """Grow the embedding (and untied LM head) to new_size rows; new rows are zero until a
        caller initialises them (ctrlsafe.controls.init_rows gives control tokens the mean row)."""
        old = self.args.vocab_size
        if new_size <= old:
            return

        def grown(w):
            return nn.Parameter(torch.cat([w.detach(), w.new_zeros(new_size - old, w.shape[1])]))

        self.embed_tokens.weight = grown(self.embed_tokens.weight)
        self.embed_tokens.num_embeddings = new_size
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head.weight = grown(self.lm_head.weight)
        self.lm_head.out_features = new_size
        self.args.vocab_size = new_size
        self.args.hf_config["vocab_size"] = new_size

    # -- checkpoints --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        path = Path(path)
        cfg = read_config(path)
        args = ModelArgs.from_hf_config(cfg, str(path / "config.json"))
        with torch.device("meta"):
            model = cls(args)
        state = load_safetensors_dir(path)
        state = {k.removeprefix("model."): v for k, v in state.items()}
        if args.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        # *ForSequenceClassification checkpoints carry a `score` head (read by ctrlsafe.reward), no LM head
        headless = not args.tie_word_embeddings and (cfg.get("architectures") or [None])[0] in CLASSIFIER_ARCHITECTURES
        if headless:
            model.lm_head = None
        expected = {k for k in model.state_dict() if not (args.tie_word_embeddings and k == "lm_head.weight")}
        missing = expected - state.keys()
        if missing:
            raise ValueError(f"{path}: checkpoint lacks weights {sorted(missing)[:5]} (of {len(missing)} missing)")
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
        if args.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_frequencies(args)  # built on the meta device above
        model.source_path = str(path)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path, *, extra_tensors: dict | None = None, config_overrides: dict | None = None):
        """Write config.json + model.safetensors that transformers' Auto classes load back."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {f"model.{k}": v for k, v in self.state_dict().items() if not k.startswith("lm_head")}
        if not self.args.tie_word_embeddings and self.lm_head is not None:  # reward backbones have no LM head
            state["lm_head.weight"] = self.lm_head.weight
        state.update(extra_tensors or {})
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(self.args.hf_config)
        cfg.setdefault("architectures", [self.args.architecture])
        cfg["vocab_size"] = self.args.vocab_size
        cfg["torch_dtype"] = cfg["dtype"] = str(self.embed_tokens.weight.dtype).removeprefix("torch.")
        cfg.update(config_overrides or {})
        (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


class KVCache:
    """Static per-row KV cache [B, Hkv, max_len, D] for plain batched decoding (no shared prefix).

    Rows are right-aligned in time: every row writes at the positions it is given, so a batch of
    equal-length sequences (the common case in tests and single-prompt decoding) needs no mask.
    """

    def __init__(self, args: ModelArgs, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (batch, args.num_key_value_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.length = 0

    def attend(self, layer, q, k, v, positions):
        t = q.shape[2]
        start = int(positions[0, 0])
        if start + t > self.k[layer].shape[2]:
            raise ValueError(f"KVCache overflow: position {start + t} > capacity {self.k[layer].shape[2]}")
        self.k[layer][:, :, start : start + t] = k
        self.v[layer][:, :, start : start + t] = v
        if layer == len(self.k) - 1:
            self.length = start + t
        keys, vals = self.k[layer][:, :, : start + t], self.v[layer][:, :, : start + t]
        if start == 0 or t == 1:  # plain causal prefill, or one new token that sees everything
            return attention(q, keys, vals, causal=start == 0 and t > 1)
        # a later block: causal within it, full attention to everything cached before it
        mask = torch.ones(t, start + t, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return attention(q, keys, vals, mask)


# -- file helpers ------------------------------------------------------------------------------
def read_config(path: Path) -> dict:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    return json.loads(cfg_file.read_text())


def load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory's model.safetensors or sharded index. Pickle files are refused."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are refused for safety; convert to safetensors)" if pickles else ""
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def generation_eos_ids(path) -> list[int]:
    """EOS ids from generation_config.json (may be a list), else config.json."""
    path = Path(path)
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                return list(eos) if isinstance(eos, list) else [eos]
    return []
