"""Grid evaluation: the policy at every weighting of a simplex grid, each validation epoch.

Logs ``val/pareto/hypervolume``, ``val/steerability/<objective>``, ``val/vertex_gain/<objective>`` (reward ``i`` at
``w = e_i`` minus the reference policy's), ``val/monotonicity_violations/<objective>``,
``val/reward/<objective>/w=<w>`` and ``val/kl``; a figure of the front (TensorBoard image and PNG); a text table of
responses at several weightings; and the numbers as files in ``<log_dir>/evaluation/`` (``epoch_<n>.json`` and
``metrics.csv``). The same code runs in ``fit`` and in ``validate`` on a checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from clp_lightning.conditioning.weights import simplex_grid, validate_weights
from clp_lightning.config import GenerationSettings
from clp_lightning.evaluation import ParetoSteerabilityMetric, hypervolume, pareto_steerability
from clp_lightning.evaluation.metrics import mean_over_ranks

log = logging.getLogger(__name__)


def weight_label(w: Tensor | list[float]) -> str:
    values = w.tolist() if isinstance(w, Tensor) else list(w)
    return ",".join(f"{v:.2f}" for v in values)


class GridEvaluation(L.Callback):
    """Evaluates the policy over a grid of weightings on the validation prompts.

    Args:
        grid_step: lattice step of the grid (``m = 2``: 0.1 gives 11 points; ``m = 3``: 0.25 gives 15).
        every_n_epochs: during ``fit``, evaluate on every n-th validation epoch (the first one included);
            ``validate`` always evaluates.
        max_prompts: validation prompts used per evaluation (None: every prompt of the val loader).
        generation: decoding settings (greedy by default, so that evaluations are repeatable).
        ref_point: hypervolume reference point, one value per objective. None uses the reference policy's mean
            rewards on the prompts being evaluated (the same point at every evaluation of a fit, since its prompts
            and the reference do not change). Never restored from a checkpoint: the config decides it.
        sample_prompts: prompts shown in the text table of responses.
        sample_weightings: weightings shown in the text table (default: the grid's corners and its centre).
        output_dir: where report files go (default ``<log_dir>/evaluation``).
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
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.grid_step, self.every_n_epochs, self.max_prompts = grid_step, every_n_epochs, max_prompts
        self.generation = generation or GenerationSettings(do_sample=False)
        self.ref_point_config = ref_point
        self.sample_prompts, self.sample_weightings_config = sample_prompts, sample_weightings
        self.output_dir_config = output_dir
        self.history: list[dict[str, Any]] = []
        self.validations = 0  # validation epochs seen during fit (saved in checkpoints)
        self.last: dict[str, Any] | None = None
        self.metric: ParetoSteerabilityMetric | None = None
        self._reference_cache: dict[str, dict[str, Any]] = {}

    # -------------------------------------------------------------------------------------------------- set-up

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        m = pl_module.num_objectives
        self.names: list[str] = pl_module.objective_names
        self.grid = simplex_grid(m, self.grid_step)
        if self.ref_point_config is not None and len(self.ref_point_config) != m:
            raise ValueError(f"ref_point {self.ref_point_config} has {len(self.ref_point_config)} values, "
                             f"expected {m} (one per objective {self.names})")
        corners = torch.eye(m)
        default = torch.cat([corners, torch.full((1, m), 1.0 / m)])
        samples = self.sample_weightings_config
        self.sample_weightings = default if samples is None else validate_weights(samples, m, name="sample weighting")
        ref = None if self.ref_point_config is None else torch.tensor(self.ref_point_config)
        if self.metric is None:
            self.metric = ParetoSteerabilityMetric(self.grid, ref_point=ref)
        self.metric.to(pl_module.device)

    # (m,) mean rewards of the reference policy on the prompts of the latest evaluation
    reference_rewards: Tensor | None = None

    # ------------------------------------------------------------------------------------------------- evaluation

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.metric is not None
        self.metric.reset()
        self._seen = 0
        self._ref_rows: list[Tensor] = []
        self._samples: list[dict[str, Any]] = []
        fitting = trainer.state.fn == "fit"
        self._run = not trainer.sanity_checking and (not fitting or self.validations % self.every_n_epochs == 0)
        if fitting and not trainer.sanity_checking:
            self.validations += 1

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._run or (self.max_prompts is not None and self._seen >= self.max_prompts):
            return
        assert self.metric is not None
        if self.max_prompts is not None:
            keep = self.max_prompts - self._seen
            batch = {k: v[:keep] for k, v in batch.items()}
        self._seen += len(batch["prompt"])
        was_training = pl_module.training
        pl_module.eval()
        out = pl_module.evaluate_weightings(batch, self.grid, self.generation)
        self.metric.update(out["point"], out["rewards"], out["kl"])
        reference = self._reference(pl_module, batch)
        self._ref_rows.append(reference["rewards"])
        self._collect_samples(pl_module, batch, out, reference)
        pl_module.train(was_training)

    def _reference(self, pl_module: L.LightningModule, batch: dict[str, list[str]]) -> dict[str, Any]:
        """The reference policy's responses and rewards on ``batch``, measured once per batch content.

        The reference never trains, so a fit's validation prompts need it once, and ``validate`` or ``test`` on other
        data measures it on that data. Keyed by what determines it (the batch's text and the decoding settings),
        not by a checkpoint, which could only carry numbers of other prompts.
        """
        content = [batch[key] for key in ("prompt", "source", "reference")] + [asdict(self.generation)]
        key = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
        if key not in self._reference_cache:
            reference = pl_module.evaluate_reference(batch, self.generation)
            self._reference_cache[key] = {"rewards": reference["rewards"].cpu(), "texts": reference["texts"]}
        cached = self._reference_cache[key]
        return {"rewards": cached["rewards"].to(pl_module.device), "texts": cached["texts"]}

    def _collect_samples(
        self, pl_module: L.LightningModule, batch: dict[str, list[str]], grid_out: dict, reference: dict | None
    ) -> None:
        """Responses at the sample weightings for the first prompts, beside the reference policy's."""
        need = self.sample_prompts - len(self._samples)
        if need <= 0:
            return
        # sample weightings on the grid reuse the grid's responses; others get a generation pass of their own
        match = (self.sample_weightings[:, None, :] - self.grid[None]).abs().amax(-1) < 1e-6  # (S, P)
        if bool(match.any(1).all()):
            out, points, n = grid_out, match.float().argmax(1).tolist(), len(batch["prompt"])
        else:
            batch = {k: v[:need] for k, v in batch.items()}
            n = len(batch["prompt"])
            out = pl_module.evaluate_weightings(batch, self.sample_weightings, self.generation)
            points = list(range(self.sample_weightings.shape[0]))
        for p in range(min(need, n)):
            rows = [
                {"weights": weight_label(w), "response": out["texts"][g * n + p],
                 "rewards": out["rewards"][g * n + p].tolist()}
                for w, g in zip(self.sample_weightings, points)
            ]
            sample = {"prompt": batch["prompt"][p], "responses": rows}
            sample["reference"] = {"response": reference["texts"][p], "rewards": reference["rewards"][p].tolist()}
            self._samples.append(sample)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._run:
            return
        assert self.metric is not None
        rows = torch.cat(self._ref_rows) if self._ref_rows else torch.zeros(0, len(self.names))
        self.reference_rewards = mean_over_ranks(rows.to(pl_module.device, torch.float32))
        if self.ref_point_config is None:
            self.metric.set_reference_point(self.reference_rewards, overwrite=True)
        result = self.metric.compute()
        report = self._report(trainer, result, pl_module)
        self._log(pl_module, report, "test" if trainer.state.fn == "test" else "val")
        self.history.append({"epoch": report["epoch"], "step": report["step"], "rewards": report["rewards"]})
        self.last = report
        directory = self.output_dir(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            self._write(trainer, report, directory)

    # ---------------------------------------------------------------------------------------------------- reports

    def _report(self, trainer: L.Trainer, result: dict[str, Tensor], pl_module: L.LightningModule) -> dict[str, Any]:
        assert self.metric is not None and self.reference_rewards is not None
        return grid_report(
            self.names,
            self.grid,
            result["rewards"],
            result["kl"],
            self.reference_rewards,
            self.metric.ref_point,
            ref_point_from="config" if self.ref_point_config is not None else "reference policy on these prompts",
            epoch=trainer.current_epoch,
            step=trainer.global_step if trainer.state.fn == "fit" else getattr(pl_module, "checkpoint_step", 0),
            samples=self._samples,
            parameters=pl_module.policy.report() if hasattr(pl_module, "policy") else {},
            tol=self.metric.tol,
        )

    def _log(self, pl_module: L.LightningModule, report: dict[str, Any], stage: str) -> None:
        metrics = {"pareto/hypervolume": report["hypervolume"], "kl": sum(report["kl"]) / len(report["kl"]),
                   "pareto/reference_hypervolume": report["reference_hypervolume"],
                   "pareto/front_size": float(sum(report["front_mask"]))}
        for i, name in enumerate(self.names):
            metrics[f"steerability/{name}"] = report["steerability"][name]
            metrics[f"vertex_gain/{name}"] = report["vertex_gain"][name]
            metrics[f"monotonicity_violations/{name}"] = float(report["monotonicity_violations"][name])
            for w, rewards in zip(report["grid"], report["rewards"]):
                metrics[f"reward/{name}/w={weight_label(w)}"] = rewards[i]
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
        (directory / f"{stem}.json").write_text(json.dumps(report, indent=2))
        (directory / "latest.json").write_text(json.dumps(report, indent=2))
        self._append_csv(directory / "metrics.csv", report, trainer.state.fn)
        figure = front_figure(report, self.history[:-1])
        figure.savefig(directory / f"{stem}_front.png", dpi=100)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            experiment.add_figure("val/pareto/front", figure, global_step=report["step"])
            experiment.add_text("val/samples", samples_markdown(report), global_step=report["step"])
        import matplotlib.pyplot as plt

        plt.close(figure)

    def _append_csv(self, path: Path, report: dict[str, Any], stage: str) -> None:
        fields = ["stage", "epoch", "step", "hypervolume", "kl"] + [f"steerability/{n}" for n in self.names] + [
            f"reward/{n}/w={weight_label(w)}" for w in report["grid"] for n in self.names]
        row = {"stage": stage, "epoch": report["epoch"], "step": report["step"],
               "hypervolume": report["hypervolume"], "kl": sum(report["kl"]) / len(report["kl"])}
        row.update({f"steerability/{n}": report["steerability"][n] for n in self.names})
        for w, rewards in zip(report["grid"], report["rewards"]):
            row.update({f"reward/{n}/w={weight_label(w)}": r for n, r in zip(self.names, rewards)})
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerow(row)

    # ----------------------------------------------------------------------------------------------- checkpoints

    # Only the run's progress is saved: numbers about the reference policy belong to the prompts they were measured
    # on, and the reference point to the config, so neither comes back from a checkpoint.
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.validations = int(state_dict.get("validations", 0))


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
) -> dict[str, Any]:
    """The report of a grid evaluation, as :class:`GridEvaluation` writes it (``latest.json``, ``validate.json``, ...).

    The one place that knows the report's keys: anything that assembles a front some other way (the study's
    fixed-weighting policies, one per grid point) builds its report here too, so every report reads the same.
    The Pareto front, hypervolume and steerability are computed from ``rewards``, in ``rewards``' dtype.

    Args:
        objectives: the m objective names.
        grid: weightings ``(G, m)``; must contain every vertex (see :func:`vertex_gain`).
        rewards: mean rewards ``(G, m)`` of the policy at each weighting.
        kl: mean KL to the reference ``(G,)`` at each weighting (nan where none was measured).
        reference_rewards: mean rewards ``(m,)`` of the reference policy on the same prompts and decoding.
        ref_point: hypervolume reference point ``(m,)``.
        ref_point_from: where ``ref_point`` came from, in words.
        epoch: training epoch of the policy.
        step: training steps behind the policy.
        samples: responses at a few weightings (see :func:`samples_markdown`); default none.
        parameters: parameter counts of the policy (``policy.report()``); default none.
        tol: slack for monotonicity violations.

    Returns:
        A JSON-serialisable dict.
    """
    summary = pareto_steerability(grid, rewards, ref_point, tol)
    reference_rewards, ref_point = reference_rewards.cpu(), ref_point.cpu()
    return {
        "epoch": epoch,
        "step": step,
        "objectives": list(objectives),
        "grid": grid.tolist(),
        "rewards": rewards.tolist(),
        "kl": kl.tolist(),
        "front_mask": summary["front_mask"].tolist(),
        "hypervolume": float(summary["hypervolume"]),
        "ref_point": ref_point.tolist(),
        "ref_point_from": ref_point_from,
        "reference_rewards": reference_rewards.tolist(),
        # the reference policy's own point measured against the same reference point: a front that improves on the
        # reference policy has a larger hypervolume than this
        "reference_hypervolume": hypervolume(reference_rewards.view(1, -1), ref_point),
        "vertex_gain": dict(zip(objectives, vertex_gain(grid.cpu(), rewards.cpu(), reference_rewards).tolist())),
        "steerability": dict(zip(objectives, summary["spearman"].tolist())),
        "monotonicity_violations": dict(zip(objectives, summary["violations"].tolist())),
        "samples": [] if samples is None else samples,
        "parameters": {} if parameters is None else parameters,
    }


def vertex_gain(grid: Tensor, rewards: Tensor, reference_rewards: Tensor) -> Tensor:
    """Reward ``i`` of the policy at the vertex ``w = e_i`` minus the reference policy's reward ``i``, per objective
    ``(m,)``: the sanity check of a CLP front (the KL-regularised optimum at ``e_i`` never lowers reward ``i``).

    Args:
        grid: weightings ``(G, m)``; must contain every vertex.
        rewards: mean rewards ``(G, m)`` of the policy at each weighting.
        reference_rewards: mean rewards ``(m,)`` of the reference policy on the same prompts and decoding.
    """
    m = grid.shape[1]
    vertex = (grid[None] - torch.eye(m, dtype=grid.dtype)[:, None]).abs().amax(-1) < 1e-6  # (m, G)
    if not bool(vertex.any(1).all()):
        raise ValueError("the grid does not contain every vertex e_i")
    index = vertex.float().argmax(1)  # (m,)
    return rewards[index, torch.arange(m)] - reference_rewards


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
