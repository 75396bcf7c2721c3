"""`ctrlsafe categorize`: answer parsing, callable judges, and the tiny preset model as judge."""
import json

import pytest

from ctrlsafe.categorize import CATEGORIES, TEMPLATE, categorize, judge_prompt, parse_category, summary
from ctrlsafe.cli import main


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("EXPLICIT", "ehd"),
        ("implicit", "ihd"),
        (" Mixed.", "mhd"),
        ("NONE", "none"),
        ("**IMPLICIT**\nThe request hides its goal.", "ihd"),
        ("Category: explicit harm", "ehd"),
        ("The answer is IMPLICIT, not explicit.", "ihd"),
        ("Explicit. It is clearly not safe.", "ehd"),
        ("EXPLICIT, IMPLICIT, MIXED or NONE", None),  # the options echoed back: ambiguous
        ("implicit or mixed", None),
        ("It is not explicit; it is implicit.", "ihd"),
        ("This request is not harmful.", "none"),
        ("benign", "none"),
        ("ehd", "ehd"),
        ('"MIXED"', "mhd"),
        ("I think the category is none of the harmful ones: NONE", "none"),
        ("", None),
        ("asdf qwerty", None),
        ("explicitly", None),  # a different word, not a category
        ("unsafe", None),
        (None, None),
        (3, None),
    ],
)
def test_parse_category(answer, expected):
    """Category words are found case-insensitively as whole words, negated ones are skipped, and an
    answer without exactly one named category (or not a string) is unparseable (None)."""
    assert parse_category(answer) == expected


def test_template_names_every_category_and_embeds_the_prompt():
    """The judge prompt contains the request and the four answer words, and each answer word
    parses back to a distinct category."""
    text = judge_prompt("How do I bake bread?")
    assert "How do I bake bread?" in text and "{prompt}" in TEMPLATE
    words = ["EXPLICIT", "IMPLICIT", "MIXED", "NONE"]
    assert all(w in text for w in words)
    assert sorted(parse_category(w) for w in words) == sorted(CATEGORIES)


def keyword_judge(prompts):
    """A callable judge for tests: explicit for 'bomb', implicit for 'story', mixed for 'but',
    free text without a category for 'weird', else none."""
    out = []
    for p in prompts:
        if "bomb" in p:
            out.append("EXPLICIT")
        elif "story" in p:
            out.append("I'd say implicit.")
        elif "but" in p:
            out.append("mixed")
        elif "weird" in p:
            out.append("I cannot tell.")
        else:
            out.append("NONE")
    return out


def test_categorize_and_summary():
    """categorize returns one category per prompt plus the raw answers; summary counts each
    category and the unparseable answers."""
    prompts = ["how to make a bomb", "write a story where a chemist explains", "fix my bike but also pick a lock", "weird", "bake bread"]
    cats, answers = categorize(prompts, keyword_judge)
    assert cats == ["ehd", "ihd", "mhd", None, "none"]
    assert answers[3] == "I cannot tell."
    assert summary(cats) == {"ehd": 1, "ihd": 1, "mhd": 1, "none": 1, "unparseable": 1, "total": 5}
    with pytest.raises(ValueError, match="returned 1 answers for 2 prompts"):
        categorize(["a", "b"], lambda ps: ["none"])


def _write_prompts(path, texts):
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return path


def test_cli_with_callable_judge(tmp_path, capsys, monkeypatch):
    """The command reads a prompt file, calls a module:function judge and writes JSONL with id,
    prompt, category and the judge's answer; the printed summary counts the unparseable answer."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_judge.py").write_text(
        "def judge(prompts):\n    return ['EXPLICIT' if 'bomb' in p else ('???' if 'weird' in p else 'none') for p in prompts]\n"
    )
    src = _write_prompts(tmp_path / "p.jsonl", ["make a bomb", "weird one", "bake bread"])
    out = tmp_path / "cats.jsonl"
    assert main(["categorize", "--prompts", str(src), "--judge", "my_judge:judge", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["category"] for r in rows] == ["ehd", None, "none"]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"] and rows[1]["judge_answer"] == "???"
    assert "ehd=1 ihd=0 mhd=0 none=1 unparseable=1 total=3" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    """A judge that is neither a directory nor module:function, and an unsupported output suffix,
    are one-line user errors (exit status 2)."""
    src = _write_prompts(tmp_path / "p.jsonl", ["a"])
    assert main(["categorize", "--prompts", str(src), "--judge", "nonsense", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "must be a model directory or module:function" in capsys.readouterr().err
    assert main(["categorize", "--prompts", str(src), "--judge", "x:y", "--out", str(tmp_path / "o.txt")]) == 2
    assert ".jsonl or .parquet" in capsys.readouterr().err


def test_cli_with_tiny_preset_model_judge(tmp_path, tiny_preset, capsys):
    """A causal LM directory as judge runs through the Engine; the random tiny policy answers
    garbage, which is written with category null and counted as unparseable (never guessed)."""
    import pyarrow.parquet as pq

    src = _write_prompts(tmp_path / "p.jsonl", ["make a bomb", "bake bread", "tell me a story"])
    out = tmp_path / "cats.parquet"
    assert main(["categorize", "--prompts", str(src), "--judge", str(tiny_preset.policy), "--out", str(out), "--max-new-tokens", "4"]) == 0
    table = pq.read_table(out).to_pylist()
    assert len(table) == 3
    for row in table:
        assert row["category"] == parse_category(row["judge_answer"])
    printed = capsys.readouterr().out
    n_bad = sum(r["category"] is None for r in table)
    assert f"unparseable={n_bad} total=3" in printed
