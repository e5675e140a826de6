"""Language-model building blocks the policy is made of: the log-probabilities of given responses, their logits,
and generation, for any seq2seq or causal Hugging Face LM. No conditioning here: the policy wraps these in its
weighting.

Notation: ``B`` rows, ``L`` prompt tokens, ``T`` response tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutput

from clp_lightning.algorithms import token_entropy
from clp_lightning.models import model_kind
from clp_lightning.sharding import generation_sync, is_sharded


class PolicyOutput(NamedTuple):
    """Per-token log-probabilities ``(B, T)`` of the given responses, and their entropies ``(B, T)`` if asked."""

    log_probs: Tensor
    entropy: Tensor | None


def response_log_probs(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    return_entropy: bool = False,
) -> PolicyOutput:
    """``log p(y_t | x, y_<t)`` for each response token under ``model`` (any seq2seq or causal LM).

    Args:
        input_ids: prompts ``(P, L)``; causal prompts must be left-padded. Each prompt once for its ``k``
            consecutive responses (``N = k P``), or once per response (``P = N``); see :func:`response_logits`.
        attention_mask: ``(P, L)``.
        response_ids: responses ``(N, T)``, right-padded.
        response_mask: ``(N, T)``, 1 on response tokens (up to and including EOS).
        return_entropy: also return the entropy of each next-token distribution (detached).

    Returns:
        ``PolicyOutput`` with log-probabilities ``(N, T)``, zero where ``response_mask`` is 0.
    """
    logits = response_logits(model, input_ids, attention_mask, response_ids, response_mask)
    log_norm = logits.logsumexp(-1)  # (N, T)
    log_probs = (logits.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) - log_norm) * response_mask
    entropy = None
    if return_entropy:
        with torch.no_grad():
            entropy = token_entropy(logits, response_mask)
    return PolicyOutput(log_probs, entropy)


def samples_per_prompt(prompts: int, responses: int) -> int:
    """``k``: how many consecutive responses share each prompt row; a clear error when they do not divide."""
    if prompts < 1 or responses % prompts:
        raise ValueError(f"{responses} responses for {prompts} prompts: expected k responses per prompt, "
                         "consecutive (prompt-major), or one prompt row per response")
    return responses // prompts


def response_logits(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, response_ids: Tensor, response_mask: Tensor
) -> Tensor:
    """Float32 logits ``(N, T, V)`` at each response position (position ``t`` predicts response token ``t``).

    With ``k = N / P > 1`` samples per prompt, each prompt's work is done once and shared by its ``k`` responses,
    the gradient flowing back through the sharing: a seq2seq encoder runs on the ``P`` prompts and its output is
    repeated; a causal LM prefills the ``P`` prompts once and continues each of the ``k`` responses from a copy of
    that key/value cache. Equal to running every (prompt, response) pair in full, to rounding.
    """
    k = samples_per_prompt(input_ids.shape[0], response_ids.shape[0])
    if model_kind(model) == "seq2seq":
        hidden = encode(model, input_ids, attention_mask)
        logits = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(k, 0)),
            attention_mask=attention_mask.repeat_interleave(k, 0),
            decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=response_ids),
            decoder_attention_mask=_decoder_mask(response_mask),
        ).logits
    elif k > 1:
        logits = _shared_prefix_logits(model, input_ids, attention_mask, response_ids, response_mask, k)
    else:
        ids = torch.cat([input_ids, response_ids], dim=1)
        mask = torch.cat([attention_mask, response_mask.to(attention_mask.dtype)], dim=1)
        position_ids = _positions(mask)
        response_length = response_ids.shape[1]
        if _accepts_logits_to_keep(model):
            # the LM head only at the T + 1 last positions: over a long prompt and a real vocabulary, the (B, S, V)
            # logits of the prompt positions cost as much time and memory as the transformer body
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                           logits_to_keep=response_length + 1).logits[:, :-1]
        else:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
            logits = logits[:, input_ids.shape[1] - 1 : -1]
    return logits.float()


def encode(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """A seq2seq model's encoder output ``(B, L, d)``.

    A model sharded with FSDP gathers its root parameters (the shared embedding) only in its own forward, so there
    the output comes from that forward with one decoder position (14-20% more than the encoder alone, measured on
    tiny T5s at 448 prompt tokens); any other model runs its encoder module alone.
    """
    if not is_sharded(model):
        return model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    start = torch.full((input_ids.shape[0], 1), model.config.decoder_start_token_id, device=input_ids.device)
    return model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=start).encoder_last_hidden_state


def _positions(attention_mask: Tensor) -> Tensor:
    """Position ids of left-padded rows: real tokens counted from 0, padding at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _prefill(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Any:
    """A causal model's forward over left-padded prompts, keeping its key/value cache, the head at the last
    position only."""
    head = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                 use_cache=True, **head)


def _shared_prefix_logits(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
    k: int,
) -> Tensor:
    """Causal logits ``(N, T, V)``: the ``P`` prompts prefilled once, each response continued from its prompt's
    cache repeated ``k`` times (the cache keeps the graph, so the prompt's activations get every response's
    gradient)."""
    prefix = _prefill(model, input_ids, attention_mask)
    first = prefix.logits[:, -1:].repeat_interleave(k, 0)  # the last prompt position predicts response token 0
    if response_ids.shape[1] == 1:
        return first
    cache = _cache_of(prefix)
    cache.batch_repeat_interleave(k)
    mask = torch.cat([attention_mask.repeat_interleave(k, 0), response_mask.to(attention_mask.dtype)], dim=1)
    positions = _positions(mask)[:, input_ids.shape[1] : -1]
    rest = model(input_ids=response_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions,
                 **{_cache_argument(model): cache}, use_cache=True).logits
    return torch.cat([first, rest], dim=1)


@torch.no_grad()
def _prefilled_cache(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, k: int) -> Any:
    """The key/value cache of every prompt token but the last (``generate`` runs that one), each prompt computed
    once and repeated ``k`` times."""
    cache = _cache_of(_prefill(model, input_ids[:, :-1], attention_mask[:, :-1]))
    cache.batch_repeat_interleave(k)
    return cache


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM computes its head at the last positions only when asked (``logits_to_keep``)."""
    return _accepts(model, "logits_to_keep")


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _cache_argument(model: nn.Module) -> str:
    return "cache" if _accepts(model, "cache") else "past_key_values"


_ACCEPTS: dict[tuple[type, str], bool] = {}


def _accepts(model: nn.Module, argument: str) -> bool:
    """Whether the LM under ``model`` (a peft wrapper passes keywords through) takes ``argument`` in ``forward``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    key = (type(base), argument)
    if key not in _ACCEPTS:
        _ACCEPTS[key] = argument in inspect.signature(base.forward).parameters
    return _ACCEPTS[key]


def _decoder_mask(response_mask: Tensor) -> Tensor:
    # The decoder input is the response shifted right behind the start token, which is always attended.
    mask = response_mask.long().roll(1, dims=1)
    mask[:, 0] = 1
    return mask


def _add_stop_token(model: PreTrainedModel, token_id: int) -> None:
    """Make ``token_id`` one of the generation config's end-of-sequence ids (kept first: it pads finished rows)."""
    eos = model.generation_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if token_id not in ids:
        model.generation_config.eos_token_id = ids + [token_id] if ids else token_id


def response_mask_from_ids(response_ids: Tensor, eos_token_id: int | Sequence[int] | None) -> Tensor:
    """1 on tokens up to and including the first EOS of each row ``(B, T)``, 0 after it."""
    if eos_token_id is None:
        return torch.ones_like(response_ids)
    eos = torch.as_tensor(eos_token_id, device=response_ids.device).view(-1)
    is_eos = torch.isin(response_ids, eos).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_eos).long()


# What a model's own ``generation_config.json`` may switch on that reshapes the next-token distribution or the
# search (Qwen2.5-Instruct ships a repetition penalty, summarisation checkpoints beams and n-gram bans): each is set
# to its "off" value for every call, so the tokens come from the policy whose log-probs the loss and the KL use, and
# greedy evaluation is the policy's argmax. A caller that wants one passes it. (The sampling temperature, top-k and
# top-p come from ``GenerationSettings``, which always passes them; forced BOS/EOS tokens are left as configured.)
PROCESSORS_OFF: dict[str, Any] = dict(
    repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
    bad_words_ids=None, sequence_bias=None, suppress_tokens=None, begin_suppress_tokens=None, min_length=0,
    typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, min_p=None, top_h=None, exponential_decay_length_penalty=None,
    guidance_scale=None, watermarking_config=None, num_beams=1, num_beam_groups=1, diversity_penalty=0.0,
    penalty_alpha=None, dola_layers=None, constraints=None, force_words_ids=None, stop_strings=None,
)


def _continues_from_a_given_cache(model: PreTrainedModel, kwargs: dict[str, Any]) -> bool:
    """Whether ``generate`` can continue from a cache passed in (the shared prompt prefill's); otherwise the ``k``
    copies of each prompt are prefilled apart.

    Not when it is to build a cache of a kind named by the caller or by the model's generation config (a static
    one for a compiled step; Gemma 2's names ``hybrid``): it refuses one passed beside it. Nor with the cache
    off: it mishandles one passed in and draws other tokens, without a word.
    """
    config = model.generation_config
    return (kwargs.get("cache_implementation", getattr(config, "cache_implementation", None)) is None
            and kwargs.get("use_cache", config.use_cache) is not False)


# Learned absolute position tables, by the name of their module (GPT-2's and GPT-Neo's ``wpe``; OPT's and BART's
# ``embed_positions``, which keep ``offset`` rows for themselves): a sequence longer than the table indexes past it,
# an IndexError deep inside the model (a device assert on a GPU). Relative (T5) and rotary (Llama) positions have none.
POSITION_TABLES = ("wpe", "embed_positions")


def position_limit(model: nn.Module) -> int | None:
    """The most positions ``model``'s learned absolute position tables hold, or None when it has none."""
    limits = [m.num_embeddings - getattr(m, "offset", 0) for name, m in model.named_modules()
              if isinstance(m, nn.Embedding) and name.rpartition(".")[2] in POSITION_TABLES]
    return min(limits, default=None)


def check_positions(model: nn.Module, prompt_tokens: int, new_tokens: int, fix: str) -> None:
    """Refuse prompts of ``prompt_tokens`` tokens continued by up to ``new_tokens`` tokens that do not fit ``model``'s
    learned position table (a causal LM holds both in one sequence, a seq2seq model each in its own).

    Args:
        fix: what to lower, named in the message (e.g. ``"max_prompt_length or max_new_tokens"``).
    """
    limit = position_limit(model)
    if limit is None:
        return
    causal = model_kind(model) == "causal"
    need = prompt_tokens + new_tokens if causal else max(prompt_tokens, new_tokens + 1)  # + its start token
    if need > limit:
        raise ValueError(f"{prompt_tokens} prompt tokens and up to {new_tokens} new tokens need {need} positions, but "
                         f"the learned position table of {type(model).__name__} holds {limit}; lower {fix}")


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: Tensor, attention_mask: Tensor,
    num_return_sequences: int = 1, **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """``model.generate`` returning only the responses ``(B k, T)``, padded after EOS, and their masks.

    ``num_return_sequences = k`` responses per prompt, consecutive (prompt-major). Each prompt is computed once for
    its ``k`` responses: a seq2seq encoder runs on the ``B`` prompts and ``generate`` decodes from ``k`` copies of its
    output; a causal LM prefills the ``B`` prompts and ``generate`` continues from ``k`` copies of their cache (unless
    the caller or the model's generation config names a ``cache_implementation``, which ``generate`` builds itself
    from the ``B k`` prompts, or turns the cache off).
    The model's generation config cannot add a penalty, filter or beam search the caller did not ask for
    (``PROCESSORS_OFF``).
    """
    k = num_return_sequences
    if "max_new_tokens" in kwargs:  # a clear error here, not an IndexError inside the model some steps in
        check_positions(model, input_ids.shape[1], kwargs["max_new_tokens"],
                        "the prompts' length (max_prompt_length; the weighting prefix counts too) or max_new_tokens")
    if model_kind(model) == "seq2seq":  # (HF's own num_return_sequences refuses greedy decoding)
        hidden = encode(model, input_ids, attention_mask)
        kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=hidden.repeat_interleave(k, 0))
    elif k > 1 and input_ids.shape[1] > 1 and _continues_from_a_given_cache(model, kwargs):
        # beam search expands each row into num_beams before its first step, and a cache passed in is not expanded
        beams = kwargs.get("num_beams") or 1
        kwargs[_cache_argument(model)] = _prefilled_cache(model, input_ids, attention_mask, k * beams)
    input_ids, attention_mask = input_ids.repeat_interleave(k, 0), attention_mask.repeat_interleave(k, 0)
    off = dict(PROCESSORS_OFF)
    if "min_new_tokens" in kwargs:  # it replaces the model's min_length anyway (and both set draws a warning)
        del off["min_length"]
    kwargs = {**off, **kwargs, "num_return_sequences": 1}  # the k copies are already in input_ids
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generation_sync(model), **kwargs)
    # causal outputs repeat the prompt; seq2seq outputs start with the decoder start token
    response = out[:, input_ids.shape[1] :] if model_kind(model) == "causal" else out[:, 1:]
    eos = kwargs.get("eos_token_id")  # the caller's stop token(s), where given, are where generate stopped
    eos = eos if eos is not None else model.generation_config.eos_token_id
    mask = response_mask_from_ids(response, eos if eos is not None else tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id
    return response.masked_fill(mask == 0, pad if pad is not None else 0), mask
