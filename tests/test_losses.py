"""ctrlsafe.losses against plain formulas on full logits: CLM, ExMATE (one pass at a time ==
one graph), DPO, counterfactual draws, AMA segments/masks, per-prefix reward-model scores."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from ctrlsafe.losses import (CLM, DPO, IGNORE, Batch, ExMATE, Normalizer, SequenceLogprobs, ama_mask, ama_segments,
                             counterfactual_cells, prefix_scores, response_token_rewards, with_controls)
from ctrlsafe.model import ModelArgs, Transformer
pytestmark = pytest.mark.usefixtures("one_thread")

V, CONTROL_IDS = 61, (50, 51, 52, 53)  # four "control token" ids at the end of a small vocabulary


@pytest.fixture
def model():
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=48, head_dim=8)
    return Transformer(args)


def make_batch():
    """3 rows, right-padded: [prompt][2 control tokens][response], labels on the response only."""
    g = torch.Generator().manual_seed(1)
    rows, labels, starts = [], [], []
    for prompt_len, resp_len in ((4, 5), (6, 3), (3, 7)):
        prompt = torch.randint(0, 50, (prompt_len,), generator=g).tolist()
        resp = torch.randint(0, 50, (resp_len,), generator=g).tolist()
        rows.append(prompt + [50, 52] + resp)
        labels.append([IGNORE] * (prompt_len + 2) + resp)
        starts.append(prompt_len)
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [IGNORE] * (width - len(r)) for r in labels])
    return Batch(ids, lab, torch.tensor(starts))


def full_logp(model, ids, labels):
    """log p(label_{t+1}) from full logits, 0 where ignored: the naive oracle."""
    logits = model(ids)[:, :-1].float()
    target = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(2, target.clamp(min=0)[..., None])[..., 0]
    return torch.where(target != IGNORE, lp, torch.zeros_like(lp))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sequence_logprobs_match_full_logits(model):
    """SequenceLogprobs (hidden states + linear_logprobs) == log_softmax of the full logits."""
    b = make_batch()
    got = SequenceLogprobs(model)(b.input_ids, b.labels)
    assert torch.allclose(got, full_logp(model, b.input_ids, b.labels), atol=1e-5)


def test_clm_is_token_mean_cross_entropy(model):
    """CLM loss and gradient == F.cross_entropy over response tokens only (prompt, controls and
    padding never count)."""
    b = make_batch()
    stats = CLM().backward(SequenceLogprobs(model), b, Normalizer(targets=b.n_targets, examples=3))
    ours = grads(model)
    model.zero_grad()
    ref = F.cross_entropy(model(b.input_ids)[:, :-1].reshape(-1, V), b.labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    ref.backward()
    assert stats["loss"] == pytest.approx(ref.item(), abs=1e-5)
    for n, g in grads(model).items():
        assert torch.allclose(ours[n], g, atol=1e-6), n


def test_exmate_one_pass_at_a_time_equals_one_graph(model):
    """ExMATE's per-counterfactual forward+backward accumulates exactly the gradient of
    CE(y|x,c) + alpha * mean_{i,j} exp(-CE_i(y|x,c'_j)) written as one graph (k=2)."""
    b = make_batch()
    b.counterfactual_ids = [torch.tensor([[51, 53], [50, 53], [51, 52]]), torch.tensor([[51, 52], [51, 53], [50, 53]])]
    alpha = 0.7
    stats = ExMATE(alpha).backward(SequenceLogprobs(model), b, Normalizer(targets=b.n_targets, examples=3))
    ours = grads(model)
    model.zero_grad()
    n_i = (b.labels[:, 1:] != IGNORE).sum(1)
    ce = -full_logp(model, b.input_ids, b.labels).sum() / n_i.sum()
    cf = [-full_logp(model, with_controls(b.input_ids, b.control_start, c), b.labels).sum(1) / n_i for c in b.counterfactual_ids]
    loss = ce + alpha * torch.stack([torch.exp(-x) for x in cf]).mean()
    loss.backward()
    assert stats["loss"] == pytest.approx(loss.item(), abs=1e-5)
    for n, g in grads(model).items():
        assert torch.allclose(ours[n], g, atol=1e-6), n


def test_exmate_alpha_zero_is_clm(model):
    """With alpha = 0 ExMATE's gradient is CLM's."""
    b = make_batch()
    b.counterfactual_ids = [torch.tensor([[51, 53], [50, 53], [51, 52]])]
    norm = Normalizer(targets=b.n_targets, examples=3)
    ExMATE(0.0).backward(SequenceLogprobs(model), b, norm)
    ex = grads(model)
    model.zero_grad()
    CLM().backward(SequenceLogprobs(model), b, norm)
    assert all(torch.allclose(ex[n], g, atol=1e-7) for n, g in grads(model).items())


def test_with_controls_replaces_only_control_positions():
    b = make_batch()
    new = torch.tensor([[51, 53], [50, 53], [51, 52]])
    out = with_controls(b.input_ids, b.control_start, new)
    for i, s in enumerate(b.control_start.tolist()):
        assert out[i, s : s + 2].tolist() == new[i].tolist()
        rest = torch.ones(out.shape[1], dtype=torch.bool)
        rest[s : s + 2] = False
        assert torch.equal(out[i, rest], b.input_ids[i, rest])


def test_dpo_loss_formula_and_direction(model):
    """DPO == -logsigmoid(beta((pi_w - ref_w) - (pi_l - ref_l))) from full-logit sums; with the
    reference = the policy it is log 2; one SGD step along its gradient widens the margin."""
    b = make_batch()  # rows 0 and 1 as chosen, rows 1 and 2 as rejected
    ids, lab = b.input_ids[[0, 1, 1, 2]], b.labels[[0, 1, 1, 2]]
    with torch.no_grad():
        pi = full_logp(model, ids, lab).sum(1)
    pair = Batch(ids, lab, ref_logp=pi + torch.tensor([0.3, -0.2, 0.1, 0.5]))
    beta = 0.5
    stats = DPO(beta).backward(SequenceLogprobs(model), pair, Normalizer(targets=1, examples=2))
    ref = pair.ref_logp
    expected = -F.logsigmoid(beta * ((pi[:2] - ref[:2]) - (pi[2:] - ref[2:]))).mean()
    assert stats["loss"] == pytest.approx(expected.item(), abs=1e-5)

    model.zero_grad()
    same = Batch(ids, lab, ref_logp=pi.clone())
    assert DPO(beta).backward(SequenceLogprobs(model), same, Normalizer(1, 2))["loss"] == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
        after = full_logp(model, ids, lab).sum(1)
    assert (after[:2] - after[2:]).sum() > (pi[:2] - pi[2:]).sum()


# -- counterfactual controls --------------------------------------------------------------------------
def test_uniform_counterfactuals_cover_every_other_cell():
    """Uniform draws never return the example's own cell and hit each other cell about equally."""
    rng = random.Random(0)
    draws = counterfactual_cells((1, 2), levels=3, k=8000, mode="uniform", rng=rng)
    counts = {c: draws.count(c) for c in set(draws)}
    assert (1, 2) not in counts and len(counts) == 8
    assert all(abs(n - 1000) < 150 for n in counts.values()), counts


def test_farthest_counterfactual():
    """'farthest' takes each attribute to the extreme level farther away (middle: either, by rng)."""
    rng = random.Random(0)
    assert counterfactual_cells((0, 4), 5, 2, "farthest", rng) == [(4, 0), (4, 0)]
    assert counterfactual_cells((3, 1), 5, 1, "farthest", rng) == [(0, 4)]
    middles = {counterfactual_cells((2, 0), 5, 1, "farthest", rng)[0] for _ in range(50)}
    assert middles == {(0, 4), (4, 4)}
    with pytest.raises(ValueError, match="allowed: uniform, farthest"):
        counterfactual_cells((0,), 2, 1, "nearest", rng)


# -- AMA --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rewards, segments", [
    ([0.5, 0.1, -0.1, -0.5, 0.0, 0.4], [1, 1, 1, -1, -1, 1]),  # hysteresis: holds between thresholds
    ([0.0, 0.2, -0.2, 0.31], [0, 0, 0, 1]),  # nothing before the first crossing
    ([-0.3, 0.3, -0.31], [0, 0, -1]),  # +-tau itself is not a crossing
    ([], []),
])
def test_ama_segments_hand_built(rewards, segments):
    assert ama_segments(rewards, tau=0.3) == segments


def test_ama_masks_keep_good_chosen_and_bad_rejected_segments():
    rewards = [0.6, 0.2, -0.4, -0.1, 0.35, 0.0]
    assert ama_mask(rewards, 0.3, chosen=True) == [True, True, False, False, True, True]
    assert ama_mask(rewards, 0.3, chosen=False) == [False, False, True, True, False, False]
    assert ama_mask([0.1, -0.1], 0.3, chosen=True) == [False, False]  # no segment: contributes nothing
    assert ama_mask(torch.tensor([1.0, -1.0]), tau=0.5, chosen=False) == [False, True]


def test_prefix_scores_equal_reward_model_on_each_prefix(tiny_preset):
    """One forward's per-position scores == transformers' sequence classifier run on every prefix;
    raw rewards are those scores, differenced rewards their increments from the prompt's score."""
    from transformers import AutoModelForSequenceClassification

    from ctrlsafe.reward import RewardModel

    path = tiny_preset.reward_models["harmless"]
    rm = RewardModel.from_pretrained(path)
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = torch.randint(10, 900, (1, 13), generator=torch.Generator().manual_seed(0))
    scores = prefix_scores(rm.model, rm.head[0], ids)[0]
    with torch.no_grad():
        expected = torch.stack([hf(ids[:, : t + 1]).logits[0, 0] for t in range(13)])
    assert torch.allclose(scores, expected, atol=1e-5)
    raw = response_token_rewards(scores, response_start=5, response_len=8)
    diff = response_token_rewards(scores, response_start=5, response_len=8, differenced=True)
    assert torch.equal(raw, scores[5:])
    assert torch.allclose(diff.cumsum(0), scores[5:] - scores[4], atol=1e-6)
