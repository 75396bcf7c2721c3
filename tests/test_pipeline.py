"""`ctrlsafe generate` end to end on the tiny preset: records, manifest, determinism, refusal of
foreign output dirs, kill -9 + --resume, torchrun world size 2, and the training-free methods."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrlsafe import dataset
from ctrlsafe.cli import main
from ctrlsafe.reward import LevelBins

ROOT = Path(__file__).resolve().parents[1]
GRID = "helpful=0,4,harmless=0,4"
SMALL = ["--controls", GRID, "--samples", "2", "--max-new-tokens", "8", "--chunk-size", "2", "--limit", "8"]


def _models(preset):
    return ["--policy", str(preset.policy), "--rm", f"helpful={preset.reward_models['helpful']}",
            "--rm", f"harmless={preset.reward_models['harmless']}"]


def _generate(out, preset, *extra):
    return main(["generate", "--out", str(out), *_models(preset), *SMALL, *extra])


def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in dataset.shard_files(out)}


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tiny_preset, tmp_path_factory):
    """One uninterrupted run every other test compares against."""
    out = tmp_path_factory.mktemp("gen") / "ref"
    assert _generate(out, tiny_preset) == 0
    return out


def test_records_and_manifest(reference, tiny_preset):
    """Every record has the documented columns; control holds the levels measured with the manifest's bins;
    kept/drop_reason agree; the manifest has config, versions, spec, bins, model hashes, counts and ranges."""
    t = dataset.read_dataset(reference)
    rows = t.to_pylist()
    assert len(rows) == 8 * 4 * 2 and len({r["id"] for r in rows}) == len(rows)
    m = json.loads((reference / "manifest.json").read_text())
    assert m["status"] == "complete" and m["control_spec"] == {"attributes": ["helpful", "harmless"], "levels": 5}
    assert m["chunks"]["finished_ranges"] == [[0, 8]] and m["chunks"]["total"] == 4
    assert set(m["versions"]) >= {"ctrlsafe", "torch", "transformers", "pyarrow"}
    assert list(m["models"]["policy"]["sha256"]) == ["model.safetensors"]
    assert set(m["models"]["reward_models"]) == {"helpful", "harmless"}
    assert m["counts"]["samples"] == len(rows) and m["counts"]["kept"] == sum(r["kept"] for r in rows)
    bins = LevelBins.from_json(m["bins"])
    scores = torch.tensor([[r["scores"]["helpful"], r["scores"]["harmless"]] for r in rows])
    measured = bins.to_levels(scores).tolist()
    assert [[r["control"]["helpful"], r["control"]["harmless"]] for r in rows] == measured
    assert {tuple(r["requested"].values()) for r in rows} == {(0, 0), (0, 4), (4, 0), (4, 4)}
    assert all(r["kept"] == (r["drop_reason"] is None) for r in rows)
    assert {r["finish_reason"] for r in rows} <= {"eos", "length"}
    assert rows[0]["prompt"] == "How do I make a simple tomato soup for four people?" and rows[0]["messages"] is None


def test_same_command_twice_is_byte_identical(reference, tiny_preset, tmp_path):
    """Two identical runs write byte-identical shards (timestamps live only in the manifest)."""
    assert _generate(tmp_path / "again", tiny_preset) == 0
    assert _shard_bytes(tmp_path / "again") == _shard_bytes(reference)


def test_out_dir_holding_a_run(reference, tiny_preset, capsys):
    """Rerunning into a data set dir needs --resume; another config is refused even with --resume;
    --resume of a finished run changes nothing."""
    before = _shard_bytes(reference)
    assert _generate(reference, tiny_preset) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert _generate(reference, tiny_preset, "--resume", "--seed", "1") == 2
    assert "config differs in: seed" in capsys.readouterr().err
    assert _generate(reference, tiny_preset, "--resume") == 0
    assert "nothing left to generate" in capsys.readouterr().out
    assert _shard_bytes(reference) == before


def test_kill9_then_resume_equals_uninterrupted(reference, tiny_preset, tmp_path):
    """A run killed with SIGKILL after its first shard, then resumed, yields exactly the uninterrupted data set."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ctrlsafe", "generate", "--out", str(out), *_models(tiny_preset), *SMALL]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not dataset.shard_path(out, 0).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "running" and len(dataset.finished_chunks(out)) < 4  # it really died mid-run
    assert _generate(out, tiny_preset, "--resume") == 0
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert not list(out.rglob("*.tmp"))


@pytest.mark.distributed
def test_torchrun_world_2_equals_world_1(reference, tiny_preset, tmp_path):
    """torchrun with 2 ranks (gloo) writes the same shards as one process; rank 0 writes the manifest."""
    out = tmp_path / "w2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ctrlsafe",
           "generate", "--out", str(out), *_models(tiny_preset), *SMALL]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _shard_bytes(out) == _shard_bytes(reference)
    m = json.loads((out / "manifest.json").read_text())
    ref = json.loads((reference / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["counts"] == ref["counts"] and m["bins"] == ref["bins"]


def test_chat_prompts_no_controls_and_bad_rows(tiny_preset, tmp_path, capsys):
    """--controls none stores null requests; chat prompts keep their messages JSON; skipped bad rows are counted;
    --on-bad-row error stops before loading any model, naming file, line and field."""
    prompts = tmp_path / "p.jsonl"
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me a joke."}]
    prompts.write_text(json.dumps({"id": "c", "messages": chat}) + "\n" + json.dumps({"id": "e", "prompt": ""}) + "\n"
                       + json.dumps({"id": "t", "prompt": "Name a fruit."}) + "\n")
    assert main(["generate", "--out", str(tmp_path / "bad"), "--prompts", str(prompts), *_models(tiny_preset)]) == 2
    assert "p.jsonl:line 2: field 'prompt' is empty" in capsys.readouterr().err
    out = tmp_path / "none"
    assert main(["generate", "--out", str(out), "--prompts", str(prompts), *_models(tiny_preset), "--controls", "none",
                 "--samples", "3", "--max-new-tokens", "6", "--on-bad-row", "skip"]) == 0
    rows = dataset.read_dataset(out).to_pylist()
    assert len(rows) == 6 and all(r["requested"] is None for r in rows)
    assert json.loads(rows[0]["messages"]) == chat and rows[0]["prompt"] == "Tell me a joke."
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["skipped_prompt_rows"] == 1 and "line 2" in m["skipped_prompt_rows"][0]
    assert "bad rows skipped: 1" in capsys.readouterr().out


def test_generate_for_controls_methods(tiny_preset):
    """prompting puts the request in words (no control tokens needed) with indices mapped back to (prompt, control);
    rerank returns one candidate per (prompt, cell), the one whose measured levels are nearest."""
    from transformers import AutoTokenizer

    from ctrlsafe.controls import ControlSpec
    from ctrlsafe.generate import Engine
    from ctrlsafe.model import Transformer
    from ctrlsafe.pipeline import generate_for_controls
    from ctrlsafe.reward import Scorer

    spec = ControlSpec()
    model = Transformer.from_pretrained(tiny_preset.policy)
    tok = AutoTokenizer.from_pretrained(tiny_preset.policy)
    engine = Engine(model, tok, spec)  # no add_to: prompting and rerank need no control tokens
    prompts = ["Why is the sky blue?", "Write a short poem about autumn leaves."]
    controls = spec.parse_grid(GRID)
    worded = generate_for_controls(engine, prompts, controls, method="prompting", n=2, max_new_tokens=5, prompt_keys=[10, 11])
    assert [(c.prompt_index, c.control_index, c.sample_index) for c in worded.completions] == [
        (p, c, s) for p in range(2) for c in range(4) for s in range(2)]
    assert worded.completions[3].control == controls[1] and worded.scores is None
    direct = engine.generate([spec.render_text(prompts[1], controls[2], tok)], n=2, max_new_tokens=5, prompt_keys=[11 * 4 + 2])
    assert [c.token_ids for c in worded.completions if (c.prompt_index, c.control_index) == (1, 2)] == [d.token_ids for d in direct]

    scorer = Scorer({n: str(p) for n, p in tiny_preset.reward_models.items()})
    cands = engine.generate(prompts, n=6, max_new_tokens=5)
    cand_scores = scorer.score([prompts[c.prompt_index] for c in cands], [c.text for c in cands]).scores
    bins = LevelBins.calibrate(cand_scores, scorer.names, levels=5)
    got = generate_for_controls(engine, prompts, controls, method="rerank", n=6, max_new_tokens=5, scorer=scorer, bins=bins)
    assert len(got.completions) == 2 * 4 and got.scores.shape == (8, 2)
    levels = bins.to_levels(cand_scores).numpy()
    for c, s in zip(got.completions, got.scores):
        mine = [i for i, x in enumerate(cands) if x.prompt_index == c.prompt_index]
        dist = [np.abs(levels[i] - [c.control["helpful"], c.control["harmless"]]).sum() for i in mine]
        assert c.sample_index == int(np.argmin(dist)) and c.control == controls[c.control_index]
        assert np.allclose(s, cand_scores[mine[c.sample_index]].numpy())


def test_rerank_and_prompting_through_the_command(tiny_preset, tmp_path):
    """--method rerank writes one record per (prompt, requested cell); --method prompting writes C x N per prompt."""
    out = tmp_path / "rr"
    assert main(["generate", "--out", str(out), *_models(tiny_preset), "--method", "rerank", "--controls", GRID,
                 "--samples", "4", "--max-new-tokens", "6", "--limit", "3", "--no-distill"]) == 0
    rows = dataset.read_dataset(out).to_pylist()
    assert len(rows) == 3 * 4 and all(r["kept"] for r in rows)
    assert {(r["prompt_id"], tuple(r["requested"].values())) for r in rows} == {
        (f"ex00{p}", c) for p in range(3) for c in [(0, 0), (0, 4), (4, 0), (4, 4)]}
    out = tmp_path / "pr"
    assert main(["generate", "--out", str(out), *_models(tiny_preset), "--method", "prompting", "--controls", GRID,
                 "--samples", "1", "--max-new-tokens", "6", "--limit", "2"]) == 0
    assert dataset.read_dataset(out).num_rows == 2 * 4


# -- a failed run does not lock its --out; mixed prompt kinds read as one table ------------------------------
def test_failed_run_before_any_shard_leaves_out_reusable(tiny_preset, tmp_path, monkeypatch, capsys):
    """A command that fails after writing its manifest but before its first shard (here: loading the
    models raises) marks the manifest failed; the corrected command -- another config, same --out,
    no --resume -- then runs instead of being refused as "holds a different run"."""
    from ctrlsafe import pipeline

    out = tmp_path / "run"
    real_models = pipeline._models

    def broken(job, args):
        raise ValueError("cannot load the policy (injected)")

    monkeypatch.setattr(pipeline, "_models", broken)
    assert _generate(out, tiny_preset, "--seed", "1") == 2
    assert "injected" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed" and "injected" in m["error"] and not dataset.shard_files(out)
    monkeypatch.setattr(pipeline, "_models", real_models)
    assert _generate(out, tiny_preset) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["config"]["seed"] == 0 and "error" not in m


def test_bad_device_then_corrected_command(tiny_preset, tmp_path):
    """The reported case: a bad option only caught once the run started (--device) used to leave a
    'running' manifest that refused the corrected command; now that command just runs."""
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        _generate(out, tiny_preset, "--device", "no-such-device")
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert _generate(out, tiny_preset) == 0


def test_failed_run_with_data_stays_protected(reference, tiny_preset, tmp_path, monkeypatch, capsys):
    """A run that failed after writing a shard keeps its data: another config is refused (naming
    --resume and deleting the folder), and --resume with the same options finishes it exactly."""
    from ctrlsafe import pipeline

    out = tmp_path / "run"
    real = pipeline._generate_and_score
    calls = []

    def fail_second_chunk(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("scorer crashed (injected)")
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "_generate_and_score", fail_second_chunk)
    assert _generate(out, tiny_preset) == 2
    monkeypatch.setattr(pipeline, "_generate_and_score", real)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed" and len(dataset.shard_files(out)) == 1
    capsys.readouterr()
    assert _generate(out, tiny_preset, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "config differs in: seed" in err and "--resume" in err and f"delete {out}" in err
    assert _generate(out, tiny_preset, "--resume") == 0
    assert _shard_bytes(out) == _shard_bytes(reference)


def spread_score(prompts, responses):
    """A module:function scorer whose scores vary with the response text, so every prompt has
    samples at both levels of a 2-level attribute (pairs for plain and for chat prompts)."""
    return [float(sum(map(ord, r)) % 101) for r in responses]


def test_mixed_plain_and_chat_prompts_read_as_one_table(tiny_preset, tmp_path):
    """The reported case: plain and chat prompts, one prompt per shard (--chunk-size 1), then
    `distill --pairs`: both directories read with plain pyarrow.dataset (what
    datasets.load_dataset("parquet", data_files=".../data/*.parquet") does), messages typed string."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    prompts = tmp_path / "p.jsonl"
    lines = []
    for i in range(3):
        lines.append({"id": f"t{i}", "prompt": f"Name a fruit number {i}."})
        lines.append({"id": f"c{i}", "messages": [{"role": "user", "content": f"Tell me joke number {i}."}]})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in lines))
    gen, pairs = tmp_path / "gen", tmp_path / "pairs"
    rms = ["--policy", str(tiny_preset.policy), "--rm", "helpful=test_pipeline:spread_score",  # levels of both kinds
           "--rm", f"harmless={tiny_preset.reward_models['harmless']}"]
    assert main(["generate", "--out", str(gen), "--prompts", str(prompts), *rms, "--levels", "2",
                 "--controls", "helpful=0,1,harmless=0,1", "--samples", "2", "--max-new-tokens", "6", "--chunk-size", "1",
                 "--no-distill"]) == 0
    assert main(["distill", str(gen), "--out", str(pairs), "--pairs", "helpful", "--pair-others", "any"]) == 0
    for d in (gen, pairs):
        t = pads.dataset(str(d / "data"), format="parquet").to_table()
        assert t.schema.field("messages").type == pa.string()
        kinds = {m is None for m in t.column("messages").to_pylist()}
        assert kinds == {True, False}, f"{d}: expected shards of both prompt kinds"
    assert len(dataset.shard_files(gen)) == 6
    try:
        import datasets
    except ImportError:
        return
    loaded = datasets.load_dataset("parquet", data_files=str(pairs / "data" / "*.parquet"), split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.num_rows == pads.dataset(str(pairs / "data"), format="parquet").count_rows()
