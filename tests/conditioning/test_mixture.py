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


def _recomputed_mixture(policy, input_ids, attention_mask, weights, max_new_tokens, do_sample):
    """The mixture decoded without any cache: every step runs every expert on the prompt and the whole response so
    far (the definition the cached decoding must reproduce)."""
    rows = input_ids.shape[0]
    eos = torch.as_tensor(policy.model.generation_config.eos_token_id).view(-1)
    pad = policy.tokenizer.pad_token_id or 0
    response = torch.empty(rows, 0, dtype=torch.long)
    done = torch.zeros(rows, dtype=torch.bool)
    for _ in range(max_new_tokens):
        ids = torch.cat([response, torch.full((rows, 1), pad)], 1)  # the dummy last position predicts the next
        experts = expert_logits(policy, input_ids, attention_mask, ids, torch.ones_like(ids))
        logits = torch.einsum("mbv,bm->bv", experts[:, :, -1], weights)
        token = torch.multinomial(logits.softmax(-1), 1).squeeze(-1) if do_sample else logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        response = torch.cat([response, token[:, None]], 1)
        done |= torch.isin(token, eos)
        if done.all():
            break
    return response


@pytest.mark.parametrize("arch", ["t5", "gpt2", "llama"])
@pytest.mark.parametrize("mode", ["attention", "lora", "all"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_cached_mixture_decodes_the_tokens_of_the_recomputed_one(arch, mode, do_sample):
    # each expert keeps its own key/value cache; the tokens must be those of recomputing every prefix (a float64
    # model, so that the two paths' rounding cannot flip a near-tie), greedy and sampled from the same seed, on
    # left-padded prompts
    policy = perturb(make_policy(arch, mode), scale=1.0).double().eval()
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
    enc = policy.encode(PROMPTS)
    assert arch == "t5" or (enc["attention_mask"] == 0).any()  # the causal prompts are padded
    torch.manual_seed(3)
    ids, mask = mixture_generate(policy, **enc, weights=w, max_new_tokens=8, do_sample=do_sample)
    torch.manual_seed(3)
    want = _recomputed_mixture(policy, enc["input_ids"], enc["attention_mask"], w, 8, do_sample)
    assert ids.shape == want.shape
    assert ids.masked_fill(mask == 0, -1).tolist() == want.masked_fill(mask == 0, -1).tolist()


def test_policies_whose_experts_the_mixture_cannot_run_are_refused():
    # a prompt-conditioned policy's prompts carry the mixture's w in their prefix: expert i would read w, not e_i
    from clp_lightning.conditioning.config import ConditioningConfig
    from clp_lightning.conditioning.policy import ConditionalPolicy

    policy = perturb(make_policy("gpt2", "prompt+attention")).eval()
    w = torch.tensor([[0.3, 0.7]])
    enc = policy.encode(PROMPTS[:1], w)
    ids = torch.randint(3, 200, (1, 3))
    with pytest.raises(ValueError, match="prompt-conditioned policy"):
        mixture_generate(policy, **enc, weights=w, **GEN)
    with pytest.raises(ValueError, match="prompt-conditioned policy"):
        mixture_log_probs(policy, **enc, response_ids=ids, response_mask=torch.ones_like(ids), weights=w)
    lora_alpha = ConditioningConfig(mode="lora", options={"r": 2}, condition_on_alpha=True, alpha_scale=0.1)
    policy = ConditionalPolicy.from_pretrained("tiny:gpt2", 2, lora_alpha)
    with pytest.raises(ValueError, match="alpha_scale"):
        mixture_generate(policy, **policy.encode(PROMPTS[:1]), weights=w, **GEN)


def test_settings_the_mixture_does_not_implement_are_refused_not_ignored():
    # a truncated or length-forced sample asked of the mixture must not silently come from the full mixture
    policy = perturb(make_policy("gpt2", "attention")).eval()
    w = torch.tensor([[0.3, 0.7]])
    enc = policy.encode(PROMPTS[:1])
    for setting in ({"top_p": 0.9}, {"top_k": 5}, {"min_new_tokens": 3}, {"repetition_penalty": 1.2}):
        with pytest.raises(ValueError, match="does not implement"):
            mixture_generate(policy, **enc, weights=w, max_new_tokens=4, do_sample=True, **setting)
    # the neutral values GenerationSettings passes are accepted
    from clp_lightning.config import GenerationSettings

    for settings in (GenerationSettings(max_new_tokens=4), GenerationSettings(max_new_tokens=4, do_sample=False)):
        ids, mask = mixture_generate(policy, **enc, weights=w, **settings.kwargs())
        assert ids.shape[0] == 1 and ids.shape[1] <= 4


def test_a_model_without_an_eos_token_decodes_to_max_new_tokens():
    # generate runs a model without an EOS token to max_new_tokens; the mixture failed in torch.as_tensor(None)
    policy = perturb(make_policy("gpt2", "attention")).eval()
    policy.model.generation_config.eos_token_id = None
    policy.tokenizer.eos_token = None
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
    enc = policy.encode(PROMPTS)
    ids, mask = mixture_generate(policy, **enc, weights=w, max_new_tokens=5)
    assert ids.shape == (3, 5) and bool(mask.all())
    experts = expert_logits(policy, **enc, response_ids=ids, response_mask=mask)
    assert ids.tolist() == torch.einsum("mbtv,bm->btv", experts, w).argmax(-1).tolist()


def test_weights_that_are_not_one_row_per_response_are_refused():
    # einsum broadcast a (B, 1) weighting against the m experts: their logits summed, unweighted, without a word
    policy = perturb(make_policy("gpt2", "attention")).eval()
    enc = policy.encode(PROMPTS)
    ids = torch.randint(3, 200, (3, 4))
    for w in (torch.ones(3, 1), torch.full((1, 2), 0.5), torch.full((3, 3), 1 / 3)):
        with pytest.raises(ValueError, match=r"must have shape \(B, m\) = \(3, 2\)"):
            mixture_generate(policy, **enc, weights=w, **GEN)
        with pytest.raises(ValueError, match=r"must have shape \(B, m\) = \(3, 2\)"):
            mixture_log_probs(policy, **enc, response_ids=ids, response_mask=torch.ones_like(ids), weights=w)
