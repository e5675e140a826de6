"""Shared helpers for the conditioning tests: tiny policies in every mode and hand-built reference models."""

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from clp_lightning.conditioning.config import ConditioningConfig
from clp_lightning.conditioning.lora import adapter_name, lora_layers
from clp_lightning.conditioning.mixing import mixed_modules
from clp_lightning.conditioning.policy import ConditionalPolicy

PROMPTS = ["SUBREDDIT: r/cooking TITLE: soup POST: too salty TL;DR:", "hi", "a somewhat longer prompt, to pad"]

MODES = {
    "logits": ConditioningConfig(mode="mixing", options={"targets": "logits"}),
    "attention": ConditioningConfig(mode="mixing", options={"targets": "attention"}),
    "all": ConditioningConfig(mode="mixing", options={"targets": "all"}),
    "lora": ConditioningConfig(mode="lora", options={"r": 4, "target_modules": "all"}),
    "prompt+attention": ConditioningConfig(prompt=True, mode="mixing", options={"targets": "attention"}),
}


def perturb(policy: ConditionalPolicy, scale: float = 0.3, seed: int = 0) -> ConditionalPolicy:
    """Give every copy / adapter its own value, so that the weighting matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in mixed_modules(policy.model).values():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp(min=0.05))
        for layer in lora_layers(policy.model):
            for i in range(policy.num_objectives):
                b = layer.lora_B[adapter_name(i)].weight
                b.copy_(torch.randn(b.shape, generator=gen) * scale)
    return policy


ARCHS = ["t5", "gpt2"]


def make_policy(arch: str, mode: str, m: int = 2, seed: int = 0) -> ConditionalPolicy:
    return ConditionalPolicy.from_pretrained(f"tiny:{arch}", m, MODES[mode], seed=seed)


def plain_model(arch: str) -> nn.Module:
    return ConditionalPolicy.from_pretrained(f"tiny:{arch}", 1).model


def plain_copy(arch: str, policy: ConditionalPolicy, i: int) -> nn.Module:
    """A fresh, unconditioned model whose conditioned parameters are set, by hand, to copy ``i``.

    For LoRA-CLP that is the base with a single peft adapter holding adapter ``i``'s values.
    """
    base = plain_model(arch)
    modules = dict(base.named_modules())
    with torch.no_grad():
        for name, mixed in mixed_modules(policy.model).items():
            target = modules[name]
            weight = mixed.weight[i]
            if type(target).__name__ == "Conv1D":
                weight = weight.t()
            target.weight = nn.Parameter(weight.clone())  # a new Parameter: unties shared embeddings
            if getattr(mixed, "bias", None) is not None:
                target.bias = nn.Parameter(mixed.bias[i].clone())
        layers = {n: m for n, m in policy.model.named_modules() if isinstance(m, LoraLayer)}
        if layers:
            spec = policy.mode.spec
            config = LoraConfig(
                r=spec.r, lora_alpha=spec.alpha, target_modules=list(layers), fan_in_fan_out=arch == "gpt2"
            )
            inject_adapter_in_model(config, base, adapter_name="single")
            single = dict(base.named_modules())
            for name, layer in layers.items():
                single[name].lora_A["single"].weight.copy_(layer.lora_A[adapter_name(i)].weight)
                single[name].lora_B["single"].weight.copy_(layer.lora_B[adapter_name(i)].weight)
    return base.eval()
