"""Conditioning a language model on a weighting over objectives (no Lightning in here).

``ConditionalPolicy`` (``policy.py``; its settings, ``PolicyConfig`` and ``ConditioningConfig``, in ``config.py``)
combines prompt conditioning (``prompt.py``) with one parameter conditioning mode behind the interface of
``mode.py``: ``mixing`` (``mixing.py``), ``lora`` (``lora.py``) or ``none``. To add a mode: write one file with a
``ConditioningMode`` subclass (``apply``, ``merge``, ``expert_values`` and, when its reference is the model with the
mode switched off, ``reference_in_model`` and ``switched_off``), register it with ``@register_mode("<name>")`` (or
name it by dotted path), and add a YAML fragment in ``conf/conditioning/`` with
``conditioning: {mode: <name>, options: {...}}``; to be saved in Hugging Face's layout (``pretrained.py``), also
``unconditioned`` and ``conditioned_state`` (and ``save_extras`` for other libraries' formats). Nothing else changes:
the policy, the module, checkpoints, Rewarded Soups and ``clp export`` only call the interface.
"""

from clp_lightning.conditioning.config import ConditioningConfig, PolicyConfig
from clp_lightning.conditioning.lora import LoraSpec
from clp_lightning.conditioning.mode import ConditioningMode, register_mode
from clp_lightning.conditioning.policy import ConditionalPolicy
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
    "ConditioningMode",
    "ConditioningConfig",
    "DirichletSampler",
    "FixedSampler",
    "LoraSpec",
    "OneHotSampler",
    "PolicyConfig",
    "PromptConditioner",
    "register_mode",
    "simplex_grid",
    "validate_weights",
]
