"""`ctrlsafe train`: fine-tune a policy with CLM, ExMATE, DPO(+AMA), RAFT, SIT (+FDC mixing) or
PPO(+AMA) / RLOO (ctrlsafe/rlhf.py).

    ctrlsafe train --data runs/demo --model POLICY --objective clm --out runs/clm
    torchrun --standalone --nproc_per_node=2 -m ctrlsafe train ...        # DDP (gloo on CPU)

The loop is deliberately plain (nanoGPT-style): AdamW, linear warmup + cosine decay, gradient
accumulation, clipping, bf16 autocast on CUDA, optional activation checkpointing.

Batching. `--batch-size` counts sequences (pairs for DPO) per optimizer step over ALL ranks; each
rank runs `grad_accum` micro-batches of batch_size / (world * grad_accum). Every loss is a sum
over the global batch divided by a global count (losses.Normalizer), so a run's result does not
depend on world size or accumulation. Epoch e visits the rows in a permutation drawn from
(seed, e); a trailing partial batch is dropped. All randomness is keyed by (seed, epoch or round,
row), so the data order is a function of the step and `--resume` continues exactly.

Checkpoints (`OUT/checkpoint-STEP/`, written to a temp dir then renamed): the model as a Hugging
Face safetensors directory with its tokenizer (control tokens included), `optimizer.safetensors`
(AdamW moments), `rng.safetensors` and `trainer_state.json` (step, config, optimizer hyper-
parameters, data order). No pickle anywhere. The final model goes to OUT/ itself; metrics to
OUT/metrics.jsonl (one JSON object per step).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from . import dataset as ds
from .cli import CommandError
from .controls import ControlSpec, render_prompt
from .losses import CLM, DPO, IGNORE, Batch, ExMATE, Normalizer, SequenceLogprobs, counterfactual_cells
from .mixing import mix, parse_spec, sit_mix
from .model import Transformer

OBJECTIVES = ("clm", "exmate", "dpo", "raft", "sit", "ppo", "rloo")
STATE_FILE = "trainer_state.json"
REPORT_TO = ("none", "tensorboard", "wandb")
_TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to value -> module it needs


# -- arguments ------------------------------------------------------------------------------------
def _report_to(value: str) -> str:
    """--report-to: one of REPORT_TO, whose optional package is installed (checked without importing it)."""
    import importlib.util

    if value not in REPORT_TO:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(REPORT_TO)})")
    module = _TRACKER_MODULES.get(value)
    if module and importlib.util.find_spec(module) is None:
        raise argparse.ArgumentTypeError(missing_tracker(value))
    return value


def missing_tracker(value: str) -> str:
    return (f"--report-to {value} needs the {_TRACKER_MODULES[value]!r} package, which is not installed: "
            f"pip install 'ctrlsafe[{value}]' (or pip install {_TRACKER_MODULES[value]})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, help="data set directories (manifest.json + data/*.parquet) or Parquet files")
    p.add_argument("--model", required=True, help="policy model directory (Hugging Face layout)")
    p.add_argument("--objective", choices=OBJECTIVES, default="clm",
                   help="clm: SFT on control-tagged rows; exmate: CLM + counterfactual-control unlikelihood; dpo: preference pairs; "
                        "raft: reward-ranked fine-tuning; sit: SFT with safety rows mixed in; ppo / rloo: online RL")
    p.add_argument("--out", required=True, help="output directory: checkpoints, metrics.jsonl, final model")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the matrices (not of norms and biases)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences (DPO: pairs) per optimizer step, over all ranks")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per rank per step")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs worth)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --max-steps is not given (fractions allowed)")
    g.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of --lr")
    g.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    g.add_argument("--seed", type=int, default=0, help="seeds the data order, the new control-token embedding rows and RAFT / PPO sampling")
    g.add_argument("--max-length", type=int, default=1024, help="longer examples lose the end of their response")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute each layer's activations in backward")
    g.add_argument("--device", default=None, help="default: cuda (the local rank's) if available, else cpu")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only the final model)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from OUT's latest checkpoint, or from the given checkpoint directory (default: start fresh)")
    g = p.add_argument_group("logging")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar: plain log lines every --log-every steps instead (also the behaviour when stderr is not a terminal)")
    g.add_argument("--log-every", type=int, default=10, metavar="N",
                   help="without a progress bar: a plain log line every N optimizer steps (0: only the final summary)")
    g.add_argument("--report-to", type=_report_to, default="none", metavar="{" + ",".join(REPORT_TO) + "}",
                   help="also log the metrics rows to TensorBoard (OUT/tensorboard; pip install 'ctrlsafe[tensorboard]') "
                        "or Weights & Biases (project $WANDB_PROJECT, else ctrlsafe; pip install 'ctrlsafe[wandb]')")
    g = p.add_argument_group("ExMATE")
    g.add_argument("--alpha", type=float, default=0.05, help="weight of exp(-CE(y|x,c'))")
    g.add_argument("--k", type=int, default=1, help="counterfactual controls per example")
    g.add_argument("--counterfactual", choices=("uniform", "farthest"), default="uniform",
                   help="counterfactual controls drawn uniformly from the other cells, or the cells farthest from the example's")
    g = p.add_argument_group("DPO / AMA")
    g.add_argument("--beta", type=float, default=0.1, help="DPO temperature: strength of the implicit KL to the reference model")
    g.add_argument("--ref-logprobs", choices=("precompute", "model"), default="precompute",
                   help="reference log-probs computed once from the initial model (stored in OUT), or by a frozen copy every step")
    g.add_argument("--ama", action="store_true", help="AMA per-token masks: DPO from --ama-rm's prefix scores, PPO from the value head's sign")
    g.add_argument("--ama-rm", help="reward model DIR or DIR#HEAD for AMA's per-token rewards (must share the policy's tokenizer)")
    g.add_argument("--tau", type=float, default=0.3, help="AMA hysteresis threshold")
    g.add_argument("--ama-reward", choices=("raw", "diff"), default="raw",
                   help="per-token reward: the prefix score (raw) or its increment (diff)")
    g = p.add_argument_group("SIT / FDC mixing")
    g.add_argument("--safety-data", nargs="+", help="SIT: safety demonstrations mixed into --data")
    g.add_argument("--safety-ratio", type=float, default=0.1, help="SIT: fraction of safety rows in the mix")
    g.add_argument("--mix", help="FDC: CATEGORY=COUNT,... or CATEGORY=RATIO,... over --mix-column "
                   "(applied to --safety-data when given, else to --data)")
    g.add_argument("--mix-column", default="category", help="FDC: the column holding each row's harm category")
    g.add_argument("--mix-total", type=int, default=None, help="rows to draw with ratios (default: as many as possible)")
    g = p.add_argument_group("RAFT")
    g.add_argument("--reward", action="append", default=[], metavar="NAME=SPEC", help="scorer (reward model dir or module:function); repeatable")
    g.add_argument("--raft-target", help="reward name to rank by (default: the first --reward)")
    g.add_argument("--raft-rounds", type=int, default=2, help="RAFT rounds (sample, rank, fine-tune)")
    g.add_argument("--raft-prompts", type=int, default=64, help="prompts per round")
    g.add_argument("--raft-n", type=int, default=4, help="samples per prompt (best of N)")
    g.add_argument("--raft-steps", type=int, default=10, help="optimizer steps per round")
    g.add_argument("--raft-control", help="control cell to sample and train under, e.g. helpful=4,harmless=4 (default: none)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of RAFT and PPO / RLOO rollouts")
    g.add_argument("--max-new-tokens", type=int, default=128, help="response length limit of RAFT and PPO / RLOO rollouts")
    from .rlhf import add_arguments as add_rl_arguments  # rlhf builds on this module: import it late

    add_rl_arguments(p)


# -- distributed ----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1 and dist.is_initialized():
            # DDP and pending gloo work hold the process group: free them now, while the interpreter
            # is whole — gloo's worker threads torn down at exit abort the process (SIGABRT)
            gc.collect()
            dist.destroy_process_group()


def init_distributed(device: str | None) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


# -- reading data ---------------------------------------------------------------------------------
def read_tables(paths) -> tuple[pa.Table, dict | None]:
    """All rows of the given data set directories / Parquet files, with `__file` and `__row`
    columns for error messages, and the first manifest found (beside the files or one level up)."""
    tables, manifest = [], None
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted((p / ds.DATA_DIR).glob("*.parquet")) or sorted(p.glob("*.parquet"))
            homes = [p]
        elif p.is_file():
            files, homes = [p], [p.parent, p.parent.parent]
        else:
            raise FileNotFoundError(f"--data {p}: no such file or directory")
        if not files:
            raise FileNotFoundError(f"--data {p}: no Parquet files (expected {p}/data/*.parquet or {p}/*.parquet)")
        manifest = manifest or next((m for m in map(ds.read_manifest, homes) if m), None)
        for f in files:
            t = pq.read_table(f)
            t = t.append_column("__file", pa.array([str(f)] * t.num_rows, pa.string()))
            tables.append(t.append_column("__row", pa.array(range(t.num_rows), pa.int64())))
    return pa.concat_tables(tables, promote_options="default"), manifest


def kept_rows(table: pa.Table) -> pa.Table:
    if "kept" not in table.column_names:
        return table
    return table.filter(pc.fill_null(table.column("kept"), False))


def check_columns(table: pa.Table, required: tuple[str, ...], what: str) -> None:
    """Required columns, with TRL's names accepted: `completion` (or a conversational `messages`
    ending in the assistant's reply) for `response`, and no `prompt` when `chosen`/`rejected` are
    conversations that start with it (TRL's implicit prompt)."""
    have = set(table.column_names)
    alias = {"response": ("completion", "messages")}
    missing = [c for c in required if c not in have and not have & set(alias.get(c, ()))]
    if not {"prompt", "messages"} & have and not {"chosen", "rejected"} <= have:
        missing.insert(0, "prompt (or messages)")
    if missing:
        files = sorted(set(table.column("__file").to_pylist()))[:3]
        raise ValueError(f"{', '.join(files)}: {what} data lacks column(s) {missing}; columns: "
                         f"{[c for c in table.column_names if not c.startswith('__')]}")


def _where(row) -> str:
    return f"{row['__file']} row {row['__row']}"


def _messages(row, name: str, value) -> list[dict]:
    """A chat as a list of {'role', 'content'} dicts: ctrlsafe's JSON string or TRL's conversational
    list (pyarrow fills struct fields a message lacks with None; those are dropped)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{_where(row)}: field {name!r} is not valid JSON ({e.msg})") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{_where(row)}: field {name!r} must be a non-empty list of chat messages, got {value!r:.80}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"{_where(row)}: field {name!r} message {i} must be a {{'role', 'content'}} dict, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{_where(row)}: field {name!r} message {i} has no 'role'")
        if not isinstance(content, str):
            raise ValueError(f"{_where(row)}: field {name!r} message {i} ({role}): 'content' must be a string, got "
                             f"{type(content).__name__} (content parts / multimodal messages are not supported)")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _conversation_reply(row):
    """TRL's conversational language-modeling row (`messages` ending in the assistant's reply, no
    `response`/`completion` column): (the chat before the reply, the reply); else None."""
    if any(k in row for k in ("response", "completion", "chosen")) or row.get("messages") is None:
        return None
    messages = _messages(row, "messages", row["messages"])
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        return None
    return messages[:-1], messages[-1]["content"]


def _implicit_prompt(row):
    """TRL's implicit-prompt preference row (no `prompt`; `chosen` and `rejected` are whole
    conversations): (shared leading messages, chosen rest, rejected rest); else None."""
    if row.get("prompt") is not None or row.get("messages") is not None or not isinstance(row.get("chosen"), (list, tuple)):
        return None
    chosen, rejected = _messages(row, "chosen", row["chosen"]), _messages(row, "rejected", row.get("rejected"))
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ValueError(f"{_where(row)}: field 'prompt' is missing and 'chosen'/'rejected' share no leading messages "
                         "(TRL's implicit-prompt format: the same conversation, then each reply)")
    return chosen[:n], chosen[n:], rejected[n:]


def row_prompt(row):
    """The prompt: the chat message list when `messages` is set (ctrlsafe's JSON string or TRL's
    list), TRL's conversational `prompt` list, the shared start of conversational `chosen`/`rejected`
    (TRL's implicit prompt), else the `prompt` string (one user message under a chat template)."""
    lm = _conversation_reply(row)
    if lm:
        return lm[0]
    if row.get("messages") is not None:
        return _messages(row, "messages", row["messages"])
    prompt = row.get("prompt")
    if isinstance(prompt, (list, tuple)):
        return _messages(row, "prompt", prompt)
    implicit = _implicit_prompt(row)
    if implicit:
        return implicit[0]
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{_where(row)}: field 'prompt' must be a string or a list of chat messages, got {type(prompt).__name__}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{_where(row)}: field 'prompt' is empty (and 'messages' is null)")
    return prompt


def row_text(row, name: str) -> str:
    """A response text: a string, or TRL's conversational form (one assistant message). `response`
    falls back to TRL's `completion`, or to the final reply of a conversational `messages`."""
    if name == "response" and row.get("response") is None:
        lm = _conversation_reply(row)
        if lm:
            text = lm[1]
            if not text.strip():
                raise ValueError(f"{_where(row)}: field 'messages': the assistant's reply is empty")
            return text
        if "completion" in row:
            name = "completion"
        elif "response" not in row:
            raise ValueError(f"{_where(row)}: no 'response' or 'completion' field, and field 'messages' does not end "
                             "with the assistant's reply (TRL's conversational language-modeling format)")
    text = row.get(name)
    if isinstance(text, (list, tuple)):
        implicit = _implicit_prompt(row) if name in ("chosen", "rejected") else None
        messages = (implicit[1] if name == "chosen" else implicit[2]) if implicit else _messages(row, name, text)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise ValueError(f"{_where(row)}: field {name!r} must be one assistant message (the reply to the prompt); "
                             f"roles: {[m['role'] for m in messages]}")
        text = messages[0]["content"]
    elif text is not None and not isinstance(text, str):
        raise ValueError(f"{_where(row)}: field {name!r} must be a string or a list of chat messages, got {type(text).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{_where(row)}: field {name!r} is empty")
    return text


def row_control(row, spec: ControlSpec | None, required: bool):
    """The measured control cell as a tuple in spec order, or None when the data has none."""
    control = row.get("control")
    if control is None:
        if required:
            raise ValueError(f"{_where(row)}: field 'control' is null; this objective conditions on it")
        return None
    if spec is None:
        raise ValueError(f"{_where(row)}: the data has a 'control' column but no manifest.json with a control_spec was found beside it")
    try:
        spec.validate(control)
    except ValueError as e:
        raise ValueError(f"{_where(row)}: field 'control': {e}") from None
    return tuple(control[a] for a in spec.attributes)


# -- examples -------------------------------------------------------------------------------------
@dataclass
class Example:
    """One SFT sequence: [prompt][control][response + EOS]; control None = no control tokens."""

    prompt: list[int]
    control: tuple[int, ...] | None
    response: list[int]


@dataclass
class Pair:
    """One preference pair; `prompt` includes the control tokens. Masks (AMA) say which response
    tokens count; None = all."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    chosen_mask: list[bool] | None = None
    rejected_mask: list[bool] | None = None


class Tokens:
    """Tokenization shared by every objective: prompts rendered with the chat template, control
    ids from the spec, responses without special tokens plus EOS, and --max-length truncation."""

    def __init__(self, tokenizer, spec: ControlSpec | None, max_length: int):
        self.tok, self.spec, self.max_length = tokenizer, spec, max_length
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("the tokenizer has no eos_token; training needs one to end responses")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.cells = {tuple(c[a] for a in spec.attributes): spec.control_ids(c, tokenizer) for c in spec.grid()} if spec else {}
        self.truncated = 0

    def response(self, text: str, eos: bool = True) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) + ([self.eos] if eos else [])

    def fit(self, prompt: list[int], n_control: int, response: list[int], where: str) -> list[int]:
        room = self.max_length - len(prompt) - n_control
        if room < 1:
            raise ValueError(f"{where}: the prompt takes {len(prompt) + n_control} tokens, no room for a response within --max-length {self.max_length}")
        if len(response) > room:
            self.truncated += 1
            response = response[:room]
        return response

    def prompt(self, row) -> list[int]:
        try:
            return render_prompt(row_prompt(row), self.tok)
        except ValueError as e:
            raise ValueError(f"{_where(row)}: field 'messages': {e}") from None

    def example(self, row, *, control_required: bool, response: str | None = None, eos: bool | None = None) -> Example:
        if eos is None:  # a response cut at the length limit never ended: an EOS there would teach stopping early
            eos = row.get("finish_reason") != "length"
        prompt = self.prompt(row)
        control = row_control(row, self.spec, control_required)
        ids = self.response(response if response is not None else row_text(row, "response"), eos)
        n_control = len(control) if control else 0
        return Example(prompt, control, self.fit(prompt, n_control, ids, _where(row)))

    def pair(self, row) -> Pair:
        control = row_control(row, self.spec, required=False)
        prompt = self.prompt(row) + (self.cells[control] if control else [])
        chosen, rejected = (self.fit(prompt, 0, self.response(row_text(row, k)), _where(row)) for k in ("chosen", "rejected"))
        return Pair(prompt, chosen, rejected)


def pad_rows(rows: list[list[int]], labels: list[list[int]], pad: int) -> Batch:
    """Right-padded ids and labels (IGNORE on padding)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
    return Batch(ids, lab, n_tokens=sum(map(len, rows)))


# -- data sources: the micro-batches of each step ---------------------------------------------------
class StepData:
    """Rows in a fresh permutation per epoch; step s takes the next batch_size of them, split into
    world * grad_accum micro-batches; this rank takes every world-th micro-batch."""

    def __init__(self, n_rows: int, cfg: "TrainConfig", d: Dist, epoch_key: int = 0):
        self.n, self.cfg, self.dist, self.epoch_key = n_rows, cfg, d, epoch_key
        parts = d.world * cfg.grad_accum
        if cfg.batch_size % parts:
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by world size x --grad-accum = {parts}")
        if n_rows < cfg.batch_size:
            raise ValueError(f"the data has {n_rows} usable rows, fewer than --batch-size {cfg.batch_size}")
        self.steps_per_epoch = n_rows // cfg.batch_size
        self.micro = cfg.batch_size // parts
        self._perm = (None, None)

    def indices(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, this rank's micro-batches of row indices) for optimizer step `step`."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch_key * 10_007 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        rows = self._perm[1][pos * self.cfg.batch_size : (pos + 1) * self.cfg.batch_size]
        chunks = [rows[i : i + self.micro] for i in range(0, len(rows), self.micro)]
        return epoch, chunks[self.dist.rank :: self.dist.world]


class SFTData(StepData):
    """CLM / SIT / RAFT micro-batches; with `exmate=(k, mode)` also counterfactual control ids."""

    def __init__(self, examples: list[Example], tokens: Tokens, cfg, d: Dist, *, exmate=None, epoch_key: int = 0):
        super().__init__(len(examples), cfg, d, epoch_key)
        self.examples, self.tokens, self.exmate = examples, tokens, exmate

    def batches(self, step: int) -> list[Batch]:
        epoch, micro = self.indices(step)
        return [self.collate(rows, epoch) for rows in micro]

    def collate(self, rows: list[int], epoch: int = 0) -> Batch:
        seqs, labels = [], []
        for i in rows:
            ex = self.examples[i]
            prefix = ex.prompt + (self.tokens.cells[ex.control] if ex.control else [])
            seqs.append(prefix + ex.response)
            labels.append([IGNORE] * len(prefix) + ex.response)
        batch = pad_rows(seqs, labels, self.tokens.pad)
        if not self.exmate:
            return batch
        k, mode = self.exmate
        levels = self.tokens.spec.levels
        cf = [[] for _ in range(k)]
        for i in rows:  # keyed by (seed, epoch, row): the same counterfactuals on any world size
            rng = random.Random(f"{self.cfg.seed}:{epoch}:{i}")
            for j, cell in enumerate(counterfactual_cells(self.examples[i].control, levels, k, mode, rng)):
                cf[j].append(self.tokens.cells[cell])
        batch.control_start = torch.tensor([len(self.examples[i].prompt) for i in rows])
        batch.counterfactual_ids = [torch.tensor(c) for c in cf]
        return batch


class PairData(StepData):
    """DPO micro-batches: B chosen rows then B rejected rows, AMA masks applied as IGNORE labels,
    with the reference log-probs of each pair ([N,2] precomputed, or a frozen model's)."""

    def __init__(self, pairs: list[Pair], tokens: Tokens, cfg, d: Dist):
        super().__init__(len(pairs), cfg, d)
        self.pairs, self.tokens = pairs, tokens
        self.ref_table: torch.Tensor | None = None  # [N,2], or:
        self.reference = None  # batch -> [2B] reference log-probs (a frozen model)

    def batches(self, step: int) -> list[Batch]:
        _, micro = self.indices(step)
        out = []
        for rows in micro:
            batch = self.collate(rows)
            if self.ref_table is not None:
                batch.ref_logp = torch.cat([self.ref_table[rows, 0], self.ref_table[rows, 1]])
            else:
                batch.ref_logp = self.reference(batch)
            out.append(batch)
        return out

    def collate(self, rows: list[int]) -> Batch:
        seqs, labels = [], []
        for side in ("chosen", "rejected"):
            for i in rows:
                p = self.pairs[i]
                resp, mask = getattr(p, side), getattr(p, f"{side}_mask")
                seqs.append(p.prompt + resp)
                kept = resp if mask is None else [t if m else IGNORE for t, m in zip(resp, mask)]
                labels.append([IGNORE] * len(p.prompt) + kept)
        return pad_rows(seqs, labels, self.tokens.pad)


# -- logging: plain lines when not on a terminal, optional trackers ------------------------------------
def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


@dataclass
class _LogState:
    start_step: int = 0
    steps: int = 0  # optimizer steps run by this process (a resumed run counts from its checkpoint)
    tokens: int = 0
    last: dict | None = None
    tracker: object = None
    summarised: bool = False
    t0: float = field(default_factory=time.perf_counter)


class _TensorBoard:
    def __init__(self, out: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise CommandError(missing_tracker("tensorboard")) from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "), 0)

    def log(self, row: dict, step: int) -> None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"train/{k}", v, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, config: dict, name: str):
        try:
            import wandb
        except ImportError:
            raise CommandError(missing_tracker("wandb")) from None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ctrlsafe"), name=f"{out.name} ({name})",
                              dir=str(out), config=config)

    def log(self, row: dict, step: int) -> None:
        self.run.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


def open_tracker(report_to: str, out: Path, config: dict, name: str = "train"):
    """The --report-to tracker (None for 'none'); its package is imported only here."""
    if report_to == "none":
        return None
    if report_to == "tensorboard":
        return _TensorBoard(out, config)
    if report_to == "wandb":
        return _WandB(out, config, name)
    raise CommandError(f"--report-to {report_to!r}: choose from {', '.join(REPORT_TO)}")


# -- the trainer ----------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    objective: str = "clm"
    lr: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    warmup: int = 0
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    seed: int = 0
    save_every: int = 0
    dtype: str = "auto"
    log_every: int = 10  # plain log lines (no progress bar): every N steps, 0 = only the final summary
    report_to: str = "none"  # REPORT_TO

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        return cls(**{k: getattr(args, k, f.default) for k, f in cls.__dataclass_fields__.items()})


def warmup_cosine(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """LR for optimizer step `step` (0-based): linear warmup over `warmup` steps, then cosine
    decay from lr to min_ratio * lr at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, model: Transformer, tokenizer, objective, cfg: TrainConfig, d: Dist, out: Path,
                 *, total_steps: int, source_model: str, progress: bool = True, control_spec: ControlSpec | None = None):
        self.model, self.tokenizer, self.objective, self.cfg, self.dist = model, tokenizer, objective, cfg, d
        self.control_spec = control_spec
        self.out, self.total_steps, self.source_model, self.progress = out, total_steps, source_model, progress
        self.policy = SequenceLogprobs(model)
        if d.world > 1:
            self.policy = torch.nn.parallel.DistributedDataParallel(
                self.policy, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.95))
        self.step = 0
        use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and d.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(d.device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    # one optimizer step ---------------------------------------------------------------------------
    def train_step(self, batches: list[Batch]) -> dict[str, float]:
        t0 = time.perf_counter()
        lr = warmup_cosine(self.step, lr=self.cfg.lr, warmup=self.cfg.warmup, total=self.total_steps, min_ratio=self.cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        targets, tokens = self.dist.sum([sum(b.n_targets for b in batches), sum(b.n_tokens for b in batches)])
        norm = Normalizer(targets=max(1, int(targets)), examples=self.cfg.batch_size, world=self.dist.world)
        self.model.train()
        stats: dict[str, float] = {}
        for i, batch in enumerate(batches):
            last_micro = i == len(batches) - 1
            sync = lambda last_pass: self._sync(last_micro and last_pass)  # noqa: E731
            with self.autocast():
                s = self.objective.backward(self.policy, batch.to(self.dist.device), norm, sync)
            for k, v in s.items():
                stats[k] = stats.get(k, 0.0) + v
        clip = self.cfg.clip if self.cfg.clip > 0 else float("inf")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        keys = sorted(stats)
        totals = dict(zip(keys, self.dist.sum([stats[k] for k in keys])))
        elapsed = time.perf_counter() - t0
        return {"step": self.step, **totals, "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens),
                "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0}

    def _sync(self, last: bool):
        if self.dist.world > 1 and not last:
            return self.policy.no_sync()
        return contextlib.nullcontext()

    def run(self, data, until: int, extra_state: dict | None = None) -> None:
        """Train from self.step up to `until` (exclusive), logging and checkpointing.

        Rank 0 logs: every step's row to OUT/metrics.jsonl and to the --report-to tracker; a tqdm
        bar when stderr is a terminal (and progress is on), else a plain line every `log_every`
        steps; a summary line once the last step (total_steps) is done. RAFT and RL call run()
        once per round / rollout; the log state lives across calls."""
        log = self._log() if self.dist.main else None
        bar = None
        if log and self.progress and _is_tty(sys.stderr):
            from tqdm import tqdm

            bar = tqdm(total=until, initial=self.step, desc=f"train {self.objective.name}", unit="step", dynamic_ncols=True)
        metrics = (self.out / "metrics.jsonl").open("a") if log else None
        ok = False
        try:
            while self.step < until:
                row = self.train_step(data.batches(self.step))
                if log:
                    log.steps += 1
                    log.tokens += row["tokens"]
                    log.last = row
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    if log.tracker:
                        log.tracker.log(row, self.step)
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                elif log and self.cfg.log_every and (self.step % self.cfg.log_every == 0 or self.step == self.total_steps):
                    print(self._log_line(row), file=sys.stderr, flush=True)
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save_checkpoint(extra_state)
            ok = True
        finally:
            if bar:
                bar.close()
            if metrics:
                metrics.close()
            if log:
                done = ok and self.step >= self.total_steps
                if log.tracker:  # kept open across RAFT rounds / RL rollouts; closed after the last step or an error
                    log.tracker.flush()
                    if done or not ok:
                        log.tracker.close()
                        log.tracker = None
                if done and not log.summarised:
                    log.summarised = True
                    print(self._summary(), flush=True)

    # logging ----------------------------------------------------------------------------------
    def _log(self) -> "_LogState":
        """This trainer's log state (rank 0), made on the first run(): the clock starts there."""
        if getattr(self, "_log_state", None) is None:
            tracker = open_tracker(self.cfg.report_to, self.out, asdict(self.cfg), self.objective.name)
            self._log_state = _LogState(start_step=self.step, tracker=tracker)
        return self._log_state

    def _log_line(self, row: dict) -> str:
        log = self._log_state
        elapsed = time.perf_counter() - log.t0
        rate = log.steps / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - self.step) / rate if rate else float("inf")
        return (f"[train {self.objective.name}] step {self.step}/{self.total_steps} loss {row.get('loss', math.nan):.4f} lr {row['lr']:.2e} "
                f"grad_norm {row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tokens/s elapsed {elapsed:.0f}s eta {eta:.0f}s")

    def _summary(self) -> str:
        log = self._log_state
        loss = f"{log.last['loss']:.4f}" if log.last and "loss" in log.last else "n/a"
        resumed = f" (resumed at step {log.start_step})" if log.start_step else ""
        return (f"ctrlsafe train: {self.objective.name} done: {self.step} steps{resumed}, {log.tokens} tokens, "
                f"final loss {loss}, {time.perf_counter() - log.t0:.1f}s wall (training loop), out {self.out}")

    # checkpoints --------------------------------------------------------------------------------
    def extra_tensors(self) -> dict:
        """Tensors saved beside the model's own (e.g. PPO's value head); transformers ignores them."""
        return {}

    def save_model(self, path: Path) -> None:
        self.model.save_pretrained(path, extra_tensors=self.extra_tensors())
        self.tokenizer.save_pretrained(path)
        gen = Path(self.source_model) / "generation_config.json"
        config = json.loads(gen.read_text()) if gen.is_file() else {}
        if self.control_spec is not None:
            # HF generate must never write a control token: they are inputs, set after the prompt
            ids = sorted(self.tokenizer.convert_tokens_to_ids(self.control_spec.all_tokens()))
            config["suppress_tokens"] = ids
            config["bad_words_ids"] = [[i] for i in ids]
            (path / CONTROL_SPEC_FILE).write_text(json.dumps(self.control_spec.to_dict(), indent=2) + "\n")
            (path / "README.md").write_text(model_card(self.control_spec, self.source_model, self.cfg))
        if config:
            (path / "generation_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def save_checkpoint(self, extra_state: dict | None = None) -> Path | None:
        final = self.out / f"checkpoint-{self.step:06d}"
        if self.dist.main:
            tmp = self.out / f".tmp-checkpoint-{self.step:06d}"
            shutil.rmtree(tmp, ignore_errors=True)
            self.save_model(tmp)
            save_optimizer(self.optimizer, tmp / "optimizer.safetensors")
            from safetensors.torch import save_file

            rng = {"torch_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            save_file(rng, str(tmp / "rng.safetensors"))
            state = {"step": self.step, "total_steps": self.total_steps, "world_size": self.dist.world,
                     "config": asdict(self.cfg), "source_model": self.source_model,
                     "optimizer_param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups],
                     **(extra_state or {})}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        self.dist.barrier()
        return final

    def load_checkpoint(self, path: Path) -> dict:
        """Restore optimizer, RNG and step from a checkpoint (the model was loaded from it)."""
        state = json.loads((path / STATE_FILE).read_text())
        mine, theirs = asdict(self.cfg), state["config"]
        differ = [k for k in ("objective", "batch_size", "seed", "lr", "warmup") if mine[k] != theirs.get(k)]
        if differ:
            raise ValueError(f"--resume {path}: the checkpoint was trained with different {', '.join(f'--{k.replace(chr(95), chr(45))}' for k in differ)} "
                             f"({', '.join(f'{k}={theirs.get(k)!r}' for k in differ)}); resume only continues the same run")
        load_optimizer(self.optimizer, path / "optimizer.safetensors")
        from safetensors.torch import load_file

        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        self.step = state["step"]
        return state


CONTROL_SPEC_FILE = "control_spec.json"


def model_card(spec: ControlSpec, source_model: str, cfg) -> str:
    """A short README for the trained directory: what the control tokens are and how to use them."""
    example = spec.format({a: spec.levels - 1 for a in spec.attributes})
    return (f"---\nlibrary_name: transformers\ntags: [ctrlsafe, controllable-generation]\n---\n\n"
            f"# Controllable model trained with ctrlsafe\n\nBase model: `{source_model}`. Training config: "
            f"`{json.dumps(asdict(cfg), default=str)}`.\n\n"
            f"Control tokens: attributes {list(spec.attributes)}, levels 0..{spec.levels - 1} "
            f"(`{CONTROL_SPEC_FILE}`). Put them right after the chat-templated prompt, before the response:\n\n"
            f"```python\nids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + {example!r}\n```\n\n"
            f"`generation_config.json` suppresses the control tokens, so `generate` never writes one.\n")


def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    """AdamW state as safetensors: `{param_index}.{name}` per tensor (hyper-parameters go in JSON)."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors = {f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for i, st in sd["state"].items() for k, v in st.items()}
    save_file(tensors, str(path))


def load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    from safetensors.torch import load_file

    state: dict[int, dict] = {}
    for key, v in load_file(str(path)).items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


def find_checkpoint(out: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume {path}: not a checkpoint directory (no {STATE_FILE})")
        return path
    found = sorted(out.glob("checkpoint-*"))
    if not found:
        raise FileNotFoundError(f"--resume: {out} has no checkpoint-* directory to continue from")
    return found[-1]


# -- reference log-probs (DPO) ----------------------------------------------------------------------
@torch.no_grad()
def _summed(policy, batch: Batch, autocast) -> torch.Tensor:
    with autocast():
        return policy(batch.input_ids, batch.labels).sum(1).float()


def reference_logprobs(policy, data: PairData, d: Dist, autocast, chunk: int = 8) -> torch.Tensor:
    """[N,2] summed (masked) response log-probs of every pair under `policy`; ranks split the
    pairs and add up their (disjoint) parts."""
    table = torch.zeros(len(data.pairs), 2, dtype=torch.float32, device=d.device)
    mine = list(range(d.rank, len(data.pairs), d.world))
    for s in range(0, len(mine), chunk):
        rows = mine[s : s + chunk]
        summed = _summed(policy, data.collate(rows).to(d.device), autocast)
        table[rows, 0], table[rows, 1] = summed[: len(rows)], summed[len(rows) :]
    if d.world > 1:
        dist.all_reduce(table)
    return table.cpu()


def precomputed_reference(out: Path, ckpt: Path | None, trainer: "Trainer", data: PairData, d: Dist) -> torch.Tensor:
    """The initial model's reference log-probs: computed before the first step and stored as
    OUT/ref_logprobs.safetensors; on --resume read back from the run that wrote the checkpoint
    (the checkpoint's model is no longer the reference)."""
    from safetensors.torch import load_file, save_file

    name = "ref_logprobs.safetensors"
    if ckpt is not None:
        path = ckpt.parent / name
        if not path.is_file():
            raise FileNotFoundError(f"--resume: {path} is missing; it holds the reference log-probs of the initial model")
        table = load_file(str(path))["ref_logprobs"]
        if table.shape != (len(data.pairs), 2):
            raise ValueError(f"--resume: {path} holds {table.shape[0]} pairs but the data has {len(data.pairs)}")
    else:
        table = reference_logprobs(SequenceLogprobs(trainer.model), data, d, trainer.autocast)
    if d.main and not (out / name).is_file():
        save_file({"ref_logprobs": table.contiguous()}, str(out / name))
    return table


# -- AMA ------------------------------------------------------------------------------------------
def add_ama_masks(pairs: list[Pair], rows: list[dict], tokens: Tokens, rm_spec: str, tau: float, differenced: bool, device, chunk: int = 16):
    """Fill each pair's masks from a reward model's per-token rewards (one forward per chunk).

    The reward model reads [its rendering of the prompt][the policy's response ids], so it must
    share the policy's tokenizer (checked per response). Prefixes are scored as they are, without
    the turn-closing tokens RewardModel.score appends to whole responses."""
    from .losses import ama_mask, prefix_scores, response_token_rewards
    from .reward import RewardModel, load_scorer

    source = load_scorer(rm_spec, device=device)
    rm, head = source if isinstance(source, tuple) else (source, None)
    if not isinstance(rm, RewardModel) or rm.tokenizer is None:
        raise ValueError(f"--ama-rm {rm_spec}: AMA needs a reward model directory with tokenizer files (DIR or DIR#HEAD)")
    if head is None and len(rm.names) != 1:
        raise ValueError(f"--ama-rm {rm_spec}: the reward model has heads {rm.names}; name one as DIR#HEAD")
    k = rm.names.index(head) if head else 0
    if rm.tokenizer.convert_ids_to_tokens(tokens.eos) != tokens.tok.convert_ids_to_tokens(tokens.eos):
        raise ValueError(f"--ama-rm {rm_spec}: its tokenizer differs from the policy's (EOS id {tokens.eos}); AMA needs a shared tokenizer")
    jobs = []  # (pair index, side, rm prompt ids, response ids)
    for i, (pair, row) in enumerate(zip(pairs, rows)):
        rm_prompt = render_prompt(row_prompt(row), rm.tokenizer)
        for side in ("chosen", "rejected"):
            resp = getattr(pair, side)
            body = resp[:-1] if resp[-1] == tokens.eos else resp
            if list(rm.tokenizer(row[side], add_special_tokens=False)["input_ids"][: len(body)]) != body:
                raise ValueError(f"{_where(row)}: --ama-rm {rm_spec} tokenizes the {side} response differently from the "
                                 "policy; AMA needs a reward model that shares the policy's tokenizer")
            jobs.append((i, side, rm_prompt, resp))
    pad = rm.pad_token_id if rm.pad_token_id is not None else tokens.pad
    for s in range(0, len(jobs), chunk):
        part = jobs[s : s + chunk]
        ids = pad_rows([p + r for _, _, p, r in part], [[] for _ in part], pad).input_ids
        scores = prefix_scores(rm.model, rm.head[k], ids.to(device), float(rm.mean[k]), float(rm.std[k])).cpu()
        for row_scores, (i, side, p, r) in zip(scores, part):
            rewards = response_token_rewards(row_scores, len(p), len(r), differenced=differenced)
            setattr(pairs[i], f"{side}_mask", ama_mask(rewards.tolist(), tau, chosen=side == "chosen"))


# -- RAFT -----------------------------------------------------------------------------------------
def raft_winners(model, tokens: Tokens, prompts: list, scorer, target: int, control, args, round_: int, d: Dist) -> list[dict]:
    """Best-of-N per prompt by the target reward: rows {prompt, messages, response, control?}."""
    from .generate import Engine, SamplingParams

    mine = list(range(d.rank, len(prompts), d.world))
    engine = Engine(model, tokens.tok, tokens.spec)
    model.eval()
    outs = engine.generate([prompts[i] for i in mine], controls=[control] if control else None, n=args.raft_n,
                           sampling=SamplingParams(temperature=args.temperature), max_new_tokens=args.max_new_tokens,
                           seed=args.seed * 1_000_003 + round_, prompt_keys=mine)
    texts = [c.text or "" for c in outs]
    scores = scorer.score([prompts[mine[c.prompt_index]] for c in outs], texts).scores[:, target] if outs else torch.zeros(0)
    candidates: dict[int, list[tuple[float, object]]] = {}
    for c, text, score in zip(outs, texts, scores.tolist()):
        if text.strip():  # an empty sample cannot be trained on
            candidates.setdefault(c.prompt_index, []).append((score, c))
    winners = []
    for pi, cands in sorted(candidates.items()):
        score, c = max(cands, key=lambda sc: sc[0])
        p = prompts[mine[pi]]
        winners.append({"prompt": p if isinstance(p, str) else None, "messages": None if isinstance(p, str) else json.dumps(p),
                        "response": c.text, "eos": c.finish_reason != "length", "score": score,
                        "candidate_scores": [s for s, _ in cands], "control": dict(control) if control else None})
    if d.world > 1:
        gathered = [None] * d.world
        dist.all_gather_object(gathered, winners)
        winners = [w for part in gathered for w in part]
    return winners


def run_raft(args, trainer: Trainer, tokens: Tokens, table: pa.Table, cfg: TrainConfig, d: Dist, out: Path) -> None:
    from .reward import Scorer

    if not args.reward:
        raise ValueError("--objective raft needs at least one --reward NAME=SPEC")
    rewards = dict(r.split("=", 1) for r in args.reward)
    target = args.raft_target or next(iter(rewards))
    if target not in rewards:
        raise ValueError(f"--raft-target {target!r} is not one of the --reward names {list(rewards)}")
    scorer = Scorer(rewards)
    control = tokens.spec.parse_grid(args.raft_control)[0] if args.raft_control else None
    # a generated data set repeats each prompt once per sample: RAFT wants each prompt once
    unique = {json.dumps(p, sort_keys=True): p for p in map(row_prompt, table.to_pylist())}
    prompts = list(unique.values())
    for round_ in range(trainer.step // args.raft_steps, args.raft_rounds):
        path = out / "raft" / f"round-{round_:03d}.json"
        if path.is_file():  # resume inside a round: train on the winners that round chose
            winners = json.loads(path.read_text())
        else:
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + round_)
            pick = torch.randperm(len(prompts), generator=g)[: args.raft_prompts].tolist()
            winners = raft_winners(trainer.model, tokens, [prompts[i] for i in pick], scorer, list(rewards).index(target), control, args, round_, d)
            if d.main:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(winners))
                mean = sum(w["score"] for w in winners) / max(1, len(winners))
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps({"round": round_, "winners": len(winners), f"winner_{target}": mean}) + "\n")
        examples = [tokens.example({**w, "__file": str(path), "__row": j}, control_required=False, response=w["response"], eos=w["eos"])
                    for j, w in enumerate(winners)]
        trainer.run(SFTData(examples, tokens, cfg, d, epoch_key=round_ + 1), until=(round_ + 1) * args.raft_steps)


# -- the command ----------------------------------------------------------------------------------
def load_training_table(args) -> tuple[pa.Table, dict | None]:
    table, manifest = read_tables(args.data)
    if manifest and manifest.get("trl"):
        raise ValueError(f"--data {' '.join(args.data)}: written by `ctrlsafe distill --format trl` for TRL's trainers (its "
                         "prompts are already chat-templated with the control tokens); give `ctrlsafe train` the data set it was made from")
    table = kept_rows(table)
    if args.safety_data:
        safety, m2 = read_tables(args.safety_data)
        safety = kept_rows(safety)
        manifest = manifest or m2
        if args.mix:
            safety = mix(safety, args.mix_column, parse_spec(args.mix), seed=args.seed, total=args.mix_total)
        table = sit_mix(table, safety, args.safety_ratio, seed=args.seed)
    elif args.mix:
        table = mix(table, args.mix_column, parse_spec(args.mix), seed=args.seed, total=args.mix_total)
    if table.num_rows == 0:
        raise ValueError(f"--data {' '.join(args.data)}: no rows to train on (after kept == true filtering and mixing)")
    return table, manifest


def check_args(args) -> None:
    if args.objective == "sit" and not args.safety_data:
        raise CommandError("--objective sit needs --safety-data (safety demonstrations mixed into --data at --safety-ratio)")
    if args.ama and not (args.objective == "ppo" or (args.objective == "dpo" and args.ama_rm)):
        raise CommandError("--ama works with --objective ppo, or with --objective dpo and --ama-rm REWARD_MODEL_DIR")
    for name in ("batch_size", "grad_accum", "k", "max_length", "raft_rounds", "raft_prompts", "raft_n", "raft_steps"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise CommandError(f"--max-steps must be >= 1, got {args.max_steps}")
    out = Path(args.out)
    if not args.resume and ((out / "metrics.jsonl").exists() or any(out.glob("checkpoint-*"))):
        raise FileExistsError(f"{out} already holds a training run; pass --resume to continue it or choose a new --out")


def keep_metrics_until(path: Path, step: int) -> None:
    """On resume: drop the step rows a killed run logged after the checkpoint it resumes from."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in lines))


def build_objective(args, rows: list[dict], tokens: Tokens, cfg: TrainConfig, d: Dist):
    """(objective, data source) for --objective; RAFT's data comes per round (None here)."""
    if args.objective == "dpo":
        pairs = [tokens.pair(r) for r in rows]
        if args.ama:
            add_ama_masks(pairs, rows, tokens, args.ama_rm, args.tau, args.ama_reward == "diff", d.device)
        return DPO(args.beta), PairData(pairs, tokens, cfg, d)
    if args.objective == "exmate":
        examples = [tokens.example(r, control_required=True) for r in rows]
        return ExMATE(args.alpha), SFTData(examples, tokens, cfg, d, exmate=(args.k, args.counterfactual))
    if args.objective == "raft":
        return CLM(), None
    examples = [tokens.example(r, control_required=args.objective == "clm") for r in rows]  # clm, sit
    return CLM(), SFTData(examples, tokens, cfg, d)


def run(args) -> int:
    from .convert import resolve_model

    check_args(args)
    args.model = resolve_model(args.model)
    d = init_distributed(args.device)
    try:
        _train(args, d)
        d.barrier()  # rank 0 has saved the model before any rank leaves
    finally:
        d.close()
    return 0


def _train(args, d: Dist) -> None:
    from transformers import AutoTokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig.from_args(args)
    torch.manual_seed(args.seed)

    table, manifest = load_training_table(args)
    spec = ControlSpec.from_dict(manifest["control_spec"]) if manifest and "control_spec" in manifest else None
    required = {"clm": ("response", "control"), "exmate": ("response", "control"), "sit": ("response",),
                "dpo": ("chosen", "rejected"), "raft": (), "ppo": (), "rloo": ()}[args.objective]
    check_columns(table, required, args.objective)
    if ("control" in required or args.raft_control or args.objective in ("ppo", "rloo")) and spec is None:
        raise ValueError(f"--data {' '.join(args.data)}: no manifest.json with a control_spec found beside the data; "
                         f"--objective {args.objective} conditions on control tokens")

    ckpt = find_checkpoint(out, args.resume) if args.resume else None
    model_dir = str(ckpt or args.model)
    model = Transformer.from_pretrained(model_dir, device=d.device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if spec:
        spec.add_to(tok, model, seed=args.seed)  # a no-op for a checkpoint: its tokenizer has them
    model.gradient_checkpointing = args.grad_checkpointing
    tokens = Tokens(tok, spec, args.max_length)
    if args.objective in ("ppo", "rloo"):
        from .rlhf import run_rl

        return save(run_rl(args, model, tokens, table, manifest, cfg, d, out, ckpt), d, out)
    objective, data = build_objective(args, table.to_pylist(), tokens, cfg, d)
    if tokens.truncated and d.main:
        print(f"ctrlsafe train: {tokens.truncated} responses cut to --max-length {args.max_length}")

    if args.objective == "raft":
        total = args.raft_rounds * args.raft_steps
    else:
        total = args.max_steps if args.max_steps is not None else max(1, int(args.epochs * data.steps_per_epoch))
    trainer = Trainer(model, tok, objective, cfg, d, out, total_steps=total, source_model=args.model,
                      progress=not args.no_progress, control_spec=spec)
    if ckpt:
        trainer.load_checkpoint(ckpt)
        if d.main:
            keep_metrics_until(out / "metrics.jsonl", trainer.step)

    if args.objective == "dpo":
        if args.ref_logprobs == "model":
            reference = SequenceLogprobs(Transformer.from_pretrained(args.model, device=d.device)).requires_grad_(False)
            if spec:  # the same mean-initialised control rows the policy started from
                spec.add_to(AutoTokenizer.from_pretrained(args.model), reference.model, seed=args.seed)
            data.reference = lambda batch: _summed(reference, batch.to(d.device), trainer.autocast)
        else:
            data.ref_table = precomputed_reference(out, ckpt, trainer, data, d)

    if args.objective == "raft":
        run_raft(args, trainer, tokens, table, cfg, d, out)
    else:
        trainer.run(data, until=total)
    save(trainer, d, out)


def save(trainer: Trainer, d: Dist, out: Path) -> None:
    if d.main:
        trainer.save_model(out)
