"""Conditioning modes: how a weighting ``w`` enters a model's parameters, behind one small interface.

A mode conditions the model in place (:meth:`ConditioningMode.apply`), mixes by reading the shared
:class:`~clp_lightning.conditioning.mixing.WeightingState`, says what its reference policy is
(:attr:`~ConditioningMode.reference_in_model`, :meth:`~ConditioningMode.switched_off`), folds a weighting into a plain
model (:meth:`~ConditioningMode.merge`), and gives the Rewarded Soups value of each conditioned parameter
(:meth:`~ConditioningMode.expert_values`). The policy calls only these; it never asks which mode it has.

Built in: ``none`` (:class:`NoConditioning`, here), ``mixing`` (``m`` copies of selected modules,
:mod:`~clp_lightning.conditioning.mixing`) and ``lora`` (``m`` LoRA adapters on a frozen base,
:mod:`~clp_lightning.conditioning.lora`). Prompt conditioning (``w`` written into the input text) combines with every
mode and is not one.

Adding a mode is one file and one YAML fragment: subclass :class:`ConditioningMode` with keyword options in
``__init__`` (returned, defaults filled, by :meth:`~ConditioningMode.options`), decorate it with
``@register_mode("<name>")``, and select it with ``conditioning: {mode: <name>, options: {...}}``. A mode outside this
package is named by its dotted path (``mode: my_package.modes.MyMode``), which also imports it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

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


def mode_class(name: str) -> type[ConditioningMode]:
    """The mode registered as ``name``, or the class at dotted path ``name``; a clear error for anything else."""
    # the built-in modes register when their modules are imported
    importlib.import_module("clp_lightning.conditioning.mixing")
    importlib.import_module("clp_lightning.conditioning.lora")
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
    """

    name: ClassVar[str] = "none"
    reference_in_model: ClassVar[bool] = False

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
