"""The conditioning-mode interface: a mode written in one file outside the package, selected by name from config,
runs through every path of the policy (conditioned forward, reference, merged model, Rewarded Soups)."""

import pytest
import torch
from policy_helpers import PROMPTS

from clp_lightning.conditioning.config import ConditioningConfig
from clp_lightning.conditioning.mode import ConditioningMode, mode_class, register_mode
from clp_lightning.conditioning.policy import ConditionalPolicy

MODE = "mode_helpers.LogitBias"


def make(scale: float = 0.0, arch: str = "gpt2") -> ConditionalPolicy:
    config = ConditioningConfig(mode=MODE, options={"init_scale": scale})
    policy = ConditionalPolicy.from_pretrained(f"tiny:{arch}", 2, config, seed=0).eval()
    policy.freeze_reference()
    return policy


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_a_new_mode_conditions_the_policy_through_the_interface(arch):
    policy = make(arch=arch)
    assert policy.conditioning.name == "LogitBias" and policy.conditioned_modules and policy.extra_parameters > 0
    assert policy.mode.name == MODE  # a mode named by its path reports that path, not the base class's "none"
    w = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    enc = policy.encode(PROMPTS[:2], w)
    ids, mask = policy.generate(**enc, weights=w, max_new_tokens=4, do_sample=False)
    # zero biases: the policy is its reference at every w
    start = policy(**enc, response_ids=ids, response_mask=mask, weights=w).log_probs
    assert torch.allclose(start, policy.reference_log_probs(PROMPTS[:2], ids, mask), atol=1e-6)
    bias = next(p for n, p in policy.model.named_parameters() if n.endswith("clp_logit_bias"))
    with torch.no_grad():
        bias.copy_(torch.randn_like(bias))
    moved = policy(**enc, response_ids=ids, response_mask=mask, weights=w).log_probs
    assert not torch.allclose(moved, start)  # the weighting now matters ...
    assert torch.allclose(policy.reference_log_probs(PROMPTS[:2], ids, mask), start, atol=1e-6)  # ... not the ref
    # the merged model at w is the policy at w, with no mode left in it
    for row in range(2):
        merged = policy.merged_model(w[row])
        assert not any(n.endswith("clp_logit_bias") for n, _ in merged.named_parameters())
        from clp_lightning.conditioning.lm import response_log_probs

        want = response_log_probs(merged, enc["input_ids"][row:row + 1], enc["attention_mask"][row:row + 1],
                                  ids[row:row + 1], mask[row:row + 1]).log_probs
        assert torch.allclose(moved[row:row + 1], want, atol=1e-5)


def test_rewarded_soups_takes_the_modes_conditioned_values():
    experts = [make(scale=1.0).model.state_dict() for _ in range(2)]
    name = next(n for n in experts[0] if n.endswith("clp_logit_bias"))
    experts[1][name] = experts[1][name] + 1.0
    soup = make()
    soup.load_expert_copies(experts)
    bias = dict(soup.model.named_parameters())[name]
    assert torch.equal(bias[0], experts[0][name][0]) and torch.equal(bias[1], experts[1][name][1])


def test_modes_are_chosen_by_name_and_bad_names_fail_early():
    assert mode_class("lora").reference_in_model and not mode_class("mixing").reference_in_model
    assert ConditioningConfig(mode="mixing", options={"targets": "logits"}).build_mode().name == "mixing"
    assert ConditioningConfig().build_mode().name == "none"
    with pytest.raises(ValueError, match="unknown conditioning mode 'prefix_tuning'"):
        ConditioningConfig(mode="prefix_tuning")
    # options are checked against the mode's signature when the config is made, before any model loads
    with pytest.raises(ValueError, match=r"mode 'lora' has no option\(s\) \['rank'\].*\['alpha', 'dropout', 'r'"):
        ConditioningConfig(mode="lora", options={"rank": 8})
    with pytest.raises(ValueError, match=r"mode 'mixing' needs option\(s\) \['targets'\]"):
        ConditioningConfig(mode="mixing")
    with pytest.raises(ValueError, match=r"mode 'none' has no option\(s\) \['x'\] .*; its options are none"):
        ConditioningConfig(options={"x": 1})

    @register_mode("test_registered")
    class Registered(ConditioningMode):
        pass

    assert ConditioningConfig(mode="test_registered").build_mode().name == "test_registered"
    with pytest.raises(ValueError, match="already registered"):
        register_mode("mixing")(Registered)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(prompt=True, prompt_template="<w {weights}> {extra}"), "only the fields \\['weights'\\]"),
        (dict(prompt=True, prompt_template="<w {weights}> {0}"), "prompt template"),
        (dict(prompt=True, condition_on_alpha=True, alpha_template="<w {weights} kl {alpha} {x}>"), "alpha template"),
        (dict(prompt=True, prompt_precision=-1), "precision must be >= 0"),
        (dict(prompt=True, prompt_precision=1.5), r"precision must be >= 0, an integer .*got 1.5"),
        (dict(prompt=True, prompt_precision=True), r"precision must be >= 0, an integer .*got True"),
        (dict(mode="lora", options={"r": 0}), "rank r must be >= 1, an integer, got 0"),
        (dict(mode="lora", options={"r": 2.5}), "rank r must be >= 1, an integer, got 2.5"),
        (dict(mode="lora", options={"r": True}), "rank r must be >= 1, an integer, got True"),
        (dict(mode="lora", options={"r": "8"}), "rank r must be >= 1, an integer, got '8'"),
        (dict(mode="lora", options={"alpha": True}), r"LoRA alpha must be a finite number > 0 .*got True"),
        (dict(mode="lora", options={"dropout": "0.1"}), r"dropout must be in \[0, 1\), got '0.1'"),
        (dict(mode="lora", options={"dropout": 1.5}), "dropout must be in"),
        (dict(mode="lora", options={"alpha": 0.0}), r"LoRA alpha must be a finite number > 0 .*got 0.0"),
        (dict(mode="lora", options={"alpha": float("nan")}), r"LoRA alpha must be a finite number > 0 .*got nan"),
        (dict(mode="lora", options={"target_modules": []}), "target_modules is empty"),
        (dict(mode="lora", condition_on_alpha=True, alpha_scale=float("inf")), r"alpha_scale must be > 0, .*got inf"),
        (dict(mode="lora", condition_on_alpha=True, alpha_scale=True), r"alpha_scale must be > 0, .*got True"),
        (dict(mode="mixing", options={"targets": []}), "targets is empty"),
        (dict(mode="mixing", options={"targets": ["attention", 1]}), r"targets must be .*got \['attention', 1\]"),
        (dict(mode="mixing", options={"targets": 5}), r"targets must be .*got 5"),
        (dict(mode="lora", options={"target_modules": [None]}), r"LoRA target_modules must be .*got \[None\]"),
        # from Python (YAML goes through jsonargparse): the text "false" counted as true
        (dict(prompt="false"), "prompt must be true or false, got 'false'"),
        (dict(train_shared=0), "train_shared must be true or false, got 0"),
        (dict(prompt=True, condition_on_alpha="no"), "condition_on_alpha must be true or false, got 'no'"),
    ],
)
def test_bad_prompt_and_mode_settings_fail_when_the_config_is_made(settings, message):
    # not when the model has loaded, nor (a template naming another field) at the first encode of the run
    with pytest.raises(ValueError, match=message):
        ConditioningConfig(**settings)


@pytest.mark.parametrize(("mode", "options", "added"), [("mixing", {"targets": "attention"}, ".attn."),
                                                       (MODE, {}, "clp_logit_bias")])
def test_train_shared_false_trains_only_what_the_mode_added(mode, options, added):
    def trainable(train_shared: bool) -> set[str]:
        config = ConditioningConfig(mode=mode, options=options, train_shared=train_shared)
        policy = ConditionalPolicy.from_pretrained("tiny:gpt2", 2, config, seed=0)
        return {n for n, p in policy.model.named_parameters() if p.requires_grad}

    everything, own = trainable(True), trainable(False)
    # the attention copies (weights and biases) or the bias vectors train; embeddings, MLPs and norms are frozen
    assert own == {n for n in everything if added in n} and own < everything
