"""Conditioning modes: how a weighting ``w`` enters a model's parameters, behind one small interface.

A mode conditions the model in place (:meth:`ConditioningMode.apply`), mixes by reading the shared
:class:`~clp_lightning.conditioning.mixing.WeightingState`, says what its reference policy is
(:attr:`~ConditioningMode.reference_in_model`, :meth:`~ConditioningMode.switched_off`), folds a weighting into a plain
model (:meth:`~ConditioningMode.merge`), and gives the Rewarded Soups value of each conditioned parameter
(:meth:`~ConditioningMode.expert_values`), and splits itself from a plain base when the policy is saved
(:meth:`~ConditioningMode.unconditioned`, :meth:`~ConditioningMode.conditioned_state`,
:meth:`~ConditioningMode.save_extras`; loading applies the mode to the saved base and
:meth:`~ConditioningMode.load_conditioned_state`). The policy calls only these; it never asks which mode it has.

Built in: ``none`` (:class:`NoConditioning`, here), ``mixing`` (``m`` copies of selected modules,
:mod:`~clp_lightning.conditioning.mixing`) and ``lora`` (``m`` LoRA adapters on a frozen base,
:mod:`~clp_lightning.conditioning.lora`). Prompt conditioning (``w`` written into the input text) combines with every
mode and is not one.

Adding a mode is one file and one YAML fragment: subclass :class:`ConditioningMode` with keyword options in
``__init__`` (returned, defaults filled, by :meth:`~ConditioningMode.options`), decorate it with
``@register_mode("<name>")``, and select it with ``conditioning: {mode: <name>, options: {...}}``. A mode outside this
package is named by its dotted path (``mode: my_package.modes.MyMode``), which also imports it. A saved policy
(``clp_config.json``) names its mode only by registered name (:func:`registered_mode`): loading one never imports.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

_MODES: dict[str, type[ConditioningMode]] = {}


def register_mode(name: str):
    """Class decorator: make a :class:`ConditioningMode` selectable as ``conditioning.mode: <name>``."""

    def register(cls: type[ConditioningMode]) -> type[ConditioningMode]:
        if name in _MODES and _MODES[name] is not cls:
            raise ValueError(f"conditioning mode {name!r} is already registered by {_MODES[name].__qualname__}")
        cls.name = name
        _MODES[name] = cls
        return cls

    return register


def _register_builtin_modes() -> None:
    # the built-in modes register when their modules are imported
    importlib.import_module("clp_lightning.conditioning.mixing")
    importlib.import_module("clp_lightning.conditioning.lora")


def registered_mode(name: Any) -> type[ConditioningMode]:
    """The mode registered as ``name``, and nothing else: for names read from files (a saved policy), which must not
    choose code to import. A mode of one's own loads once its package has been imported (registering it)."""
    _register_builtin_modes()
    if not isinstance(name, str) or name not in _MODES:
        raise ValueError(f"unknown conditioning mode {name!r}: expected one of the registered modes {sorted(_MODES)} "
                         "(import the package that registers a mode of your own before loading)")
    return _MODES[name]


def mode_class(name: str) -> type[ConditioningMode]:
    """The mode registered as ``name``, or the class at dotted path ``name``; a clear error for anything else."""
    _register_builtin_modes()
    if name in _MODES:
        return _MODES[name]
    module, _, attribute = name.rpartition(".")
    cls = None
    if module:
        try:
            cls = getattr(importlib.import_module(module), attribute, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, ConditioningMode)):
        raise ValueError(f"unknown conditioning mode {name!r}: expected one of {sorted(_MODES)} or the dotted path "
                         "of a ConditioningMode subclass")
    if "name" not in vars(cls):  # unregistered: named by its path, not by the base class's "none"
        cls.name = name
    return cls


class ConditioningMode:
    """Base class of conditioning modes; on its own it conditions no parameter (see :class:`NoConditioning`).

    Attributes:
        name: the registered name.
        reference_in_model: the reference policy is the model with the mode switched off (LoRA: the base), so the
            policy keeps no frozen copy; otherwise the policy copies the model before training.
        update_linear_in_weights: the mode's change to the model is linear in the weighting row it reads (LoRA:
            ``sum_i w_i B_i A_i``), so a row scaled by ``c`` scales the change by ``c``
            (``ConditioningConfig.alpha_scale`` relies on it).
    """

    name: ClassVar[str] = "none"
    reference_in_model: ClassVar[bool] = False
    update_linear_in_weights: ClassVar[bool] = False

    def apply(self, model: nn.Module, num_objectives: int, state: Any) -> tuple[list[str], int]:
        """Condition ``model`` in place on the weighting in ``state``.

        Returns:
            ``(conditioned module names, parameters added over the unconditioned model)``.
        """
        return [], 0

    def merge(self, model: nn.Module, weights: Tensor) -> nn.Module:
        """Make ``model`` (a copy of the conditioned one) a plain model at the weighting ``(m,)``, in place."""
        return model

    @contextlib.contextmanager
    def switched_off(self, model: nn.Module) -> Iterator[None]:
        """A block in which ``model`` computes the reference policy (modes with ``reference_in_model``)."""
        raise NotImplementedError(f"conditioning mode {self.name!r} keeps its reference as a frozen copy")
        yield  # pragma: no cover

    def expert_values(self, model: nn.Module, experts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Rewarded Soups: the value of each conditioned parameter of ``model`` (by name) built from the ``m``
        experts' states, expert ``i`` giving copy or adapter ``i``. Parameters not listed are shared."""
        return {}

    # ------------------------------------------------------------------------------------------------ save / load

    def unconditioned(self, model: nn.Module) -> nn.Module:
        """Make ``model`` (a copy of the conditioned one) the plain model that a saved policy stores as its base, in
        place; loading applies the mode to it again, then :meth:`load_conditioned_state`."""
        return model

    def conditioned_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The mode's own parameters of ``model`` by name (``m`` copies, adapters): what a saved policy stores beside
        its base. Each tensor once, under its first name."""
        return {}

    @torch.no_grad()
    def load_conditioned_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        """Set the mode's own parameters of ``model`` (conditioned by :meth:`apply`) from a saved ``state``.

        Raises:
            ValueError: ``state`` lacks a parameter, has one the mode does not own, or a shape differs.
        """
        expected = self.conditioned_state(model)
        missing, unknown = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        if missing or unknown:
            problem = f"lacks {missing[:4]}" if missing else f"has parameters this mode does not own {unknown[:4]}"
            raise ValueError(f"the saved conditioning ({self.name!r}) {problem}: was it saved by a policy conditioned "
                             "like this one?")
        for name, param in expected.items():
            if state[name].shape != param.shape:
                raise ValueError(f"saved parameter {name!r} has shape {tuple(state[name].shape)}, the policy's has "
                                 f"{tuple(param.shape)}")
            param.copy_(state[name])

    def save_extras(self, model: nn.Module, directory: Path, kind: str) -> list[str]:
        """Write extra files of the mode into a saved policy's ``directory`` (other libraries' formats of its
        parameters, e.g. peft adapters); ``kind`` is ``seq2seq`` or ``causal``.

        Returns:
            The paths written, relative to ``directory``.
        """
        return []

    def options(self) -> dict[str, Any]:
        """Every option the mode was built with, defaults included (checkpoints record and compare them)."""
        return {}

    def label(self) -> str:
        """A short name for run labels and reports (``ConditioningConfig.name``); empty for no conditioning."""
        return self.name.rpartition(".")[2]


@register_mode("none")
class NoConditioning(ConditioningMode):
    """Parameters are not conditioned: prompt-only policies and unconditioned baselines."""

    def label(self) -> str:
        return ""
