"""Control tokens: `<|helpful=3|><|harmless=1|>` placed after the rendered prompt.

Layout of every request: `[prompt (chat template + generation prompt)][control tokens][response]`,
so all control settings of one prompt share the prompt's KV cache. The `text` form says the same
request in words, for training-free prompting.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch

_TOKEN_RE = re.compile(r"<\|([A-Za-z_][A-Za-z0-9_\-]*)=(\d+)\|>")
_LEVEL_WORDS = {
    2: ("low", "high"),
    3: ("low", "medium", "high"),
    5: ("very low", "low", "medium", "high", "very high"),
}


@dataclass(frozen=True)
class ControlSpec:
    attributes: tuple[str, ...] = ("helpful", "harmless")
    levels: int = 5

    def __post_init__(self):
        object.__setattr__(self, "attributes", tuple(self.attributes))
        if not self.attributes or len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"ControlSpec: attributes must be non-empty and unique, got {self.attributes}")
        for a in self.attributes:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", a):
                raise ValueError(f"ControlSpec: attribute name {a!r} must match [A-Za-z_][A-Za-z0-9_-]*")
        if self.levels < 2:
            raise ValueError(f"ControlSpec: levels must be >= 2, got {self.levels}")

    # -- tokens -------------------------------------------------------------------------------
    def token(self, attribute: str, level: int) -> str:
        self._check(attribute, level)
        return f"<|{attribute}={level}|>"

    def all_tokens(self) -> list[str]:
        return [self.token(a, lv) for a in self.attributes for lv in range(self.levels)]

    def format(self, levels: dict[str, int]) -> str:
        """The control suffix as text, attributes in spec order: '<|helpful=3|><|harmless=1|>'."""
        self.validate(levels)
        return "".join(self.token(a, levels[a]) for a in self.attributes)

    def parse(self, text: str) -> dict[str, int]:
        """Inverse of format(); the whole string must be control tokens of this spec."""
        found = _TOKEN_RE.findall(text)
        if _TOKEN_RE.sub("", text).strip() or not found:
            raise ValueError(f"not a control string of this spec: {text!r}")
        levels = {a: int(lv) for a, lv in found}
        self.validate(levels)
        return levels

    def validate(self, levels: dict[str, int]) -> None:
        if set(levels) != set(self.attributes):
            raise ValueError(
                f"control {levels} must set exactly the attributes {list(self.attributes)}"
            )
        for a, lv in levels.items():
            self._check(a, lv)

    def _check(self, attribute, level):
        if attribute not in self.attributes:
            raise ValueError(f"unknown control attribute {attribute!r}; allowed: {list(self.attributes)}")
        if not isinstance(level, (int,)) or isinstance(level, bool) or not 0 <= level < self.levels:
            raise ValueError(f"level {level!r} for {attribute!r} is out of range; allowed: 0..{self.levels - 1}")

    # -- grids --------------------------------------------------------------------------------
    def grid(self) -> list[dict[str, int]]:
        """Every control cell, first attribute slowest."""
        return [dict(zip(self.attributes, c)) for c in itertools.product(range(self.levels), repeat=len(self.attributes))]

    def parse_grid(self, text: str) -> list[dict[str, int]]:
        """'grid' or 'helpful=0..4,harmless=1,3' -> list of cells (a product of the given ranges)."""
        if text.strip() == "grid":
            return self.grid()
        ranges = {}
        for part in filter(None, (p.strip() for p in re.split(r",(?=\s*[A-Za-z_])", text))):
            name, _, values = part.partition("=")
            name = name.strip()
            if not values:
                raise ValueError(f"control range {part!r} must look like NAME=LO..HI or NAME=A,B")
            levels = []
            for v in values.split(","):
                lo, dots, hi = v.strip().partition("..")
                try:
                    levels += list(range(int(lo), int(hi) + 1)) if dots else [int(lo)]
                except ValueError:
                    raise ValueError(f"control range {part!r}: {v!r} is not a level or LO..HI") from None
            for lv in levels:
                self._check(name, lv)
            ranges[name] = levels
        missing = [a for a in self.attributes if a not in ranges]
        if missing:
            raise ValueError(f"control ranges {text!r} do not set {missing}; allowed attributes: {list(self.attributes)}")
        return [dict(zip(self.attributes, c)) for c in itertools.product(*(ranges[a] for a in self.attributes))]

    # -- tokenizer and model ------------------------------------------------------------------
    def add_to(self, tokenizer, model=None, *, init: str = "template", noise_std: float = 0.01, seed: int = 0) -> list[int]:
        """Add the control tokens as special tokens and give each new one an embedding row (see
        INIT_RULES; "template", the default, perturbs an untrained real model least).

        Returns the token ids in all_tokens() order. Idempotent: tokens already present keep their
        ids and trained rows.
        """
        if init not in INIT_RULES:
            raise ValueError(f"init {init!r}: allowed values are {', '.join(INIT_RULES)}")
        tokens = self.all_tokens()
        vocab = tokenizer.get_vocab()
        new = [t for t in tokens if t not in vocab]
        if new:
            tokenizer.add_tokens(new, special_tokens=True)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if model is not None and new:
            sources = [self._init_sources(t, init, tokenizer) for t in new]
            init_rows(model, tokenizer.convert_tokens_to_ids(new), sources, noise_std=noise_std, seed=seed)
        return ids

    def _init_sources(self, token: str, init: str, tokenizer) -> list[int] | None:
        """Token ids whose mean embedding starts `token`'s row; None = the mean of all rows."""
        if init == "mean":
            return None
        if init == "zero":
            return []
        if init == "template":  # the token the template already puts before a response
            return render_prompt([{"role": "user", "content": "x"}], tokenizer)[-1:]
        attribute, level = token[2:-2].split("=")
        words = _LEVEL_WORDS.get(self.levels, ())
        text = f" {attribute} {words[int(level)] if words else level}"
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def control_ids(self, levels: dict[str, int], tokenizer) -> list[int]:
        self.validate(levels)
        ids = tokenizer.convert_tokens_to_ids([self.token(a, levels[a]) for a in self.attributes])
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or (unk is not None and i == unk) for i in ids):
            raise ValueError("control tokens are not in this tokenizer; call ControlSpec.add_to(tokenizer, model) first")
        return ids

    def render(self, prompt, levels: dict[str, int], tokenizer) -> list[int]:
        """Token ids `[rendered prompt][control tokens]`."""
        return render_prompt(prompt, tokenizer) + self.control_ids(levels, tokenizer)

    # -- words, for training-free prompting ---------------------------------------------------
    def text(self, levels: dict[str, int]) -> str:
        self.validate(levels)
        words = _LEVEL_WORDS.get(self.levels)
        parts = []
        for a in self.attributes:
            lv = levels[a]
            desc = f"{words[lv]} ({lv} on a scale of 0 to {self.levels - 1})" if words else f"{lv} on a scale of 0 to {self.levels - 1}"
            parts.append(f"{a}: {desc}")
        return "Write your response with these levels. " + "; ".join(parts) + "."

    def render_text(self, prompt, levels: dict[str, int], tokenizer) -> list[int]:
        """The same request as words appended to the (last) user message, no control tokens."""
        instruction = self.text(levels)
        if isinstance(prompt, str):
            return render_prompt(f"{prompt}\n\n{instruction}", tokenizer)
        messages = [dict(m) for m in prompt]
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise ValueError("render_text: the conversation has no user message")
        messages[last_user]["content"] += f"\n\n{instruction}"
        return render_prompt(messages, tokenizer)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"attributes": list(self.attributes), "levels": self.levels}

    @classmethod
    def from_dict(cls, d: dict) -> "ControlSpec":
        return cls(tuple(d["attributes"]), int(d["levels"]))


def render_prompt(prompt, tokenizer) -> list[int]:
    """Prompt ids: the chat template with its generation prompt when the tokenizer has one.

    A plain string becomes one user message under a chat template; without a template it is
    tokenized as is (with the tokenizer's BOS rule), and a message list is joined as
    'Role: content' lines ending in 'Assistant:'.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty prompt")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("a chat prompt must be a non-empty list of {'role', 'content'} messages")
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return list(ids)
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return list(tokenizer(text)["input_ids"])


# how a new control token's embedding row starts (measured on SmolLM2-135M-Instruct, see README:
# "template" moves the next-token distribution least before any training)
INIT_RULES = ("template", "words", "mean", "zero")


@torch.no_grad()
def init_rows(model, ids: list[int], sources: list[list[int] | None] | None = None, *,
              noise_std: float = 0.01, seed: int = 0) -> None:
    """Grow the vocabulary to cover `ids` and set each one's embedding (and untied head) row to
    the mean of its source rows (None: of all other rows; []: zero) plus small Gaussian noise
    (so rows that start equal can still be told apart by training). `model` is a
    ctrlsafe.model.Transformer or a transformers PreTrainedModel."""
    weights = _grown_vocab_weights(model, max(ids) + 1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor(ids)
    others = torch.ones(weights[0].shape[0], dtype=torch.bool)
    others[idx] = False
    sources = sources or [None] * len(ids)
    for w in weights:
        mean = w[others.to(w.device)].float().mean(0).cpu()
        start = torch.stack([mean if s is None else w[s].float().mean(0).cpu() if s else torch.zeros_like(mean)
                             for s in sources])
        noise = noise_std * mean.abs().mean() * torch.randn(len(ids), w.shape[1], generator=g)
        w[idx.to(w.device)] = (start + noise).to(w.dtype).to(w.device)


def _grown_vocab_weights(model, need: int) -> list[torch.Tensor]:
    """The embedding (and, when untied, output head) weights, grown to at least `need` rows."""
    if hasattr(model, "get_input_embeddings"):  # transformers: its own resize keeps ties and config
        if need > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(need, mean_resizing=False)
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings()
        return [emb] if head is None or head.weight is emb else [emb, head.weight]
    if need > model.args.vocab_size:
        model.resize_vocab(need)
    return [model.embed_tokens.weight] + ([] if model.args.tie_word_embeddings else [model.lm_head.weight])
