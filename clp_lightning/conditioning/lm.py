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

from clp_lightning.algorithms import token_entropy
from clp_lightning.models import model_kind


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
        input_ids: prompts ``(B, L)``; causal prompts must be left-padded.
        attention_mask: ``(B, L)``.
        response_ids: responses ``(B, T)``, right-padded.
        response_mask: ``(B, T)``, 1 on response tokens (up to and including EOS).
        return_entropy: also return the entropy of each next-token distribution (detached).

    Returns:
        ``PolicyOutput`` with log-probabilities ``(B, T)``, zero where ``response_mask`` is 0.
    """
    logits = response_logits(model, input_ids, attention_mask, response_ids, response_mask)
    log_norm = logits.logsumexp(-1)  # (B, T)
    log_probs = (logits.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) - log_norm) * response_mask
    entropy = None
    if return_entropy:
        with torch.no_grad():
            entropy = token_entropy(logits, response_mask)
    return PolicyOutput(log_probs, entropy)


def response_logits(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, response_ids: Tensor, response_mask: Tensor
) -> Tensor:
    """Float32 logits ``(B, T, V)`` at each response position (position ``t`` predicts response token ``t``)."""
    if model_kind(model) == "seq2seq":
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=response_ids)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=_decoder_mask(response_mask),
        ).logits
    else:
        ids = torch.cat([input_ids, response_ids], dim=1)
        mask = torch.cat([attention_mask, response_mask.to(attention_mask.dtype)], dim=1)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
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


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM under ``model`` (a peft wrapper passes keywords through) takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(base) not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[type(base)] = "logits_to_keep" in inspect.signature(base.forward).parameters
    return _LOGITS_TO_KEEP[type(base)]


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


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: Tensor, attention_mask: Tensor,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """``model.generate`` returning only the responses ``(B', T)``, padded after EOS, and their masks ``(B', T)``."""
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    # causal outputs repeat the prompt; seq2seq outputs start with the decoder start token
    response = out[:, input_ids.shape[1] :] if model_kind(model) == "causal" else out[:, 1:]
    eos = model.generation_config.eos_token_id
    mask = response_mask_from_ids(response, eos if eos is not None else tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id
    return response.masked_fill(mask == 0, pad if pad is not None else 0), mask
