"""DDP: `torchrun --nproc_per_node=2` (gloo, CPU) trains the same weights as one process with the
same global batch."""
import os
import subprocess
import sys

import pytest

from test_train import metrics, sft_rows, small_policy, state_dict, train, write_dataset  # noqa: F401

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]


def test_world2_equals_world1(small_policy, tmp_path):  # noqa: F811
    """ExMATE (k=2), global batch 4, 3 steps. World 1: one micro-batch of 4. World 2: per rank 2
    micro-batches of 1 (so DDP's no_sync over micro-batches and over the counterfactual passes
    is exercised). fp32: step losses agree to 1e-5 and weights to 1% of one step's Adam update
    (lr 3e-3) — reduction order differs between the runs, and Adam's 1/sqrt(v) magnifies float
    noise in near-zero gradient entries; a missing or double-counted gradient would differ ~lr."""
    data = write_dataset(tmp_path / "data", sft_rows())
    args = ["--data", data, "--model", small_policy, "--objective", "exmate", "--k", "2", "--alpha", "0.5",
            "--lr", "3e-3", "--batch-size", "4", "--max-steps", "3", "--seed", "0", "--no-progress"]
    train(*args, "--out", tmp_path / "w1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CTRLSAFE_DEBUG": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ctrlsafe", "train",
           *map(str, args), "--grad-accum", "2", "--out", str(tmp_path / "w2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r1, r2 in zip(metrics(tmp_path / "w1"), metrics(tmp_path / "w2"), strict=True):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-5)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5)  # Adam hides a gradient scale error
        assert r1["tokens"] == r2["tokens"]
    w1, w2 = state_dict(tmp_path / "w1"), state_dict(tmp_path / "w2")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 0.01 * 3e-3
