"""Decoding-time mixing of the experts' logits."""

import pytest
import torch
from policy_helpers import PROMPTS, make_policy, perturb

from clp_lightning.conditioning.mixture import expert_logits, mixture_generate, mixture_log_probs

GEN = dict(max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_mixture_is_the_weighted_sum_of_expert_logits(arch):
    policy = perturb(make_policy(arch, "attention"), scale=1.0).eval()
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
    enc = policy.encode(PROMPTS)
    ids, mask = mixture_generate(policy, **enc, weights=w, **GEN)
    experts = expert_logits(policy, **enc, response_ids=ids, response_mask=mask)  # (m, B, T, V)
    got = mixture_log_probs(policy, **enc, response_ids=ids, response_mask=mask, weights=w).log_probs
    want = (0.3 * experts[0, 2] + 0.7 * experts[1, 2]).log_softmax(-1)
    want = want.gather(-1, ids[2].unsqueeze(-1)).squeeze(-1) * mask[2]
    assert torch.allclose(got[2], want, atol=1e-5)
    # greedy: each token is the argmax of the mixed logits given the tokens before it
    mixed = 0.3 * experts[0, 2] + 0.7 * experts[1, 2]
    n = int(mask[2].sum())
    assert ids[2, :n].tolist() == mixed.argmax(-1)[:n].tolist()
    # at a one-hot weighting the mixture is that expert: the conditioned policy at e_i
    for row in (0, 1):
        alone, alone_mask = policy.generate(**policy.encode(PROMPTS[row : row + 1]), weights=w[row : row + 1], **GEN)
        k = int(alone_mask.sum())
        assert ids[row, :k].tolist() == alone[0, :k].tolist()
