"""Write the story openings: train.jsonl and heldout.jsonl (one {"id", "prompt"} per line).

Openings are built from templates x characters x places. The held-out set uses characters
that never appear in training, so evaluation measures control on unseen openings rather than
recall of training prompts. Deterministic: the same files every run.

    python make_openings.py OUT_DIR [--train N] [--heldout M]
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

TEMPLATES = [
    "Once upon a time, there was a {who} named {name}. {Pron} lived {where}.",
    "One day, {name} the {who} went {where}.",
    "{name} was a little {who} who lived {where}. Every day,",
    "Once upon a time, a {who} called {name} found a box {where}.",
    "It was a sunny day. {name} the {who} was playing {where}.",
    "There once was a {who} named {name}. One morning, {pron} woke up {where}.",
]
PLACES = ["in a big forest", "near the sea", "in a small town", "in the park", "at the farm",
          "in a tall tree", "by the river", "in the garden"]
TRAIN_CHARACTERS = [("girl", "Lily", "she"), ("boy", "Tom", "he"), ("cat", "Mittens", "she"),
                    ("dog", "Max", "he"), ("bird", "Tweety", "she"), ("bunny", "Hoppy", "he"),
                    ("bear", "Ben", "he"), ("girl", "Sue", "she")]
HELDOUT_CHARACTERS = [("boy", "Tim", "he"), ("girl", "Mia", "she"), ("frog", "Fred", "he"),
                      ("mouse", "Sam", "he"), ("duck", "Daisy", "she")]


def openings(characters, n: int, seed: int) -> list[str]:
    combos = list(itertools.product(TEMPLATES, characters, PLACES))
    random.Random(seed).shuffle(combos)
    if n > len(combos):
        raise ValueError(f"asked for {n} openings but only {len(combos)} distinct ones exist")
    return [t.format(who=who, name=name, pron=pron, Pron=pron.capitalize(), where=where)
            for t, (who, name, pron), where in combos[:n]]


def write(path: Path, prefix: str, texts: list[str]) -> None:
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"{prefix}{i:03d}", "prompt": text}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=300)
    p.add_argument("--heldout", type=int, default=60)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "train.jsonl", "train", openings(TRAIN_CHARACTERS, args.train, seed=0))
    write(args.out / "heldout.jsonl", "heldout", openings(HELDOUT_CHARACTERS, args.heldout, seed=1))


if __name__ == "__main__":
    main()
