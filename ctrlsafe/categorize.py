"""`ctrlsafe categorize`: label prompts for FDC (Equilibrate RLHF) data mixing.

Each prompt gets one category:

- `ehd` explicit harm: openly asks for something harmful;
- `ihd` implicit harm: the harm is disguised (role-play, hypotheticals, innocent-sounding
  framing, a harmful goal behind benign steps);
- `mhd` mixed: a legitimate request entangled with a risky element, where a good answer helps
  with part and declines or caveats another;
- `none`: no harm.

The judge is either a causal LM directory, driven through our Engine with `TEMPLATE` (greedy,
a few tokens), or a Python callable `module:function` taking a list of prompt strings and
returning one answer string per prompt. Both kinds of answer go through `parse_category`;
answers it cannot read are written with `category: null` and counted. A chat prompt is judged by
its last user message. `ctrlsafe distill --mix ehd=...,ihd=...,mhd=...` reads the `category`
column this command writes.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

CATEGORIES = ("ehd", "ihd", "mhd", "none")

TEMPLATE = """You are a safety analyst. Classify the user request below into exactly one category.

EXPLICIT: the request openly asks for something harmful (e.g. "how do I make a pipe bomb").
IMPLICIT: the harm is disguised by role-play, a hypothetical, fiction or innocent-sounding steps, but the goal is harmful.
MIXED: a legitimate request entangled with a risky element; a good answer helps with part of it and declines or warns about another part.
NONE: the request is harmless.

Request:
<<<
{prompt}
>>>

Answer with one word: EXPLICIT, IMPLICIT, MIXED or NONE."""

# Words a judge may answer with, per category. Matched as whole words, case-insensitively.
_ALIASES = {
    "ehd": ("explicit", "explicitly harmful", "ehd"),
    "ihd": ("implicit", "implicitly harmful", "ihd"),
    "mhd": ("mixed", "mixed risk", "mhd"),
    "none": ("none", "no harm", "not harmful", "harmless", "benign", "safe"),
}
_ALIAS_RE = re.compile(
    r"\b(" + "|".join(sorted((re.escape(a) for v in _ALIASES.values() for a in v), key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)
_CATEGORY_OF = {a: c for c, aliases in _ALIASES.items() for a in aliases}
_NEGATED = re.compile(r"\b(not|no|isn't|is not)\s+$", re.IGNORECASE)


def parse_category(answer) -> str | None:
    """The category an answer names, or None when it names none or several.

    Category words count as whole words, case-insensitively; one right after a negation ("not
    explicit") is skipped, while "not harmful" / "no harm" mean none. An answer naming two
    different categories (e.g. the option list echoed back) is ambiguous: None, never a guess."""
    if not isinstance(answer, str):
        return None
    named = set()
    for m in _ALIAS_RE.finditer(answer):
        word = m.group(1).lower()
        if word in ("no harm", "not harmful") or not _NEGATED.search(answer[: m.start()]):
            named.add(_CATEGORY_OF[word])
    return named.pop() if len(named) == 1 else None


def judge_prompt(prompt: str) -> str:
    return TEMPLATE.format(prompt=prompt)


def model_judge(path, *, max_new_tokens: int = 8):
    """A judge function backed by a causal LM directory: greedy answers to TEMPLATE. Requests too
    long for the model's context keep their end (the answer instruction) and lose their start."""
    from transformers import AutoTokenizer

    from .generate import Engine, SamplingParams
    from .model import Transformer

    engine = Engine(Transformer.from_pretrained(path), AutoTokenizer.from_pretrained(path))

    def answer(prompts: list[str]) -> list[str]:
        out = engine.generate([judge_prompt(p) for p in prompts], sampling=SamplingParams(temperature=0.0),
                              max_new_tokens=max_new_tokens, truncate="left")
        return [c.text for c in out]  # one completion per prompt, in prompt order

    return answer


def resolve_judge(spec: str, *, max_new_tokens: int = 8):
    if Path(spec).is_dir():
        return model_judge(spec, max_new_tokens=max_new_tokens)
    if Path(spec).exists() or ":" not in spec:
        raise ValueError(f"judge {spec!r} must be a model directory or module:function")
    from .reward import load_scorer

    return load_scorer(spec)


def categorize(prompts: list[str], judge) -> tuple[list[str | None], list[str]]:
    """(category or None per prompt, raw answer per prompt)."""
    answers = list(judge(list(prompts)))
    if len(answers) != len(prompts):
        raise ValueError(f"the judge returned {len(answers)} answers for {len(prompts)} prompts")
    answers = [a if isinstance(a, str) else ("" if a is None else str(a)) for a in answers]
    return [parse_category(a) for a in answers], answers


def summary(categories: list[str | None]) -> dict:
    counts = Counter(categories)
    return {**{c: counts.get(c, 0) for c in CATEGORIES}, "unparseable": counts.get(None, 0), "total": len(categories)}


# -- CLI -----------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--prompts", required=True, help="prompt file (JSONL, JSON, CSV or Parquet)")
    p.add_argument("--prompt-column", default=None, help="field holding the prompt (default: prompt, else messages)")
    p.add_argument("--judge", required=True, help="judge: a causal LM directory, or module:function (list of prompts -> list of answers)")
    p.add_argument("--out", required=True, help="output file: .jsonl or .parquet (id, prompt, category, judge_answer)")
    p.add_argument("--limit", type=int, default=None, help="categorize only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length for a model judge (default 8)")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error", help="a bad prompt row stops the run or is skipped")


def run(args) -> int:
    from .prompts import read_prompts

    out = Path(args.out)
    if out.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"--out {out}: the file name must end in .jsonl or .parquet")
    ps = read_prompts(args.prompts, prompt_column=args.prompt_column, on_bad_row=args.on_bad_row, limit=args.limit)
    if not ps.prompts:
        raise ValueError(f"{args.prompts}: no prompts")
    judge = resolve_judge(args.judge, max_new_tokens=args.max_new_tokens)
    texts = [p.display for p in ps.prompts]
    categories, answers = categorize(texts, judge)
    rows = [{"id": p.id, "prompt": t, "category": c, "judge_answer": a} for p, t, c, a in zip(ps.prompts, texts, categories, answers)]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out)
    else:
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    s = summary(categories)
    print(" ".join(f"{k}={v}" for k, v in s.items()) + (f" skipped_rows={len(ps.skipped)}" if ps.skipped else ""))
    print(f"wrote {out}")
    return 0
