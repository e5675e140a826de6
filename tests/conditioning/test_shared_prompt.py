"""Each prompt computed once for its k samples (seq2seq: one encoder pass; causal: one prefill whose cache the k
responses continue from) equals computing every (prompt, response) pair in full: log-probabilities, KL, loss,
gradients and generations, for every conditioning mode, on left-padded prompts of different lengths (float64)."""

import pytest
import torch
from policy_helpers import MODES, PROMPTS, perturb

from clp_lightning import algorithms as alg
from clp_lightning.conditioning.config import ConditioningConfig
from clp_lightning.conditioning.lm import samples_per_prompt
from clp_lightning.conditioning.policy import ConditionalPolicy

K = 3
SETUPS = {**MODES, "prompt": ConditioningConfig(prompt=True)}


def make(arch: str, mode: str) -> ConditionalPolicy:
    policy = ConditionalPolicy.from_pretrained(f"tiny:{arch}", 2, SETUPS[mode], seed=0).double()
    policy.freeze_reference()
    return perturb(policy).eval()  # eval: no dropout, so two passes are comparable


def repeated(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.repeat_interleave(K, 0)


def responses(policy: ConditionalPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """Random responses ``(P K, 7)`` of different lengths (right-padded after each row's end)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (len(PROMPTS) * K, 7), generator=gen)
    lengths = torch.randint(1, 8, (len(PROMPTS) * K,), generator=gen)
    mask = (torch.arange(7) < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, policy.tokenizer.pad_token_id), mask


@pytest.mark.parametrize("mode", list(SETUPS))
@pytest.mark.parametrize("arch", ["t5", "gpt2", "llama"])
def test_shared_prompt_equals_the_full_path(arch, mode):
    policy = make(arch, mode)
    w = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    alpha = torch.full((len(PROMPTS),), 0.1)
    enc = policy.encode(PROMPTS, w)
    full_enc = policy.encode([p for p in PROMPTS for _ in range(K)], repeated(w))
    assert enc["input_ids"].shape[0] == len(PROMPTS) and (enc["attention_mask"] == 0).any()  # padded, not equal
    ids, mask = responses(policy)
    coeffs = torch.randn(ids.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def pass_(encoded, weights, prompts):
        policy.zero_grad()
        logp = policy(**encoded, response_ids=ids, response_mask=mask, weights=weights).log_probs
        ref = policy.reference_log_probs(prompts, ids, mask)
        kl = alg.sequence_kl(logp.detach(), ref, mask, "k1")
        loss = (alg.sequence_log_probs(logp, mask) * coeffs).sum() + alg.kl_loss(logp, ref, mask, "k2").sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return logp.detach(), ref, kl, loss.detach(), grads

    shared = pass_(enc, w, PROMPTS)
    full = pass_(full_enc, repeated(w), [p for p in PROMPTS for _ in range(K)])
    for name, a, b in zip(("log-probs", "reference log-probs", "KL", "loss"), shared[:4], full[:4]):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), (name, (a - b).abs().max())
    assert shared[4].keys() == full[4].keys() and shared[4]
    for name, grad in shared[4].items():
        # summed over the k samples in another order, through the float32 logits: float32 rounding of the scale
        error, scale = (grad - full[4][name]).abs().max(), full[4][name].abs().max()
        assert error <= 1e-6 * scale, (name, error, scale)
    assert not torch.allclose(shared[0][0], shared[0][K])  # different prompts and weightings: a real comparison

    # generation: greedy and sampled (the same seed draws the same tokens when the logits are the same)
    for sampling in ({"do_sample": False}, {"do_sample": True, "top_k": 0}):
        torch.manual_seed(3)
        got = policy.generate(**enc, weights=w, alpha=alpha, num_return_sequences=K, max_new_tokens=6, **sampling)
        torch.manual_seed(3)
        want = policy.generate(**full_enc, weights=repeated(w), alpha=repeated(alpha), max_new_tokens=6, **sampling)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), sampling
        # and the library's own generate, which encodes (prefills) inside
        torch.manual_seed(3)
        with policy.conditioned(repeated(w)):
            direct = policy.model.generate(**full_enc, max_new_tokens=6, **sampling)
        response = direct[:, full_enc["input_ids"].shape[1]:] if arch != "t5" else direct[:, 1:]
        assert torch.equal(response[:, : want[0].shape[1]] * want[1], want[0] * want[1]), sampling


@pytest.mark.parametrize("arch", ["t5", "gpt2", "llama"])
def test_beam_search_asked_for_by_the_caller_with_k_samples_per_prompt(arch):
    """Beam search expands every row into its beams before the first step, and a causal prompt's shared cache must
    be expanded with them: the same responses as the prompts repeated k times (GenerationSettings.extra may ask for
    beams)."""
    policy = make(arch, "lora")
    w = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    enc = policy.encode(PROMPTS, w)
    full_enc = policy.encode([p for p in PROMPTS for _ in range(K)], repeated(w))
    settings = dict(max_new_tokens=6, do_sample=False, num_beams=2)
    got = policy.generate(**enc, weights=w, num_return_sequences=K, **settings)
    want = policy.generate(**full_enc, weights=repeated(w), **settings)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_responses_that_do_not_divide_among_the_prompts_are_refused():
    assert samples_per_prompt(3, 12) == 4 and samples_per_prompt(5, 5) == 1
    with pytest.raises(ValueError, match="10 responses for 3 prompts: expected k responses per prompt"):
        samples_per_prompt(3, 10)


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_the_models_generation_config_cannot_reshape_the_sampling_distribution(arch, monkeypatch):
    """A checkpoint's generation_config.json (a repetition penalty, an n-gram ban, a minimum length, beams, more
    return sequences) must not change what the policy samples or decodes greedily: the loss and the KL score the
    tokens under the policy itself. Settings the caller passes still apply."""
    import warnings

    from transformers.generation import utils as generation_utils

    from clp_lightning.config import GenerationSettings

    policy = perturb(ConditionalPolicy.from_pretrained(f"tiny:{arch}", 2, SETUPS["lora"], seed=0)).eval()
    w = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.6, 0.4]])
    enc = policy.encode(PROMPTS, w)

    def run(settings: GenerationSettings, **extra) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        return policy.generate(**enc, weights=w, num_return_sequences=K, **settings.kwargs(), **extra)

    sampled, greedy = GenerationSettings(max_new_tokens=8), GenerationSettings(max_new_tokens=8, do_sample=False)
    logged = []
    monkeypatch.setattr(generation_utils.logger, "warning", lambda msg, *a, **k: logged.append(msg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the "off" values passed are transformers' defaults: nothing to warn about
        clean = run(sampled), run(greedy)
        run(GenerationSettings(max_new_tokens=8, min_new_tokens=3))
    assert logged == []
    config = policy.model.generation_config
    # top_h truncates the sample; penalty_alpha turns greedy into contrastive search, dola_layers into DoLa;
    # stop_strings would end a response where its mask (EOS) does not
    for name, value in dict(repetition_penalty=50.0, no_repeat_ngram_size=1, min_length=6, num_beams=3,
                            num_return_sequences=2, typical_p=0.2, top_h=0.2, penalty_alpha=0.6,
                            dola_layers="low", stop_strings=["TL"]).items():
        setattr(config, name, value)
    for got, want in zip((run(sampled), run(greedy)), clean):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    penalised = run(greedy, repetition_penalty=50.0, no_repeat_ngram_size=1)
    assert not torch.equal(penalised[0], clean[1][0])  # asked for by the caller: applied


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("where", ["argument", "generation_config"])
@pytest.mark.parametrize("setting, value", [("cache_implementation", "static"), ("use_cache", False)])
def test_generation_that_cannot_continue_from_the_shared_prefill(arch, where, setting, value):
    """The shared prefill's cache must stay out where generate cannot continue from it. It refuses a cache passed
    beside the ``cache_implementation`` it is asked to make (a static cache for a compiled step, which
    GenerationSettings.extra may ask for; Gemma 2's generation config names ``hybrid``). With the cache off
    (``use_cache=False``, or a generation config that says so) it mishandled one passed in: other tokens, without a
    word."""
    policy = make(arch, "lora")
    w = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    enc = policy.encode(PROMPTS, w)
    settings = dict(max_new_tokens=6, do_sample=False)
    want = policy.generate(**enc, weights=w, num_return_sequences=K, **settings)
    if where == "argument":
        settings[setting] = value
    else:
        setattr(policy.model.generation_config, setting, value)
    got = policy.generate(**enc, weights=w, num_return_sequences=K, **settings)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
