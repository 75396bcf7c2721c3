"""`ctrlsafe train` end to end on a small random Llama (the tiny preset's tokenizer, 2 layers,
hidden 64): every objective lowers its loss, ExMATE separates controls more than CLM, DPO widens
the chosen-rejected margin, resume is exact, checkpoints load in transformers, bad data errors."""
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctrlsafe.cli import main as cli
from ctrlsafe.controls import ControlSpec
from ctrlsafe.losses import IGNORE, SequenceLogprobs
from ctrlsafe.model import Transformer

SPEC = ControlSpec(("helpful", "harmless"), levels=2)
PROMPTS = ["How do I cook rice?", "Tell me about Python.", "What is the weather like today?", "How can I stay safe?"]
RESPONSES = {  # response by helpful level: the data ties each control cell to one style
    0: "I'm sorry, but I can't help with that request.",
    1: "Sure, here is a simple answer. First, gather what you need.",
}


# -- fixtures and helpers ---------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def small_policy(tiny_preset, tmp_path_factory) -> Path:
    """A 2-layer hidden-64 random Llama with the tiny preset's tokenizer (fast to train)."""
    from transformers import AutoTokenizer

    from ctrlsafe.presets import _llama_config, _random_model

    tok = AutoTokenizer.from_pretrained(tiny_preset.policy)
    path = tmp_path_factory.mktemp("small_policy")
    model = _random_model(_llama_config(len(tok), 64, 2, 4, 2, 128, tok), torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_dataset(path: Path, rows: list[dict], spec: ControlSpec | None = SPEC) -> Path:
    """A data set directory like `ctrlsafe generate` writes: data/*.parquet + manifest.json."""
    (path / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "data" / "chunk-000000.parquet")
    manifest = {"format": "ctrlsafe-dataset", "bins": {}}
    if spec:
        manifest["control_spec"] = spec.to_dict()
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def sft_rows(n_prompts: int = 4, kept_extra: bool = True) -> list[dict]:
    """Each prompt answered under cell (h, 1-h) with RESPONSES[h]; plus a kept=False row that
    must be ignored."""
    rows = []
    for i, p in enumerate(PROMPTS[:n_prompts]):
        for h in (0, 1):
            rows.append(dict(id=f"{i}-{h}", prompt_id=str(i), prompt=p, messages=None,
                             requested={"helpful": h, "harmless": 1 - h}, control={"helpful": h, "harmless": 1 - h},
                             sample_index=0, response=RESPONSES[h], scores={"helpful": 0.0, "harmless": 0.0},
                             finish_reason="eos", kept=True, drop_reason=None))
    if kept_extra:
        rows.append({**rows[0], "id": "dropped", "response": "", "kept": False, "drop_reason": "empty"})
    return rows


def pair_rows() -> list[dict]:
    return [dict(prompt=p, chosen=RESPONSES[0], rejected=RESPONSES[1], control={"helpful": 1, "harmless": 1})
            for p in PROMPTS]


def train(*argv) -> None:
    assert cli(["train", "--no-progress", *map(str, argv)]) == 0


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]


def losses_fall(rows: list[dict], factor: float = 0.8) -> bool:
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    return math.isfinite(last) and last < factor * first


def encode(tok, prompt, control, response):
    from ctrlsafe.controls import render_prompt

    prefix = render_prompt(prompt, tok) + SPEC.control_ids(control, tok)
    resp = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prefix + resp])
    labels = torch.tensor([[IGNORE] * len(prefix) + resp])
    return ids, labels


def control_gap(model_dir: Path) -> float:
    """Mean over training examples (x, c, y) of log p(y|x,c) - mean_{c' != c} log p(y|x,c')."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = SequenceLogprobs(Transformer.from_pretrained(model_dir))
    gaps = []
    with torch.no_grad():
        for row in sft_rows(kept_extra=False):
            own = policy(*encode(tok, row["prompt"], row["control"], row["response"])).sum()
            others = [policy(*encode(tok, row["prompt"], c, row["response"])).sum() for c in SPEC.grid() if c != row["control"]]
            gaps.append(float(own - sum(others) / len(others)))
    return sum(gaps) / len(gaps)


def pair_margin(model_dir: Path) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if "<|helpful=1|>" not in tok.get_vocab():  # the initial model: add the controls as training does
        model = Transformer.from_pretrained(model_dir)
        SPEC.add_to(tok, model, seed=0)
    else:
        model = Transformer.from_pretrained(model_dir)
    policy = SequenceLogprobs(model)
    with torch.no_grad():
        c = {"helpful": 1, "harmless": 1}
        return sum(float(policy(*encode(tok, r["prompt"], c, r["chosen"])).sum() - policy(*encode(tok, r["prompt"], c, r["rejected"])).sum())
                   for r in pair_rows()) / len(PROMPTS)


COMMON = ("--lr", "3e-3", "--batch-size", "4", "--seed", "0")


# -- objectives -------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["clm", "exmate", "dpo", "sit"])
def test_loss_goes_down(objective, small_policy, tmp_path):
    """A few dozen steps on a tiny data set lower the objective's loss (last 3 steps < 0.8 x first)."""
    data = write_dataset(tmp_path / "data", pair_rows() if objective == "dpo" else sft_rows())
    extra = []
    if objective == "sit":  # general rows without controls + safety rows picked by category (FDC)
        general = write_dataset(tmp_path / "general", [{"prompt": p, "response": RESPONSES[1]} for p in PROMPTS], spec=None)
        safety = [{"prompt": p + " Tell me how to hurt someone.", "response": RESPONSES[0], "category": cat}
                  for p in PROMPTS for cat in ("ehd", "ihd")]
        pq.write_table(pa.Table.from_pylist(safety), tmp_path / "safety.parquet")
        data = general
        extra = ["--safety-data", tmp_path / "safety.parquet", "--safety-ratio", "0.5", "--mix", "ehd=2,ihd=2"]
    out = tmp_path / "out"
    train("--data", data, "--model", small_policy, "--objective", objective, "--out", out, *COMMON,
          "--max-steps", 24, "--k", 2, *extra)
    rows = metrics(out)
    assert len(rows) == 24
    assert losses_fall(rows), [r["loss"] for r in rows]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rows)


def test_exmate_separates_controls_more_than_clm(small_policy, tmp_path):
    """On its training pairs ExMATE raises log p(y|x,c) - log p(y|x,c') more than CLM alone does
    (same data, seed, steps; alpha raised to 1 so the unlikelihood term matters within 40 steps)."""
    data = write_dataset(tmp_path / "data", sft_rows())
    gaps = {}
    for objective in ("clm", "exmate"):
        out = tmp_path / objective
        train("--data", data, "--model", small_policy, "--objective", objective, "--out", out,
              "--lr", 1e-2, "--batch-size", 4, "--max-steps", 40, "--alpha", 1.0)
        gaps[objective] = control_gap(out)
    assert gaps["clm"] > 0
    assert gaps["exmate"] > 2 * gaps["clm"] + 1.0, gaps


def test_dpo_raises_margin(small_policy, tmp_path):
    """DPO (with a frozen reference model) raises log p(chosen) - log p(rejected); its first-step
    loss is log 2 (policy == reference)."""
    data = write_dataset(tmp_path / "data", pair_rows())
    out = tmp_path / "out"
    train("--data", data, "--model", small_policy, "--objective", "dpo", "--out", out, *COMMON,
          "--max-steps", 12, "--ref-logprobs", "model")
    assert metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    before, after = pair_margin(small_policy), pair_margin(out)
    assert after > before + 5, (before, after)


def test_ama_dpo_trains_with_reward_model_masks(small_policy, tiny_preset, tmp_path):
    """DPO with AMA masks from the tiny preset's helpful reward model (same tokenizer) trains
    (loss falls), and the masks drop tokens: the stored reference sums over kept tokens only, so
    they are >= the unmasked ones everywhere and > somewhere."""
    from safetensors.torch import load_file

    data = write_dataset(tmp_path / "data", pair_rows())
    train("--data", data, "--model", small_policy, "--objective", "dpo", "--out", tmp_path / "plain", *COMMON, "--max-steps", 1)
    out = tmp_path / "ama"
    train("--data", data, "--model", small_policy, "--objective", "dpo", "--out", out, *COMMON,
          "--max-steps", 12, "--ama", "--ama-rm", tiny_preset.reward_models["helpful"], "--tau", 0.0)
    rows = metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert losses_fall(rows)
    masked = load_file(str(out / "ref_logprobs.safetensors"))["ref_logprobs"]
    full = load_file(str(tmp_path / "plain" / "ref_logprobs.safetensors"))["ref_logprobs"]
    assert (masked >= full - 1e-5).all() and (masked > full + 1e-3).any()


# -- trainer mechanics ------------------------------------------------------------------------------
def test_warmup_cosine_schedule():
    """Linear warmup to lr, cosine down to min_ratio * lr at the last step, flat after."""
    from ctrlsafe.train import warmup_cosine

    lrs = [warmup_cosine(s, lr=1.0, warmup=4, total=14, min_ratio=0.1) for s in range(16)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[9] == pytest.approx(0.55) and lrs[14] == lrs[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_bf16_autocast_reaches_linear_logprobs_in_bf16(small_policy, monkeypatch):
    """Under torch.autocast("cpu", bfloat16) with fp32 weights, SequenceLogprobs hands the
    linear_logprobs backend bf16 hidden states and a bf16 lm_head weight (the final norm's output
    is fp32 there: the residual stream is fp32); lm_head's fp32 weight gets an fp32 gradient, and
    log-probs stay within bf16 noise of the fp32 run."""
    import importlib

    llp = importlib.import_module("ctrlsafe.ops.linear_logprobs")
    cpu, seen = llp.cpu, []

    def spy(hidden, weight, *args, **kw):
        seen.append((hidden.dtype, weight.dtype))
        return cpu(hidden, weight, *args, **kw)

    monkeypatch.setattr(llp, "cpu", spy)
    policy = SequenceLogprobs(Transformer.from_pretrained(small_policy))
    ids = torch.randint(3, policy.model.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    fp32 = policy(ids, labels).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = policy(ids, labels)
        logp.sum().backward()
    assert seen == [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
    assert logp.dtype == torch.float32 and policy.model.lm_head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(logp.detach(), fp32, atol=0.02, rtol=0)


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return Transformer.from_pretrained(path).state_dict()


@pytest.mark.parametrize("objective", ["exmate", "dpo"])
def test_resume_is_exact(objective, small_policy, tmp_path):
    """10 steps in one go == 5 steps, checkpoint, `--resume`, 5 more: bit-identical weights. ExMATE
    (counterfactual draws, optimizer state) and DPO (stored reference log-probs). The resumed run
    is a copy of the run directory as a kill after step 7 would leave it: checkpoint-5 and
    metrics up to step 7; resume drops the metrics after 5 and continues from there."""
    import shutil

    data = write_dataset(tmp_path / "data", pair_rows() if objective == "dpo" else sft_rows())
    args = ("--data", data, "--model", small_policy, "--objective", objective, *COMMON, "--batch-size", 2,
            "--max-steps", 10, "--warmup", 3)
    full = tmp_path / "full"
    train(*args, "--out", full, "--save-every", 5)
    ckpt = full / "checkpoint-000005"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 5
    assert not list(ckpt.glob("*.bin")) and not list(ckpt.glob("*.pt"))

    killed = tmp_path / "killed"
    shutil.copytree(ckpt, killed / ckpt.name)
    if objective == "dpo":
        shutil.copy(full / "ref_logprobs.safetensors", killed)
    (killed / "metrics.jsonl").write_text("".join(line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()[:7]))
    assert cli(["train", *map(str, args), "--out", str(killed)]) == 2  # without --resume: refused
    train(*args, "--out", killed, "--resume")

    a, b = state_dict(full), state_dict(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(killed)] == list(range(1, 11))
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(full)]


def test_grad_accum_matches_one_big_batch(small_policy, tmp_path):
    """Batch 4 in one micro-batch == 2 micro-batches of 2 (global token-mean normalisation).

    fp32: losses agree to 1e-6; weights after 3 AdamW steps to 1% of one step's update (lr 3e-3).
    Adam divides by sqrt(v), so float summation-order noise in near-zero gradient entries
    becomes a visible (but tiny next to lr) difference; a normalisation bug would differ by ~lr."""
    data = write_dataset(tmp_path / "data", sft_rows())
    for accum in (1, 2):
        train("--data", data, "--model", small_policy, "--objective", "clm", "--out", tmp_path / f"a{accum}", *COMMON,
              "--max-steps", 3, "--grad-accum", accum)
    a, b = state_dict(tmp_path / "a1"), state_dict(tmp_path / "a2")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.01 * 3e-3
    for r1, r2 in zip(metrics(tmp_path / "a1"), metrics(tmp_path / "a2")):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-6)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5)  # Adam hides a gradient scale error


def test_grad_checkpointing_gives_the_same_weights(small_policy, tmp_path):
    """--grad-checkpointing recomputes activations in backward; the result is unchanged (1e-6)."""
    data = write_dataset(tmp_path / "data", sft_rows())
    for flag in ((), ("--grad-checkpointing",)):
        train("--data", data, "--model", small_policy, "--objective", "clm", "--out", tmp_path / f"gc{len(flag)}", *COMMON,
              "--max-steps", 2, *flag)
    a, b = state_dict(tmp_path / "gc0"), state_dict(tmp_path / "gc1")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_checkpoint_loads_in_transformers(small_policy, tmp_path):
    """The saved model loads with AutoModelForCausalLM and gives our logits (1e-5); its tokenizer
    carries the control tokens at the rows the model trained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_dataset(tmp_path / "data", sft_rows())
    out = tmp_path / "out"
    train("--data", data, "--model", small_policy, "--objective", "clm", "--out", out, *COMMON, "--max-steps", 3)
    tok = AutoTokenizer.from_pretrained(out)
    ids = SPEC.render("How do I cook rice?", {"helpful": 1, "harmless": 0}, tok)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = Transformer.from_pretrained(out)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-5
    assert hf.config.vocab_size == len(tok) > max(ids)
    # the directory says what its control tokens are, and HF generate never writes one
    assert json.loads((out / "control_spec.json").read_text()) == SPEC.to_dict()
    assert "control tokens" in (out / "README.md").read_text().lower()
    control = set(tok.convert_tokens_to_ids(SPEC.all_tokens()))
    gen = hf.generate(x, max_new_tokens=12, do_sample=True, temperature=5.0, top_k=0)[0, x.shape[1]:]
    assert not control & set(gen.tolist())
    assert set(hf.generation_config.suppress_tokens) == control


@pytest.mark.parametrize("case, match", [
    ("missing_column", r"lacks column\(s\) \['control'\]"),
    ("bad_level", r"chunk-000000.parquet row 1: field 'control': level 7 for 'helpful' is out of range"),
    ("empty_response", r"chunk-000000.parquet row 2: field 'response' is empty"),
    ("no_manifest", r"no manifest.json with a control_spec"),
])
def test_bad_data_errors_name_file_row_field(case, match, small_policy, tmp_path, capsys):
    """Bad data stops with one line naming the file, the row and the field."""
    rows = sft_rows(kept_extra=False)
    if case == "missing_column":
        rows = [{k: v for k, v in r.items() if k != "control"} for r in rows]
    elif case == "bad_level":
        rows[1]["control"] = {"helpful": 7, "harmless": 0}
    elif case == "empty_response":
        rows[2]["response"] = "  "
    data = write_dataset(tmp_path / "data", rows, spec=None if case == "no_manifest" else SPEC)
    code = cli(["train", "--data", str(data), "--model", str(small_policy), "--out", str(tmp_path / "out"), "--batch-size", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(match, err), err


def shortness(prompts, responses):
    """A RAFT test reward (module:function scorer): shorter responses score higher."""
    return [-float(len(r)) for r in responses]


def test_raft_rounds_pick_best_of_n_and_train(small_policy, tmp_path):
    """RAFT: each round samples N per prompt with the current policy, keeps the best by the target
    reward (checked against every candidate's score), and CLM on the winners lowers the loss."""
    data = write_dataset(tmp_path / "data", sft_rows())
    out = tmp_path / "out"
    train("--data", data, "--model", small_policy, "--objective", "raft", "--out", out, *COMMON,
          "--reward", "short=test_train:shortness", "--raft-rounds", 2, "--raft-prompts", 4, "--raft-n", 4,
          "--raft-steps", 8, "--min-lr-ratio", 1, "--max-new-tokens", 12, "--temperature", 1.0, "--raft-control", "helpful=1,harmless=1")
    for r in range(2):
        winners = json.loads((out / "raft" / f"round-{r:03d}.json").read_text())
        assert len(winners) == 4
        for w in winners:
            assert w["score"] == max(w["candidate_scores"]) == -len(w["response"])
            assert w["control"] == {"helpful": 1, "harmless": 1}
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    for round_rows in (rows[:8], rows[8:]):
        assert losses_fall(round_rows, 0.9), [r["loss"] for r in round_rows]


# -- logging: plain lines off a terminal, the final summary, --report-to -----------------------------
def test_no_progress_prints_log_lines_and_a_summary(small_policy, tmp_path, capsys):
    """--no-progress: a plain line every --log-every steps (and at the last), then one summary line
    with steps, tokens, final loss, wall time and the output directory."""
    data = write_dataset(tmp_path / "data", sft_rows())
    out = tmp_path / "out"
    train("--data", data, "--model", small_policy, "--out", out, *COMMON, "--max-steps", 5, "--log-every", 2)
    cap = capsys.readouterr()
    lines = [line for line in cap.err.splitlines() if line.startswith("[train clm]")]
    assert [line.split()[3] for line in lines] == ["2/5", "4/5", "5/5"], cap.err
    assert "\r" not in cap.err and "loss" in lines[0] and "eta" in lines[0]
    rows = metrics(out)
    summary = [line for line in cap.out.splitlines() if line.startswith("ctrlsafe train: clm done:")]
    assert len(summary) == 1, cap.out
    s = summary[0]
    assert "5 steps" in s and f"{sum(r['tokens'] for r in rows)} tokens" in s and f"final loss {rows[-1]['loss']:.4f}" in s
    assert "s wall" in s and str(out) in s


def test_no_tqdm_when_stderr_is_not_a_terminal(small_policy, tmp_path, capsys):
    """Without --no-progress but with stderr captured (a log file, CI), no tqdm redraws reach it:
    the same plain lines are printed instead; --log-every 0 leaves only the summary."""
    data = write_dataset(tmp_path / "data", sft_rows())
    assert cli(["train", "--data", str(data), "--model", str(small_policy), "--out", str(tmp_path / "a"), *COMMON,
                "--max-steps", "3", "--log-every", "1"]) == 0
    cap = capsys.readouterr()
    assert "\r" not in cap.err and "step/s" not in cap.err and "it/s" not in cap.err
    assert sum(line.startswith("[train clm] step ") for line in cap.err.splitlines()) == 3
    assert cli(["train", "--data", str(data), "--model", str(small_policy), "--out", str(tmp_path / "b"), *COMMON,
                "--max-steps", "2", "--log-every", "0"]) == 0
    cap = capsys.readouterr()
    assert "[train" not in cap.err and "ctrlsafe train: clm done: 2 steps" in cap.out


def test_report_to_missing_package_names_the_extra(small_policy, tmp_path, capsys, monkeypatch):
    """--report-to with its package missing fails at once, naming the pip extra; the tracker
    factory says the same when the import itself fails; 'none' writes nothing but metrics.jsonl."""
    import importlib.util

    from ctrlsafe import train as train_mod
    from ctrlsafe.cli import CommandError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard") else real_find_spec(name, *a))
    for tracker in ("wandb", "tensorboard"):
        with pytest.raises(SystemExit) as e:
            cli(["train", "--data", "x", "--model", "y", "--out", str(tmp_path / "o"), "--report-to", tracker])
        assert e.value.code == 2
        assert f"pip install 'ctrlsafe[{tracker}]'" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    for tracker in ("tensorboard", "wandb"):
        with pytest.raises(CommandError, match=rf"pip install 'ctrlsafe\[{tracker}\]'"):
            train_mod.open_tracker(tracker, tmp_path, {})
    assert train_mod.open_tracker("none", tmp_path, {}) is None
    data = write_dataset(tmp_path / "data", sft_rows())
    out = tmp_path / "none"
    train("--data", data, "--model", small_policy, "--out", out, *COMMON, "--max-steps", 2, "--report-to", "none")
    assert not (out / "tensorboard").exists() and len(metrics(out)) == 2


def test_report_to_tensorboard_writes_event_files(small_policy, tmp_path):
    """--report-to tensorboard: event files under OUT/tensorboard holding every step's scalars."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        pytest.skip(f"torch.utils.tensorboard is unavailable ({e}); pip install 'ctrlsafe[tensorboard]'")
    data = write_dataset(tmp_path / "data", sft_rows())
    out = tmp_path / "out"
    train("--data", data, "--model", small_policy, "--out", out, *COMMON, "--max-steps", 3, "--report-to", "tensorboard")
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


def _tokens(small_policy):
    from transformers import AutoTokenizer

    from ctrlsafe.model import Transformer
    from ctrlsafe.train import Tokens

    tok = AutoTokenizer.from_pretrained(small_policy)
    SPEC.add_to(tok, Transformer.from_pretrained(small_policy))
    return Tokens(tok, SPEC, 1024)


def _table_row(row: dict) -> dict:
    """A row as `ctrlsafe train` reads it from Parquet (message lists become lists of structs)."""
    return {**pa.Table.from_pylist([row]).to_pylist()[0], "__file": "f.parquet", "__row": 0}


def test_trl_conversational_rows_give_the_same_ids(small_policy):
    """TRL's conversational formats read by `ctrlsafe train` build exactly the ids of ctrlsafe's own
    rows: prompt-completion with message lists, and preference rows with an implicit prompt (no
    prompt column; chosen/rejected are whole conversations sharing their opening)."""
    tokens = _tokens(small_policy)
    control = {"helpful": 1, "harmless": 0}
    user, reply = [{"role": "user", "content": PROMPTS[0]}], [{"role": "assistant", "content": RESPONSES[0]}]
    plain = tokens.example(_table_row({"prompt": PROMPTS[0], "response": RESPONSES[0], "control": control}), control_required=True)
    trl = tokens.example(_table_row({"prompt": user, "completion": reply, "control": control}), control_required=True)
    assert (trl.prompt, trl.control, trl.response) == (plain.prompt, plain.control, plain.response)

    other = [{"role": "assistant", "content": RESPONSES[1]}]
    plain_pair = tokens.pair(_table_row({"prompt": PROMPTS[0], "chosen": RESPONSES[0], "rejected": RESPONSES[1], "control": control}))
    implicit = tokens.pair(_table_row({"chosen": user + reply, "rejected": user + other, "control": control}))
    assert (implicit.prompt, implicit.chosen, implicit.rejected) == (plain_pair.prompt, plain_pair.chosen, plain_pair.rejected)


@pytest.mark.parametrize("row, match", [
    ({"prompt": [{"role": "user"}], "completion": "x"}, r"f.parquet row 0: field 'prompt'.*message 0"),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "user", "content": "x"}]}, r"f.parquet row 0: field 'completion'"),
])
def test_bad_conversational_rows_name_row_field_and_message(row, match, small_policy):
    """A malformed TRL conversation is an error naming the file, row, field (and message), not the
    old misleading "field 'prompt' is empty"."""
    tokens = _tokens(small_policy)
    with pytest.raises(ValueError, match=match):
        tokens.example({**row, "control": {"helpful": 1, "harmless": 0}, "__file": "f.parquet", "__row": 0}, control_required=True)


def test_distill_format_trl_prompts_tokenize_to_our_training_ids(small_policy, tmp_path):
    """`distill --format trl` writes TRL's prompt/completion text whose prompt, tokenized the way
    TRL does (tokenizer(text)), is exactly our chat-templated prompt followed by the control ids
    (the ids `ctrlsafe train` conditions on), and whose completion is the response."""
    data = write_dataset(tmp_path / "data", sft_rows(kept_extra=False))
    out = tmp_path / "trl"
    assert cli(["distill", str(data), "--out", str(out), "--format", "trl", "--tokenizer", str(small_policy), "--no-distill"]) == 0
    rows = pa.concat_tables([pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))]).to_pylist()
    tokens = _tokens(small_policy)
    assert len(rows) == len(sft_rows(kept_extra=False))
    for r in rows:
        assert set(r) >= {"prompt", "completion", "control"}
        source = next(s for s in sft_rows(kept_extra=False) if s["id"] == r["id"])
        ours = tokens.example(_table_row(source), control_required=True)
        assert tokens.tok(r["prompt"])["input_ids"] == ours.prompt + SPEC.control_ids(source["control"], tokens.tok)
        assert r["completion"] == source["response"]
