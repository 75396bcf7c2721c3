"""Train and held-out prompt sets for the SmolLM2 safety run, from ../shared/data:
XSTest (safe prompts that look unsafe + unsafe contrasts, labelled) and HarmBench's standard
text behaviours (harmful). Half of each set is harmful. Disjoint by prompt; seeded.

    python make_prompts.py OUT --train 120 --heldout 40  ->  OUT/train.jsonl, OUT/heldout.jsonl
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def load() -> tuple[list[dict], list[dict]]:
    """(harmful, safe) rows {id, prompt, label}."""
    xstest = list(csv.DictReader((DATA / "xstest" / "xstest_prompts.csv").open()))
    harmbench = [r for r in csv.DictReader((DATA / "harmbench" / "harmbench_behaviors_text_all.csv").open())
                 if r["FunctionalCategory"] == "standard" and not r["ContextString"].strip()]
    safe = [{"id": f"xstest-{r['id']}", "prompt": r["prompt"], "label": "safe"} for r in xstest if r["label"] == "safe"]
    harmful = [{"id": f"xstest-{r['id']}", "prompt": r["prompt"], "label": "harmful"} for r in xstest if r["label"] == "unsafe"]
    harmful += [{"id": f"harmbench-{r['BehaviorID']}", "prompt": r["Behavior"], "label": "harmful"} for r in harmbench]
    return harmful, safe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=120)
    p.add_argument("--heldout", type=int, default=40)
    args = p.parse_args()
    harmful, safe = load()
    rng = random.Random(0)
    rng.shuffle(harmful)
    rng.shuffle(safe)
    need = (args.train + args.heldout + 1) // 2
    if need > min(len(harmful), len(safe)):
        raise SystemExit(f"--train + --heldout asks for {need} prompts of each kind; there are {len(harmful)} harmful, {len(safe)} safe")
    sets = {"train": (0, args.train // 2), "heldout": (args.train // 2, args.train // 2 + args.heldout // 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (lo, hi) in sets.items():
        rows = harmful[lo:hi] + safe[lo:hi]
        rng.shuffle(rows)
        with (args.out / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{name}: {len(rows)} prompts ({hi - lo} harmful, {hi - lo} safe)")


if __name__ == "__main__":
    main()
