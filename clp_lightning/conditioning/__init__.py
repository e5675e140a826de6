"""Conditioning a language model on a weighting over objectives (no Lightning in here)."""

from clp_lightning.conditioning.lora import LoraSpec
from clp_lightning.conditioning.policy import ConditionalPolicy, ConditioningConfig, PolicyConfig
from clp_lightning.conditioning.prompt import PromptConditioner
from clp_lightning.conditioning.weights import (
    DirichletSampler,
    FixedSampler,
    OneHotSampler,
    simplex_grid,
    validate_weights,
)

__all__ = [
    "ConditionalPolicy",
    "ConditioningConfig",
    "DirichletSampler",
    "FixedSampler",
    "LoraSpec",
    "OneHotSampler",
    "PolicyConfig",
    "PromptConditioner",
    "simplex_grid",
    "validate_weights",
]
