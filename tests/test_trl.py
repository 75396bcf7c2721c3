"""The README's TRL recipes ("Training with TRL, controls kept") run as written: `ctrlsafe distill
--format trl` data, loaded with 🤗 datasets, trains in TRL's SFTTrainer and DPOTrainer from the
model directory `ControlSpec.add_to` resized, and the ids TRL builds carry the control tokens right
after the chat-templated prompt's generation prompt, with the loss on the response only.

A tiny random Llama (hidden 32, 2 layers) with two real tokenizers: SmolLM2-135M-Instruct's (ChatML)
and the tiny preset's. Needs the `trl` extra (`pip install -c constraints.txt -e .[trl]`); the
module skips without it."""
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from test_train import RESPONSES, SPEC, sft_rows, write_dataset  # noqa: E402  (helpers only, no tests)

from ctrlsafe.cli import main as cli  # noqa: E402
from ctrlsafe.controls import render_prompt  # noqa: E402

pytestmark = [pytest.mark.trl, pytest.mark.usefixtures("one_thread")]

SAFE_AND_HELPFUL = "Sure, and safely: first, gather what you need, then follow the steps."


# -- fixtures and helpers ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["smollm2", "tiny"])
def base(request, tmp_path_factory) -> Path:
    """runs/base+controls of the README: a tiny random transformers Llama (hidden 32, 2 layers) and a
    real tokenizer, both after `ControlSpec.add_to(tok, model)` (vocabulary resized, control rows from
    the template token). Tokenizers: SmolLM2-135M-Instruct's (ChatML, a default system prompt; conftest's
    `smollm2` fixture: the user cache, converted once) and the tiny preset's (its template writes BOS)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = request.getfixturevalue("smollm2") if request.param == "smollm2" else request.getfixturevalue("tiny_preset").policy
    tok = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    vocab = len(tok)
    SPEC.add_to(tok, model)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == vocab + len(SPEC.all_tokens())
    path = tmp_path_factory.mktemp(f"base+controls-{request.param}")
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return path


def tokenizer(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def load_trl(out: Path, tmp_path: Path):
    """The README's `load_dataset("parquet", data_files="runs/.../data/*.parquet")["train"]`."""
    from datasets import load_dataset

    return load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), cache_dir=str(tmp_path / "hf"))["train"]


def train_args(tmp_path: Path) -> dict:
    """Options both trainers need on a CPU test box (TRL defaults bf16 and gradient checkpointing on)."""
    return dict(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                logging_steps=1, report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False,
                save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)


def expected_prefix(tok, prompt: str, control: dict) -> tuple[list[int], list[int]]:
    """(chat-templated prompt with its generation prompt, the control ids) as `ctrlsafe train` builds them;
    checks the template's generation prompt is the last thing before the controls."""
    prompt_ids = render_prompt(prompt, tok)
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=False, tokenize=True)
        without = list(out["input_ids"] if hasattr(out, "keys") else out)
        assert prompt_ids[:len(without)] == without and len(prompt_ids) > len(without)  # ends with the generation prompt
    return prompt_ids, SPEC.control_ids(control, tok)


def reply_ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_trained(trainer, before: dict[str, torch.Tensor], control_ids: list[int], result) -> None:
    """A finite loss in every logged step and in the summary, and the weights moved (the control rows too)."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and losses and all(math.isfinite(x) for x in losses + [result.training_loss])
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)
    emb = trainer.model.get_input_embeddings().weight.detach()
    name = next(n for n, p in trainer.model.named_parameters() if p is trainer.model.get_input_embeddings().weight)
    assert not torch.equal(before[name][control_ids], emb[control_ids])


# -- SFT --------------------------------------------------------------------------------------------
def test_sft_trainer_trains_on_controls_after_the_generation_prompt(base, tmp_path):
    """README recipe 1: SFTTrainer(model=<base+controls dir>) on `distill --format trl` data, loaded
    with datasets. For every row TRL tokenizes, input_ids = [chat-templated prompt + generation
    prompt][control ids of the row][response + EOS], and the loss covers the response + EOS only
    (labels -100 on prompt and controls: TRL's completion mask, completion-only loss being its
    default for prompt-completion data). 2 steps: finite loss, the weights change."""
    from trl import SFTConfig, SFTTrainer

    source = {r["id"]: r for r in sft_rows(kept_extra=False)}
    run = write_dataset(tmp_path / "run", list(source.values()))
    out = tmp_path / "sft-trl"
    assert cli(["distill", str(run), "--out", str(out), "--format", "trl", "--tokenizer", str(base), "--no-distill"]) == 0
    ds = load_trl(out, tmp_path)
    assert {"prompt", "completion", "control"} <= set(ds.column_names)

    trainer = SFTTrainer(model=str(base), args=SFTConfig(**train_args(tmp_path)), train_dataset=ds)
    tok = tokenizer(base)
    assert trainer.model.get_input_embeddings().weight.shape[0] == len(tok)
    assert trainer.completion_only_loss  # the default for prompt-completion rows, as the README says

    rows = trainer.train_dataset.to_list()
    assert sorted(r["id"] for r in rows) == sorted(source)
    for r in rows:
        src = source[r["id"]]
        prompt_ids, control_ids = expected_prefix(tok, src["prompt"], src["control"])
        prefix, response = prompt_ids + control_ids, reply_ids(tok, src["response"])
        assert r["input_ids"] == prefix + response, r["id"]
        assert r["labels"] == [-100] * len(prefix) + response, r["id"]  # no loss on the controls

    before = snapshot(trainer.model)
    result = trainer.train()
    assert_trained(trainer, before, tok.convert_tokens_to_ids(SPEC.all_tokens()), result)


# -- DPO --------------------------------------------------------------------------------------------
def dpo_rows() -> list[dict]:
    """sft_rows plus, per prompt, a sample at (helpful 1, harmless 1): `--pairs harmless` (other
    attributes equal) pairs it, chosen, with the (helpful 1, harmless 0) sample, rejected."""
    rows = sft_rows(kept_extra=False)
    for i in sorted({r["prompt_id"] for r in rows}):
        first = next(r for r in rows if r["prompt_id"] == i)
        rows.append({**first, "id": f"{i}-safe", "control": {"helpful": 1, "harmless": 1},
                     "requested": {"helpful": 1, "harmless": 1}, "response": SAFE_AND_HELPFUL})
    return rows


def test_dpo_trainer_loads_the_resized_reference_and_keeps_controls(base, tmp_path):
    """README recipe 2: DPOTrainer(model=<base+controls dir>) on `distill --pairs harmless --format trl`
    data. Its reference model loads from the same directory with the resized vocabulary (this used to
    fail with IndexError on the control ids). For every row TRL tokenizes, prompt_ids = chat-templated
    prompt + generation prompt + the chosen sample's control ids, chosen_ids / rejected_ids = the
    two responses + EOS. 2 steps: finite loss, the weights change."""
    from trl import DPOConfig, DPOTrainer

    rows = dpo_rows()
    by_id = {r["id"]: r for r in rows}
    run = write_dataset(tmp_path / "run", rows)
    out = tmp_path / "dpo-trl"
    assert cli(["distill", str(run), "--out", str(out), "--pairs", "harmless", "--format", "trl",
                "--tokenizer", str(base), "--no-distill"]) == 0
    ds = load_trl(out, tmp_path)
    assert len(ds) == 4 and {"prompt", "chosen", "rejected", "control"} <= set(ds.column_names)

    trainer = DPOTrainer(model=str(base), args=DPOConfig(**train_args(tmp_path)), train_dataset=ds)
    tok = tokenizer(base)
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert ref.get_input_embeddings().weight.shape[0] == trainer.model.get_input_embeddings().weight.shape[0] == len(tok)

    for r in trainer.train_dataset.to_list():
        chosen, rejected = by_id[r["chosen_id"]], by_id[r["rejected_id"]]
        assert chosen["control"] == {"helpful": 1, "harmless": 1} and rejected["control"] == {"helpful": 1, "harmless": 0}
        prompt_ids, control_ids = expected_prefix(tok, chosen["prompt"], chosen["control"])
        assert r["prompt_ids"] == prompt_ids + control_ids, r["chosen_id"]
        assert r["chosen_ids"] == reply_ids(tok, SAFE_AND_HELPFUL)
        assert r["rejected_ids"] == reply_ids(tok, RESPONSES[1])

    before = snapshot(trainer.model)
    result = trainer.train()
    assert_trained(trainer, before, tok.convert_tokens_to_ids(SPEC.all_tokens()), result)
