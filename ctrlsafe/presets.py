"""The embedded default: `tiny()` builds a small random Llama policy, two reward models and a
tokenizer, deterministically from a seed, and caches them as ordinary Hugging Face directories.

It exists so that every command runs offline in seconds. Its outputs are meaningless text and
its reward scores are meaningless numbers; real use passes real model directories.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .model import ModelArgs, Transformer

PRESET_VERSION = "tiny-v1"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class Preset:
    policy: Path
    reward_models: dict[str, Path]

    @property
    def tokenizer(self) -> Path:
        return self.policy


def cache_dir() -> Path:
    return Path(os.environ.get("CTRLSAFE_CACHE", Path.home() / ".cache" / "ctrlsafe"))


def example_prompts_path() -> Path:
    return Path(str(resources.files("ctrlsafe.assets") / "example_prompts.jsonl"))


def tiny(seed: int = 0, root: Path | None = None) -> Preset:
    """Build (once) and return the tiny preset's directories."""
    root = Path(root or cache_dir()) / f"{PRESET_VERSION}-seed{seed}"
    preset = Preset(root / "policy", {"helpful": root / "rm_helpful", "harmless": root / "rm_harmless"})
    if (root / "DONE").is_file():
        return preset
    root.parent.mkdir(parents=True, exist_ok=True)
    # build beside, then rename: concurrent builders (parallel tests) never see a half-written preset
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        _build(tmp, seed)
        (tmp / "DONE").write_text(PRESET_VERSION + "\n")
        try:
            tmp.rename(root)
        except OSError:
            if not (root / "DONE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return preset


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE trained on the shipped example prompts plus a little general text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [json.loads(line)["prompt"] for line in example_prompts_path().read_text().splitlines()]
    corpus += _GENERAL_TEXT.split("\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, tok) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _random_model(cfg: dict, generator: torch.Generator) -> Transformer:
    model = Transformer(ModelArgs.from_hf_config(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


def _build(root: Path, seed: int) -> None:
    tok = build_tokenizer()
    g = torch.Generator().manual_seed(seed)
    vocab = len(tok)
    policy = _random_model(_llama_config(vocab, 256, 4, 4, 2, 704, tok), g)
    policy.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    (root / "policy" / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tok.bos_token_id, "eos_token_id": [tok.eos_token_id], "pad_token_id": tok.pad_token_id})
    )
    for name in ("helpful", "harmless"):
        cfg = _llama_config(vocab, 128, 2, 4, 2, 352, tok)
        cfg.update(architectures=["LlamaForSequenceClassification"], tie_word_embeddings=True,
                   num_labels=1, id2label={"0": name}, label2id={name: 0})
        rm = _random_model(cfg, g)
        score = torch.randn(1, 128, generator=g) * 0.5
        rm.save_pretrained(root / f"rm_{name}", extra_tensors={"score.weight": score})
        tok.save_pretrained(root / f"rm_{name}")


_GENERAL_TEXT = """\
Sure, here is a simple answer. First, gather what you need, then follow the steps one by one.
I'm sorry, but I can't help with that request. It could cause harm to you or to other people.
I cannot provide instructions for that. If you are in danger, please contact local emergency services.
Here are a few ideas you might like: take a walk, read a book, call a friend, or cook a new recipe.
The answer depends on your situation. In general, it is a good idea to ask a professional for advice.
Step 1: prepare the ingredients. Step 2: heat the pan. Step 3: stir gently and season to taste.
Python is a programming language. A function takes arguments and returns a value.
The weather today is sunny with a light breeze, and the temperature will rise in the afternoon.
Thank you for asking! Let me explain how this works, why it matters, and what you can do next.
Please be careful: some chemicals are dangerous when mixed, so always read the safety label."""
