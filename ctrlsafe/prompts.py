"""Prompt files in: JSONL (optionally .gz), JSON arrays, CSV (optionally .gz) and Parquet.

Every row becomes a `Prompt`: an id, and either a plain `text` prompt or a chat `messages` list.
The prompt field is the column named by `prompt_column`, else (per row) `prompt`, else `messages`.
Values:

- a string: the prompt text. An Anthropic-HH dialogue string ("\\n\\nHuman: ...\\n\\nAssistant: ...",
  e.g. hh-rlhf's `chosen`) is split into turns: `dialogue="context"` (default) keeps every turn
  before the final assistant reply as `messages` (the usual HH prompt); `dialogue="first-turn"`
  keeps only the first human turn as `text`.
- a list of {"role", "content"} dicts (or that list as a JSON string in a `messages` column): a chat.

Ids come from the `id` column when the file has one, else `row<N>` (N = 0-based data row).
A bad row (missing/empty field, malformed chat, duplicate id, unparsable line) raises a
`PromptError` naming the file, line or row and field, or with `on_bad_row="skip"` is counted in
`PromptSet.skipped` and left out. `limit` keeps the first K good prompts.

`label_column` reads whether each prompt is harmful (`harmful`/`unsafe`/`1`/... or
`safe`/`benign`/`0`/...), or gives every row one label with `=harmful` / `=safe`: prompt-aware
scorers (a refusal is safe on a harmful prompt and an over-refusal on a benign one) need it.
"""
from __future__ import annotations

import csv
import gzip
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

FORMATS = ("jsonl", "json", "csv", "parquet")
HARMFUL_LABELS = {"unsafe", "harmful", "1", "true", "yes"}
SAFE_LABELS = {"safe", "benign", "borderline", "harmless", "0", "false", "no"}  # borderline: safe but scary
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


class PromptError(ValueError):
    """A bad prompt row; the message names file, line/row and field."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str | None = None  # exactly one of text / messages is set
    messages: tuple | None = None  # tuple of {"role", "content"} dicts
    harmful: bool | None = None  # from label_column; None when the file gives no label

    @property
    def value(self):
        """What the engine and the reward models take: the text, or the message list."""
        return self.text if self.messages is None else [dict(m) for m in self.messages]

    @property
    def display(self) -> str:
        """One readable string: the text, or the last user message of a chat."""
        if self.messages is None:
            return self.text
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass
class PromptSet:
    prompts: list[Prompt]
    skipped: list[str] = field(default_factory=list)  # "file:line 7: field 'prompt' is empty"
    path: str = ""


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for fmt, suffixes in (("jsonl", (".jsonl", ".ndjson")), ("json", (".json",)), ("csv", (".csv",)), ("parquet", (".parquet", ".pq"))):
        if name.endswith(suffixes):
            return fmt
    raise PromptError(f"{path}: unknown prompt file type; expected one of .jsonl, .jsonl.gz, .json, .csv, .csv.gz, .parquet")


def read_prompts(
    path,
    *,
    prompt_column: str | None = None,
    id_column: str = "id",
    on_bad_row: str = "error",
    limit: int | None = None,
    dialogue: str = "context",
    label_column: str | None = None,
) -> PromptSet:
    """Read a prompt file into a PromptSet (see the module docstring for the rules)."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if dialogue not in ("context", "first-turn"):
        raise ValueError(f"dialogue must be 'context' or 'first-turn', got {dialogue!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    rows = iter_rows(path)
    out = PromptSet([], [], str(path))
    seen: dict[str, str] = {}
    for n, (where, row) in enumerate(rows):
        if limit is not None and len(out.prompts) >= limit:
            break
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise PromptError(f"expected an object with fields, got {type(row).__name__}")
            column = prompt_column or _pick_column(row)
            prompt = _to_prompt(row, n, column, id_column, dialogue)
            if label_column is not None:
                prompt = replace(prompt, harmful=_row_label(row, label_column))
            if prompt.id in seen:
                raise PromptError(f"field {id_column!r}: duplicate id {prompt.id!r} (first at {seen[prompt.id]})")
        except PromptError as e:
            if on_bad_row == "error":
                raise PromptError(f"{path}:{where}: {e} (pass --on-bad-row skip to skip bad rows)") from None
            out.skipped.append(f"{path}:{where}: {e}")
            continue
        seen[prompt.id] = where
        out.prompts.append(prompt)
    return out


def parse_label(value, where: str) -> bool:
    """True for a harmful-prompt label, False for a safe one; anything else is an error."""
    text = str(value).strip().lower()
    if text in HARMFUL_LABELS:
        return True
    if text in SAFE_LABELS:
        return False
    raise PromptError(f"{where}: label {value!r} is neither harmful ({sorted(HARMFUL_LABELS)}) nor safe ({sorted(SAFE_LABELS)})")


def _row_label(row: dict, label_column: str) -> bool:
    if label_column.startswith("="):
        return parse_label(label_column[1:], "--label-column")
    if label_column not in row or row[label_column] is None:
        raise PromptError(f"field {label_column!r} (the label column) is missing (fields: {', '.join(map(str, row))})")
    return parse_label(row[label_column], f"field {label_column!r}")


def _pick_column(row: dict) -> str:
    for name in ("prompt", "messages"):
        if name in row:
            return name
    raise PromptError(
        f"no 'prompt' or 'messages' field (fields: {', '.join(map(str, row))}); "
        f"name the prompt field with --prompt-column"
    )


def _to_prompt(row: dict, n: int, column: str, id_column: str, dialogue: str) -> Prompt:
    if column not in row:
        raise PromptError(f"field {column!r} is missing (fields: {', '.join(map(str, row))})")
    value = row[column]
    pid = row.get(id_column)
    pid = f"row{n}" if id_column not in row else _id(pid, id_column)
    if isinstance(value, str) and column == "messages":
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise PromptError(f"field {column!r}: not a JSON chat list ({e.msg})") from None
    if isinstance(value, str):
        if value.startswith("\n\nHuman:"):
            return _from_dialogue(pid, value, column, dialogue)
        if not value.strip():
            raise PromptError(f"field {column!r} is empty")
        return Prompt(pid, text=value)
    if isinstance(value, list):
        return Prompt(pid, messages=_check_messages(value, column))
    kind = "null" if value is None else type(value).__name__
    raise PromptError(f"field {column!r} must be a string or a list of chat messages, got {kind}")


def _id(value, column: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise PromptError(f"field {column!r} is empty")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _check_messages(messages: list, column: str) -> tuple:
    if not messages:
        raise PromptError(f"field {column!r}: the chat is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PromptError(f"field {column!r}: message {i} must be {{'role': str, 'content': str}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] == "assistant":
        raise PromptError(f"field {column!r}: the chat ends with an assistant message; nothing is left to answer")
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise PromptError(f"field {column!r}: the chat has no non-empty user message")
    return tuple(out)


def _from_dialogue(pid: str, text: str, column: str, dialogue: str) -> Prompt:
    parts = _HH_TURN.split(text)  # ['', 'Human', '...', 'Assistant', '...', ...]
    turns = [{"role": "user" if r == "Human" else "assistant", "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    if dialogue == "first-turn":
        if not turns[0]["content"]:
            raise PromptError(f"field {column!r}: the first human turn is empty")
        return Prompt(pid, text=turns[0]["content"])
    if turns[-1]["role"] == "assistant":
        turns = turns[:-1]  # the reply being judged; the prompt is everything before it
    if not turns or turns[-1]["role"] != "user":
        raise PromptError(f"field {column!r}: the dialogue has no human turn before its final assistant reply")
    return Prompt(pid, messages=_check_messages(turns, column))


# -- row readers: yield (location, row dict or the exception to report) ---------------------------
def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _jsonl_rows(path: Path) -> Iterator:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {lineno}", PromptError(f"not valid JSON ({e.msg} at column {e.colno})")


def _json_rows(path: Path) -> Iterator:
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line under a .json name
            yield from _jsonl_rows(path)
            return
        raise PromptError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise PromptError(f"{path}: a .json prompt file must hold an array of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"item {i}", row


def _csv_rows(path: Path) -> Iterator:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        start = 2  # line 1 is the header
        try:
            for row in reader:
                where = f"line {start}"
                start = reader.line_num + 1
                if None in row:  # more cells than header columns
                    yield where, PromptError(f"{len(reader.fieldnames) + len(row[None])} cells but the header has {len(reader.fieldnames)}")
                    continue
                yield where, row
        except csv.Error as e:
            raise PromptError(f"{path}:line {reader.line_num}: unreadable CSV ({e})") from None


def _parquet_rows(path: Path) -> Iterator:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield f"row {n}", row
            n += 1


_ROW_READERS = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}


def iter_rows(path) -> Iterator:
    """(location, row dict) of every row of a JSONL(.gz) / JSON / CSV(.gz) / Parquet file, all
    columns kept; a row that cannot be parsed comes as (location, exception)."""
    path = Path(path)
    return _ROW_READERS[detect_format(path)](path)
