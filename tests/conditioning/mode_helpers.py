"""A conditioning mode written outside the package, as a user would: one file, selected by its dotted path."""

import torch
from torch import Tensor, nn

from clp_lightning.conditioning.mixing import ParameterMixing
from clp_lightning.conditioning.mode import ConditioningMode, register_mode

BIAS = "clp_logit_bias"  # (m, V) parameter registered on the output layer


class LogitBias(ConditioningMode):
    """``m`` bias vectors over the vocabulary, added to the logits as ``sum_i w_i b_i`` (zero at initialisation, so
    the policy starts as its reference)."""

    def __init__(self, init_scale: float = 0.0) -> None:
        self.init_scale = init_scale

    def apply(self, model: nn.Module, num_objectives: int, state) -> tuple[list[str], int]:
        head = model.get_output_embeddings()
        bias = torch.randn(num_objectives, head.out_features) * self.init_scale
        head.register_parameter(BIAS, nn.Parameter(bias))

        def add_bias(module: nn.Module, args, output: Tensor) -> Tensor:
            w = state.rows(output.shape[0]).to(output.dtype)  # (B, m)
            return output + (w @ getattr(module, BIAS)).unsqueeze(1)  # (B, T, V)

        head.register_forward_hook(add_bias)
        return [name for name, m in model.named_modules() if m is head][:1], bias.numel()

    def merge(self, model: nn.Module, weights: Tensor) -> nn.Module:
        head = model.get_output_embeddings()
        folded = weights.to(getattr(head, BIAS).dtype) @ getattr(head, BIAS)
        head._forward_hooks.clear()
        delattr(head, BIAS)
        head.bias = nn.Parameter(folded if head.bias is None else head.bias + folded)
        return model

    def expert_values(self, model: nn.Module, experts) -> dict[str, Tensor]:
        name = next(n for n, _ in model.named_parameters() if n.endswith(BIAS))
        return {name: torch.stack([e[name][i] for i, e in enumerate(experts)])}


@register_mode("test_registered_mixing")
class RegisteredMixing(ParameterMixing):
    """Parameter mixing under a registered name of its own, selected by its dotted path as a user's mode would be."""
