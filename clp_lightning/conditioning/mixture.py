"""Decoding-time mixing: next-token logits ``sum_i w_i * logits_i`` of ``m`` expert policies.

The experts are the conditioned policy at the one-hot weightings ``e_i`` (for a Rewarded Soups policy, expert
``i`` itself). Unlike parameter mixing, each decoding step runs every expert: ``m`` forward passes per token.
This is a baseline for evaluation; it recomputes the whole prefix at each step (no KV cache), which is simple
and exact but quadratic in the response length.

Notation: ``B`` rows, ``L`` prompt tokens, ``T`` response tokens, ``V`` vocabulary, ``m`` experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clp_lightning.conditioning.lm import PolicyOutput, response_logits, response_mask_from_ids
from clp_lightning.conditioning.policy import ConditionalPolicy


def expert_logits(
    policy: ConditionalPolicy, input_ids: Tensor, attention_mask: Tensor, response_ids: Tensor, response_mask: Tensor
) -> Tensor:
    """Logits of every expert for every response position, ``(m, B, T, V)`` (position ``t`` predicts token ``t``)."""
    rows, out = input_ids.shape[0], []
    for i in range(policy.num_objectives):
        one_hot = torch.zeros(rows, policy.num_objectives, device=input_ids.device)
        one_hot[:, i] = 1.0
        with policy.conditioned(one_hot):
            out.append(response_logits(policy.model, input_ids, attention_mask, response_ids, response_mask))
    return torch.stack(out)


def mixed_logits(expert: Tensor, weights: Tensor) -> Tensor:
    """``sum_i w_i * logits_i``: experts ``(m, B, T, V)``, weights ``(B, m)`` -> ``(B, T, V)``."""
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
    logits = mixed_logits(expert_logits(policy, input_ids, attention_mask, response_ids, response_mask), weights)
    logp = logits.log_softmax(-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) * response_mask
    return PolicyOutput(logp, None)


@torch.no_grad()
def mixture_generate(
    policy: ConditionalPolicy,
    input_ids: Tensor,
    attention_mask: Tensor,
    weights: Tensor,
    max_new_tokens: int = 48,
    do_sample: bool = False,
    temperature: float = 1.0,
    **_: object,
) -> tuple[Tensor, Tensor]:
    """Generate from the logit mixture at ``weights`` ``(B, m)``; returns ``(response_ids, response_mask)`` like
    :meth:`ConditionalPolicy.generate`. Sampling draws from torch's global generator."""
    rows = input_ids.shape[0]
    eos = policy.model.generation_config.eos_token_id
    eos = policy.tokenizer.eos_token_id if eos is None else eos
    pad = policy.tokenizer.pad_token_id or 0
    response = torch.empty(rows, 0, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    eos_ids = torch.as_tensor(eos, device=input_ids.device).view(-1)
    for _step in range(max_new_tokens):
        # one more (dummy) position: its logits predict the next token
        step_ids = torch.cat([response, torch.full((rows, 1), pad, device=input_ids.device)], 1)
        step_mask = torch.ones_like(step_ids)
        logits = mixed_logits(expert_logits(policy, input_ids, attention_mask, step_ids, step_mask), weights)[:, -1]
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
