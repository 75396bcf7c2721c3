"""`ctrlsafe distill --format trl`: the data in TRL's own columns, control tokens where ctrlsafe's
training puts them.

ctrlsafe trains on `[chat-templated prompt + generation prompt][control tokens][response + EOS]`
(controls.render_prompt, train.Tokens), with the loss on the response only. TRL's trainers take:

- SFTTrainer, prompt-completion: `prompt`, `completion`; loss on the completion (completion_only_loss).
- DPOTrainer, preference: `prompt`, `chosen`, `rejected`.

We write TRL's *standard* (text) form of both, not the conversational (message-list) form: the
`prompt` is the chat template already applied with its generation prompt, followed by the control
tokens (`<|user|>\\nHi<|end|>\\n<|assistant|>\\n<|helpful=3|><|harmless=4|>`), and `completion` /
`chosen` / `rejected` are the response texts (TRL appends the EOS). Why not message lists: a
message list cannot say "after the generation prompt". TRL renders a conversational prompt with
`add_generation_prompt=True` and the completion as an assistant message, so the only place for the
controls would be inside the assistant's content, i.e. in the completion, where (1) they get loss
(the model would learn to emit controls, not to obey them), (2) templates may rewrite that content
(trim it, strip think blocks), and (3) the tokens after the assistant header are no longer the
ones the engine prefills at generation time. Text prompts give TRL nothing to re-render.

Every prompt is checked as it is written: TRL tokenizes text with the tokenizer's own special-token
rule (`tokenizer(text)`), so the text must tokenize to exactly the ids ctrlsafe renders (a leading
BOS the template writes is dropped when the tokenizer adds one itself; a mismatch is an error that
names the row). The tokenizer given must be the one TRL will train with: its control tokens are
added here as in `ControlSpec.add_to`, so save that tokenizer (with the model whose embeddings
`add_to` resized) and pass it to TRL (README: "Training with TRL").

One difference TRL cannot express: ctrlsafe trains a response cut at --max-new-tokens
(finish_reason "length") without an EOS, TRL always appends one; such SFT rows are left out and
counted (`skipped_truncated`). Pairs keep them (ctrlsafe's DPO also ends both sides with EOS).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import dataset
from .controls import ControlSpec, render_prompt

KINDS = {"records": "prompt-completion", "mix": "prompt-completion", "pairs": "preference"}


def sft_schema(attributes) -> pa.Schema:
    levels = pa.struct([(a, pa.int32()) for a in attributes])
    return pa.schema([("prompt", pa.string()), ("completion", pa.string()), ("id", pa.string()),
                      ("prompt_id", pa.string()), ("control", levels)])


def preference_schema(attributes) -> pa.Schema:
    levels = pa.struct([(a, pa.int32()) for a in attributes])
    return pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                      ("prompt_id", pa.string()), ("attribute", pa.string()), ("chosen_id", pa.string()),
                      ("rejected_id", pa.string()), ("control", levels), ("chosen_control", levels),
                      ("rejected_control", levels)])


def load_tokenizer(path, spec: ControlSpec):
    """The tokenizer TRL will train with, with this spec's control tokens (ids as add_to gives them)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer {path}: cannot load a tokenizer ({e})") from None
    if tok.eos_token is None:
        raise ValueError(f"--tokenizer {path}: the tokenizer has no eos_token; TRL ends every completion with it")
    spec.add_to(tok)
    return tok


class TRLWriter:
    """Rows of a ctrlsafe data set -> rows in TRL's columns (see the module docstring)."""

    def __init__(self, tokenizer, spec: ControlSpec):
        self.tok, self.spec = tokenizer, spec
        bos = tokenizer.bos_token_id
        self.adds_bos = bos is not None and list(tokenizer("x")["input_ids"][:1]) == [bos]
        self.counts = {"rows": 0, "skipped_truncated": 0, "retokenized": 0}

    def prompt(self, row, where: str) -> str:
        """The chat-templated prompt with its control tokens, as text TRL tokenizes to ctrlsafe's ids."""
        prompt = _prompt(row, where)
        control = row.get("control")
        try:
            ids = render_prompt(prompt, self.tok) + (self.spec.control_ids(control, self.tok) if control else [])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        text = _prompt_text(prompt, self.tok) + (self.spec.format(control) if control else "")
        if self.adds_bos and self.tok.bos_token and text.startswith(self.tok.bos_token):
            text = text[len(self.tok.bos_token):]  # TRL's tokenizer(text) adds it back
        got = list(self.tok(text)["input_ids"])
        if got != ids:
            raise ValueError(f"{where}: the templated prompt does not tokenize back to the ids ctrlsafe trains on "
                             f"(tokenizer(text) gives {len(got)} ids, render_prompt + controls {len(ids)}); "
                             "this tokenizer's chat template cannot be written as TRL text")
        self._ids = ids
        return text

    def _check_reply(self, text: str, reply: str) -> None:
        """Count rows where TRL's joint tokenization of prompt + reply + EOS differs from ctrlsafe's
        (prompt ids, then the reply tokenized alone, then EOS): a tokenizer property, reported."""
        joint = list(self.tok(text + reply + self.tok.eos_token)["input_ids"])
        ours = self._ids + list(self.tok(reply, add_special_tokens=False)["input_ids"]) + [self.tok.eos_token_id]
        if joint != ours:
            self.counts["retokenized"] += 1

    def sft(self, rows: list[dict], src: str) -> list[dict]:
        out = []
        for i, r in enumerate(rows):
            if r.get("kept") is False:
                continue
            if r.get("finish_reason") == "length":
                self.counts["skipped_truncated"] += 1
                continue
            text = self.prompt(r, f"{src} row {i}")
            self._check_reply(text, r["response"])
            out.append({"prompt": text, "completion": r["response"], "id": r.get("id"),
                        "prompt_id": r.get("prompt_id"), "control": r.get("control")})
        self.counts["rows"] += len(out)
        return out

    def pairs(self, rows: list[dict], src: str) -> list[dict]:
        out = []
        for i, r in enumerate(rows):
            text = self.prompt(r, f"{src} row {i}")
            self._check_reply(text, r["chosen"])
            self._check_reply(text, r["rejected"])
            out.append({"prompt": text, **{k: r.get(k) for k in preference_schema(self.spec.attributes).names if k != "prompt"}})
        self.counts["rows"] += len(out)
        return out


def _prompt(row, where: str):
    """The prompt a ctrlsafe row trains on: its chat (`messages`, JSON) or its `prompt` string."""
    messages = row.get("messages")
    if messages is not None:
        try:
            return json.loads(messages) if isinstance(messages, str) else messages
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: field 'messages' is not valid JSON ({e.msg})") from None
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: field 'prompt' is empty (and 'messages' is null)")
    return prompt


def _prompt_text(prompt, tok) -> str:
    """render_prompt as text (the same three cases; TRLWriter.prompt checks the ids agree)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(prompt, str):
        return prompt
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


def convert(out: Path, kind: str, tokenizer, spec: ControlSpec) -> dict:
    """Rewrite every shard of `out` (just written by `ctrlsafe distill`) in TRL's columns; rows
    with kept=false are left out. Returns the counts."""
    writer = TRLWriter(tokenizer, spec)
    preference = KINDS[kind] == "preference"
    schema = (preference_schema if preference else sft_schema)(spec.attributes)
    for shard in dataset.shard_files(out):
        rows = pq.read_table(shard).to_pylist()
        rows = writer.pairs(rows, shard.name) if preference else writer.sft(rows, shard.name)
        if rows:
            dataset.write_table(pa.Table.from_pylist(rows, schema=schema), shard)
        else:
            shard.unlink()
    if not writer.counts["rows"]:
        raise ValueError(f"{out}: no rows left for TRL (kept, and not cut at --max-new-tokens)")
    return writer.counts
