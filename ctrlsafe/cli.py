"""`ctrlsafe <command>`: one verb per arrow of the data flow.

Each command lives in the module that implements it, which provides `add_arguments(parser)` and
`run(args) -> int`. Only the chosen command's module is imported, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__

COMMANDS = {
    "generate": ("ctrlsafe.pipeline", "self-generate a controllable data set: sample, score, level, distill, write"),
    "score": ("ctrlsafe.reward", "score (prompt, response) pairs with reward models or callables"),
    "distill": ("ctrlsafe.distill", "filter, balance, pair or mix a generated data set"),
    "train": ("ctrlsafe.train", "fine-tune with CLM, ExMATE, DPO(+AMA), RAFT, SIT, PPO or RLOO"),
    "eval": ("ctrlsafe.evaluate", "controllability grid, safe rate, over-refusal and helpfulness"),
    "categorize": ("ctrlsafe.categorize", "label prompts explicit / implicit / mixed harm (FDC)"),
    "convert": ("ctrlsafe.convert", "convert a GGUF model file into a Hugging Face safetensors directory"),
    "bench": ("ctrlsafe.bench", "benchmark every kernel and stage against its reference"),
}


class CommandError(Exception):
    """An error meant for the user: printed as one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, in one style: "(default: X)".

    Not appended when the help already says what the default is (it mentions "default", e.g. "the
    tiny preset" for a None default), when there is nothing to say (None, an empty list) or for
    an on/off flag that is off by default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower():
            return text
        default = action.default
        if default is None or default is argparse.SUPPRESS or default == [] or (action.nargs == 0 and default is False):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        return text


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrlsafe", formatter_class=HelpFormatter,
        description="Controllable safety and helpfulness for LLMs. Run `ctrlsafe COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ctrlsafe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (CommandError, ValueError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("CTRLSAFE_DEBUG"):
            raise
        print(f"ctrlsafe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctrlsafe {args.command}: interrupted", file=sys.stderr)
        return 130
