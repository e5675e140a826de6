"""Parameter-space conditioning: selected modules hold ``m`` copies of their parameters, mixed by ``w``.

The policy at weighting ``w`` uses ``theta_S(w) = sum_i w_i * theta_S^(i)`` for the conditioned subset ``S`` and the
shared value elsewhere. Each row of a batch may carry its own ``w``.

Cost model (``N`` rows x tokens through a layer of ``out x in`` weights, ``G`` distinct weightings in the batch):

- *grouped*: mix one weight per distinct ``w`` (``G * m * out * in``), then one matmul per group (``N * out * in``);
  inside ``generate`` the mixed weights are computed once per call and reused at every decoding step;
- *per-copy*: ``sum_i w_i * (x W_i^T)`` (``m * N * out * in``), never materialising a mixed weight.

:class:`MixedLinear` takes whichever is cheaper; embeddings always gather per copy (``m * N * d``).

Notation: ``m`` objectives, ``B`` rows, ``G`` distinct weightings among the rows.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from clp_lightning.conditioning.mode import ConditioningMode, register_mode

NAMED_TARGETS = ("logits", "attention", "all")


class WeightingState:
    """The weighting every conditioned module of one policy reads during a forward pass.

    The policy sets it around each forward / generate call (:meth:`use`); modules ask for the rows they see, which
    may be a multiple of the set rows (beam search and ``num_return_sequences`` repeat each row). Everything that
    depends only on the weights and the row count (per-row weights, groups, sort orders) is computed once per call
    and shared by every module and decoding step.
    """

    def __init__(self) -> None:
        self.weights: Tensor | None = None  # (B, m)
        self.alpha: Tensor | None = None  # (B,)
        self.caching = False
        self._unique: Tensor | None = None  # (G, m)
        self._inverse: Tensor | None = None  # (B,)
        self._cache: dict[Any, tuple[Tensor, ...]] = {}  # per call, when caching: mixed weights, stacked adapters
        self._per_rows: dict[tuple[str, int], Any] = {}

    @contextlib.contextmanager
    def use(self, weights: Tensor, alpha: Tensor | None = None, cache: bool = False) -> Iterator[None]:
        """Condition on ``weights`` ``(B, m)`` inside the block; ``cache`` reuses mixed weights across calls."""
        if weights.dim() != 2:
            raise ValueError(f"weights must have shape (B, m), got {tuple(weights.shape)}")
        previous = (self.weights, self.alpha, self.caching, self._unique, self._inverse, self._cache, self._per_rows)
        self.weights, self.alpha, self.caching, self._cache, self._per_rows = weights, alpha, cache, {}, {}
        self._unique, self._inverse = torch.unique(weights, dim=0, return_inverse=True)
        try:
            yield
        finally:
            (self.weights, self.alpha, self.caching, self._unique, self._inverse, self._cache,
             self._per_rows) = previous

    def _check(self) -> Tensor:
        if self.weights is None:
            raise RuntimeError("a conditioned module ran without a weighting: call it inside policy.conditioned(w)")
        return self.weights

    def _repeat(self, rows: int) -> int:
        b = self._check().shape[0]
        if rows % b:
            raise RuntimeError(f"a conditioned module saw {rows} rows, not a multiple of the {b} weightings set")
        return rows // b

    def rows(self, rows: int) -> Tensor:
        """Per-row weights ``(rows, m)``."""
        key = ("rows", rows)
        if key not in self._per_rows:
            self._per_rows[key] = self._check().repeat_interleave(self._repeat(rows), dim=0)
        return self._per_rows[key]

    def groups(self, rows: int) -> tuple[Tensor, Tensor]:
        """``(unique weightings (G, m), group index of each row (rows,))``."""
        key = ("groups", rows)
        if key not in self._per_rows:
            repeat = self._repeat(rows)
            assert self._unique is not None and self._inverse is not None
            self._per_rows[key] = (self._unique, self._inverse.repeat_interleave(repeat))
        return self._per_rows[key]

    def group_order(self, rows: int) -> tuple[Tensor, Tensor, list[int]]:
        """Rows sorted by group: ``(order (rows,), its inverse (rows,), rows per group)``."""
        key = ("order", rows)
        if key not in self._per_rows:
            unique, inverse = self.groups(rows)
            order = torch.argsort(inverse, stable=True)
            counts = torch.bincount(inverse, minlength=unique.shape[0]).tolist()
            self._per_rows[key] = (order, torch.argsort(order), counts)
        return self._per_rows[key]


class MixedLinear(nn.Module):
    """A linear layer with ``m`` copies of its weight ``(m, out, in)`` and bias ``(m, out)``, mixed by ``w``.

    Built from an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is stored transposed); every copy starts at the
    original value, so the layer equals the original for every ``w`` at initialisation.
    """

    def __init__(self, layer: nn.Linear | Conv1D, num_objectives: int, state: WeightingState) -> None:
        super().__init__()
        self.conv1d = isinstance(layer, Conv1D)  # merged back into the same class, so saved shapes stay the model's
        weight = layer.weight.detach().t() if self.conv1d else layer.weight.detach()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.unsqueeze(0).repeat(num_objectives, 1, 1).contiguous())
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().unsqueeze(0).repeat(num_objectives, 1))
        self.state = state

    @property
    def num_objectives(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, copies={self.num_objectives}"

    def mixed(self, weights: Tensor) -> tuple[Tensor, Tensor | None]:
        """Mixed weight ``(G, out, in)`` and bias ``(G, out)`` for weightings ``(G, m)``."""
        w = weights.to(self.weight.dtype)
        bias = None if self.bias is None else w @ self.bias
        return torch.einsum("gm,moi->goi", w, self.weight), bias

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        unique, _ = self.state.groups(rows)
        num_groups, m = unique.shape
        if num_groups > 1 and self._per_copy_is_cheaper(x, num_groups, m):
            return self._per_copy(x, self.state.rows(rows))
        if self.state.caching and id(self) in self.state._cache:
            weight, bias = self.state._cache[id(self)]
        else:
            weight, bias = self.mixed(unique)
            if self.state.caching:
                self.state._cache[id(self)] = (weight, bias)
        if num_groups == 1:
            return F.linear(x, weight[0], None if bias is None else bias[0])
        order, inverse_order, counts = self.state.group_order(rows)
        chunks = x.index_select(0, order).split(counts)
        outs = [F.linear(c, weight[g], None if bias is None else bias[g]) for g, c in enumerate(chunks) if counts[g]]
        return torch.cat(outs).index_select(0, inverse_order)

    def _per_copy_is_cheaper(self, x: Tensor, num_groups: int, m: int) -> bool:
        if self.state.caching:
            # Inside generate the mixed weights are made once and reused at every step, where the cost is reading
            # weights: G mixed ones on the grouped path, m copies on the per-copy path.
            return m < num_groups
        tokens = x.numel() // self.in_features
        return m * tokens < num_groups * m + tokens  # flops of one call: per copy vs mix-then-matmul

    def _per_copy(self, x: Tensor, w_rows: Tensor) -> Tensor:
        # (rows, ..., m * out) -> (rows, ..., m, out), weighted sum over the copies
        m = self.num_objectives
        flat_bias = None if self.bias is None else self.bias.reshape(-1)
        y = F.linear(x, self.weight.reshape(m * self.out_features, self.in_features), flat_bias)
        y = y.unflatten(-1, (m, self.out_features))
        w = w_rows.to(y.dtype).view(x.shape[0], *([1] * (x.dim() - 2)), m, 1)
        return (y * w).sum(-2)

    def to_plain(self, weights: Tensor) -> nn.Linear | Conv1D:
        """An ``nn.Linear`` (a ``Conv1D`` if built from one) holding the mixed parameters for one weighting ``(m,)``."""
        weight, bias = self.mixed(weights.view(1, -1))
        if self.conv1d:
            layer = Conv1D(self.out_features, self.in_features).to(self.weight.dtype)
            layer.weight.data.copy_(weight[0].t())
            layer.bias.data.copy_(bias[0])
            return layer.to(self.weight.device)
        layer = nn.Linear(self.in_features, self.out_features, bias=bias is not None, dtype=self.weight.dtype)
        layer.weight.data.copy_(weight[0])
        if bias is not None:
            layer.bias.data.copy_(bias[0])
        return layer.to(self.weight.device)


class MixedEmbedding(nn.Module):
    """A token embedding with ``m`` copies ``(m, V, d)``; rows gather from every copy and mix (``m * N * d``).

    Built from an ``nn.Embedding`` or a subclass whose forward scales the lookup (Gemma's and BART's
    ``embed_scale``): the scale is kept, and merging gives back the original class.
    """

    def __init__(self, layer: nn.Embedding, num_objectives: int, state: WeightingState) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = layer.weight.shape
        self.padding_idx = layer.padding_idx
        self.scale = _lookup_scale(layer)
        self.weight = nn.Parameter(layer.weight.detach().unsqueeze(0).repeat(num_objectives, 1, 1).contiguous())
        self.state = state
        # the original module without its weight, outside the module tree: to_plain rebuilds its class from it
        shell = copy.copy(layer)
        shell._parameters = {**layer._parameters, "weight": None}
        shell._buffers, shell._modules = dict(layer._buffers), dict(layer._modules)
        self.__dict__["_shell"] = shell

    @property
    def num_objectives(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, copies={self.num_objectives}"

    def forward(self, ids: Tensor) -> Tensor:
        w = self.state.rows(ids.shape[0]).to(self.weight.dtype)  # (rows, m)
        per_copy = torch.stack([F.embedding(ids, self.weight[i], self.padding_idx) for i in range(self.num_objectives)])
        mixed = _mix_rows(per_copy, w)
        return mixed if self.scale == 1.0 else mixed * self.scale

    def to_plain(self, weights: Tensor) -> nn.Embedding:
        """An embedding of the original class holding the mixed table for one weighting ``(m,)``."""
        table = torch.einsum("m,mvd->vd", weights.to(self.weight.dtype), self.weight)
        layer = copy.deepcopy(self._shell)
        layer.weight = nn.Parameter(table.detach().clone())
        return layer.to(table.device)


def _lookup_scale(layer: nn.Embedding) -> float:
    """The factor ``layer`` multiplies its lookup by: 1 for an ``nn.Embedding``, ``embed_scale`` (rounded to the
    weight's dtype, as Gemma multiplies) for a scaled one.

    Raises:
        ValueError: the forward is not a scaled lookup (e.g. a norm after it): per-row mixing of the table would not
            be the model at the mixed parameters.
    """
    if type(layer).forward is nn.Embedding.forward:
        return 1.0
    scale = float(torch.as_tensor(getattr(layer, "embed_scale", 1.0)).to(layer.weight.dtype))
    with torch.no_grad():
        probe = torch.arange(min(layer.num_embeddings, 16), device=layer.weight.device)
        scaled_lookup = torch.allclose(layer(probe), F.embedding(probe, layer.weight) * scale)
    if not scaled_lookup:
        raise ValueError(f"cannot condition the token embedding {type(layer).__name__}: its forward is not a (scaled) "
                         "lookup; leave it shared (list the modules to condition instead of 'all')")
    return scale


def _mix_rows(per_copy: Tensor, w_rows: Tensor) -> Tensor:
    """``per_copy`` ``(m, rows, ..., d)`` mixed with ``w_rows`` ``(rows, m)`` -> ``(rows, ..., d)``."""
    w = w_rows.t().reshape(*w_rows.t().shape, *([1] * (per_copy.dim() - 2)))
    return (per_copy * w).sum(0)


# ------------------------------------------------------------------------------------------------- target selection


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that can be conditioned: every Linear / Conv1D and the token embedding, by qualified name.

    The token embedding may appear under several names that share one weight (T5's ``shared``,
    ``encoder.embed_tokens`` and ``decoder.embed_tokens``); all of them are candidates.
    """
    token_embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    token_weight = None if token_embedding is None else token_embedding.weight
    return {
        name: mod
        for name, mod in model.named_modules()
        if name and (_is_linear(mod) or (isinstance(mod, nn.Embedding) and mod.weight is token_weight))
    }


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Qualified names of the modules selected by ``targets``.

    Args:
        model: a Hugging Face model.
        targets: ``"logits"`` (output layer), ``"attention"`` (every linear projection inside an attention block:
            T5 encoder self-, decoder self- and cross-attention; GPT-2 ``c_attn``/``c_proj``; ``*_proj`` of
            Llama-style models), ``"all"`` (every Linear / Conv1D and the token embedding; position embeddings and
            T5's relative-position biases stay shared because they are indexed without a batch dimension), or a
            list mixing those names with module-name patterns (glob on the qualified name, or a ``.``-suffix such as
            ``"q"`` or ``"SelfAttention.o"``).

    Raises:
        ValueError: a pattern matches no conditionable module; the message lists names it could have meant.
    """
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ValueError("targets is empty; expected 'logits', 'attention', 'all' or module-name patterns")
    candidates = candidate_modules(model)
    parents = {name: mod for name, mod in model.named_modules()}
    selected: dict[str, None] = {}
    for pattern in patterns:
        if pattern == "logits":
            output = model.get_output_embeddings()
            hits = [n for n, mod in candidates.items() if mod is output]
        elif pattern == "attention":
            hits = [
                n
                for n, mod in candidates.items()
                if _is_linear(mod) and "attention" in type(parents[n.rpartition(".")[0]]).__name__.lower()
            ]
        elif pattern == "all":
            hits = list(candidates)
        else:
            hits = [
                n for n in candidates if fnmatch.fnmatchcase(n, pattern) or n == pattern or n.endswith("." + pattern)
            ]
        if not hits:
            close = difflib.get_close_matches(pattern, list(candidates), n=8, cutoff=0.3) or sorted(candidates)[:8]
            raise ValueError(
                f"target {pattern!r} matches no Linear/Conv1D/token-embedding module of {type(model).__name__}; "
                f"did you mean one of {close}? (or one of {list(NAMED_TARGETS)})"
            )
        selected.update(dict.fromkeys(hits))
    return list(selected)


def _names_or_patterns(targets: Any) -> bool:
    """Whether ``targets`` is a target name or a sequence of them (the form :func:`resolve_targets` takes)."""
    return isinstance(targets, str) or (isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets))


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Swap every reference to ``old`` (T5's encoder and decoder share ``shared`` as ``embed_tokens``)."""
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


@dataclass
class MixingReport:
    """What parameter mixing conditioned: the module names and the parameters it added to the model (the ``m - 1``
    extra copies of each mixed weight, and ``m`` where mixing unties a weight the model tied, such as an output layer
    tied to the input embedding that only one of them conditions, or each with its own copies)."""

    modules: list[str]
    extra_parameters: int


def apply_parameter_mixing(
    model: nn.Module, targets: str | Sequence[str], num_objectives: int, state: WeightingState
) -> MixingReport:
    """Replace the selected modules of ``model`` in place with ``m``-copy mixed modules reading ``state``."""
    if num_objectives < 1:
        raise ValueError(f"num_objectives must be >= 1, got {num_objectives}")
    names = resolve_targets(model, targets)
    modules = dict(model.named_modules())
    before = sum(p.numel() for p in model.parameters())  # a tied weight counts once
    by_weight: dict[tuple[int, type], nn.Module] = {}  # modules that share a weight share one set of copies
    for name in names:
        old = modules[name]
        kind = MixedLinear if _is_linear(old) else MixedEmbedding
        key = (id(old.weight), kind)
        if key not in by_weight:
            by_weight[key] = kind(old, num_objectives, state)
        _replace_module(model, old, by_weight[key])
    # counted, not derived from m: mixing one side of a tied weight leaves the other side's original in the model
    return MixingReport(names, sum(p.numel() for p in model.parameters()) - before)


def mixed_modules(model: nn.Module) -> dict[str, MixedLinear | MixedEmbedding]:
    """The mixed modules of ``model`` by every qualified name (a shared module appears under each of its names)."""
    return {
        n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, (MixedLinear, MixedEmbedding))
    }


def unmix(model: nn.Module, weights: Tensor) -> nn.Module:
    """Replace every mixed module of ``model`` (in place) with a plain one holding its parameters at ``weights``."""
    for module in set(mixed_modules(model).values()):
        _replace_module(model, module, module.to_plain(weights))
    return model


@register_mode("mixing")
class ParameterMixing(ConditioningMode):
    """``m`` copies of the modules ``targets`` selects, mixed as ``sum_i w_i theta_i`` per row.

    Args:
        targets: ``"logits"``, ``"attention"``, ``"all"`` or module-name patterns (:func:`resolve_targets`).
    """

    def __init__(self, targets: str | Sequence[str]) -> None:
        if not _names_or_patterns(targets):  # a number failed at list() or, in a list, only once the model had loaded
            raise ValueError(f"targets must be 'logits', 'attention', 'all' or a list of module-name patterns, got "
                             f"{targets!r}")
        self.targets = targets if isinstance(targets, str) else list(targets)
        if not self.targets:  # checked when the config is made, before any model loads
            raise ValueError("targets is empty; expected 'logits', 'attention', 'all' or module-name patterns")

    def apply(self, model: nn.Module, num_objectives: int, state: WeightingState) -> tuple[list[str], int]:
        report = apply_parameter_mixing(model, self.targets, num_objectives, state)
        return report.modules, report.extra_parameters

    def merge(self, model: nn.Module, weights: Tensor) -> nn.Module:
        return unmix(model, weights)

    def expert_values(self, model: nn.Module, experts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        params = dict(model.named_parameters(remove_duplicate=False))
        names = {f"{name}.{p}" for name in mixed_modules(model) for p in ("weight", "bias")} & params.keys()
        # (m, ...) copies: copy i from expert i
        return {n: torch.stack([e[n][i] for i, e in enumerate(experts)]) for n in names
                if all(n in e for e in experts)}

    def unconditioned(self, model: nn.Module) -> nn.Module:
        modules = list(dict.fromkeys(mixed_modules(model).values()))
        if not modules:
            return model
        m, device = modules[0].num_objectives, modules[0].weight.device
        # the base holds the uniform mixture, so that loaded as a plain model it is the policy at the simplex's centre
        return unmix(model, torch.full((m,), 1.0 / m, device=device))

    def conditioned_state(self, model: nn.Module) -> dict[str, Tensor]:
        own = {id(p) for module in mixed_modules(model).values() for p in module.parameters()}
        return {n: p for n, p in model.named_parameters() if id(p) in own}  # (m, ...) copies

    def options(self) -> dict[str, Any]:
        return {"targets": self.targets}

    def label(self) -> str:
        return self.targets if isinstance(self.targets, str) else "+".join(self.targets)
