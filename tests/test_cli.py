"""The command line: every verb's options are documented and show their defaults in one style."""
import argparse

import pytest

from ctrlsafe.cli import COMMANDS, HelpFormatter, build_parser, main



def verb_parser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_has_help(name):
    """Walk parser._actions of every verb: each option and positional has a help string."""
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in options(verb_parser(name)) if not (a.help or "").strip()]
    assert not missing, f"ctrlsafe {name}: options without help: {missing}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_shows_defaults(name, capsys):
    """`ctrlsafe VERB --help` renders (no broken %-formatting), and every option whose default is a
    real value says it: either the formatter's "(default: X)" or the help's own wording."""
    parser = verb_parser(name)
    assert parser.formatter_class is HelpFormatter
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: ctrlsafe {name}")
    formatter = HelpFormatter(prog="x")
    for a in options(parser):
        if a.default in (None, False, [], argparse.SUPPRESS) or not a.help:
            continue
        shown = formatter._get_help_string(a) % {"default": a.default}
        assert "default" in shown.lower(), f"ctrlsafe {name} {a.option_strings}: default {a.default!r} not shown"


def test_formatter_appends_default_once():
    """A help that already states its default is left alone; None, [] and off flags add nothing."""
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--a", type=int, default=5, help="levels")
    p.add_argument("--b", default="x", help="thing (default: x, as documented)")
    p.add_argument("--c", default=None, help="optional")
    p.add_argument("--d", action="append", default=[], help="repeatable")
    p.add_argument("--e", action="store_true", help="a flag")
    text = " ".join(p.format_help().split())
    assert "levels (default: 5)" in text
    assert text.count("default: x") == 1
    assert "optional (default" not in text and "repeatable (default" not in text and "a flag (default" not in text


def test_train_help_shows_defaults_of_most_options(capsys):
    """The reported case: `ctrlsafe train --help` showed defaults for 19 of 59 options (every option: test above)."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR peak learning rate (AdamW) (default: 1e-05)" in text
    assert "(default: 0.1)" in text and "--log-every N" in text and "--report-to {none,tensorboard,wandb}" in text
