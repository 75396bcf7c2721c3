"""ctrlsafe.gpucheck: the dry run passes end to end on this CPU (every stage, trace, summary), a
failed check makes the exit code non-zero, and without CUDA the full run refuses clearly.

Each run is a fresh subprocess: the dry run sets TRITON_INTERPRET=1 before triton is imported,
which cannot be undone in a process that has already imported it."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from ctrlsafe.gpucheck import STAGES

# find_spec, not importorskip: importing triton here, at collection, before the Triton test modules
# set TRITON_INTERPRET=1, would leave their kernels compiled for a GPU
if importlib.util.find_spec("triton") is None:
    pytest.skip("needs triton", allow_module_level=True)

def gpucheck(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "ctrlsafe.gpucheck", *args], env=env, capture_output=True, text=True, timeout=timeout)


def rows_of(out_dir):
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


def assert_passing_dry_run(out_dir):
    out = gpucheck("--out", str(out_dir), "--dry-run")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = rows_of(out_dir)
    assert {r["stage"] for r in rows} == set(STAGES)
    for r in rows:
        assert set(r) == {"stage", "name", "ok", "figures", "seconds"}
        assert r["ok"] is True, r
    names = {f"{r['stage']}.{r['name']}" for r in rows}
    assert {"sampler.triton_vs_reference", "sampler.chi_square", "logprobs.bitwise_rerun", "reward.score_ids_vs_transformers",
            "engine.greedy_equals_hf_generate", "throughput.decode_1b"} <= names
    trace = json.loads((out_dir / "trace.json").read_text())
    assert trace["traceEvents"]
    assert f"{len(rows)}/{len(rows)} checks passed" in out.stdout
    assert "stage" in out.stdout and "figures" in out.stdout  # the summary table's header
    assert not any(p.name.startswith("models-") for p in out_dir.iterdir())  # saved models cleaned up
    return rows, out.stdout


@pytest.mark.slow
def test_dry_run_passes_every_stage_on_cpu(tmp_path):
    """--dry-run on CPU (Triton interpreted): exit 0, every stage in results.jsonl with ok true,
    a chrome trace, the summary printed."""
    rows, stdout = assert_passing_dry_run(tmp_path)
    decode = next(r for r in rows if r["name"] == "decode_1b")["figures"]
    assert decode["ctrlsafe_tokens_per_s"] > 0 and "ctrlsafe_launches_per_step" in decode


def test_a_failed_check_exits_non_zero(tmp_path):
    """A failing check (forced through the --fail seam) is recorded with ok false, named in the
    summary, and gives exit code 1; the other checks still run."""
    out = gpucheck("--out", str(tmp_path), "--dry-run", "--stages", "environment", "--fail", "environment.versions")
    assert out.returncode == 1, out.stdout + out.stderr
    rows = {r["name"]: r for r in rows_of(tmp_path)}
    assert rows["versions"]["ok"] is False and rows["versions"]["figures"]["injected_failure"] is True
    assert rows["sdpa_backends"]["ok"] is True
    assert "FAILED: environment.versions" in out.stdout


def test_a_crashing_check_is_a_failure_not_a_crash():
    """An exception inside a check becomes a failed row with the error as its figure."""
    import tempfile
    from pathlib import Path

    from ctrlsafe.gpucheck import Checks

    with tempfile.TemporaryDirectory() as d:
        checks = Checks(Path(d))
        assert checks.run("s", "boom", lambda: 1 / 0) is False
        assert checks.run("s", "fine", lambda: (True, {"x": torch.tensor(2.5), "nan": float("nan")})) is True
        rows = [json.loads(line) for line in (Path(d) / "results.jsonl").read_text().splitlines()]
    assert rows[0]["ok"] is False and "ZeroDivisionError" in rows[0]["figures"]["error"]
    assert rows[1]["figures"] == {"x": 2.5, "nan": "nan"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_cuda_the_full_run_asks_for_a_gpu(tmp_path):
    out = gpucheck("--out", str(tmp_path))
    assert out.returncode == 2
    assert "needs a CUDA GPU" in out.stderr and "--dry-run" in out.stderr


@pytest.mark.cuda
def test_dry_run_on_gpu_compiles_the_kernels(tmp_path):
    """On a GPU the dry run uses compiled kernels (no interpreter) on tiny shapes."""
    rows, _ = assert_passing_dry_run(tmp_path)
    env = next(r for r in rows if r["name"] == "versions")["figures"]
    assert env["triton_interpret"] == "0"
