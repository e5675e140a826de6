"""Prompt conditioning: the weighting (and optionally the KL strength) written into the model's input text.

For seq2seq models the prefix goes in front of the encoder input; for causal models in front of the prompt. Either
way it is a prefix of the prompt text, so one implementation serves both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


class PromptConditioner:
    """Formats ``w`` (and ``alpha``) as a text prefix and parses it back.

    Args:
        template: prefix with a ``{weights}`` field, e.g. ``"<w {weights}> "``.
        alpha_template: prefix used when ``alpha`` is given, with ``{weights}`` and ``{alpha}`` fields.
        precision: decimals written per number; the policy sees ``w`` rounded to this.
        separator: between the entries of ``w``.
    """

    def __init__(
        self,
        template: str = "<w {weights}> ",
        alpha_template: str = "<w {weights} | kl {alpha}> ",
        precision: int = 2,
        separator: str = ",",
    ) -> None:
        if "{weights}" not in template:
            raise ValueError(f"prompt template {template!r} must contain a '{{weights}}' field")
        if "{weights}" not in alpha_template or "{alpha}" not in alpha_template:
            raise ValueError(f"alpha template {alpha_template!r} must contain '{{weights}}' and '{{alpha}}' fields")
        if precision < 0:
            raise ValueError(f"precision must be >= 0, got {precision}")
        self.template = template
        self.alpha_template = alpha_template
        self.precision = precision
        self.separator = separator
        self._patterns = [self._compile(t) for t in (alpha_template, template)]

    def _compile(self, template: str) -> re.Pattern[str]:
        weights = rf"(?P<weights>{_NUMBER}(?:{re.escape(self.separator)}{_NUMBER})*)"
        pieces = re.split(r"(\{weights\}|\{alpha\})", template)
        regex = "".join(
            weights if p == "{weights}" else rf"(?P<alpha>{_NUMBER})" if p == "{alpha}" else re.escape(p)
            for p in pieces
        )
        return re.compile(regex)

    def prefix(self, weights: Sequence[float] | Tensor, alpha: float | None = None) -> str:
        """The prefix for one weighting ``(m,)``."""
        values = weights.tolist() if isinstance(weights, Tensor) else list(weights)
        text = self.separator.join(f"{v:.{self.precision}f}" for v in values)
        if alpha is None:
            return self.template.format(weights=text)
        return self.alpha_template.format(weights=text, alpha=f"{float(alpha):.{self.precision}g}")

    def apply(self, prompts: Sequence[str], weights: Tensor, alpha: Tensor | None = None) -> list[str]:
        """Prefix each prompt with its own weighting: ``weights`` ``(B, m)``, ``alpha`` ``(B,)`` or None."""
        if weights.dim() != 2 or weights.shape[0] != len(prompts):
            raise ValueError(f"weights of shape {tuple(weights.shape)} do not match {len(prompts)} prompts")
        return [prefix + p for prefix, p in zip(self.prefixes(weights, alpha), prompts)]

    def prefixes(self, weights: Tensor, alpha: Tensor | None = None) -> list[str]:
        """One prefix per row of ``weights`` ``(B, m)``."""
        alphas = [None] * weights.shape[0] if alpha is None else alpha.tolist()
        return [self.prefix(w, a) for w, a in zip(weights, alphas)]

    def parse(self, text: str) -> tuple[Tensor, float | None, str]:
        """Inverse of :meth:`apply` for one text: ``(weights (m,), alpha or None, prompt without the prefix)``."""
        for pattern in self._patterns:
            match = pattern.match(text)
            if match:
                weights = torch.tensor([float(x) for x in match["weights"].split(self.separator)])
                alpha = float(match["alpha"]) if "alpha" in pattern.groupindex else None
                return weights, alpha, text[match.end() :]
        raise ValueError(f"text {text[:60]!r} does not start with a prefix of the form {self.template!r}")
