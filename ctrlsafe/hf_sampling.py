"""transformers adapter: ctrlsafe's temperature / top-k / top-p / min-p inside `model.generate`.

    from ctrlsafe.hf_sampling import CtrlsafeLogitsProcessor, generate_kwargs
    out = model.generate(ids, max_new_tokens=32, **generate_kwargs(temperature=0.8, top_k=50, top_p=0.9))
    # i.e. do_sample=True, logits_processor=LogitsProcessorList([CtrlsafeLogitsProcessor(0.8, 50, 0.9)])
    # and transformers' own warpers off (temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, ...)

The processor turns each step's scores into `ctrlsafe.sampling.processed_logprobs` (log q of the
kept set, -inf elsewhere), so transformers' multinomial draw over softmax(scores) = q samples
from exactly the distribution `ctrlsafe.sampling.sample` draws from with the same parameters
(ties at the top-k / top-p cut kept, top-p on the renormalised top-k survivors, min-p last;
temperature 0 leaves only the argmax, lowest id on ties, as ctrlsafe's greedy does). The
uniforms differ (transformers uses torch's RNG), so tokens match in distribution, not one by
one. transformers' own temperature / top-k / top-p / min-p warpers must be off, or they apply
on top: `generate_kwargs` sets them off (overriding a model's generation_config.json).
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .sampling import processed_logprobs


class CtrlsafeLogitsProcessor(LogitsProcessor):
    """A transformers LogitsProcessor applying ctrlsafe's sampling filters: returns the
    processed log-probabilities (fp32 math, the scores' dtype back; -inf outside the kept set).

    Parameters are numbers or [B] tensors (B = the generate batch, num_return_sequences
    included), validated like `ctrlsafe.sampling.sample`'s.
    """

    def __init__(self, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
        self.params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        if not any(hasattr(v, "shape") for v in self.params.values()):  # numbers: fail at construction
            processed_logprobs(torch.zeros(1, 1), **self.params)

    def __call__(self, input_ids, scores):
        return processed_logprobs(scores, **self.params).to(scores.dtype)


def generate_kwargs(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, logits_processor=None) -> dict:
    """`model.generate(**generate_kwargs(...))` arguments that sample with ctrlsafe's filters and
    switch transformers' own warpers off. `logits_processor` (a list of processors) run before
    ctrlsafe's (e.g. repetition penalties, which act on the raw logits)."""
    procs = LogitsProcessorList(list(logits_processor or []) + [CtrlsafeLogitsProcessor(temperature, top_k, top_p, min_p)])
    return dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0,
                eta_cutoff=0.0, logits_processor=procs)


_HF_WARPERS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper")
_HF_UNSUPPORTED = ("TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper")


@torch.no_grad()
def ctrlsafe_generate(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                      streamer=None, ctrlsafe_seed=None, **model_kwargs):
    """A decoding loop for `model.generate(..., custom_generate=ctrlsafe_generate)` (decoder-only
    models) that draws every token with `ctrlsafe.sampling.sample`: transformers prepares the
    inputs, processors and stopping criteria as usual; its temperature / top_k / top_p / min_p
    (generation_config, defaults included: top_k=50 unless set) are applied by ctrlsafe instead
    of its warpers, after the other processors (penalties, min_new_tokens, ...), as
    transformers orders them; do_sample=False is greedy.

    Randomness is ctrlsafe's counter RNG: row r at new token t uses (seed[r], t), so a row's
    tokens depend on its seed only, not on its batch. `ctrlsafe_seed`: a [B] int tensor (one
    seed per row, num_return_sequences included), an int (the B seeds drawn from
    torch.Generator().manual_seed(it)), or None (torch's global generator).
    Returns the sequences, or a GenerateDecoderOnlyOutput (sequences, scores = ctrlsafe's
    processed log-probs, logits) with return_dict_in_generate=True.

        out = model.generate(ids, do_sample=True, temperature=0.8, top_k=0, top_p=0.9, max_new_tokens=64,
                             custom_generate=ctrlsafe_generate, ctrlsafe_seed=1234)
    """
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    from .sampling import sample

    if model.config.is_encoder_decoder or synced_gpus:
        raise NotImplementedError("ctrlsafe_generate runs decoder-only models on one process (synced_gpus=False)")
    names = [type(p).__name__ for p in logits_processor]
    if bad := sorted(set(names) & set(_HF_UNSUPPORTED)):
        raise ValueError(f"ctrlsafe_generate does not implement {', '.join(bad)}; allowed warpers: temperature, top_k, top_p, min_p")
    procs = LogitsProcessorList([p for p, n in zip(logits_processor, names) if n not in _HF_WARPERS])
    gc = generation_config
    params = dict(temperature=(1.0 if gc.temperature is None else gc.temperature) if gc.do_sample else 0.0,
                  top_k=gc.top_k or 0, top_p=1.0 if gc.top_p is None else gc.top_p, min_p=gc.min_p or 0.0)
    B, device = input_ids.shape[0], input_ids.device
    if ctrlsafe_seed is None or isinstance(ctrlsafe_seed, int):
        g = torch.Generator().manual_seed(ctrlsafe_seed) if ctrlsafe_seed is not None else None
        ctrlsafe_seed = torch.randint(0, 2**62, (B,), dtype=torch.int64, generator=g)
    seeds = ctrlsafe_seed.to(device, torch.int64)
    if seeds.shape != (B,):
        raise ValueError(f"ctrlsafe_seed must be an int or a [{B}] tensor (one per row), got shape {tuple(seeds.shape)}")
    cache = model_kwargs.get("past_key_values")
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("ctrlsafe_generate starts from an empty cache")
    mask = model_kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    position = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    pad = gc._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    scores, raw = [], []
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True)
    for step in range(1 << 62):
        logits = out.logits[:, -1].float()
        x = procs(input_ids, logits)
        drawn = sample(x, **params, seed=seeds, step=step)
        if not bool(drawn.valid.all()):
            raise RuntimeError(f"non-finite logits at new token {step} in row {int((~drawn.valid).nonzero()[0, 0])}")
        if gc.return_dict_in_generate and gc.output_scores:
            scores.append(processed_logprobs(x, **params))
        if gc.return_dict_in_generate and gc.output_logits:
            raw.append(logits)
        tokens = torch.where(unfinished, drawn.tokens, pad) if has_eos else drawn.tokens
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        unfinished &= ~stopping_criteria(input_ids, None)
        if not bool(unfinished.any()):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=-1)
        position = position[:, -1:] + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                    past_key_values=out.past_key_values, use_cache=True)
    if streamer is not None:
        streamer.end()
    if gc.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=tuple(scores) or None, logits=tuple(raw) or None,
                                         past_key_values=out.past_key_values)
    return input_ids
