"""Decoding-time mixing: next-token logits ``sum_i w_i * logits_i`` of ``m`` expert policies.

The experts are the conditioned policy at the one-hot weightings ``e_i`` (for a Rewarded Soups policy, expert
``i`` itself). Unlike parameter mixing, each decoding step runs every expert: ``m`` forward passes per token. Each
expert keeps its own key/value cache: its prompt is computed once (a causal prefill, or a seq2seq encoder pass
under that expert's conditioning) and each step feeds the new token alone, so a response costs every expert one
prompt pass and one single-token pass per token, as ``generate`` does for one policy.

Notation: ``B`` rows, ``L`` prompt tokens, ``T`` response tokens, ``V`` vocabulary, ``m`` experts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutput

from clp_lightning.conditioning.lm import (
    PolicyOutput,
    _cache_argument,
    _cache_of,
    _positions,
    _prefill,
    encode,
    response_logits,
    response_mask_from_ids,
)
from clp_lightning.conditioning.policy import ConditionalPolicy
from clp_lightning.models import model_kind


def check_experts(policy: ConditionalPolicy) -> None:
    """Refuse a policy whose experts the mixture cannot run: every expert reads the one encoding of the prompts it is
    given, and conditions only its parameters on ``e_i``.

    Raises:
        ValueError: prompt conditioning (the encoding carries the prefix of the mixture's ``w``, so expert ``i``
            would not be the policy at ``e_i``), or alpha in the parameters (``alpha_scale``: the experts get no
            alpha to scale by).
    """
    if policy.conditioning.prompt:
        raise ValueError("decoding-time mixing of a prompt-conditioned policy: every expert would read the prompt "
                         "with the mixture's weighting in its prefix, not its own e_i; use decoding='policy', or a "
                         "policy conditioned in its parameters only (Rewarded Soups, mixing, LoRA)")
    if policy.conditioning.alpha_scale is not None:
        raise ValueError("decoding-time mixing of a policy conditioned on alpha in its parameters (alpha_scale) is "
                         "not supported: the experts run without alpha; use decoding='policy'")


def _one_hots(policy: ConditionalPolicy, rows: int, device: torch.device) -> list[Tensor]:
    """The ``m`` one-hot weightings ``(rows, m)``: expert ``i`` is the policy conditioned on ``e_i``."""
    eye = torch.eye(policy.num_objectives, device=device)
    return [eye[i].repeat(rows, 1) for i in range(policy.num_objectives)]


def expert_logits(
    policy: ConditionalPolicy, input_ids: Tensor, attention_mask: Tensor, response_ids: Tensor, response_mask: Tensor
) -> Tensor:
    """Logits of every expert for every response position, ``(m, B, T, V)`` (position ``t`` predicts token ``t``)."""
    check_experts(policy)
    out = []
    for one_hot in _one_hots(policy, input_ids.shape[0], input_ids.device):
        with policy.conditioned(one_hot):
            out.append(response_logits(policy.model, input_ids, attention_mask, response_ids, response_mask))
    return torch.stack(out)


def _check_weights(weights: Tensor, rows: int, m: int) -> None:
    # einsum broadcasts a size-1 dimension: a (B, 1) weighting would add the experts' logits up unweighted
    if tuple(weights.shape) != (rows, m):
        raise ValueError(f"`weights` must have shape (B, m) = ({rows}, {m}), one weighting of the {m} experts per "
                         f"row, got {tuple(weights.shape)}")


def mixed_logits(expert: Tensor, weights: Tensor) -> Tensor:
    """``sum_i w_i * logits_i``: experts ``(m, B, T, V)``, weights ``(B, m)`` -> ``(B, T, V)``."""
    _check_weights(weights, expert.shape[1], expert.shape[0])
    return torch.einsum("mbtv,bm->btv", expert, weights.to(expert.dtype))


def mixture_log_probs(
    policy: ConditionalPolicy,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    weights: Tensor,
) -> PolicyOutput:
    """Per-token log-probabilities ``(B, T)`` of ``response_ids`` under the logit mixture at ``weights`` ``(B, m)``."""
    _check_weights(weights, response_ids.shape[0], policy.num_objectives)  # before the m expert passes
    logits = mixed_logits(expert_logits(policy, input_ids, attention_mask, response_ids, response_mask), weights)
    logp = logits.log_softmax(-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) * response_mask
    return PolicyOutput(logp, None)


class _ExpertDecoder:
    """One expert's incremental decoding: its prompt computed once, then one token per :meth:`step`, with its own
    key/value cache. ``logits`` ``(B, V)`` (float32) predict the next response token."""

    def __init__(self, policy: ConditionalPolicy, one_hot: Tensor, input_ids: Tensor, attention_mask: Tensor):
        self.policy, self.one_hot, self.model = policy, one_hot, policy.model
        self.seq2seq = model_kind(self.model) == "seq2seq"
        self.cache_argument = _cache_argument(self.model)
        with policy.conditioned(one_hot):
            if self.seq2seq:
                self.encoder = BaseModelOutput(last_hidden_state=encode(self.model, input_ids, attention_mask))
                self.encoder_mask, self.cache = attention_mask, None
                start = torch.full((input_ids.shape[0], 1), self.model.config.decoder_start_token_id,
                                   device=input_ids.device)
                self._decode(start)
            else:
                self._keep(_prefill(self.model, input_ids, attention_mask))
                self.mask = attention_mask
                self.position = _positions(attention_mask)[:, -1:]  # (B, 1): the last prompt token's

    def _keep(self, out) -> None:
        """Keep a forward's key/value cache and its last position's logits."""
        self.cache, self.logits = _cache_of(out), out.logits[:, -1].float()

    def _decode(self, tokens: Tensor) -> None:
        self._keep(self.model(encoder_outputs=self.encoder, attention_mask=self.encoder_mask,
                              decoder_input_ids=tokens, use_cache=True, **{self.cache_argument: self.cache}))

    def step(self, tokens: Tensor) -> None:
        """Feed the last generated tokens ``(B, 1)``."""
        with self.policy.conditioned(self.one_hot):
            if self.seq2seq:
                self._decode(tokens)
                return
            self.mask = torch.cat([self.mask, torch.ones_like(tokens, dtype=self.mask.dtype)], 1)
            self.position = self.position + 1
            self._keep(self.model(input_ids=tokens, attention_mask=self.mask, position_ids=self.position,
                                  use_cache=True, **{self.cache_argument: self.cache}))


# generate keywords the mixture accepts at their neutral value only (what GenerationSettings passes by default)
_NEUTRAL: dict[str, Any] = {"top_k": 0, "top_p": 1.0, "min_new_tokens": 0, "num_beams": 1}


@torch.no_grad()
def mixture_generate(
    policy: ConditionalPolicy,
    input_ids: Tensor,
    attention_mask: Tensor,
    weights: Tensor,
    max_new_tokens: int = 48,
    do_sample: bool = False,
    temperature: float = 1.0,
    **settings: Any,
) -> tuple[Tensor, Tensor]:
    """Generate from the logit mixture at ``weights`` ``(B, m)``; returns ``(response_ids, response_mask)`` like
    :meth:`ConditionalPolicy.generate`. Sampling draws from torch's global generator.

    ``settings``: other ``generate`` keywords, accepted only at the values that change nothing (``top_k`` 0,
    ``top_p`` 1, ``min_new_tokens`` 0, ``num_beams`` 1), which ``GenerationSettings`` passes.

    Raises:
        ValueError: a setting the mixture does not implement (a truncation, a minimum length, a penalty, beams).
    """
    check_experts(policy)
    _check_weights(weights, input_ids.shape[0], policy.num_objectives)
    unsupported = {k: v for k, v in settings.items() if _NEUTRAL.get(k, object()) != v and v is not None}
    if unsupported:
        raise ValueError(f"decoding-time mixing samples from the full mixture, greedily or at a temperature; it does "
                         f"not implement {unsupported} (neutral values: {_NEUTRAL}): drop them or use "
                         "decoding='policy'")
    experts = [_ExpertDecoder(policy, one_hot, input_ids, attention_mask)
               for one_hot in _one_hots(policy, input_ids.shape[0], input_ids.device)] if max_new_tokens > 0 else []

    def next_logits(response: Tensor) -> Tensor:
        if response.shape[1]:
            for expert in experts:
                expert.step(response[:, -1:])
        return mixed_logits(torch.stack([e.logits for e in experts])[:, :, None], weights)[:, 0]  # (B, V)

    return decode(policy, next_logits, input_ids.shape[0], max_new_tokens, do_sample, temperature)


def decode(
    policy: ConditionalPolicy, next_logits: Callable[[Tensor], Tensor], rows: int, max_new_tokens: int,
    do_sample: bool = False, temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Decode ``rows`` responses token by token: ``next_logits(response)`` gives the ``(B, V)`` logits of the next
    token after ``response`` ``(B, t)``; greedy or sampled at ``temperature``; a row stops at the policy's EOS and is
    padded after it (without an EOS token, every row runs to ``max_new_tokens``). Returns
    ``(response_ids, response_mask)``."""
    device = policy.model.device
    eos = policy.model.generation_config.eos_token_id
    eos = policy.tokenizer.eos_token_id if eos is None else eos
    pad = policy.tokenizer.pad_token_id or 0
    response = torch.empty(rows, 0, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    # a model without an EOS token decodes every row to max_new_tokens, as generate does
    eos_ids = torch.as_tensor([] if eos is None else eos, dtype=torch.long, device=device).view(-1)
    for _step in range(max_new_tokens):
        logits = next_logits(response)
        if do_sample:
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(-1)
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        response = torch.cat([response, token[:, None]], 1)
        done |= torch.isin(token, eos_ids)
        if done.all():
            break
    mask = response_mask_from_ids(response, eos)
    return response.masked_fill(mask == 0, pad), mask
