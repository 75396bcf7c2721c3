"""Smoke version of the stories260k controllability replication (examples/stories_control).

Runs the real script, `examples/stories_control/run.sh`, end to end at reduced size: generate on
the real trained stories260k model with the two example scorers, train CLM and ExMATE, eval the
base model, reranking and both trained models on held-out openings, then write the report.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "stories_control" / "run.sh"

SMOKE = {"TRAIN_PROMPTS": "64", "HELDOUT_PROMPTS": "12", "SAMPLES": "2", "MAX_NEW": "64", "STEPS": "150",
         "EVAL_SAMPLES": "2", "RERANK_N": "4", "SEEDS": "0", "JOBS": "2"}

# Measured at these SMOKE sizes (seed 0, this CPU, 2026-11-23): Spearman of requested level vs
# score, base (untrained control tokens) -> trained:
#   sentiment: base -0.001, CLM 0.017, ExMATE 0.114
#   dialogue:  base  0.097, CLM 0.066, ExMATE 0.331   (best margin: ExMATE dialogue, +0.234)
#   (rerank, training-free, for reference: 0.614 / 0.634)
# Sampling is seeded, so the run is reproducible up to float differences between machines; the
# threshold is well under the measured margin (one Spearman over 216 samples has a standard error
# of about 0.07). CPU time measured: 2 min 25 s user (5 min 37 s wall on a heavily shared 2-core box).
MIN_MARGIN = 0.10


def _spearman(out: Path, method: str) -> dict[str, float]:
    m = json.loads((out / "eval" / f"{method}-s0" / "metrics.json").read_text())
    return {a: v["spearman"] for a, v in m["controllability"]["attributes"].items()}


def test_smoke_replication_trained_beats_base(tmp_path, stories260k):
    """End to end at smoke size: every step of run.sh succeeds, the report is written from the
    metrics, and a trained model (CLM or ExMATE) follows at least one control attribute clearly
    better than the base model with untrained control tokens (Spearman margin >= MIN_MARGIN)."""
    out, report = tmp_path / "run", tmp_path / "replication.md"
    env = {**os.environ, **SMOKE, "POLICY": str(stories260k), "REPORT": str(report),
           "PYTHON": sys.executable, "CTRLSAFE": str(Path(sys.executable).parent / "ctrlsafe")}
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    base = _spearman(out, "base")
    trained = {m: _spearman(out, m) for m in ("clm", "exmate")}
    margins = {(m, a): trained[m][a] - base[a] for m in trained for a in base}
    best = max(margins, key=margins.get)
    assert margins[best] >= MIN_MARGIN, f"no trained model beats base by {MIN_MARGIN}: margins {margins}"
    text = report.read_text()
    assert "| CLM on the distilled data | sentiment |" in text and "ExMATE" in text
