"""LoRA-CLP: a frozen base with ``m`` LoRA adapters per target module, mixed per row by ``w``.

``Delta W(w) = sum_i w_i * B_i A_i`` (times peft's ``lora_alpha / r`` scaling). peft injects the adapters (named
``objective_0 .. objective_{m-1}``) and owns their parameters, saving, loading and switching off. The forward pass
runs the ``m`` adapters of a layer as one stacked adapter: ``A = [A_1; ...; A_m]`` ``(m r, in)`` and
``B = [B_1 ... B_m]`` ``(out, m r)``, with the ``(rows, ..., m r)`` activation scaled by each row's weights repeated
``r`` times, so ``B (s w * (A x)) = sum_i w_i s B_i A_i x`` in two matmuls whatever ``m`` (peft's own forward loops
over the adapters: ``m`` times as many small ops, which dominated the step at small widths). With adapter dropout,
whose masks must differ per adapter, the layer keeps peft's loop and a hook on each ``lora_B`` weights its output.
``B`` starts at zero, so the policy equals the base for every ``w`` at initialisation, and the reference policy is
the same base with the adapters switched off: no second copy of the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from clp_lightning.checks import is_integer, is_number
from clp_lightning.conditioning.mixing import WeightingState, _names_or_patterns, resolve_targets
from clp_lightning.conditioning.mode import ConditioningMode, register_mode


def adapter_name(i: int) -> str:
    return f"objective_{i}"


@dataclass
class LoraSpec:
    """LoRA adapters, one set per objective.

    Attributes:
        r: rank of each adapter.
        alpha: peft's ``lora_alpha``; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input.
        target_modules: modules that get adapters: ``"attention"``, ``"all"`` (every Linear / Conv1D except the
            output layer) or module-name patterns, resolved like parameter-mixing targets.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = field(default_factory=lambda: ["attention"])


def _lora_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    output = model.get_output_embeddings()
    names = resolve_targets(model, targets)
    modules = dict(model.named_modules())
    # peft adapts Linear / Conv1D; the output layer stays shared (condition it with parameter mixing instead).
    return [n for n in names if not isinstance(modules[n], nn.Embedding) and modules[n] is not output]


def apply_lora_mixing(model: nn.Module, spec: LoraSpec, num_objectives: int, state: WeightingState) -> list[str]:
    """Freeze ``model`` and inject ``m`` LoRA adapters into the target modules, mixed per row by ``state``.

    Returns:
        The qualified names of the adapted modules.
    """
    if spec.r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {spec.r}")
    targets = _lora_targets(model, spec.target_modules)
    if not targets:
        raise ValueError(
            f"LoRA target_modules {spec.target_modules!r} select no Linear module of {type(model).__name__}"
        )
    model.requires_grad_(False)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        init_lora_weights=True,
        fan_in_fan_out=any(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n in targets),
    )
    names = [adapter_name(i) for i in range(num_objectives)]
    with warnings.catch_warnings():  # several adapters in one model is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        for name in names:
            inject_adapter_in_model(config, model, adapter_name=name)
    for layer in lora_layers(model):
        layer.set_adapter(names)  # all adapters active at once
        if spec.dropout > 0:  # peft's per-adapter loop (a dropout mask per adapter), weighted by hooks
            for i, name in enumerate(names):
                layer.lora_B[name].register_forward_hook(_weight_hook(state, i))
        else:
            layer.forward = _StackedForward(layer, names, state)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return targets


def _weight_hook(state: WeightingState, index: int):
    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        w = state.rows(output.shape[0])[:, index].to(output.dtype)  # (rows,)
        return output * w.view(-1, *([1] * (output.dim() - 1)))

    return hook


class _StackedForward:
    """A LoRA layer's forward with its ``m`` adapters stacked into one rank-``m r`` adapter, weighted per row."""

    def __init__(self, layer: LoraLayer, names: list[str], state: WeightingState) -> None:
        self.layer, self.names, self.state = layer, names, state
        self.peft_forward = type(layer).forward.__get__(layer)  # for the switched-off and merged cases
        # one LoraConfig made every adapter: one rank and one scaling, fixed here rather than per call
        self.rank, self.scaling = layer.r[names[0]], layer.scaling[names[0]]

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        layer = self.layer
        if layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None:
            return self.peft_forward(x, *args, **kwargs)
        result = layer.base_layer(x, *args, **kwargs)
        a, b, w = self._stacked(x.shape[0])
        h = nn.functional.linear(x.to(a.dtype), a)  # (rows, ..., m r)
        h = h * w.view(h.shape[0], *([1] * (h.dim() - 2)), h.shape[-1]).to(h.dtype)
        return (result + nn.functional.linear(h, b)).to(result.dtype)

    def _stacked(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """The stacked adapter ``A`` ``(m r, in)`` and ``B`` ``(out, m r)`` and the per-row scale of each rank
        ``(rows, m r)``; inside ``generate`` (a caching weighting) made once per call, not at every decoding step."""
        if not self.state.caching:
            return self._build(rows)
        key = (id(self), rows)
        if key not in self.state._cache:
            self.state._cache[key] = self._build(rows)
        return self.state._cache[key]

    def _build(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        layer = self.layer
        a = torch.cat([layer.lora_A[n].weight for n in self.names], 0)
        b = torch.cat([layer.lora_B[n].weight for n in self.names], 1)
        return a, b, (self.state.rows(rows) * self.scaling).to(a.dtype).repeat_interleave(self.rank, dim=1)


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the frozen base: every adapter switched off inside the block (the LoRA-CLP reference policy)."""
    layers = lora_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@torch.no_grad()
def merge_lora(model: nn.Module, weights: Tensor) -> nn.Module:
    """Fold ``sum_i w_i * scale * B_i A_i`` into each base layer and drop the adapters (in place)."""
    for layer in lora_layers(model):
        base = layer.get_base_layer()
        delta = sum(
            float(w)
            * layer.scaling[adapter_name(i)]
            * (layer.lora_B[adapter_name(i)].weight @ layer.lora_A[adapter_name(i)].weight)
            for i, w in enumerate(weights)
        )
        base.weight += delta.t() if layer.fan_in_fan_out else delta
    return remove_adapters(model)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put each adapted layer's base layer back in its place (in place): the frozen base, without adapters."""
    from clp_lightning.conditioning.mixing import _replace_module

    for layer in lora_layers(model):
        _replace_module(model, layer, layer.get_base_layer())
    return model


def save_peft_adapters(model: nn.Module, spec: LoraSpec, directory: Path, kind: str) -> list[str]:
    """Write each objective's adapter in peft's layout, ``<directory>/objective_<i>/`` (``adapter_config.json``,
    ``adapter_model.safetensors``): ``PeftModel.from_pretrained(base, <directory>/objective_<i>)`` on the saved base
    is the policy at the vertex ``w = e_i``.

    Returns:
        The adapter directories written.
    """
    from safetensors.torch import save_file

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    names = sorted({key for layer in layers.values() for key in layer.lora_A})
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=sorted(layers),
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
        task_type="SEQ_2_SEQ_LM" if kind == "seq2seq" else "CAUSAL_LM",
    )
    written = []
    for name in names:
        out = directory / name
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(out))
        # peft's own key format: the adapter's name is left out and put back by whoever loads it
        state = {f"base_model.model.{module}.lora_{part}.weight": getattr(layer, f"lora_{part}")[name].weight
                 .detach().contiguous().cpu() for module, layer in layers.items() for part in ("A", "B")}
        save_file(state, str(out / "adapter_model.safetensors"))
        written.append(str(out))
    return written


@register_mode("lora")
class LoraConditioning(ConditioningMode):
    """LoRA-CLP: ``m`` LoRA adapters per target module on a frozen base, their outputs mixed by ``w``; the base with
    adapters off is the reference policy.

    Args: the fields of :class:`LoraSpec`: ``r``, ``alpha``, ``dropout``, ``target_modules``.
    """

    reference_in_model = True
    update_linear_in_weights = True  # Delta W = sum_i w_i B_i A_i: scaling the row scales the update

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: str | Sequence[str] = ("attention",)) -> None:
        # checked when the config is made (it builds the mode), before any model loads
        if not _names_or_patterns(target_modules):
            raise ValueError(f"LoRA target_modules must be 'attention', 'all' or a list of module-name patterns, got "
                             f"{target_modules!r}")
        modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        # a rank of 2.5 or True would fail only when the adapters are made, after the model has loaded
        if not (is_integer(r) and r >= 1):
            raise ValueError(f"LoRA rank r must be >= 1, an integer, got {r!r}")
        if not (is_number(dropout) and 0 <= dropout < 1):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        # 0 makes every update zero (nothing learns), nan every logit
        if not (is_number(alpha) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"LoRA alpha must be a finite number > 0 (the update is scaled by alpha / r), got "
                             f"{alpha!r}")
        if not modules:
            raise ValueError("LoRA target_modules is empty; expected 'attention', 'all' or module-name patterns")
        self.spec = LoraSpec(r=r, alpha=alpha, dropout=dropout, target_modules=modules)

    def apply(self, model: nn.Module, num_objectives: int, state: WeightingState) -> tuple[list[str], int]:
        modules = apply_lora_mixing(model, self.spec, num_objectives, state)
        return modules, sum(p.numel() for p in lora_parameters(model))

    def merge(self, model: nn.Module, weights: Tensor) -> nn.Module:
        return merge_lora(model, weights)

    @contextlib.contextmanager
    def switched_off(self, model: nn.Module) -> Iterator[None]:
        with adapters_disabled(model):
            yield

    def expert_values(self, model: nn.Module, experts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        out = {}
        for name, _ in model.named_parameters(remove_duplicate=False):
            if ".lora_" in name and all(name in e for e in experts):  # adapter i from expert i
                out[name] = experts[int(name.split(".objective_")[1].split(".")[0])][name]
        return out

    def unconditioned(self, model: nn.Module) -> nn.Module:
        return remove_adapters(model)

    def conditioned_state(self, model: nn.Module) -> dict[str, Tensor]:
        return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}

    def save_extras(self, model: nn.Module, directory: Path, kind: str) -> list[str]:
        written = save_peft_adapters(model, self.spec, directory / "adapters", kind)
        return [str(Path(w).relative_to(directory)) for w in written]

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.spec)
