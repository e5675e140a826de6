"""Generation at given weightings: the one path every evaluation of a policy takes (grid evaluation, ``validate``,
``test``, ``predict``, ``clp steer``, export checks), as a mixin of :class:`~clp_lightning.module.CLPModule`.

Kept out of ``module.py`` so that the system file reads as training; the methods are the module's (callbacks call
``pl_module.evaluate_weightings``). Notation as in :mod:`clp_lightning.module`: ``P`` prompts, ``G`` weightings,
``m`` objectives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from clp_lightning import algorithms as alg
from clp_lightning.config import GenerationSettings

if TYPE_CHECKING:
    from clp_lightning.conditioning.policy import ConditionalPolicy


def check_alpha(alpha: float, alpha_range: tuple[float, float], name: str = "alpha") -> None:
    """Refuse a KL strength ``alpha`` outside ``alpha_range``, the strengths an alpha-conditioned policy was trained
    on; from the range alone, so that a tool can check it against the config before it loads the model."""
    low, high = alpha_range
    if not low <= alpha <= high:
        raise ValueError(f"{name}={alpha} is outside alpha_range [{low}, {high}], the KL strengths the policy was "
                         "trained on")


class GenerationAtWeightings:
    """Evaluation generation of a conditional-policy system.

    The class it is mixed into (a LightningModule) provides ``policy``, ``alpha_range``, ``kl_coef``, ``decoding``,
    ``device`` and ``score(sources, responses, references) -> (N, m)``.
    """

    policy: ConditionalPolicy
    alpha_range: tuple[float, float] | None
    kl_coef: float
    decoding: str
    device: torch.device

    def evaluation_alpha(self, alpha: float | None = None) -> float:
        """The KL strength evaluation gives the policy: ``alpha`` (in ``alpha_range``), by default ``alpha_range``'s
        low end; ``kl_coef`` for a policy not conditioned on alpha, which takes no ``alpha``."""
        if self.alpha_range is None:
            if alpha is not None:
                raise ValueError(f"alpha={alpha} given, but the policy is not conditioned on alpha (no alpha_range)")
            return self.kl_coef
        if alpha is not None:
            check_alpha(alpha, self.alpha_range)
        return float(self.alpha_range[0] if alpha is None else alpha)

    @torch.no_grad()
    def evaluate_weightings(
        self, batch: dict[str, list[str]], grid: Tensor, generation: GenerationSettings, score: bool = True,
        alpha: float | None = None, num_samples: int = 1, log_ratio: bool = True,
    ) -> dict[str, Any]:
        """Responses, raw rewards and log-ratios for each prompt of ``batch`` at each weighting of ``grid`` ``(G, m)``.

        The one way the project generates at given weightings (grid evaluation, ``validate``, ``test``, ``predict``,
        ``clp steer``): alpha conditioning and ``decoding="logit_mixture"`` apply everywhere. One generation pass
        covers the whole grid; rows are grid-point-major, each prompt's samples consecutive: row
        ``(g * P + p) * num_samples + s``.

        Args:
            batch: ``prompt`` (and, when ``score``, ``source`` and ``reference``) lists of ``P`` strings.
            grid: weightings ``(G, m)``.
            generation: decoding settings.
            score: score the responses with every reward; False leaves ``rewards`` None (the caller scores).
            alpha: KL strength given to an alpha-conditioned policy (see :meth:`evaluation_alpha`).
            num_samples: responses per (prompt, weighting).
            log_ratio: compute ``kl``; False leaves it None and spares the two forward passes over prompt and
                response (the policy's and the reference's) that it takes.

        Returns:
            ``{"point": (N,), "rewards": (N, m) or None, "kl": (N,) or None, "texts": list[str], "weights": (N, m)}``,
            ``N = G * P * num_samples``. ``kl`` is each response's sequence log-ratio ``log pi(y|x,w) / pi_ref(y|x)``:
            a one-sample (k1) estimate of the KL when ``y`` was sampled from the policy itself (temperature 1, no
            truncation), and no KL estimate at all for a greedy ``y``.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        num_prompts, num_points, k = len(batch["prompt"]), grid.shape[0], num_samples
        w_rows = grid.to(self.device).repeat_interleave(num_prompts, 0)  # (G*P, m)
        alpha_rows = torch.full((w_rows.shape[0],), self.evaluation_alpha(alpha), device=self.device,
                                dtype=torch.float32)  # predict_step runs under bf16-true's bfloat16 default dtype
        prompts = batch["prompt"] * num_points
        enc = self.policy.encode(prompts, w_rows, alpha_rows)
        if self.decoding == "logit_mixture":
            from clp_lightning.conditioning.mixture import mixture_generate, mixture_log_probs

            if k > 1:  # the mixture decodes one response per row: a row per sample
                enc = {key: value.repeat_interleave(k, 0) for key, value in enc.items()}
                w_rows, prompts = w_rows.repeat_interleave(k, 0), [p for p in prompts for _ in range(k)]
            ids, mask = mixture_generate(self.policy, **enc, weights=w_rows, **generation.kwargs())
            logp = mixture_log_probs(self.policy, **enc, response_ids=ids, response_mask=mask,
                                     weights=w_rows).log_probs if log_ratio else None
        else:
            ids, mask = self.policy.generate(**enc, weights=w_rows, alpha=alpha_rows, num_return_sequences=k,
                                             **generation.kwargs())
            logp = self.policy(**enc, response_ids=ids, response_mask=mask, weights=w_rows,
                               alpha=alpha_rows).log_probs if log_ratio else None
        kl = None if logp is None else alg.sequence_kl(
            logp, self.policy.reference_log_probs(prompts, ids, mask), mask, "k1")
        texts = self.policy.decode(ids, mask)
        rows = lambda xs: [x for x in xs * num_points for _ in range(k)]  # noqa: E731
        rewards = self.score(rows(batch["source"]), texts, rows(batch["reference"])) if score else None
        point = torch.arange(num_points, device=self.device).repeat_interleave(num_prompts * k)
        return {"point": point, "rewards": rewards, "kl": kl, "texts": texts, "weights": grid.to(self.device)[point]}

    @torch.no_grad()
    def evaluate_reference(
        self, batch: dict[str, list[str]], generation: GenerationSettings, num_samples: int = 1
    ) -> dict[str, Any]:
        """The reference policy's responses and their raw rewards (the vertex gains' baseline and the default
        hypervolume reference point), ``num_samples`` per prompt.

        Returns:
            ``{"rewards": (P * num_samples, m), "texts": list[str]}``, each prompt's samples consecutive.
        """
        ids, mask = self.policy.generate_reference(batch["prompt"], num_return_sequences=num_samples,
                                                   **generation.kwargs())
        texts = self.policy.decode(ids, mask)
        rows = lambda xs: [x for x in xs for _ in range(num_samples)]  # noqa: E731
        return {"rewards": self.score(rows(batch["source"]), texts, rows(batch["reference"])), "texts": texts}
