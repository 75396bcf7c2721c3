"""PPO / RLOO with control-conditioned rewards (ctrlsafe/rlhf.py, `ctrlsafe train --objective ppo|rloo`):
the pieces against hand-computed cases, then end to end on a small random Llama (the tiny preset's
tokenizer, 2 layers, hidden 64) with a learnable scorer: PPO raises control accuracy, RLOO and AMA
train without NaN, resume is exact, bad options error in one line."""
import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctrlsafe.cli import main as cli
from ctrlsafe.controls import ControlSpec
from ctrlsafe.model import Transformer, load_safetensors_dir
from ctrlsafe.reward import LevelBins
from ctrlsafe.rlhf import (ama_policy_mask, clipped_policy_loss, clipped_value_loss, control_reward, gae, kl_per_token,
                           rloo_advantages, token_rewards, whiten)

SPEC = ControlSpec(("helpful",), levels=2)
EDGE = 0.5  # `starts_with_space` is 0 or 1: level 1 = the response starts a word


# -- the pieces -------------------------------------------------------------------------------------
def test_gae_matches_hand_computation():
    """GAE(gamma=0.9, lambda=0.8) on two rows: a prompt position (masked), rewards on response
    tokens, and a padded row whose value after its last token counts as 0 (the pad's value 7
    and reward 5 are ignored). Numbers worked out by hand from delta_t = r_t + g V_t+1 - V_t."""
    rewards = torch.tensor([[0.0, -0.1, 0.2, 1.0], [0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[9.0, 0.5, 0.2, 0.4], [9.0, 0.3, 0.6, 7.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[0.0, 0.15024, 0.792, 0.6], [0.0, 0.528, 0.4, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.0, 0.65024, 0.992, 1.0], [0.0, 0.828, 1.0, 0.0]]), atol=1e-6)
    # gamma = lambda = 1: every advantage is the reward-to-go minus the value
    adv1, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv1[0, 1:], torch.tensor([1.1 - 0.5, 1.2 - 0.2, 1.0 - 0.4]), atol=1e-6)


def test_token_rewards_put_the_sequence_reward_on_the_last_token():
    """-kl_coef * KL on every response token; the sequence reward lands on each row's last one."""
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    kl = torch.tensor([[9.0, 1.0, 2.0, 9.0], [9.0, 0.0, 1.0, 1.0]])
    r = token_rewards(torch.tensor([3.0, -1.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(r, torch.tensor([[0.0, -0.5, 2.0, 0.0], [0.0, 0.0, -0.5, -1.5]]))


def test_clipped_policy_loss_hand_case():
    """ratios 1.5, 0.5, 1.1, 0.7 with advantages +1, +1, -1, -1 (eps 0.2): per-token losses
    max(-rA, -clip(r)A) = -1.2, -0.5, 1.1, 0.8 (sum 0.2); the clipped term wins for the 1st and
    4th. A 5th token outside the mask (ratio 100) counts for nothing."""
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7, 100.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    old = torch.full_like(ratio, -2.0)
    loss, clipped = clipped_policy_loss(old + ratio.log(), old, adv, mask, eps=0.2)
    assert loss.item() == pytest.approx(0.2, abs=1e-6)
    assert clipped.item() == 2


def test_clipped_policy_loss_gradient_stops_where_clipped():
    """The gradient is zero on tokens whose ratio left the trust region in the advantage's
    direction, and -A * r elsewhere."""
    old = torch.zeros(1, 3)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0]])
    loss, _ = clipped_policy_loss(logp, old, adv, torch.ones(1, 3, dtype=torch.bool), eps=0.2)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5, -1.1]]), atol=1e-6)


def test_clipped_value_loss_hand_case():
    """V=1.0 (old 0.5, return 2): the clipped 0.7 is farther, 0.5*1.3^2 = 0.845; V=0 (old 0.5,
    return 0): the clipped 0.3 is farther, 0.5*0.09 = 0.045; total 0.89."""
    v, old, ret = torch.tensor([[1.0, 0.0, 4.0]]), torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    assert clipped_value_loss(v, old, ret, mask, clip=0.2).item() == pytest.approx(0.89, abs=1e-6)


def test_ama_mask_keeps_tokens_whose_value_sign_matches_the_advantage():
    """A >= 0 keeps value > 0, A < 0 keeps value < 0; A == 0 counts as >= 0; value 0 is never
    kept; tokens outside the response mask never are."""
    seq_adv = torch.tensor([0.5, -0.2, 0.0])
    values = torch.tensor([[0.3, -0.1, 0.2], [0.3, -0.1, 0.0], [0.0, 0.1, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    expected = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0]], dtype=torch.bool)
    assert torch.equal(ama_policy_mask(seq_adv, values, mask), expected)


def test_rloo_leave_one_out_baseline():
    """Each return minus the mean of the others in its group; groups need >= 2 members."""
    out = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0]), torch.tensor([0, 0, 0, 1, 1]))
    assert torch.allclose(out, torch.tensor([-1.5, 0.0, 1.5, -10.0, 10.0]))
    with pytest.raises(ValueError, match="RLOO needs >= 2 samples"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_kl_estimators_are_unbiased_and_k3_nonnegative():
    """Averaged over the policy's own distribution, k1 and k3 both equal KL(p || q) exactly; k3
    is >= 0 token by token (k1 is not), and both are 0 where p == q."""
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(7, 33, generator=g), -1)
    logq = torch.log_softmax(torch.randn(7, 33, generator=g), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    for est in ("k1", "k3"):
        assert torch.allclose((logp.exp() * kl_per_token(logp, logq, est)).sum(-1), kl, atol=1e-5)
        assert kl_per_token(logp, logp, est).abs().max() == 0
    assert (kl_per_token(logp, logq, "k3") >= 0).all() and (kl_per_token(logp, logq, "k1") < 0).any()
    assert kl_per_token(torch.tensor(-1.0), torch.tensor(-2.0), "k3").item() == pytest.approx(math.exp(-1), abs=1e-6)


def test_whiten_uses_masked_entries_only():
    x = torch.tensor([[100.0, 1.0, 2.0, 3.0]])
    mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    assert torch.allclose(whiten(x, mask), torch.tensor([[0.0, -1.0, 0.0, 1.0]]), atol=1e-6)


def test_control_reward_level_and_smooth():
    """Two attributes, 4 levels. a: edges 0,1,2 (width 1, bin centres -0.5, 0.5, 1.5, 2.5);
    b: edges 10,20,30 (width 10, centres 5, 15, 25, 35). Row 0: a=0.7 (level 1, target 1),
    b=12 (level 1, target 3): level reward -(0 + 2), smooth -(0.2^2 + 2.3^2) = -5.33.
    Row 1: a=2.6 (level 3, target 0), b=5 (level 0, target 0): -3; smooth -(3.1^2 + 0)."""
    bins = LevelBins({"a": [0.0, 1.0, 2.0], "b": [10.0, 20.0, 30.0]})
    scores = torch.tensor([[0.7, 12.0], [2.6, 5.0]])
    targets = torch.tensor([[1, 3], [0, 0]])
    assert torch.allclose(control_reward(scores, targets, bins, "level"), torch.tensor([-2.0, -3.0]))
    assert torch.allclose(control_reward(scores, targets, bins, "smooth"), torch.tensor([-5.33, -9.61]), atol=1e-5)


# -- end to end -------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


def starts_with_space(prompts, responses):
    """The test reward (a `module:function` scorer): 1 when the response starts with a space
    (its first token is word-initial; ~40% of the random policy's first tokens), else 0. The
    first response token is predicted right at the control token, so it can learn to obey it."""
    return [float(r.startswith(" ")) for r in responses]


def random_policy(tiny_preset, path: Path, with_controls: bool) -> Path:
    """A 2-layer hidden-64 random Llama with the tiny preset's tokenizer (fast to train);
    with_controls: the control tokens are in the vocabulary with their own random rows, as after
    supervised control training (else training adds them, mean-initialised)."""
    from transformers import AutoTokenizer

    from ctrlsafe.presets import _llama_config, _random_model

    tok = AutoTokenizer.from_pretrained(tiny_preset.policy)
    if with_controls:
        SPEC.add_to(tok)
    model = _random_model(_llama_config(len(tok), 64, 2, 4, 2, 128, tok), torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_policy(tiny_preset, tmp_path_factory) -> Path:
    return random_policy(tiny_preset, tmp_path_factory.mktemp("rl_policy"), with_controls=False)


@pytest.fixture(scope="module")
def controlled_policy(tiny_preset, tmp_path_factory) -> Path:
    return random_policy(tiny_preset, tmp_path_factory.mktemp("rl_policy_controls"), with_controls=True)


@pytest.fixture(scope="module")
def prompts_data(tmp_path_factory) -> Path:
    """The 24 shipped example prompts as a data set with a one-attribute spec (2 levels) and bins."""
    from ctrlsafe.presets import example_prompts_path

    path = tmp_path_factory.mktemp("rl_data")
    rows = [{"prompt": json.loads(line)["prompt"]} for line in example_prompts_path().read_text().splitlines()]
    (path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path / "data" / "chunk-000000.parquet")
    (path / "manifest.json").write_text(json.dumps({"format": "ctrlsafe-dataset", "control_spec": SPEC.to_dict(),
                                                    "bins": {"levels": 2, "edges": {"helpful": [EDGE]}}}))
    return path


COMMON = ("--reward", "helpful=test_rlhf:starts_with_space", "--rollout-prompts", 8, "--rollout-n", 4, "--batch-size", 16,
          "--max-new-tokens", 4, "--seed", 0)


def train(*argv) -> None:
    assert cli(["train", "--no-progress", *map(str, argv)]) == 0


def rollout_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "rollout" in r]


def step_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "rollout" not in r]


def all_finite(rows: list[dict]) -> bool:
    return all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


ROLLOUTS, MARGIN = 30, 0.25


def test_ppo_raises_control_accuracy(controlled_policy, prompts_data, tmp_path):
    """PPO learns to obey the control: targets drawn uniformly from helpful=0/1, 8 prompts x 4
    samples x 4 tokens per rollout, lr 1e-2. Measured (seed 0, 1 thread): control accuracy
    0.59, 0.53, 0.41 on rollouts 0-2 (mean 0.51, chance is 0.5), still ~0.5 up to rollout 21,
    then 0.81 0.66 0.91 0.78 0.94 and 1.0, 0.78, 0.94 on rollouts 27-29 (mean 0.91); the test
    asserts the last-3 mean beats the first-3 mean by > 0.25 (measured 0.40). KL to the initial
    model (measured, not penalised here; k3, summed per sequence) grows to ~19 and stays finite,
    nothing is NaN, and the run writes the value head beside the model."""
    out = tmp_path / "ppo"
    train("--objective", "ppo", "--data", prompts_data, "--model", controlled_policy, "--out", out, *COMMON,
          "--rollouts", ROLLOUTS, "--lr", 1e-2, "--min-lr-ratio", 1, "--kl-coef", 0.0)
    rows = rollout_rows(out)
    acc = [r["accuracy_helpful"] for r in rows]
    start, end = sum(acc[:3]) / 3, sum(acc[-3:]) / 3
    assert end > start + MARGIN, acc
    assert all_finite(rows) and all_finite(step_rows(out))
    assert all(r["kl"] >= 0 for r in rows)  # k3 is non-negative token by token
    assert load_safetensors_dir(out)["value_head.weight"].shape == (1, 64)


@pytest.mark.parametrize("objective, extra", [("rloo", ()), ("ppo", ("--ama", "--kl-estimator", "k1", "--control-reward", "smooth"))])
def test_rloo_and_ama_ppo_train(objective, extra, small_policy, prompts_data, tmp_path):
    """RLOO (no critic, no value head saved) and AMA-masked PPO (k1 KL, smooth reward) run 2
    rollouts with finite metrics from a policy without control tokens (training adds them);
    AMA's first rollout trains the policy on a strict, non-empty subset of the response
    tokens; the weights move; the PPO checkpoint (with value_head.weight) loads in transformers."""
    out = tmp_path / objective
    train("--objective", objective, "--data", prompts_data, "--model", small_policy, "--out", out, *COMMON,
          "--rollouts", 2, "--lr", 3e-3, *extra)
    rows, steps = rollout_rows(out), step_rows(out)
    assert [r["rollout"] for r in rows] == [0, 1] and len(steps) == 2 * 2 * 2  # epochs x minibatches per rollout
    assert all_finite(rows) and all_finite(steps)
    saved = load_safetensors_dir(out)
    assert ("value_head.weight" in saved) == (objective == "ppo")
    before = Transformer.from_pretrained(small_policy).state_dict()["layers.0.mlp.down_proj.weight"]
    assert not torch.equal(saved["model.layers.0.mlp.down_proj.weight"], before)
    if "--ama" in extra:  # the fresh value head has both signs; later all tokens may share one
        assert 0 < rows[0]["policy_tokens"] < 1 and all(0 <= r["policy_tokens"] <= 1 for r in rows), rows
        from transformers import AutoModelForCausalLM  # ... and transformers loads past value_head.weight

        x = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            assert (AutoModelForCausalLM.from_pretrained(out).eval()(x).logits - Transformer.from_pretrained(out)(x)).abs().max() < 1e-5


def test_resume_is_exact(small_policy, prompts_data, tmp_path):
    """3 rollouts of 4 optimizer steps in one go == the same run killed and resumed, bit for bit
    (model and value head), from (a) checkpoint-4, a rollout boundary, with no rollout files left
    (rollout 1 is generated again from the checkpoint's policy) and (b) checkpoint-6, inside
    rollout 1, which continues on the stored rollout. Metrics are not duplicated."""
    args = ("--objective", "ppo", "--data", prompts_data, "--model", small_policy, *COMMON, "--rollouts", 3,
            "--lr", 3e-3, "--warmup", 2)
    full = tmp_path / "full"
    train(*args, "--out", full, "--save-every", 2)
    want = load_safetensors_dir(full)
    for ckpt, keep_rollouts in (("checkpoint-000004", False), ("checkpoint-000006", True)):
        killed = tmp_path / ckpt
        shutil.copytree(full / ckpt, killed / ckpt)
        if keep_rollouts:
            shutil.copytree(full / "rollouts", killed / "rollouts")
        lines = (full / "metrics.jsonl").read_text().splitlines()
        (killed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:9]))  # up to step 7
        train(*args, "--out", killed, "--save-every", 2, "--resume")
        got = load_safetensors_dir(killed)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), ckpt
        assert logged(killed) == logged(full), ckpt


def logged(out: Path) -> list[dict]:
    """The metrics rows without their timings."""
    keys = ("step", "rollout", "loss", "reward", "control_accuracy", "kl", "clip_frac")
    return [{k: r[k] for k in keys if k in r} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("argv, match", [
    (("--objective", "ppo"), r"needs a --reward NAME=SPEC for every control attribute; missing \['helpful'\]"),
    (("--objective", "rloo", "--reward", "helpful=test_rlhf:starts_with_space", "--rollout-n", 1), r"rloo needs --rollout-n >= 2"),
    (("--objective", "rloo", "--ama", "--reward", "helpful=test_rlhf:starts_with_space"), r"--ama works with --objective ppo"),
    (("--objective", "ppo", "--reward", "helpful=test_rlhf:starts_with_space", "--rollout-prompts", 99, "--batch-size", 4), r"more than the 24 distinct prompts"),
    (("--objective", "ppo", "--reward", "helpful=test_rlhf:starts_with_space", "--batch-size", 5), r"--batch-size 5 must divide the rollout.s 64 rows"),
])
def test_bad_options_error_in_one_line(argv, match, small_policy, prompts_data, tmp_path, capsys):
    """Bad RL options stop with one line naming the option, before any rollout."""
    code = cli(["train", "--no-progress", "--data", str(prompts_data), "--model", str(small_policy), "--out", str(tmp_path / "o"),
                *map(str, argv)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert __import__("re").search(match, err), err
