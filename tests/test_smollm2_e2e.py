"""Smoke version of the SmolLM2 end-to-end safety run (examples/smollm2_safety, docs/smollm2_e2e.md).

Runs the real script on the real model at tiny size: convert (cached), prompt sets, generate with
the built-in prompt-aware scorers, train CLM and ExMATE, eval base / CLM / ExMATE.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "smollm2_safety" / "run.sh"
SMOKE = {"TRAIN_PROMPTS": "8", "HELDOUT_PROMPTS": "4", "SAMPLES": "1", "MAX_NEW": "8", "STEPS": "2", "BATCH": "2",
         "EVAL_SAMPLES": "1", "OMP_NUM_THREADS": "2"}

pytestmark = pytest.mark.real_model


def test_smoke_run_writes_every_stage(tmp_path, smollm2):
    """Every step of run.sh succeeds on SmolLM2 and leaves its artefact: a data set whose rows carry
    the measured levels of both attributes, two trained models, and eval metrics over the 2x2 grid
    with the safety table of the labelled held-out prompts (harmful and safe both present)."""
    out = tmp_path / "run"
    env = {**os.environ, **SMOKE, "PYTHON": sys.executable, "CTRLSAFE": str(Path(sys.executable).parent / "ctrlsafe")}
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert set(manifest["control_spec"]["attributes"]) == {"harmless", "helpful"}
    for objective in ("clm", "exmate"):
        assert (out / "train" / objective / "model.safetensors").is_file()
    for method in ("base", "clm", "exmate"):
        m = json.loads((out / "eval" / method / "metrics.json").read_text())
        assert set(m["controllability"]["attributes"]) == {"harmless", "helpful"}
        assert len(m["controllability"]["cells"]) == 4
        overall = m["suites"]["prompts"]["overall"]
        assert overall["n_harmful"] > 0 and overall["n_safe"] > 0 and 0 <= overall["safe_rate"] <= 1
    assert "done in" in proc.stdout
