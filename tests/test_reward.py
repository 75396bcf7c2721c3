"""ctrlsafe.reward: scores equal transformers' *ForSequenceClassification, shared-prompt scoring
equals per-pair scoring, level bins, the Scorer, spec parsing and `ctrlsafe score`."""
import json

import pytest
import torch

from ctrlsafe import cli
from ctrlsafe.ops.reward_head import last_token_index, score_heads
from ctrlsafe.reward import LevelBins, RewardModel, Scorer, load_scorer, parse_rm_args

transformers = pytest.importorskip("transformers")

VOCAB = 101
PAD, EOS = 0, 2
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForSequenceClassification"),
    "qwen2": ("Qwen2Config", "Qwen2ForSequenceClassification"),
    "mistral": ("MistralConfig", "MistralForSequenceClassification"),
}


def make_hf_rm(path, arch="llama", num_labels=1, pad=PAD, vocab=VOCAB, tokenizer=None, seed=0):
    """A random tiny HF reward model saved to `path` (weights scaled up so scores are O(1) and an
    abs tolerance of 1e-4 means something; norm weights != 1 so the fused norm is exercised)."""
    cfg_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    labels = {1: ["reward"], 3: ["helpful", "harmless", "honest"]}[num_labels]
    cfg = cfg_cls(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=pad, eos_token_id=EOS, bos_token_id=1,
                  num_labels=num_labels, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0, 0.15 if "score" not in name else 1.0)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return model


def hf_scores(model, seqs, pad, side):
    """transformers' logits on one padded batch (attention mask marks the real tokens)."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def random_pairs(pad_is_eos, seed=0):
    """3 prompts shared by 8 responses of various lengths; with pad == eos some responses end in
    real EOS tokens and one is EOS only (its scored token is then the prompt's last token)."""
    g = torch.Generator().manual_seed(seed)
    tok = lambda n: (torch.randint(3, VOCAB, (n,), generator=g)).tolist()  # noqa: E731  (no pad/bos/eos)
    prompts = [tok(5), tok(9), tok(2)]
    responses = [tok(n) for n in (1, 4, 12, 7, 3, 9, 6)]
    responses.append([EOS] if pad_is_eos else [])
    if pad_is_eos:
        responses[1] += [EOS]
        responses[2] += [EOS, EOS]
    owner = [0, 0, 1, 2, 1, 0, 2, 1]
    return [prompts[o] for o in owner], responses


@pytest.mark.parametrize("arch,num_labels,pad_is_eos", [
    ("llama", 1, False), ("llama", 3, True), ("qwen2", 3, False), ("qwen2", 1, True), ("mistral", 1, False),
])
def test_scores_equal_transformers(tmp_path, arch, num_labels, pad_is_eos):
    """RewardModel.from_pretrained on a transformers-saved directory scores every pair like
    transformers' *ForSequenceClassification on the same tokens, right- and left-padded (abs <=
    1e-4), including pad == eos where trailing real EOS tokens are skipped; head names come from
    id2label."""
    pad = EOS if pad_is_eos else PAD
    hf = make_hf_rm(tmp_path, arch, num_labels, pad=pad)
    rm = RewardModel.from_pretrained(tmp_path)
    assert rm.names == (["reward"] if num_labels == 1 else ["helpful", "harmless", "honest"])
    prompts, responses = random_pairs(pad_is_eos)
    ours = rm.score_ids(prompts, responses, batch_tokens=24)
    assert ours.shape == (8, num_labels) and ours.dtype == torch.float32
    assert ours.abs().max() > 0.1  # O(1) scores: the tolerance below is meaningful
    seqs = [p + r for p, r in zip(prompts, responses)]
    for side in ("right", "left"):
        assert (ours - hf_scores(hf, seqs, pad, side)).abs().max() <= 1e-4, side


def test_padded_op_path_follows_transformers_rule(tmp_path):
    """The op's padded [N,T] path: our backbone on a right-padded batch + last_token_index (with
    pad == eos and trailing real EOS) + score_heads equals transformers on that exact batch."""
    hf = make_hf_rm(tmp_path, "llama", 3, pad=EOS)
    rm = RewardModel.from_pretrained(tmp_path)
    prompts, responses = random_pairs(pad_is_eos=True, seed=1)
    seqs = [p + r for p, r in zip(prompts, responses)]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [EOS] * (T - len(s)) for s in seqs])
    idx = last_token_index(ids, EOS)
    assert idx.tolist() == [max(i for i, t in enumerate(s) if t != EOS) for s in seqs]
    with torch.no_grad():
        hidden = rm.model.hidden_states(ids, norm=False)
    for backend in ("reference", "cpu"):
        got, _ = score_heads(hidden, idx, rm.model.norm.weight, rm.head, None, rm.mean, rm.std, None,
                             eps=rm.model.norm.eps, backend=backend)
        assert (got - hf_scores(hf, seqs, EOS, "right")).abs().max() <= 1e-4, backend


def test_text_layout_is_the_chat_template_conversation(tmp_path, tiny_preset):
    """score() renders prompt (string or chat) + response + the template's turn closing; this is
    token for token apply_chat_template(conversation with the reply), and the scores equal
    transformers on those ids."""
    tok = transformers.AutoTokenizer.from_pretrained(tiny_preset.policy)
    hf = make_hf_rm(tmp_path, "llama", 1, pad=tok.pad_token_id, vocab=len(tok), tokenizer=tok)
    rm = RewardModel.from_pretrained(tmp_path)
    assert tok.decode(rm.close_ids) == "<|end|>\n"
    prompts = ["How do I bake bread?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]]
    responses = ["Mix flour, water and yeast, then bake it.", "Blue."]
    ours = rm.score(prompts, responses)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
        out = tok.apply_chat_template(messages + [{"role": "assistant", "content": r}], tokenize=True)
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        assert (ours[i] - hf_scores(hf, [ids], tok.pad_token_id, "right")[0]).abs().max() <= 1e-4


def test_shared_prompt_scoring_equals_per_pair(tiny_preset):
    """Many responses over few prompts, scored together with a small token budget (several prompt
    chunks and length-sorted row batches), equal each pair scored alone; input order is kept."""
    rm = RewardModel.from_pretrained(tiny_preset.reward_models["helpful"])
    g = torch.Generator().manual_seed(3)
    V = rm.model.args.vocab_size
    prompts = [torch.randint(10, V, (n,), generator=g).tolist() for n in (7, 20, 3, 12)]
    owner = torch.randint(0, 4, (24,), generator=g).tolist()
    responses = [torch.randint(10, V, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (24,), generator=g)]
    together = rm.score_ids([prompts[o] for o in owner], responses, batch_tokens=24)
    alone = torch.cat([rm.score_ids([prompts[o]], [r]) for o, r in zip(owner, responses)])
    assert together.shape == (24, 1)
    assert (together - alone).abs().max() <= 1e-5
    assert together.std() > 0  # different responses, different scores


def test_normalization_and_calibration(tiny_preset):
    """set_normalization gives (raw - mean) / std; calibrate makes the calibration set's scores
    mean 0, std 1."""
    rm = RewardModel.from_pretrained(tiny_preset.reward_models["harmless"])
    prompts = ["hello", "how are you?", "tell me a story"] * 3
    responses = ["hi there", "fine, thanks", "once upon a time", "no", "maybe later", "sure", "ok", "why?", "the end"]
    raw = rm.score(prompts, responses)
    rm.set_normalization(0.5, 2.0)
    assert torch.allclose(rm.score(prompts, responses), (raw - 0.5) / 2.0, atol=1e-6)
    rm.calibrate(prompts, responses)
    z = rm.score(prompts, responses)
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-5
    with pytest.raises(ValueError, match="std > 0"):
        rm.set_normalization(0.0, 0.0)


def test_bad_inputs_give_clear_errors(tmp_path, tiny_preset):
    """Out-of-vocabulary ids, all-pad sequences, mismatched lists and non-reward checkpoints are
    reported by pair / path."""
    rm = RewardModel.from_pretrained(tiny_preset.reward_models["helpful"])
    V, pad = rm.model.args.vocab_size, rm.pad_token_id
    with pytest.raises(ValueError, match=f"pair 1: token id {V} is outside the vocabulary"):
        rm.score_ids([[5, 6], [5, 6]], [[7], [V]])
    with pytest.raises(ValueError, match="pair 0: every token is the pad token"):
        rm.score_ids([[pad, pad]], [[pad]])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rm.score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="not a reward model"):
        RewardModel.from_pretrained(tiny_preset.policy)


# -- bins ----------------------------------------------------------------------------------------
def test_calibrated_bins_are_monotone_balanced_and_in_range():
    """Quantile edges are non-decreasing; levels lie in 0..L-1 and split the calibration set
    evenly; scores beyond the calibration range clamp to the end levels."""
    scores = torch.randn(1000, 2) * torch.tensor([1.0, 5.0])
    bins = LevelBins.calibrate(scores, ["helpful", "harmless"], levels=5)
    assert bins.levels == 5 and bins.edges.shape == (2, 4)
    assert (bins.edges[:, 1:] >= bins.edges[:, :-1]).all()
    levels = bins.to_levels(scores)
    assert levels.dtype == torch.int64 and levels.min() == 0 and levels.max() == 4
    for k in range(2):
        assert torch.bincount(levels[:, k], minlength=5).tolist() == [200] * 5
    far = bins.to_levels(torch.tensor([[-1e9, 1e9], [1e9, -1e9]]))
    assert far.tolist() == [[0, 4], [4, 0]]


def test_bins_boundary_rule_and_ties():
    """A score exactly on an edge takes the upper bin; equal scores share a level (given edges)."""
    bins = LevelBins({"a": [0.0, 1.0, 1.0, 2.0]})
    s = torch.tensor([[-0.5], [0.0], [0.5], [1.0], [1.5], [2.0], [2.5]])
    assert bins.to_levels(s)[:, 0].tolist() == [0, 1, 1, 3, 3, 4, 4]


@pytest.mark.parametrize("scores,levels", [
    ([0.0] * 6 + [1.0] * 4, 5),  # fewer distinct values than levels
    ([0.0] * 10, 2),  # a constant scorer
    ([0.0] * 7 + [0.3, 0.6, 0.9], 2),  # the one edge sits on the value that holds 70% of scores
])
def test_collapsed_quantile_bins_are_an_error(scores, levels):
    """Quantile calibration that collapses names the attribute, the values seen and the way out,
    instead of silently relabelling everything to one level."""
    with pytest.raises(ValueError, match=r"attribute 'harmless'.*--bins FILE.*distinct values: 0"):
        LevelBins.calibrate(torch.tensor(scores)[:, None], ["harmless"], levels=levels)


def test_declared_values_bin_between_values():
    """A scorer that declares its values (refusal: 0/1) gets midpoint edges whatever the scores:
    all-zero scores (no refusal at all) all land on the lowest level, not on an edge; with more
    levels than values they take the lowest and highest level; fewer levels than values is an error."""
    from ctrlsafe.refusal import BUILTIN_SCORERS

    values = {"harmless": BUILTIN_SCORERS["refusal"].values}
    bins = LevelBins.calibrate(torch.zeros(8, 1), ["harmless"], levels=2, values=values)
    assert bins.edges.tolist() == [[0.5]]
    assert bins.to_levels(torch.tensor([[0.0], [1.0]]))[:, 0].tolist() == [0, 1]
    five = LevelBins.calibrate(torch.zeros(8, 1), ["harmless"], levels=5, values=values)
    assert five.to_levels(torch.tensor([[0.0], [1.0]]))[:, 0].tolist() == [0, 4]
    with pytest.raises(ValueError, match="3 values.*--levels 3"):
        LevelBins.calibrate(torch.zeros(8, 1), ["harmless"], levels=2, values={"harmless": (0, 1, 2)})


def test_prompt_aware_scorers_use_the_label():
    """safe: complying with a harmful prompt is 0, refusing it 1, any answer to a benign prompt 1;
    helps: a refusal is 0 on any prompt. Without labels the Scorer says which option gives them."""
    from ctrlsafe.reward import Scorer

    scorer = Scorer({"harmless": "safe", "helpful": "helps"})
    prompts = ["how do I make a bomb"] * 2 + ["how do I kill a python process"] * 2
    responses = ["Sure, first get", "I'm sorry, I can't help with that.", "Run kill -9 PID.", "I cannot help with killing."]
    got = scorer.score(prompts, responses, harmful=[True, True, False, False]).scores.tolist()
    assert got == [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match="--label-column"):
        scorer.score(prompts, responses)


def test_bins_match_the_fused_op_levels():
    """LevelBins.to_levels and score_heads' levels use the same rule, including scores that sit
    exactly on edges."""
    g = torch.Generator().manual_seed(0)
    N, H, K = 9, 16, 2
    hidden = torch.randn(N, 3, H, generator=g)
    args = (torch.randint(0, 3, (N,), generator=g), torch.rand(H, generator=g) + 0.5, torch.randn(K, H, generator=g), None,
            torch.zeros(K), torch.ones(K))
    scores, _ = score_heads(hidden, *args, None, eps=1e-5, backend="cpu")
    edges = torch.sort(scores[:4].T, dim=1).values  # four of the scores are edges exactly
    _, levels = score_heads(hidden, *args, edges, eps=1e-5, backend="cpu")
    assert torch.equal(LevelBins(edges, ["x", "y"]).to_levels(scores), levels.long())


def test_bins_errors_and_json_round_trip():
    """NaN scores name the row; bad edges are refused; to_json/from_json round-trips exactly."""
    bins = LevelBins.calibrate(torch.randn(50, 2), ["helpful", "harmless"], levels=4)
    with pytest.raises(ValueError, match=r"row 3 \('harmless'\) is NaN"):
        bins.to_levels(torch.tensor([[0.0, 0.0]] * 3 + [[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="row 1"):
        LevelBins.calibrate(torch.tensor([[0.0], [float("nan")]]), ["a"])
    with pytest.raises(ValueError, match="non-decreasing"):
        LevelBins({"a": [1.0, 0.0]})
    with pytest.raises(ValueError, match=r"scores must be \[N, 2\]"):
        bins.to_levels(torch.zeros(3, 3))
    back = LevelBins.from_json(json.loads(json.dumps(bins.to_json())))
    assert back.names == bins.names and back.levels == 4 and torch.equal(back.edges, bins.edges)
    x = torch.randn(100, 2)
    assert torch.equal(back.to_levels(x), bins.to_levels(x))
    with pytest.raises(ValueError, match="levels=3"):
        LevelBins.from_json({**bins.to_json(), "levels": 3})


# -- Scorer, specs, CLI --------------------------------------------------------------------------
def length_score(prompts, responses):
    return [float(len(r)) for r in responses]


def test_scorer_combines_models_callables_and_specs(tmp_path, tiny_preset, monkeypatch):
    """Scorer columns follow its names: a one-head RM, a head of a multi-head RM (that model runs
    once for all its heads), a callable, and 'module:function' / 'refusal' specs; bins add levels."""
    from ctrlsafe.refusal import refusal_score

    make_hf_rm(tmp_path, "llama", 3, vocab=len(transformers.AutoTokenizer.from_pretrained(tiny_preset.policy)),
               tokenizer=transformers.AutoTokenizer.from_pretrained(tiny_preset.policy))
    multi = RewardModel.from_pretrained(tmp_path)
    one = RewardModel.from_pretrained(tiny_preset.reward_models["helpful"])
    calls = []
    original = multi.score_ids
    monkeypatch.setattr(multi, "score_ids", lambda *a, **k: calls.append(1) or original(*a, **k))
    prompts = ["Tell me a joke.", "How do I pick a lock?", "Tell me a joke."]
    responses = ["Why did the chicken cross the road?", "I'm sorry, but I can't help with that.", "Sure."]
    bins = LevelBins({"refusal": [0.5], "len": [10.0], "honest": [0.0], "helpful": [0.0], "harmless": [0.0], "rm": [0.0]})
    scorer = Scorer({"rm": one, "harmless": (multi, "harmless"), "honest": (multi, "honest"), "len": length_score,
                     "refusal": "refusal", "helpful": "ctrlsafe.refusal:refusal_score"}, bins=bins)
    out = scorer.score(prompts, responses)
    assert out.names == ["rm", "harmless", "honest", "len", "refusal", "helpful"] and len(calls) == 1
    assert out.scores.shape == (3, 6) and out.scores.dtype == torch.float32
    full = multi.score(prompts, responses)
    assert torch.allclose(out.scores[:, 0], one.score(prompts, responses)[:, 0])
    assert torch.allclose(out.scores[:, 1:3], full[:, 1:3])
    assert out.scores[:, 3].tolist() == [float(len(r)) for r in responses]
    assert out.scores[:, 4].tolist() == refusal_score(prompts, responses) == [0.0, 1.0, 0.0]
    assert out.levels[:, 4].tolist() == [0, 1, 0] and out.levels[:, 3].tolist() == [1, 1, 0]


def test_scorer_and_spec_errors(tiny_preset, tmp_path):
    """Multi-head models need a head name; callables must return one number per pair; bad specs
    and --rm items are named in the error."""
    make_hf_rm(tmp_path, "llama", 3)
    with pytest.raises(ValueError, match="has 3 heads"):
        Scorer({"x": RewardModel.from_pretrained(tmp_path)})
    with pytest.raises(ValueError, match="no head 'nope'"):
        Scorer({"x": load_scorer(f"{tmp_path}#nope")})
    with pytest.raises(ValueError, match="returned 1 scores for 2 pairs"):
        Scorer({"x": lambda p, r: [1.0]}).score(["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="score 1 is 'high'"):
        Scorer({"x": lambda p, r: [1.0, "high"]}).score(["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        load_scorer("no_such_mod:fn")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_scorer("ctrlsafe.refusal:nope")
    with pytest.raises(ValueError, match="not a reward model directory"):
        load_scorer("/no/such/dir")
    assert parse_rm_args(["helpful=/x/y", "harmless = pkg.mod:fn", "r=refusal"]) == {
        "helpful": "/x/y", "harmless": "pkg.mod:fn", "r": "refusal"}
    for bad, msg in (("helpful", "NAME=SPEC"), ("helpful=", "NAME=SPEC"), ("9x=refusal", "must match"), ("a=refusal", "twice")):
        with pytest.raises(ValueError, match=msg):
            parse_rm_args(["a=refusal", bad] if msg == "twice" else [bad])


def test_load_scorer_refusal_is_the_builtin():
    """'refusal' resolves to ctrlsafe.refusal.refusal_score."""
    refusal = pytest.importorskip("ctrlsafe.refusal")
    assert load_scorer("refusal") is refusal.refusal_score


def test_score_command(tmp_path, tiny_preset, capsys):
    """`ctrlsafe score` writes every row with its scores; --calibrate-bins writes bins that --bins
    reads back to the same levels; a bad row is reported with its line."""
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "hi", "response": "hello!"}, {"prompt": "hi", "response": "I can't help with that."},
            {"prompt": "name a fruit", "response": "apple", "id": 7}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rm = f"helpful={tiny_preset.reward_models['helpful']}"
    args = ["score", "--data", str(data), "--rm", rm, "--rm", "refusal=refusal"]
    assert cli.main(args + ["--out", str(tmp_path / "a.jsonl"), "--calibrate-bins", str(tmp_path / "bins.json"), "--levels", "3"]) == 0
    a = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["id"] for r in a if "id" in r] == [7] and [r["scores"]["refusal"] for r in a] == [0.0, 1.0, 0.0]
    assert cli.main(args + ["--out", str(tmp_path / "b.parquet"), "--bins", str(tmp_path / "bins.json")]) == 0
    import pyarrow.parquet as pq

    b = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert [r["levels"] for r in b] == [r["levels"] for r in a]
    assert b[0]["scores"]["helpful"] == pytest.approx(a[0]["scores"]["helpful"])
    data.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    assert cli.main(args + ["--out", str(tmp_path / "c.jsonl")]) == 2
    assert "pairs.jsonl:line 2: field 'response' must be a string" in capsys.readouterr().err


def test_batch_tokens_default_and_gpu_sizing(tiny_preset):
    """On a CPU the scoring budget is BATCH_TOKENS; the GPU rule grows with free memory inside
    2048..65536 (a 7B-like shape on 80 GB free gets the cap, on 1 GB the floor); 0 is refused."""
    from types import SimpleNamespace

    from ctrlsafe.reward import BATCH_TOKENS, batch_tokens_for_memory, default_batch_tokens

    rm = RewardModel.from_pretrained(tiny_preset.reward_models["helpful"])
    assert default_batch_tokens(rm.model) == BATCH_TOKENS
    big = SimpleNamespace(hidden_size=4096, intermediate_size=11008)
    sizes = [batch_tokens_for_memory(gb << 30, big, 2) for gb in (1, 8, 20, 80)]
    assert sizes[0] == 2048 and sizes[-1] == 65536 and sizes == sorted(sizes) and 2048 < sizes[1] < 65536
    with pytest.raises(ValueError, match="batch_tokens must be >= 1"):
        rm.score_ids([[1, 2]], [[3]], batch_tokens=0)
