"""The KL strength alpha in the parameters (``ConditioningConfig.alpha_scale``): LoRA-CLP's update scaled by
``alpha_scale / alpha``, the same in the forward pass, generation, a merged model and a saved policy."""

import re

import pytest
import torch
from policy_helpers import PROMPTS, perturb

from clp_lightning.conditioning.config import ConditioningConfig
from clp_lightning.conditioning.policy import ConditionalPolicy

LORA = {"r": 4, "target_modules": "all"}
SCALE = 0.05
W = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.0, 1.0]])  # one weighting per prompt


def scaled_policy(arch: str, alpha_scale: float | None = SCALE) -> ConditionalPolicy:
    conditioning = ConditioningConfig(mode="lora", options=LORA, condition_on_alpha=alpha_scale is not None,
                                      alpha_scale=alpha_scale)
    torch.manual_seed(0)  # peft initialises lora_A from the global generator: the same policy whatever ran before
    return perturb(ConditionalPolicy.from_pretrained(f"tiny:{arch}", 2, conditioning, seed=0), seed=0)


def logits(policy: ConditionalPolicy, weights: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """The next-token logits after each prompt (seq2seq: the decoder's first step) under ``policy.conditioned``."""
    enc = policy.encode(PROMPTS)
    extra = {"decoder_input_ids": torch.zeros(len(PROMPTS), 1, dtype=torch.long)} if policy.kind == "seq2seq" else {}
    with torch.no_grad(), policy.conditioned(weights, alpha):
        return policy.model(**enc, **extra).logits[:, -1]


def test_the_update_is_scaled_by_alpha_scale_over_alpha(arch):
    policy, plain = scaled_policy(arch), scaled_policy(arch, None)
    plain.model.load_state_dict(policy.model.state_dict())  # the same adapters, alpha in the parameters or not
    for alpha, factor in ((SCALE, 1.0), (2 * SCALE, 0.5), (SCALE / 4, 4.0)):
        a = torch.full((len(PROMPTS),), alpha)
        # the adapters' outputs are linear in the weighting row, so scaling alpha is scaling the row
        torch.testing.assert_close(logits(policy, W, a), logits(plain, W * factor, None), atol=1e-5, rtol=1e-5)
    # a per-prompt alpha scales each prompt's row on its own
    mixed = torch.tensor([SCALE, 2 * SCALE, SCALE / 4])
    torch.testing.assert_close(logits(policy, W, mixed), logits(plain, W * torch.tensor([[1.0], [0.5], [4.0]]), None),
                               atol=1e-5, rtol=1e-5)
    # a very large alpha leaves the reference (the base, adapters off), which a very small one moves far from
    with policy.reference() as reference:
        enc = policy.encode(PROMPTS)
        extra = {"decoder_input_ids": torch.zeros(len(PROMPTS), 1, dtype=torch.long)} if arch == "t5" else {}
        with torch.no_grad():
            base = reference(**enc, **extra).logits[:, -1]
    torch.testing.assert_close(logits(policy, W, torch.full((3,), 1e6)), base, atol=1e-4, rtol=1e-4)
    assert (logits(policy, W, torch.full((3,), SCALE)) - base).abs().max() > 1e-2


def test_generation_merging_and_saving_read_the_same_alpha(arch, tmp_path):
    policy = scaled_policy(arch)
    w, alpha = [0.3, 0.7], 2 * SCALE
    expected = policy.generate_text(PROMPTS, w, alpha, do_sample=False, max_new_tokens=6)
    assert expected != policy.generate_text(PROMPTS, w, SCALE / 10, do_sample=False, max_new_tokens=6)
    # a plain model merged at (w, alpha)
    merged = policy.merged_model(w, alpha).eval()
    enc = policy.encode(PROMPTS)
    out = merged.generate(**enc, do_sample=False, max_new_tokens=6)
    got = out[:, enc["input_ids"].shape[1]:] if arch == "gpt2" else out[:, 1:]
    assert policy.tokenizer.batch_decode(got, skip_special_tokens=True) == expected
    with pytest.raises(ValueError, match="pass alpha to merge it"):
        policy.merged_model(w)
    # saved and loaded: the setting travels with the policy
    policy.save_pretrained(str(tmp_path))
    loaded = ConditionalPolicy.from_pretrained(str(tmp_path))
    assert loaded.conditioning.alpha_scale == SCALE
    assert loaded.generate_text(PROMPTS, w, alpha, do_sample=False, max_new_tokens=6) == expected
    with pytest.raises(ValueError, match="pass alpha"):
        loaded.generate_text(PROMPTS, w, do_sample=False, max_new_tokens=6)


def test_bad_settings_are_refused_before_any_model_loads():
    with pytest.raises(ValueError, match="condition_on_alpha is False"):
        ConditioningConfig(mode="lora", options=LORA, alpha_scale=SCALE)
    with pytest.raises(ValueError, match="must be > 0"):
        ConditioningConfig(mode="lora", options=LORA, condition_on_alpha=True, alpha_scale=0.0)
    with pytest.raises(ValueError, match="mode 'mixing' has no update separate"):
        ConditioningConfig(mode="mixing", options={"targets": "all"}, condition_on_alpha=True, alpha_scale=SCALE)
    with pytest.raises(ValueError, match="needs a channel for alpha"):
        ConditioningConfig(mode="lora", options=LORA, condition_on_alpha=True)
    # unset, the field is not recorded: checkpoints written before it existed compare equal
    assert "alpha_scale" not in ConditioningConfig(mode="lora", options=LORA).stored()
    assert ConditioningConfig(mode="lora", options=LORA, condition_on_alpha=True,
                              alpha_scale=SCALE).stored()["alpha_scale"] == SCALE


@pytest.mark.parametrize("alpha", [torch.full((6,), SCALE), torch.full((3, 1), SCALE)])
def test_an_alpha_of_another_shape_is_refused_by_name(alpha):
    # per-response alphas (N,) with per-prompt weights (P, m) failed in expand with torch's bare size error
    policy = scaled_policy("gpt2")
    with pytest.raises(ValueError, match=rf"`alpha` must be a number or have shape \(B,\) = \(3,\).*"
                                         rf"got {re.escape(str(tuple(alpha.shape)))}"):
        logits(policy, W, alpha)
    torch.testing.assert_close(logits(policy, W, torch.tensor(SCALE)), logits(policy, W, torch.full((3,), SCALE)))
