"""Grid evaluation: the policy at every weighting of a simplex grid, each validation epoch.

Logs ``val/pareto/hypervolume``, ``val/steerability/<objective>``, ``val/vertex_gain/<objective>`` (reward ``i`` at
``w = e_i`` minus the reference policy's) with ``val/vertex_gain_se/<objective>`` (its paired standard error over
prompts), ``val/monotonicity_violations/<objective>``,
``val/reward/<objective>/w=<w>``, ``val/kl`` (the KL to the reference estimated from sampled responses, mean over the
grid), ``val/greedy_log_ratio`` (greedy decoding only) and, for a policy conditioned on alpha,
``val/alpha=<a>/pareto/hypervolume`` and ``val/alpha=<a>/kl``; a figure of the front (TensorBoard image and PNG); a
text table of responses at several weightings; and the numbers as files in ``<log_dir>/evaluation/``
(``epoch_<n>.json`` and ``metrics.csv``). The same code runs in ``fit`` and in ``validate`` on a checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from clp_lightning.callbacks.checkpoint import CheckpointError
from clp_lightning.callbacks.preemption import validation_due
from clp_lightning.checks import is_integer, is_number
from clp_lightning.conditioning.lm import check_positions
from clp_lightning.conditioning.weights import simplex_grid, validate_weights
from clp_lightning.config import GenerationSettings
from clp_lightning.evaluation import ParetoSteerabilityMetric, hypervolume, pareto_steerability
from clp_lightning.evaluation.metrics import (
    PromptRows,
    mean_and_standard_error,
    prompt_digest,
    prompts_sha256,
)
from clp_lightning.evaluation.reports import grid_mean
from clp_lightning.files import json_text, save_figure_atomic, write_text_atomic

log = logging.getLogger(__name__)


def weight_label(w: Tensor | list[float]) -> str:
    values = w.tolist() if isinstance(w, Tensor) else list(w)
    return ",".join(f"{v:.2f}" for v in values)


def samples_the_policy(generation: GenerationSettings) -> bool:
    """Whether ``generation`` draws from the policy's own distribution (temperature 1, no top-k, top-p, minimum
    length or extra setting): only then is a response's log-ratio an unbiased sample of the KL."""
    return (generation.do_sample and generation.temperature == 1.0 and generation.top_k == 0
            and generation.top_p == 1.0 and generation.min_new_tokens == 0 and not generation.extra)


class GridEvaluation(L.Callback):
    """Evaluates the policy over a grid of weightings on the validation prompts.

    The report (see :func:`grid_report` for every key) gives, at each weighting, the mean reward over the prompts
    (``rewards``) with its standard error (``rewards_se``; the prompt is the unit: each prompt's mean over its
    ``num_samples`` responses, then std / sqrt(P) over prompts), each prompt's own means (``per_prompt_rewards``,
    prompts ordered by their digest, the same order in every evaluation of the same prompts, with
    ``prompts_sha256`` to check it) for paired comparisons (:func:`clp_lightning.evaluation.paired_bootstrap`), the
    reference policy's per-prompt means in the same order (``reference_per_prompt_rewards``), from which each vertex
    gain gets its paired standard error (``vertex_gain_se``), and the KL to the reference estimated by sampling
    (``kl``, ``kl_se``). Under DDP each rank evaluates its share of the
    prompts and the rows are gathered (:class:`~clp_lightning.evaluation.PromptRows`); the distributed sampler may
    repeat a few prompts to even out the shares: every number counts each prompt once (``rewards``, the reference
    policy's, the KL and the standard errors are means over the per-prompt rows), so it matches one process's.

    **The KL.** ``kl`` at weighting ``w`` estimates ``E_x KL(pi(.|x,w) || pi_ref(.|x))``: the policy's own
    distribution (temperature 1, untruncated: the distribution the training objective's KL term is about) against
    the reference, over responses of at most ``generation.max_new_tokens`` tokens, averaged over the evaluated
    prompts. It is the mean of the k1 estimator, the sequence log-ratio ``log pi(y|x,w) - log pi_ref(y|x)``, over
    ``y ~ pi(.|x,w)``: unbiased for that KL. When the evaluation's decoding is that distribution (``do_sample``,
    temperature 1, ``top_k`` 0, ``top_p`` 1, no minimum length or extra setting) its own responses are used;
    otherwise (greedy by default) ``kl_samples`` more responses per prompt and weighting are drawn from it.
    Greedy evaluations also report ``greedy_log_ratio``, the log-ratio of the greedy response itself (a number
    that earlier versions called ``kl``; it is not a KL), unless ``greedy_log_ratio`` is off: it takes a forward pass
    of the policy and one of the reference over every prompt and response, about a third of the evaluation's time
    when prompts are long.

    **Randomness.** Evaluation samples from its own seed (``seed``, the batch's prompts and what is drawn), inside a
    fork of torch's generators: the training's random stream is neither consumed nor moved, and the same batch of
    prompts gets the same draws at every evaluation and in every run evaluated with the same ``seed`` (common random
    numbers, which make paired differences less noisy).

    **Alpha.** For a policy conditioned on the KL strength (``CLPModule(alpha_range=...)``), the top-level numbers
    are at ``alpha_range``'s low end, and the report's ``by_alpha`` holds one front per alpha of ``alphas``.

    Args:
        grid_step: lattice step of the grid (``m = 2``: 0.1 gives 11 points; ``m = 3``: 0.25 gives 15).
        every_n_epochs: during ``fit``, evaluate on every n-th validation epoch (the first one included);
            ``validate`` always evaluates.
        max_prompts: validation prompts used per evaluation (None: every prompt of the val loader): the first
            ``max_prompts`` of the loader, whatever the number of processes (under DDP each rank takes those of
            them that the distributed sampler gives it).
        generation: decoding settings (greedy by default, so that evaluations are repeatable).
        ref_point: hypervolume reference point, one value per objective. None uses the reference policy's mean
            rewards on the prompts being evaluated (the same point at every evaluation of a fit, since its prompts
            and the reference do not change). Never restored from a checkpoint: the config decides it.
        sample_prompts: prompts shown in the text table of responses.
        sample_weightings: weightings shown in the text table (default: the grid's corners and its centre).
        output_dir: where report files go (default ``<log_dir>/evaluation``).
        num_samples: responses per prompt and weighting (the reference policy's too); more than 1 needs
            ``generation.do_sample``.
        kl_samples: responses per prompt and weighting drawn for the KL when the evaluation's own responses are not
            samples of the policy (e.g. greedy); 0 disables the KL (reported as nan).
        seed: seed of the evaluation's sampling.
        alphas: KL strengths at which an alpha-conditioned policy gets a front of its own (``by_alpha``); None: the
            low end, the geometric mean and the high end of ``alpha_range``. An error for other policies.
        greedy_log_ratio: report the greedy responses' own log-ratio (``greedy_log_ratio``) under greedy decoding.
    """

    def __init__(
        self,
        grid_step: float = 0.1,
        every_n_epochs: int = 1,
        max_prompts: int | None = None,
        generation: GenerationSettings | None = None,
        ref_point: list[float] | None = None,
        sample_prompts: int = 3,
        sample_weightings: list[list[float]] | None = None,
        output_dir: str | None = None,
        num_samples: int = 1,
        kl_samples: int = 4,
        seed: int = 0,
        alphas: list[float] | None = None,
        greedy_log_ratio: bool = True,
    ) -> None:
        # counts: 1.5 (or True) passed the range checks below, and then every_n_epochs=1.5 evaluated every third
        # epoch without a word, while max_prompts, sample_prompts or num_samples failed mid-fit in a slice or generate
        counts = {"every_n_epochs": every_n_epochs, "max_prompts": max_prompts, "sample_prompts": sample_prompts,
                  "num_samples": num_samples, "kl_samples": kl_samples}
        for name, value in counts.items():
            if not (is_integer(value) or (name == "max_prompts" and value is None)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if sample_prompts < 0:
            raise ValueError(f"sample_prompts must be >= 0 (0: no table of responses), got {sample_prompts}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if max_prompts is not None and max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 (or None: every validation prompt), got {max_prompts}")
        self.generation = generation or GenerationSettings(do_sample=False)
        self.generation.kwargs()  # its checks (top_p, temperature, ...) now, not at the first evaluation
        if num_samples < 1 or kl_samples < 0:
            raise ValueError(f"need num_samples >= 1 and kl_samples >= 0, got {num_samples} and {kl_samples}")
        if num_samples > 1 and not self.generation.do_sample:
            raise ValueError(f"num_samples={num_samples} needs sampled decoding, but generation.do_sample is false: "
                             "greedy decoding gives the same response every time (set generation.do_sample: true, "
                             "or num_samples: 1)")
        if alphas is not None and not alphas:
            raise ValueError("alphas is empty: list at least one KL strength, or leave it None for the default")
        self.grid_step, self.every_n_epochs, self.max_prompts = grid_step, every_n_epochs, max_prompts
        self.ref_point_config = ref_point
        self.sample_prompts, self.sample_weightings_config = sample_prompts, sample_weightings
        self.output_dir_config = output_dir
        self.num_samples, self.kl_samples, self.seed, self.alphas_config = num_samples, kl_samples, seed, alphas
        self.greedy_log_ratio = greedy_log_ratio
        self.history: list[dict[str, Any]] = []
        self.validations = 0  # validation epochs seen during fit (saved in checkpoints)
        self._checkpoint_epoch = 0  # the epoch of the checkpoint that validate or test loaded
        self.last: dict[str, Any] | None = None
        self.metric: ParetoSteerabilityMetric | None = None
        self._reference_cache: dict[str, dict[str, Any]] = {}
        self._reference_owner: weakref.ref | None = None  # the module whose reference filled the cache

    @property
    def kl_sampling(self) -> str:
        """Where the KL's responses come from, in words (also in the report's ``evaluation``)."""
        if self.kl_samples == 0:
            return "none (kl_samples: 0)"
        if samples_the_policy(self.generation):
            return "the evaluation's own responses"
        return "separate samples from the policy (temperature 1)"

    # -------------------------------------------------------------------------------------------------- set-up

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The cached reference numbers are one module's (its reference policy, its reward models): another module
        # given to the same trainer (trainer.validate(other_module)) is measured anew. A weak reference, so the
        # callback does not keep a finished module's models alive.
        if self._reference_owner is None or self._reference_owner() is not pl_module:
            self._reference_cache.clear()
            self._reference_owner = weakref.ref(pl_module)
        m = pl_module.num_objectives
        self.names: list[str] = pl_module.objective_names
        self.grid = simplex_grid(m, self.grid_step)
        labels = [weight_label(w) for w in self.grid]
        if len(set(labels)) != len(labels):  # one CSV column and metric key would hold two weightings' rewards
            raise ValueError(f"grid_step={self.grid_step} gives weightings that differ by less than 0.01, which the "
                             "metric keys and metrics.csv name to 2 decimals: use grid_step >= 0.01")
        check_positions(pl_module.policy.model, pl_module.policy.max_prompt_length, self.generation.max_new_tokens,
                        "the policy's max_prompt_length or GridEvaluation's generation.max_new_tokens")
        if self.ref_point_config is not None and len(self.ref_point_config) != m:
            raise ValueError(f"ref_point {self.ref_point_config} has {len(self.ref_point_config)} values, "
                             f"expected {m} (one per objective {self.names})")
        corners = torch.eye(m)
        default = torch.cat([corners, torch.full((1, m), 1.0 / m)])
        samples = self.sample_weightings_config
        self.sample_weightings = default if samples is None else validate_weights(samples, m, name="sample weighting")
        ref = None if self.ref_point_config is None else torch.tensor(self.ref_point_config)
        # built anew for another grid: a module with other objectives given to the same trainer would otherwise meet
        # the first module's (m,) reference point only at the epoch's end, after all its generation
        if self.metric is None or not torch.equal(self.metric.grid_weights.cpu(), self.grid):
            self.metric = ParetoSteerabilityMetric(self.grid, ref_point=ref)
        self.metric.to(pl_module.device)
        self.alphas = self._alphas(pl_module)
        # the evaluated KL strengths, the top-level one first (None: a policy not conditioned on alpha)
        top = None if self.alphas is None else pl_module.evaluation_alpha()
        self._evaluated = [top] + [a for a in (self.alphas or []) if a != top]
        g = self.grid.shape[0]
        # Every per-weighting mean is taken over these per-prompt rows, which count each prompt once: under DDP the
        # distributed sampler repeats prompts to even out the shards, and a mean over every evaluated response would
        # count those twice (and so differ from one process's, and from the rows' own means).
        self._rows = {a: PromptRows(g, m).to(pl_module.device) for a in self._evaluated}
        self._log_ratio_rows = {a: PromptRows(g, 1).to(pl_module.device) for a in self._evaluated}
        self._reference_rows = PromptRows(1, m).to(pl_module.device)  # the reference's per-prompt rewards

    def _alphas(self, pl_module: L.LightningModule) -> list[float] | None:
        """The listed KL strengths (checked against ``alpha_range`` now, before any generation), None without alpha
        conditioning."""
        alpha_range = getattr(pl_module, "alpha_range", None)
        if alpha_range is None:
            if self.alphas_config is not None:
                raise ValueError(f"alphas {self.alphas_config} set, but the policy is not conditioned on alpha "
                                 "(model.alpha_range is None): there is one front, at kl_coef")
            return None
        low, high = (float(a) for a in alpha_range)
        alphas = [low, math.sqrt(low * high), high] if self.alphas_config is None else self.alphas_config
        alphas = list(dict.fromkeys(pl_module.evaluation_alpha(float(a)) for a in alphas))  # checked, each once
        return alphas

    # (m,) mean rewards of the reference policy on the prompts of the latest evaluation
    reference_rewards: Tensor | None = None

    @property
    def _reports_greedy_log_ratio(self) -> bool:
        return not self.generation.do_sample and self.greedy_log_ratio

    # ------------------------------------------------------------------------------------------------- evaluation

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.metric is not None
        for metric in [*self._rows.values(), *self._log_ratio_rows.values(), self._reference_rows]:
            metric.reset()
        self._seen = 0
        self._budget = self._rank_budget(trainer)
        self._samples: list[dict[str, Any]] = []
        fitting = trainer.state.fn == "fit"
        self._run = not trainer.sanity_checking and (not fitting or self.validations % self.every_n_epochs == 0)
        if fitting and not trainer.sanity_checking:
            self.validations += 1

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._run or (self._budget is not None and self._seen >= self._budget):
            return
        if self._budget is not None:
            keep = self._budget - self._seen
            batch = {k: v[:keep] for k, v in batch.items()}
        self._seen += len(batch["prompt"])
        was_training = pl_module.training
        pl_module.eval()
        digests = [prompt_digest(*row) for row in zip(batch["prompt"], batch["source"], batch["reference"])]
        batch_key = prompts_sha256(digests)
        outs = {alpha: self._evaluate(pl_module, batch, digests, batch_key, alpha) for alpha in self._evaluated}
        reference = self._reference(pl_module, batch, batch_key)
        n, k = len(batch["prompt"]), self.num_samples
        # each prompt's mean over its samples
        self._reference_rows.update(digests, reference["rewards"].view(n, k, -1).mean(1).unsqueeze(1))
        self._collect_samples(pl_module, batch, outs[self._evaluated[0]], reference)
        pl_module.train(was_training)

    def _rank_budget(self, trainer: L.Trainer) -> int | None:
        """How many of ``max_prompts`` this rank evaluates (None: no limit).

        A distributed sampler deals the loader's items round-robin (rank ``r`` gets items ``r``, ``r + W``, ...), so
        the first ``max_prompts`` items of the loader are this rank's items below ``max_prompts``; capping every rank
        at ``max_prompts`` would evaluate up to ``W`` times as many prompts, and other ones than a single process does.
        A shuffled one deals its permutation the same way: the count is the same, the prompts are a random subset."""
        if self.max_prompts is None:
            return None
        loaders = trainer.test_dataloaders if trainer.state.fn == "test" else trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
            return len(range(sampler.rank, self.max_prompts, sampler.num_replicas))
        return self.max_prompts

    @contextmanager
    def _seeded(self, pl_module: L.LightningModule, *parts: Any) -> Iterator[None]:
        """Draw from a seed of the evaluation's own (``seed`` and ``parts``) inside a fork of torch's generators, so
        that the training's random stream is neither consumed nor moved (see the class docstring)."""
        digest = hashlib.sha256(json.dumps([self.seed, *parts]).encode()).digest()
        devices = list(range(torch.cuda.device_count())) if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            yield

    def _evaluate(self, pl_module: L.LightningModule, batch: dict[str, list[str]], digests: list[bytes],
                  batch_key: str, alpha: float | None) -> dict[str, Any]:
        """The grid at one KL strength: the rows go to the reward means and to the per-prompt rows."""
        g, n, k, m = self.grid.shape[0], len(batch["prompt"]), self.num_samples, len(self.names)
        own = samples_the_policy(self.generation)  # the responses are the policy's samples: their log-ratio is the KL's
        # the responses' log-ratio is reported as the KL (own samples) or as greedy_log_ratio, and is otherwise unused
        log_ratio = (own and self.kl_samples > 0) or (not self.generation.do_sample and self.greedy_log_ratio)
        with self._seeded(pl_module, "grid", alpha, batch_key):
            out = pl_module.evaluate_weightings(batch, self.grid, self.generation, alpha=alpha, num_samples=k,
                                                log_ratio=log_ratio)
        if self._reports_greedy_log_ratio:  # each prompt's mean log-ratio of its (greedy) responses
            self._log_ratio_rows[alpha].update(digests, out["kl"].view(g, n, k).mean(2).T.unsqueeze(-1))
        kl = None
        if self.kl_samples and own:
            kl = out["kl"].view(g, n, k).mean(2)
        elif self.kl_samples:
            settings = GenerationSettings(max_new_tokens=self.generation.max_new_tokens, do_sample=True)
            with self._seeded(pl_module, "kl", alpha, batch_key):
                draws = pl_module.evaluate_weightings(batch, self.grid, settings, score=False, alpha=alpha,
                                                      num_samples=self.kl_samples)
            kl = draws["kl"].view(g, n, self.kl_samples).mean(2)
        rewards = out["rewards"].view(g, n, k, m).mean(2)  # (G, n, m) each prompt's mean over its samples
        self._rows[alpha].update(digests, rewards.transpose(0, 1), None if kl is None else kl.T)
        return out

    def _reference(self, pl_module: L.LightningModule, batch: dict[str, list[str]], batch_key: str) -> dict[str, Any]:
        """The reference policy's responses and rewards on ``batch``, measured once per batch content.

        The reference never trains, so a fit's validation prompts need it once, and ``validate`` or ``test`` on other
        data measures it on that data. Keyed by what determines it (the batch's text, the decoding settings, the
        number of samples and the seed), not by a checkpoint, which could only carry numbers of other prompts.
        """
        content = [batch_key, asdict(self.generation), self.num_samples, self.seed]
        key = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
        if key not in self._reference_cache:
            with self._seeded(pl_module, "reference", batch_key):
                reference = pl_module.evaluate_reference(batch, self.generation, num_samples=self.num_samples)
            self._reference_cache[key] = {"rewards": reference["rewards"].cpu(), "texts": reference["texts"]}
        cached = self._reference_cache[key]
        return {"rewards": cached["rewards"].to(pl_module.device), "texts": cached["texts"]}

    def _collect_samples(
        self, pl_module: L.LightningModule, batch: dict[str, list[str]], grid_out: dict, reference: dict | None
    ) -> None:
        """Responses at the sample weightings for the first prompts (the first of each prompt's samples), beside the
        reference policy's."""
        need = self.sample_prompts - len(self._samples)
        if need <= 0:
            return
        # sample weightings on the grid reuse the grid's responses; others get a generation pass of their own
        match = (self.sample_weightings[:, None, :] - self.grid[None]).abs().amax(-1) < 1e-6  # (S, P)
        if bool(match.any(1).all()):
            out, points, n, k = grid_out, match.float().argmax(1).tolist(), len(batch["prompt"]), self.num_samples
        else:
            batch = {key: v[:need] for key, v in batch.items()}
            n, k = len(batch["prompt"]), 1
            with self._seeded(pl_module, "sample weightings", prompts_sha256(
                    [prompt_digest(*row) for row in zip(batch["prompt"], batch["source"], batch["reference"])])):
                out = pl_module.evaluate_weightings(batch, self.sample_weightings, self.generation,
                                                    alpha=self._evaluated[0], log_ratio=False)
            points = list(range(self.sample_weightings.shape[0]))
        for p in range(min(need, n)):
            rows = [
                {"weights": weight_label(w), "response": out["texts"][(g * n + p) * k],
                 "rewards": out["rewards"][(g * n + p) * k].tolist()}
                for w, g in zip(self.sample_weightings, points)
            ]
            sample = {"prompt": batch["prompt"][p], "responses": rows}
            first = p * self.num_samples  # the reference's samples of prompt p start here
            sample["reference"] = {"response": reference["texts"][first],
                                   "rewards": reference["rewards"][first].tolist()}
            self._samples.append(sample)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._run:
            return
        assert self.metric is not None
        reference_rows = self._reference_rows.compute()  # collectives: every rank, same order
        all_reference = reference_rows["rewards"].reshape(-1, len(self.names))  # (P, m), each prompt once
        self.reference_rewards = all_reference.mean(0)
        if self.ref_point_config is None:
            self.metric.set_reference_point(self.reference_rewards, overwrite=True)
        fronts = {alpha: self._front(alpha) for alpha in self._evaluated}  # collectives too
        reference_per_prompt = None
        if reference_rows["digests"] == fronts[self._evaluated[0]]["digests"]:  # the same prompts, the same order
            reference_per_prompt = all_reference
            for front in fronts.values():
                front["vertex_gain_se"] = vertex_gain_standard_error(
                    self.grid, front["per_prompt_rewards"], reference_per_prompt)
        report = self._report(trainer, fronts, pl_module, reference_per_prompt)
        self._log(pl_module, report, "test" if trainer.state.fn == "test" else "val")
        self.history.append({"epoch": report["epoch"], "step": report["step"], "rewards": report["rewards"]})
        self.last = report
        directory = self.output_dir(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            self._write(trainer, report, directory)

    def _front(self, alpha: float | None) -> dict[str, Any]:
        """One KL strength's numbers, reduced over ranks: the per-prompt rows (each prompt once) and their means and
        standard errors."""
        rows = self._rows[alpha].compute()
        # torchmetrics squeezes a one-element result to a scalar (one objective: a grid of one point); restore shapes
        g, m = self.grid.shape
        rows = {**rows, "rewards": rows["rewards"].reshape(g, -1, m), "kl": rows["kl"].reshape(g, -1)}
        _, rewards_se = mean_and_standard_error(rows["rewards"], dim=1)
        kl, kl_se = mean_and_standard_error(rows["kl"], dim=1)
        log_ratio = torch.full((g,), torch.nan)
        if self._reports_greedy_log_ratio:  # the same on every rank: a collective, like the rows
            log_ratio = self._log_ratio_rows[alpha].compute()["rewards"].reshape(g, -1).mean(1)
        return {"alpha": alpha, "rewards": rows["rewards"].mean(1), "rewards_se": rewards_se, "kl": kl,
                "kl_se": kl_se, "log_ratio": log_ratio, "per_prompt_rewards": rows["rewards"],
                "digests": rows["digests"]}

    # ---------------------------------------------------------------------------------------------------- reports

    def _report(self, trainer: L.Trainer, fronts: dict[float | None, dict[str, Any]], pl_module: L.LightningModule,
                reference_per_prompt: Tensor | None = None) -> dict[str, Any]:
        assert self.metric is not None and self.reference_rewards is not None
        top = fronts[self._evaluated[0]]
        own = samples_the_policy(self.generation)
        from_checkpoint = trainer.state.fn != "fit" and trainer.ckpt_path is not None
        evaluation = {"generation": asdict(self.generation), "num_samples": self.num_samples,
                      "kl_samples": self.num_samples if own and self.kl_samples else self.kl_samples,
                      "kl_sampling": self.kl_sampling, "seed": self.seed, "alpha": top["alpha"],
                      "num_prompts": len(top["digests"])}
        return grid_report(
            self.names,
            self.grid,
            top["rewards"],
            top["kl"],
            self.reference_rewards,
            self.metric.ref_point,
            ref_point_from="config" if self.ref_point_config is not None else "reference policy on these prompts",
            # validate/test on a checkpoint: only fit restores the loops, so the checkpoint's epoch and step; on the
            # weights in memory (`trainer.validate(module)` after `fit` in one process), the trainer's
            epoch=self._checkpoint_epoch if from_checkpoint else trainer.current_epoch,
            step=getattr(pl_module, "checkpoint_step", 0) if from_checkpoint else trainer.global_step,
            samples=self._samples,
            parameters=pl_module.policy.report() if hasattr(pl_module, "policy") else {},
            tol=self.metric.tol,
            rewards_se=top["rewards_se"],
            kl_se=top["kl_se"],
            vertex_gain_se=top.get("vertex_gain_se"),
            greedy_log_ratio=top["log_ratio"] if self._reports_greedy_log_ratio else None,
            per_prompt_rewards=top["per_prompt_rewards"],
            reference_per_prompt_rewards=reference_per_prompt,
            prompts_sha256=prompts_sha256(top["digests"]),
            by_alpha=None if self.alphas is None else [fronts[a] for a in self.alphas],
            evaluation=evaluation,
        )

    def _log(self, pl_module: L.LightningModule, report: dict[str, Any], stage: str) -> None:
        metrics = {"pareto/hypervolume": report["hypervolume"],
                   "pareto/reference_hypervolume": report["reference_hypervolume"],
                   "pareto/front_size": float(sum(report["front_mask"]))}
        if not math.isnan(kl := grid_mean(report["kl"])):  # nan: the KL is off (kl_samples: 0)
            metrics["kl"] = kl
        if "greedy_log_ratio" in report:
            metrics["greedy_log_ratio"] = grid_mean(report["greedy_log_ratio"])
        for i, name in enumerate(self.names):
            metrics[f"steerability/{name}"] = report["steerability"][name]
            metrics[f"vertex_gain/{name}"] = report["vertex_gain"][name]
            if "vertex_gain_se" in report:
                metrics[f"vertex_gain_se/{name}"] = report["vertex_gain_se"][name]
            metrics[f"monotonicity_violations/{name}"] = float(report["monotonicity_violations"][name])
            for w, rewards in zip(report["grid"], report["rewards"]):
                metrics[f"reward/{name}/w={weight_label(w)}"] = rewards[i]
        for entry in report.get("by_alpha", []):
            metrics[f"alpha={entry['alpha']:g}/pareto/hypervolume"] = entry["hypervolume"]
            if not math.isnan(kl := grid_mean(entry["kl"])):
                metrics[f"alpha={entry['alpha']:g}/kl"] = kl
        metrics = {f"{stage}/{k}": v for k, v in metrics.items()}
        # already reduced across ranks by the metric: every rank has the same numbers, so syncing them again only
        # costs a few scalars (and keeps Lightning from warning about unsynced epoch metrics)
        pl_module.log_dict({k: float(v) for k, v in metrics.items()}, on_epoch=True, sync_dist=True)

    def output_dir(self, trainer: L.Trainer) -> Path:
        base = self.output_dir_config or Path(trainer.log_dir or trainer.default_root_dir) / "evaluation"
        return Path(base)

    # the test split gets the same evaluation, reported as test.json
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_validation_epoch_start(trainer, pl_module)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self.on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_validation_epoch_end(trainer, pl_module)

    def _write(self, trainer: L.Trainer, report: dict[str, Any], directory: Path) -> None:
        from clp_lightning.evaluation.plots import front_figure

        directory.mkdir(parents=True, exist_ok=True)
        stem = f"epoch_{report['epoch']:03d}_step_{report['step']:06d}" if trainer.state.fn == "fit" else str(
            trainer.state.fn.value)  # validate.json, test.json
        text = json_text(report, indent=2) + "\n"  # strict JSON: a NaN reward or KL is null
        for name in (f"{stem}.json", "latest.json"):  # a reader (clp export) never sees half a report
            write_text_atomic(directory / name, text)
        self._append_csv(directory / "metrics.csv", report, trainer.state.fn)
        # one objective has no front to draw: its reward is in the files and logs
        figure = front_figure(report, self.history[:-1]) if len(self.names) > 1 else None
        if figure is not None:
            save_figure_atomic(figure, directory / f"{stem}_front.png", dpi=100)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            if figure is not None:
                experiment.add_figure("val/pareto/front", figure, global_step=report["step"])
            experiment.add_text("val/samples", samples_markdown(report), global_step=report["step"])
        if figure is not None:
            import matplotlib.pyplot as plt

            plt.close(figure)

    def _append_csv(self, path: Path, report: dict[str, Any], stage: str) -> None:
        """Add the report's row to ``metrics.csv``, rewritten whole and atomically.

        A run resumed from an older checkpoint evaluates again at steps the file already has: the fit rows from that
        abandoned future (this step and later) are dropped, and a ``validate`` or ``test`` row replaces one of its
        stage at the same step, so each evaluation has one row. A grid or objectives that differ from the file's add
        columns rather than shifting the old ones."""
        stage = str(getattr(stage, "value", stage))
        fields = ["stage", "epoch", "step", "hypervolume", "kl"] + [f"steerability/{n}" for n in self.names] + [
            f"reward/{n}/w={weight_label(w)}" for w in report["grid"] for n in self.names]
        row = {"stage": stage, "epoch": report["epoch"], "step": report["step"],
               "hypervolume": report["hypervolume"], "kl": grid_mean(report["kl"])}
        row.update({f"steerability/{n}": report["steerability"][n] for n in self.names})
        for w, rewards in zip(report["grid"], report["rewards"]):
            row.update({f"reward/{n}/w={weight_label(w)}": r for n, r in zip(self.names, rewards)})
        rows: list[dict[str, Any]] = []
        if path.exists():
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                fields = list(reader.fieldnames or []) + [k for k in fields if k not in (reader.fieldnames or [])]
                rows = [r for r in reader if not self._superseded(r, stage, int(report["step"]))]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows([*rows, row])
        write_text_atomic(path, out.getvalue())

    @staticmethod
    def _superseded(row: dict[str, str], stage: str, step: int) -> bool:
        try:
            row_step = int(row.get("step") or "")
        except ValueError:
            return False  # not a row this callback wrote: kept as it is
        if row.get("stage") != stage:
            return False
        return row_step >= step if stage == "fit" else row_step == step

    # ----------------------------------------------------------------------------------------------- checkpoints

    # Only the run's progress is saved: numbers about the reference policy belong to the prompts they were measured
    # on, and the reference point to the config, so neither comes back from a checkpoint.
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "validations": self.validations}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # only fit restores the loops: `validate` and `test` name the checkpoint's epoch, as its step (checkpoint_step)
        self._checkpoint_epoch = int(checkpoint.get("epoch", 0))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A checkpoint saved after a training batch whose step then validates (ModelCheckpoint's every_n_train_steps)
        # resumes past that validation: Lightning fast-forwards it. Counted here, so that a resumed fit keeps the
        # every_n_epochs schedule of an uninterrupted one.
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if trainer.state.fn == "fit" and not trainer.sanity_checking and state is not None and \
                _validation_follows_this_save(trainer):
            state["validations"] = self.validations + 1

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a checkpoint is untrusted input: malformed state would fail only at the next validation's figure, after
        # minutes of generation, with a TypeError that names nothing
        history, validations = state_dict.get("history", []), state_dict.get("validations", 0)
        if type(validations) is not int or validations < 0:
            raise CheckpointError(f"GridEvaluation state in the checkpoint has validations={validations!r}; expected "
                                  "an integer >= 0")
        if not isinstance(history, list) or not all(_is_history_entry(h) for h in history):
            raise CheckpointError("GridEvaluation state in the checkpoint has a malformed history; expected a list of "
                                  "{'epoch': int, 'step': int, 'rewards': [[number, ...], ...]}")
        self.history, self.validations = list(history), validations


def _is_history_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and type(entry.get("epoch")) is int and type(entry.get("step")) is int
            and isinstance(entry.get("rewards"), list)
            and all(isinstance(row, list) and all(is_number(x) for x in row) for row in entry["rewards"]))


def _validation_follows_this_save(trainer: L.Trainer) -> bool:
    """Whether a checkpoint saved now is one after a training batch whose step validates next (one that a resumed fit
    takes as validated: it is not saved mid-validation, nor after one)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    train, val = epoch_loop.batch_progress.total, epoch_loop.val_loop.batch_progress.total
    after_batch = train.completed == train.processed - 1 and not trainer.validating
    mid_validation = val.started == val.ready and val.processed == val.started - 1
    return after_batch and not mid_validation and validation_due(trainer)


def grid_report(
    objectives: list[str],
    grid: Tensor,
    rewards: Tensor,
    kl: Tensor,
    reference_rewards: Tensor,
    ref_point: Tensor,
    *,
    ref_point_from: str,
    epoch: int,
    step: int,
    samples: list[dict[str, Any]] | None = None,
    parameters: dict[str, Any] | None = None,
    tol: float = 0.0,
    rewards_se: Tensor | None = None,
    kl_se: Tensor | None = None,
    vertex_gain_se: Tensor | None = None,
    greedy_log_ratio: Tensor | None = None,
    per_prompt_rewards: Tensor | None = None,
    reference_per_prompt_rewards: Tensor | None = None,
    prompts_sha256: str | None = None,
    by_alpha: list[dict[str, Any]] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of a grid evaluation, as :class:`GridEvaluation` writes it (``latest.json``, ``validate.json``, ...).

    The one place that knows the report's keys: anything that assembles a front some other way (the study's
    fixed-weighting policies, one per grid point) builds its report here too, so every report reads the same.
    The Pareto front, hypervolume and steerability are computed from ``rewards``, in ``rewards``' dtype. The
    optional arguments add their keys only when given, so reports of older versions (without them) read the same.

    Args:
        objectives: the m objective names.
        grid: weightings ``(G, m)``; must contain every vertex (see :func:`vertex_gain`).
        rewards: mean rewards ``(G, m)`` of the policy at each weighting.
        kl: KL to the reference ``(G,)`` at each weighting, estimated from sampled responses (see
            :class:`GridEvaluation`); nan where none was measured.
        reference_rewards: mean rewards ``(m,)`` of the reference policy on the same prompts and decoding.
        ref_point: hypervolume reference point ``(m,)``.
        ref_point_from: where ``ref_point`` came from, in words.
        epoch: training epoch of the policy.
        step: training steps behind the policy.
        samples: responses at a few weightings (see :func:`samples_markdown`); default none.
        parameters: parameter counts of the policy (``policy.report()``); default none.
        tol: slack for monotonicity violations.
        rewards_se: standard errors ``(G, m)`` of ``rewards``, over prompts (each prompt's mean over its samples).
        kl_se: standard errors ``(G,)`` of ``kl``, over prompts.
        vertex_gain_se: standard errors ``(m,)`` of the vertex gains, over prompts, paired: each prompt's reward at
            the vertex minus the reference policy's on that prompt (:func:`vertex_gain_standard_error`).
        greedy_log_ratio: mean log-ratio ``log pi(y|x,w) / pi_ref(y|x)`` ``(G,)`` of the greedy responses ``y``.
        per_prompt_rewards: ``(G, P, m)`` each prompt's mean reward over its samples, prompts in digest order.
        reference_per_prompt_rewards: ``(P, m)`` the reference policy's, the same prompts in the same order.
        prompts_sha256: digest of the evaluated prompts in that order (:func:`clp_lightning.evaluation.prompts_sha256`).
        by_alpha: one front per KL strength of an alpha-conditioned policy: dicts with ``alpha`` and ``rewards``
            ``(G, m)``, ``kl`` ``(G,)``, optionally ``rewards_se``, ``kl_se`` and ``vertex_gain_se``. Each becomes
            ``{alpha, rewards, rewards_se, kl, kl_se, hypervolume, steerability, vertex_gain, front_mask}`` (and
            ``vertex_gain_se`` where given), measured from the same ``ref_point`` and ``reference_rewards``.
        evaluation: how the numbers were measured (decoding, samples, seed, alpha), recorded as given.

    Returns:
        A JSON-serialisable dict.
    """
    reference_rewards, ref_point = reference_rewards.cpu(), ref_point.cpu()
    front = _front_summary(grid, rewards, reference_rewards, ref_point, objectives, tol)
    report: dict[str, Any] = {"epoch": epoch, "step": step, "objectives": list(objectives), "grid": grid.tolist(),
                              "rewards": rewards.tolist()}
    if rewards_se is not None:
        report["rewards_se"] = rewards_se.tolist()
    report["kl"] = kl.tolist()
    if kl_se is not None:
        report["kl_se"] = kl_se.tolist()
    if greedy_log_ratio is not None:
        report["greedy_log_ratio"] = greedy_log_ratio.tolist()
    report.update({
        "front_mask": front["front_mask"],
        "hypervolume": front["hypervolume"],
        "ref_point": ref_point.tolist(),
        "ref_point_from": ref_point_from,
        "reference_rewards": reference_rewards.tolist(),
        # the reference policy's own point measured against the same reference point: a front that improves on the
        # reference policy has a larger hypervolume than this
        "reference_hypervolume": hypervolume(reference_rewards.view(1, -1), ref_point),
        "vertex_gain": front["vertex_gain"],
        **({} if vertex_gain_se is None else {"vertex_gain_se": dict(zip(objectives, vertex_gain_se.tolist()))}),
        "steerability": front["steerability"],
        "monotonicity_violations": front["monotonicity_violations"],
    })
    if by_alpha is not None:
        report["by_alpha"] = []
        for entry in by_alpha:
            summary = _front_summary(grid, entry["rewards"], reference_rewards, ref_point, objectives, tol)
            se = {key: None if entry.get(key) is None else entry[key].tolist() for key in ("rewards_se", "kl_se")}
            report["by_alpha"].append({
                "alpha": float(entry["alpha"]), "rewards": entry["rewards"].tolist(), "rewards_se": se["rewards_se"],
                "kl": entry["kl"].tolist(), "kl_se": se["kl_se"], "hypervolume": summary["hypervolume"],
                "steerability": summary["steerability"], "vertex_gain": summary["vertex_gain"],
                "front_mask": summary["front_mask"],
            })
            if entry.get("vertex_gain_se") is not None:
                report["by_alpha"][-1]["vertex_gain_se"] = dict(zip(objectives, entry["vertex_gain_se"].tolist()))
    if evaluation is not None:
        report["evaluation"] = evaluation
    if prompts_sha256 is not None:
        report["prompts_sha256"] = prompts_sha256
    if per_prompt_rewards is not None:
        report["per_prompt_rewards"] = per_prompt_rewards.tolist()
    if reference_per_prompt_rewards is not None:
        report["reference_per_prompt_rewards"] = reference_per_prompt_rewards.tolist()
    report["samples"] = [] if samples is None else samples
    report["parameters"] = {} if parameters is None else parameters
    return report


def _front_summary(grid: Tensor, rewards: Tensor, reference_rewards: Tensor, ref_point: Tensor, objectives: list[str],
                   tol: float) -> dict[str, Any]:
    """Front, hypervolume, steerability and vertex gains of one front ``rewards`` ``(G, m)``, as report values."""
    summary = pareto_steerability(grid, rewards, ref_point, tol)
    return {
        "front_mask": summary["front_mask"].tolist(),
        "hypervolume": float(summary["hypervolume"]),
        "vertex_gain": dict(zip(objectives, vertex_gain(grid.cpu(), rewards.cpu(), reference_rewards).tolist())),
        "steerability": dict(zip(objectives, summary["spearman"].tolist())),
        "monotonicity_violations": dict(zip(objectives, summary["violations"].tolist())),
    }


def vertex_gain(grid: Tensor, rewards: Tensor, reference_rewards: Tensor) -> Tensor:
    """Reward ``i`` of the policy at the vertex ``w = e_i`` minus the reference policy's reward ``i``, per objective
    ``(m,)``: the sanity check of a CLP front (the KL-regularised optimum at ``e_i`` never lowers reward ``i``).

    Args:
        grid: weightings ``(G, m)``; must contain every vertex.
        rewards: mean rewards ``(G, m)`` of the policy at each weighting.
        reference_rewards: mean rewards ``(m,)`` of the reference policy on the same prompts and decoding.
    """
    index = _vertex_index(grid)
    return rewards[index, torch.arange(grid.shape[1])] - reference_rewards


def _vertex_index(grid: Tensor) -> Tensor:
    """The row of each vertex ``e_i`` in ``grid`` ``(G, m)``: ``(m,)``."""
    m = grid.shape[1]
    vertex = (grid[None] - torch.eye(m, dtype=grid.dtype)[:, None]).abs().amax(-1) < 1e-6  # (m, G)
    if not bool(vertex.any(1).all()):
        raise ValueError("the grid does not contain every vertex e_i")
    return vertex.float().argmax(1)


def vertex_gain_standard_error(grid: Tensor, per_prompt_rewards: Tensor, reference_per_prompt: Tensor) -> Tensor:
    """Standard error ``(m,)`` of each vertex gain over prompts, paired: prompt ``p``'s reward ``i`` at ``w = e_i``
    minus the reference policy's reward ``i`` on prompt ``p``, then ``std / sqrt(P)`` (nan below two prompts).

    Pairing takes out what the prompts share (some are easy for both policies), so this is the SE to judge a vertex
    gain by, and it is usually well below the two unpaired SEs combined.

    Args:
        grid: weightings ``(G, m)``; must contain every vertex.
        per_prompt_rewards: ``(G, P, m)`` each prompt's mean reward over its samples at each weighting.
        reference_per_prompt: ``(P, m)`` the reference policy's, the prompts in the same order.
    """
    m = grid.shape[1]
    if per_prompt_rewards.shape[1:] != reference_per_prompt.shape:
        raise ValueError(f"per-prompt rewards {tuple(per_prompt_rewards.shape)} and the reference's "
                         f"{tuple(reference_per_prompt.shape)} do not cover the same prompts and objectives")
    index = _vertex_index(grid)
    at_vertex = per_prompt_rewards[index, :, torch.arange(m)]  # (m, P): objective i's rewards at e_i
    _, se = mean_and_standard_error(at_vertex - reference_per_prompt.T.to(at_vertex.dtype), dim=1)
    return se


def samples_markdown(report: dict[str, Any]) -> str:
    """The text table of responses at several weightings, as Markdown (TensorBoard renders it)."""
    names = report["objectives"]
    lines = []
    for sample in report["samples"]:
        lines.append(f"**prompt:** {sample['prompt'][-300:]!r}\n")
        lines.append("| w | response | " + " | ".join(names) + " |")
        lines.append("|---|---|" + "---|" * len(names))
        reference = [{"weights": "reference", **sample["reference"]}] if "reference" in sample else []
        rows = sample["responses"] + reference
        for row in rows:
            rewards = " | ".join(f"{r:.3f}" for r in row["rewards"])
            lines.append(f"| {row['weights']} | {row['response']!r} | {rewards} |")
        lines.append("")
    return "\n".join(lines)
