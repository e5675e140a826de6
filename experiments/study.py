"""CLP variants against the baselines on one task: each variant's learning rate picked on validation, then several
seeds compared on held-out prompts, at equal training steps and at equal KL to the reference.

The tasks are the rows of ``TASKS`` (``--task``): the quick start's (a tiny T5 from one warm start,
conf/quickstart_sft.yaml; with a third objective), and the real-model task (SmolLM2-135M-Instruct on real
CNN/DailyMail articles, conf/cnndm_smollm2.yaml, no warm start: the instruct model is the starting policy). Every run
of a task starts from the same policy and is evaluated by the same grid evaluation. The variants are the rows of
``VARIANTS``; their kind says how a run gets its grid report:

- ``fit``: one CLP policy trained on the weight distribution, the full step budget.
- ``soup``: Rewarded Soups. The step budget is split across m experts (each trained with the one-hot weighting of its
  objective, only its own copies or adapters trained), which are then combined without further training: their
  parameters interpolated (``rs_*``), or their logits mixed at decoding time (``mix_lora``: ``sum_i w_i * logits_i``,
  with the ``rs_lora`` experts). Joint CLP with attention copies also trains the shared weights, which the experts
  cannot (their soup would not be an interpolation); ``attention_own`` is joint CLP trained like the experts, so
  that the difference is measured. LoRA trains the adapters alone either way.
- ``fixed``: one policy per grid weighting (the sampler fixed at that weighting, the full step budget each), each
  policy's point taken at its own weighting: the expensive upper reference, costing G times the budget.

The protocol:

1. **Learning rate.** Each variant trains at ``--lr-factors`` times its base rate (the task config's, or the
   variant's own), seed ``--seeds[0]``; the rate with the largest hypervolume on the *validation* prompts is chosen
   (``fixed`` is not swept: it trains at its base rate, only with its own seeds, ``--fixed-seeds``).
2. **Seeds.** The chosen rate trains with every seed (the sweep's run is reused for the first).
3. **Test.** Each chosen run is evaluated on ``--test-prompts`` prompts of the *test* split, which no choice saw:
   hypervolume (mean and standard deviation over seeds, null for one seed; a bootstrap interval over prompts with
   the seeds' per-prompt rewards averaged) and the paired difference to ``--compare-to`` on the same prompts (paired
   bootstrap, :func:`clp_lightning.evaluation.paired_bootstrap`). Hypervolumes are measured from the task's fixed
   point when it has one (``Task.ref_point``), else from each report's own.
4. **Equal KL.** A policy that drifts further from the reference buys more reward. Every run is evaluated
   ``--evaluations`` times during training; each evaluation carries the sampled KL to the reference (mean over the
   grid). Hypervolume is read off each run's (KL, hypervolume) path, from the reference policy's point (KL 0) on, at
   the largest KL that every run reaches (the smallest of the runs' largest KLs). A soup's path combines its
   experts' checkpoints nearest each evaluation of a fit (equal steps); ``--every-checkpoint`` evaluates all of
   them, which reaches lower KL.

    python experiments/study.py --out runs/study                                   # the full study
    python experiments/study.py --out runs/study --variants all lora rs_lora --seeds 0 --steps 20 --lr-factors 1
    python experiments/study.py --out runs/study3 --task three_objectives                           # m = 3
    clp data cnndm-blanc --val-size 36 --test-size 64 --out data/cnndm_blanc_study      # real model: 64 test articles
    python experiments/study.py --task cnndm_smollm2 --out runs/study_smollm2 --steps 24 --evaluations 2
    python experiments/study.py ... --variants mix_lora --lr-factors 3 --sweep-only    # one rate of a sweep alone

Writes <out>/table.md (the tables), <out>/results.json (every number behind them), <out>/fronts.png (test fronts,
first seed) and <out>/kl.png (validation hypervolume against KL over training), and prints the tables. An
interrupted study picks up where it stopped: a run whose report exists is not run again, and a fit cut short
resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from clp_lightning.callbacks import GridEvaluation  # noqa: E402
from clp_lightning.callbacks.grid_evaluation import grid_report, vertex_gain_standard_error  # noqa: E402
from clp_lightning.cli import CLPCLI, run_cli  # noqa: E402
from clp_lightning.compare import overlay_figure  # noqa: E402
from clp_lightning.compare import rebased as rebase_report  # noqa: E402
from clp_lightning.conditioning.weights import simplex_grid  # noqa: E402
from clp_lightning.evaluation import bootstrap_ci, paired_bootstrap  # noqa: E402
from clp_lightning.evaluation.reports import read_report, sampled_kl  # noqa: E402
from clp_lightning.files import save_figure_atomic, write_json, write_text_atomic  # noqa: E402

CONF = ROOT / "conf"


@dataclass(frozen=True)
class Variant:
    """One row of the study.

    Attributes:
        fragment: the conditioning config, under ``conf/conditioning/``.
        kind: how the run gets its grid report (see the module docstring): ``fit``, ``soup`` or ``fixed``.
        decoding: ``model.decoding`` when a soup is evaluated (None: the config's, parameter interpolation).
        lr: the base learning rate, which the sweep multiplies (None: the task config's).
        experts_of: the soup variant whose experts this soup reuses, trained once for both (None: its own).
        overrides: further command-line settings of the variant's runs.
        sweep: whether the learning rate is chosen by the sweep (False: the base rate).
    """

    fragment: str
    kind: Literal["fit", "soup", "fixed"] = "fit"
    decoding: str | None = None
    lr: float | None = None
    experts_of: str | None = None
    overrides: tuple[str, ...] = ()
    sweep: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("fit", "soup", "fixed"):
            raise ValueError(f"variant kind {self.kind!r} is not one of 'fit', 'soup', 'fixed'")
        if self.kind != "soup" and (self.decoding is not None or self.experts_of is not None):
            raise ValueError(f"decoding and experts_of are for soups, not for a {self.kind!r} variant")

    @property
    def done(self) -> str:
        """The report a finished run leaves under its directory: an interrupted study skips runs that have it (a fit
        writes its report at every evaluation: it is finished once the report is its last evaluation's)."""
        return {"fit": "evaluation/latest.json", "soup": "evaluation/validate.json", "fixed": "report.json"}[self.kind]


LORA_LR = 2e-3  # a frozen base with small adapters wants a larger step than full finetuning
OWN_ONLY = "--model.init_args.policy.conditioning.train_shared=false"  # only the mode's copies / adapters train
VARIANTS = {
    "prompt": Variant("prompt.yaml"),
    "logits": Variant("logits.yaml"),
    "attention": Variant("attention.yaml"),
    "all": Variant("all.yaml"),
    "lora": Variant("lora.yaml", lr=LORA_LR),
    "prompt_attention": Variant("prompt_attention.yaml"),
    "attention_own": Variant("attention.yaml", overrides=(OWN_ONLY,)),
    "rs_lora": Variant("lora.yaml", "soup", lr=LORA_LR),
    "rs_attention": Variant("attention.yaml", "soup"),
    "mix_lora": Variant("lora.yaml", "soup", decoding="logit_mixture", lr=LORA_LR, experts_of="rs_lora"),
    "fixed": Variant("attention.yaml", "fixed", sweep=False),
}
LR_FACTORS = (1 / 3, 1.0, 3.0)


@dataclass(frozen=True)
class Task:
    """What a study runs on.

    Attributes:
        configs: the task's configs, under ``conf/``, in order.
        warm_start: the config whose fit writes the starting policy (under ``<out>/sft/model``), or None: the
            task config's own model is the starting policy.
        test_size: the data module's argument that sets how many test prompts there are.
        variant_rates: whether a variant's own base rate (``Variant.lr``) applies; False: the task config's rate is
            every variant's base (a task config that already trains the variant's parameters, e.g. LoRA).
        variants: the variants the task supports (None: all).
        overrides: settings of every run of the task.
        expert_evaluations: whether a soup's experts run the grid evaluation during their fits. Nothing reads an
            expert's own grid reports (the soup is what is evaluated), so False spares them where an evaluation costs
            minutes; the task config's checkpoint callback must then save every few steps, since the soup's KL path
            combines the experts' checkpoints.
        ref_point: the fixed point the study's comparisons measure hypervolume from (test, intervals, KL paths),
            one value per objective; None: each report's own, as evaluated. The learning rate is chosen on each
            report's own either way. A task config whose grid evaluation measures from the reference policy's point
            needs one: a front that misses that point by a hair in one objective has hypervolume 0 there, however
            far it reaches in the other.
    """

    configs: tuple[str, ...]
    warm_start: str | None
    test_size: str
    variant_rates: bool = True
    variants: tuple[str, ...] | None = None
    overrides: tuple[str, ...] = ()
    expert_evaluations: bool = True
    ref_point: tuple[float, ...] | None = None


STUDY_DATA = "data/cnndm_blanc_study"  # clp data cnndm-blanc --val-size 36 --test-size 64: 64 articles to test on
TASKS = {
    "quickstart": Task(("quickstart.yaml",), "quickstart_sft.yaml", "num_test"),
    "three_objectives": Task(("quickstart.yaml", "tasks/three_objectives.yaml"), "quickstart_sft.yaml", "num_test"),
    # LoRA on a frozen instruct model: the variants that train adapters (the config's rate, 5e-4, is their base)
    "cnndm_smollm2": Task(("cnndm_smollm2.yaml",), None, "max_test_samples", variant_rates=False,
                          variants=("lora", "rs_lora", "mix_lora"),
                          overrides=(f"--data.init_args.path={STUDY_DATA}",),
                          expert_evaluations=False,  # the config checkpoints every 4 steps
                          # relevance 0 (an unrelated text), brevity -5 (50 words: longer than any 48-token summary)
                          ref_point=(0.0, -5.0)),
}


def cli(subcommand: str | None, configs: list[Path], overrides: list[str]) -> CLPCLI:
    """Run ``clp <subcommand>`` in this process; with None, only build the model, data and trainer."""
    args = ([subcommand] if subcommand else []) + [a for c in configs for a in ("--config", str(c))] + overrides
    return run_cli(args, run=subcommand is not None)


def config_value(configs: list[Path], *keys: str) -> object:
    """A value of the merged task configs (the last file that sets it wins), read without building anything."""
    found = None
    for config in configs:
        node = yaml.safe_load(config.read_text()) or {}
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        found = node if node is not None else found
    return found


def read(path: Path) -> dict:
    return read_report(path)


def point_runs(run: Path) -> list[Path]:
    """A fixed-weighting run's policies, in grid order (``point0``, ``point1``, ...)."""
    return sorted(run.glob("point*"), key=lambda p: int(p.name.removeprefix("point")))


@dataclass
class Study:
    """The settings every run of a study shares, and the runs: training, test, and the KL path of each.

    A run is ``(variant, learning rate, seed)``, in ``<out>/<variant>/lr<rate>/seed<seed>``.
    """

    out: Path
    sft: Path | None  # the starting policy (None: the task config's model)
    task: list[Path]
    steps: int
    overrides: tuple[str, ...] = ()  # settings of every run (the grid step)
    evaluations: int = 4  # grid evaluations on the validation prompts during each training
    test_prompts: int = 64
    test_size: str = "num_test"  # the data module's argument for the number of test prompts
    variant_rates: bool = True  # see Task.variant_rates
    expert_evaluations: bool = True  # see Task.expert_evaluations
    ref_point: tuple[float, ...] | None = None  # see Task.ref_point
    every_checkpoint: tuple[str, ...] = ()  # soups whose KL path evaluates every expert checkpoint (--every-checkpoint)

    def base_lr(self, name: str) -> float:
        own = VARIANTS[name].lr if self.variant_rates else None
        lr = own or config_value(self.task, "model", "init_args", "optimizer", "lr")
        if lr is None:
            raise ValueError(f"variant {name!r} has no learning rate and the task configs set none")
        return float(lr)

    def lrs(self, name: str, factors: tuple[float, ...]) -> list[float]:
        """The rates the sweep tries for ``name`` (only the base rate for a variant that is not swept)."""
        base = self.base_lr(name)
        return [float(f"{base * f:.3g}") for f in factors] if VARIANTS[name].sweep else [base]

    def run_dir(self, name: str, lr: float, seed: int) -> Path:
        return self.out / name / f"lr{lr:.3g}" / f"seed{seed}"

    @property
    def num_objectives(self) -> int:
        return 3 if any(c.name == "three_objectives.yaml" for c in self.task) else 2

    def _configs(self, name: str) -> list[Path]:
        return [*self.task, CONF / "conditioning" / VARIANTS[name].fragment]

    def _common(self, name: str, seed: int, lr: float, save_dir: Path) -> list[str]:
        start = [] if self.sft is None else [f"--model.init_args.policy.model_name_or_path={self.sft}"]
        return [
            f"--seed_everything={seed}",
            *start,
            f"--model.init_args.weight_seed={seed}",
            f"--trainer.logger.init_args.save_dir={save_dir}",
            f"--trainer.default_root_dir={save_dir}",  # a config's checkpoint dirpath may be relative to it
            "--trainer.logger.init_args.name=",
            "--trainer.enable_progress_bar=false",
            f"--model.init_args.optimizer.lr={lr}",
            *VARIANTS[name].overrides,
            *self.overrides,
        ]

    def _interval(self, steps: int) -> int:
        return max(1, steps // self.evaluations)  # the KL path: an evaluation every `interval` steps

    def fitted(self, run: Path, steps: int) -> bool:
        """Whether the fit in ``run`` went through its last evaluation (a fit cut short has an earlier one) and saved
        its last step: steps after the last evaluation (``steps`` not a multiple of the interval), or a kill between
        the evaluation and its checkpoint, would leave ``last.ckpt`` short of the budget, and the test would
        evaluate it."""
        latest = run / "evaluation" / "latest.json"
        last_evaluation = steps // self._interval(steps) * self._interval(steps)
        return (latest.exists() and read(latest).get("step", 0) >= last_evaluation
                and any((run / "checkpoints").glob(f"*step={steps}.ckpt")))

    def _expert_fitted(self, run: Path, steps: int) -> bool:
        """Whether the expert in ``run`` trained all its ``steps`` (by its evaluation, or by its checkpoint where
        experts are not evaluated)."""
        if self.expert_evaluations:
            return self.fitted(run, steps)
        return any((run / "checkpoints").glob(f"*step={steps}.ckpt"))

    def _fit(self, configs: list[Path], common: list[str], steps: int, extra: list[str] = ()) -> None:
        interval = self._interval(steps)
        # a fit that an interrupted study left half done resumes exactly from its last checkpoint
        run = Path(next(o for o in common if o.startswith("--trainer.default_root_dir=")).split("=", 1)[1])
        last = run / "checkpoints" / "last.ckpt"
        resume = [f"--ckpt_path={last}"] if last.exists() else []
        cli("fit", configs, [*common, f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={interval}",
                             *extra, *resume])

    # ----------------------------------------------------------------------------------------------- training

    def train(self, name: str, seed: int, lr: float) -> dict:
        """Train the run (once) and return its final grid report on the validation prompts."""
        variant, run = VARIANTS[name], self.run_dir(name, lr, seed)
        done = run / variant.done
        if not (self.fitted(run, self.steps) if variant.kind == "fit" else done.exists()):
            configs, common = self._configs(name), self._common(name, seed, lr, run)
            if variant.kind == "fit":
                self._fit(configs, common, self.steps)
            elif variant.kind == "soup":
                self._soup(name, common, "validate", self._expert_checkpoints(name, seed, lr))
            else:
                self._fixed(name, seed, lr)
        report = read(done)
        return {**report, "step": self.steps} if variant.kind == "soup" else report

    def _experts(self, name: str, seed: int, lr: float) -> Path:
        return self.run_dir(VARIANTS[name].experts_of or name, lr, seed)

    def _expert_checkpoints(self, name: str, seed: int, lr: float) -> list[Path]:
        """Each expert's last checkpoint, training the experts that are not there yet."""
        experts, steps = self._experts(name, seed, lr), self.steps // self.num_objectives
        checkpoints = []
        for i in range(self.num_objectives):
            checkpoint = experts / f"expert{i}" / "checkpoints" / "last.ckpt"
            if not self._expert_fitted(experts / f"expert{i}", steps):
                # only the experts' own copies / adapters train, so the soup is exactly their interpolation
                common = self._common(name, seed, lr, experts / f"expert{i}") + [OWN_ONLY]
                quiet = [] if self.expert_evaluations else ["--trainer.limit_val_batches=0"]
                self._fit(self._configs(name), common, steps,
                          ["--model.init_args.sampler.kind=one_hot", f"--model.init_args.sampler.index={i}", *quiet])
            checkpoints.append(checkpoint)
        return checkpoints

    def _soup(self, name: str, common: list[str], stage: str, checkpoints: list[Path], extra: list[str] = ()) -> dict:
        """Evaluate the combination of the experts' ``checkpoints`` (``validate`` or ``test``); its report."""
        decoding = VARIANTS[name].decoding
        decoded = [] if decoding is None else [f"--model.init_args.decoding={decoding}"]
        combined = f"--model.init_args.expert_checkpoints={json.dumps([str(c) for c in checkpoints])}"
        evaluated = cli(stage, self._configs(name), [*common, OWN_ONLY, *decoded, combined, *extra])
        return read(Path(evaluated.trainer.log_dir) / "evaluation" / f"{stage}.json")

    def _fixed(self, name: str, seed: int, lr: float) -> dict:
        """One policy per grid weighting, each trained at that weighting only; point g is policy g's rewards at g."""
        run, configs = self.run_dir(name, lr, seed), self._configs(name)
        points = []
        for g, weights in enumerate(self.grid(configs, self._common(name, seed, lr, run))):
            policy_run = run / f"point{g}"
            latest = policy_run / "evaluation" / "latest.json"
            if not self.fitted(policy_run, self.steps):
                # the policy is evaluated on the whole grid like the others; only its own weighting is kept
                fixed = ["--model.init_args.sampler.kind=fixed",
                         f"--model.init_args.sampler.weights={json.dumps(weights)}"]
                self._fit(configs, self._common(name, seed, lr, policy_run), self.steps, fixed)
            points.append(read(latest))
        report = fixed_report(points, self.steps)
        run.mkdir(parents=True, exist_ok=True)
        # its existence marks the run done (Variant.done): a half-written one would stop every resumed study
        write_json(run / "report.json", report)
        return report

    @staticmethod
    def grid(configs: list[Path], common: list[str]) -> list[list[float]]:
        """The evaluation grid the configs set up: the GridEvaluation callback's step over the task's objectives."""
        built = cli(None, configs, common)
        step = next(c.grid_step for c in built.trainer.callbacks if isinstance(c, GridEvaluation))
        return simplex_grid(built.model.num_objectives, step).tolist()

    # ----------------------------------------------------------------------------------------------- test

    def test(self, name: str, seed: int, lr: float) -> dict:
        """The trained run's grid report on ``test_prompts`` prompts of the test split (evaluated once)."""
        variant, run = VARIANTS[name], self.run_dir(name, lr, seed)
        done = run / "test" / "evaluation" / "test.json"
        if variant.kind == "fixed":
            done = run / "test_report.json"
        if done.exists():
            report = self._measured(read(done))
            return {**report, "step": self.steps} if variant.kind == "soup" else report
        self.train(name, seed, lr)
        # every test prompt is evaluated (a task config may cap the validation evaluation's prompts)
        data = [f"--data.init_args.{self.test_size}={self.test_prompts}",
                f"--trainer.callbacks.init_args.max_prompts={self.test_prompts}"]
        if variant.kind == "fit":
            common = self._common(name, seed, lr, run / "test")
            cli("test", self._configs(name), [*common, *data, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
            return self._measured(read(done))
        if variant.kind == "soup":
            common = self._common(name, seed, lr, run / "test")
            report = self._soup(name, common, "test", self._expert_checkpoints(name, seed, lr), data)
            return {**self._measured(report), "step": self.steps}
        points = []
        for policy_run in point_runs(run):
            tested = policy_run / "test" / "evaluation" / "test.json"
            if not tested.exists():  # a study stopped part-way through the G tests does not run the done ones again
                common = self._common(name, seed, lr, policy_run / "test")
                checkpoint = policy_run / "checkpoints" / "last.ckpt"
                cli("test", self._configs(name), [*common, *data, f"--ckpt_path={checkpoint}"])
            points.append(read(tested))
        report = fixed_report(points, self.steps)
        write_json(done, report)
        return self._measured(report)

    # ----------------------------------------------------------------------------------------------- KL path

    def path(self, name: str, seed: int, lr: float) -> list[tuple[float, float]]:
        """The run's (sampled KL, hypervolume) on the validation prompts at each evaluation during training, in
        order, from the reference policy's point (KL 0, its own hypervolume) on."""
        variant, run = VARIANTS[name], self.run_dir(name, lr, seed)
        self.train(name, seed, lr)
        if variant.kind == "fit":
            reports = [read(f) for f in sorted((run / "evaluation").glob("epoch_*_step_*.json"))]
        elif variant.kind == "fixed":
            per_point = [[read(f) for f in sorted((policy_run / "evaluation").glob("epoch_*_step_*.json"))]
                         for policy_run in point_runs(run)]
            reports = [fixed_report(list(points), self.steps) for points in zip(*per_point)]
        else:  # the soup of the experts' checkpoints nearest each evaluation of a fit, evaluated once each
            experts, n = self._experts(name, seed, lr), self.num_objectives
            saved = [int(f.stem.rsplit("step=", 1)[1])
                     for f in (experts / "expert0" / "checkpoints").glob("*step=*.ckpt")]
            interval = self._interval(self.steps)
            # a fit evaluates at step s; the experts together are there at s / n steps each (ties: the later step);
            # or every checkpoint the experts saved, down to the lower KL of their first ones
            steps = sorted(set(saved) if name in self.every_checkpoint else
                           {min(saved, key=lambda t: (abs(t - s / n), -t))
                            for s in range(interval, self.steps + 1, interval)} if saved else set())
            reports = []
            for step in steps:
                save = run / "path" / f"step{step}"
                if (save / "evaluation" / "validate.json").exists():
                    reports.append(read(save / "evaluation" / "validate.json"))
                elif step == self.steps // n:  # the experts' last checkpoints: the soup the training evaluated
                    reports.append(read(run / variant.done))
                else:
                    checkpoints = [next((experts / f"expert{i}" / "checkpoints").glob(f"*step={step}.ckpt"))
                                   for i in range(n)]
                    reports.append(self._soup(name, self._common(name, seed, lr, save), "validate", checkpoints))
        if not reports:
            return []
        reports = [self._measured(r) for r in reports]
        return [(0.0, reports[0]["reference_hypervolume"])] + [(sampled_kl(r), r["hypervolume"]) for r in reports]

    def _measured(self, report: dict) -> dict:
        """``report`` as the comparisons read it: from ``ref_point`` when the study sets one."""
        return report if self.ref_point is None else rebased(report, self.ref_point)


def rebased(report: dict, ref_point: Sequence[float]) -> dict:
    """``report`` with its hypervolumes measured from ``ref_point`` instead of its own point (the study's fixed one)."""
    return rebase_report(report, ref_point, "the study's fixed point")


def fixed_report(points: list[dict], steps: int) -> dict:
    """The front of the fixed-weighting policies as one grid report, with the keys of every other.

    Args:
        points: the G policies' grid reports, policy g trained at the grid's weighting g (all on the same prompts,
            grid, reference policy and reference point).
        steps: training steps of each policy.
    """
    first, own = points[0], range(len(points))
    parameters = first.get("parameters", {})

    def column(key: str) -> torch.Tensor:  # each policy's value at its own weighting
        return torch.tensor([points[g][key][g] for g in own], dtype=torch.float64)

    # per-point columns of the newer reports (per_prompt_rewards: policy g's prompts at its own weighting g)
    columns = {key: column(key) for key in ("rewards_se", "kl_se", "greedy_log_ratio", "per_prompt_rewards")
               if all(key in p for p in points)}
    if len({p.get("prompts_sha256") for p in points}) > 1:
        raise ValueError("the fixed-weighting policies were evaluated on different prompts (prompts_sha256 differ)")
    grid = torch.tensor(first["grid"], dtype=torch.float64)
    if "per_prompt_rewards" in columns and all("reference_per_prompt_rewards" in p for p in points):
        # one reference policy on the same prompts for all G: the vertex gains' paired SE as any report has it
        reference_rows = torch.tensor(first["reference_per_prompt_rewards"], dtype=torch.float64)
        columns["reference_per_prompt_rewards"] = reference_rows
        columns["vertex_gain_se"] = vertex_gain_standard_error(grid, columns["per_prompt_rewards"], reference_rows)
    shared = {key: first[key] for key in ("prompts_sha256", "evaluation") if key in first}
    return grid_report(
        first["objectives"],
        grid,
        column("rewards"),
        column("kl"),
        torch.tensor(first["reference_rewards"], dtype=torch.float64),
        torch.tensor(first["ref_point"], dtype=torch.float64),
        ref_point_from=first.get("ref_point_from", "not recorded"),  # reports before it was recorded
        epoch=first["epoch"],
        step=steps * len(points),  # G policies, each with the full budget
        samples=[],  # G policies' responses do not make one policy's table of responses
        parameters={k: v * len(points) if k.endswith("_parameters") else v for k, v in parameters.items()},
        **columns,
        **shared,
    )


def at_kl(path: list[tuple[float, float]], budget: float) -> float:
    """Hypervolume where the (KL, hypervolume) path first reaches KL ``budget``, linear between evaluations (nan if
    it never does, or if KL was not measured)."""
    for (kl0, hv0), (kl1, hv1) in zip(path, path[1:]):
        if math.isnan(kl0) or math.isnan(kl1):
            return math.nan
        if kl0 <= budget <= kl1 and kl1 > kl0:
            return hv0 + (hv1 - hv0) * (budget - kl0) / (kl1 - kl0)
        if kl1 == budget:
            return hv1
    return math.nan


def pooled(reports: list[dict]) -> dict:
    """One report whose per-prompt rewards are the seeds' mean (the same test prompts for every seed)."""
    if len({r.get("prompts_sha256") for r in reports}) > 1:
        raise ValueError("the seeds' test reports were evaluated on different prompts")
    rows = torch.tensor([r["per_prompt_rewards"] for r in reports], dtype=torch.float64).mean(0)  # (G, P, m)
    return {**reports[0], "per_prompt_rewards": rows.tolist(), "rewards": rows.mean(1).tolist()}


def fmt(x: float, spec: str = ".3f") -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def analyse(results: dict[str, dict], compare_to: str, num_resamples: int) -> dict:
    """Test statistics, bootstrap intervals and hypervolume at matched KL, from the runs' reports."""
    # the largest KL that every run's path reaches, so that each run has a hypervolume there
    # (a path with an unmeasured KL reaches nan: max() would skip the nan after the reference's KL 0 and say 0)
    reached = [math.nan if any(math.isnan(kl) for kl, _ in p) else max(kl for kl, _ in p)
               for r in results.values() for p in r["paths"] if p]
    budget = math.nan if not reached or any(math.isnan(x) for x in reached) else min(reached)
    reference = pooled(results[compare_to]["test"]) if compare_to in results else None
    for variant, r in results.items():
        hv = [t["hypervolume"] for t in r["test"]]
        # one seed measures no seed-to-seed spread: its std is undefined (null in results.json), not 0
        r["test_hypervolume"] = {"mean": statistics.fmean(hv), "std": statistics.stdev(hv) if len(hv) > 1 else None,
                                 "seeds": len(hv)}
        r["test_kl"] = statistics.fmean(sampled_kl(t) for t in r["test"])
        r["hypervolume_at_kl"] = statistics.fmean(at_kl(p, budget) for p in r["paths"]) if r["paths"] else math.nan
        both = pooled(r["test"])
        r["pooled_ci"] = bootstrap_ci(both, num_resamples)
        if reference is not None and variant != compare_to:
            r["versus"] = paired_bootstrap(both, reference, num_resamples)
        names = r["test"][0]["objectives"]
        r["vertex_gain"] = {n: statistics.fmean(t["vertex_gain"][n] for t in r["test"]) for n in names}
        r["steerability"] = {n: statistics.fmean(t["steerability"][n] for t in r["test"]) for n in names}
    first = next(iter(results.values()))["test"][0]
    return {"kl_budget": budget, "compare_to": compare_to, "ref_point": first["ref_point"],
            "ref_point_from": first.get("ref_point_from", "not recorded")}


def tables(results: dict[str, dict], summary: dict) -> str:
    names = next(iter(results.values()))["test"][0]["objectives"]
    ref = summary["compare_to"]
    head = ["variant", "lr", "test HV (mean ± std)", "test HV, seeds pooled [95% CI]", f"HV - {ref} [95% CI]",
            "test KL", f"val HV at KL {fmt(summary['kl_budget'])}", *[f"vertex gain {n}" for n in names],
            *[f"steer {n}" for n in names], "steps", "trainable", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, r in results.items():
        ci, vs = r["pooled_ci"], r.get("versus")
        params = r["test"][0].get("parameters", {})
        lines.append("| " + " | ".join([
            variant, f"{r['lr']:.3g}",
            f"{r['test_hypervolume']['mean']:.3f} " + (  # one seed measures no spread: not "± 0.000"
                "(1 seed)" if r["test_hypervolume"]["std"] is None else f"± {r['test_hypervolume']['std']:.3f}"),
            f"{ci['hypervolume']:.3f} [{ci['ci'][0]:.3f}, {ci['ci'][1]:.3f}]",
            "—" if vs is None else f"{vs['difference']:+.3f} [{vs['ci'][0]:+.3f}, {vs['ci'][1]:+.3f}]",
            fmt(r["test_kl"]), fmt(r["hypervolume_at_kl"]),
            *[f"{r['vertex_gain'][n]:+.3f}" for n in names], *[fmt(r["steerability"][n], "+.2f") for n in names],
            str(r["test"][0]["step"]), str(params.get("trainable_parameters", "?")), str(len(r["test"]))]) + " |")
    sweep_rates = sorted({lr for r in results.values() for lr in r["sweep"]})
    point = ", ".join(f"{x:.4g}" for x in summary["ref_point"])
    lines += ["", f"Hypervolumes from ({point}) ({summary['ref_point_from']}).", "",
              "Learning-rate sweep (validation hypervolume from each report's own point, first seed; chosen rate in "
              "bold):", "",
              "| variant | " + " | ".join(f"lr {lr:.3g}" for lr in sweep_rates) + " |",
              "|---|" + "---|" * len(sweep_rates)]
    for variant, r in results.items():
        cells = []
        for lr in sweep_rates:
            hv = r["sweep"].get(lr)
            cells.append("" if hv is None else (f"**{hv:.3f}**" if lr == r["lr"] else f"{hv:.3f}"))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kl_figure(results: dict[str, dict], budget: float):
    """Validation hypervolume against sampled KL over training, a line per run, the KL budget marked."""
    import matplotlib.pyplot as plt

    from clp_lightning.evaluation import plots  # selects the Agg backend

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (variant, r) in enumerate(results.items()):
        for s, path in enumerate(r["paths"]):
            ax.plot([p[0] for p in path], [p[1] for p in path], marker="o", ms=3, alpha=0.8,
                    **plots.series_style(k), label=variant if s == 0 else None)
    if not math.isnan(budget):
        ax.axvline(budget, color="grey", ls="--", lw=1, label=f"KL budget {budget:.3g}")
    ax.set_xlabel("KL to the reference (sampled, nats per response, mean over the grid)")
    ax.set_ylabel("hypervolume (validation prompts)")
    ax.legend(fontsize=7, handlelength=3)  # long enough to show dashes
    fig.tight_layout()
    return fig


def parse_variant_seeds(specs: Sequence[str], variants: Sequence[str], error) -> dict[str, list[int]]:
    """``["mix_lora=0,1"]`` -> ``{"mix_lora": [0, 1]}``; ``error`` (the parser's) on a malformed one or a variant
    the study does not run."""
    out = {}
    for spec in specs:
        name, _, seeds = spec.partition("=")
        try:
            out[name] = [int(s) for s in seeds.split(",")]
        except ValueError:
            error(f"--variant-seeds {spec!r}: expected VARIANT=SEED[,SEED...], e.g. mix_lora=0,1")
        if name not in variants:
            error(f"--variant-seeds {spec!r}: {name!r} is not among the variants this study runs {list(variants)}")
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/study", help="where runs, the tables and the figures go")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                        help="default: every variant the task supports")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the first one also runs the sweep")
    parser.add_argument("--steps", type=int, default=160, help="training steps per run (RS: all experts together)")
    parser.add_argument("--sft-steps", type=int, default=None, help="override the warm start's steps")
    parser.add_argument("--fixed-seeds", nargs="+", type=int, default=None,
                        help="seeds of the fixed-weighting baseline (G trainings per seed, no others: it is not "
                             "swept; default: the first of --seeds)")
    parser.add_argument("--grid-step", type=float, default=None,
                        help="override the evaluation grid's step (and so the number of fixed-weighting policies)")
    parser.add_argument("--task", default="quickstart", choices=list(TASKS), help="what the study runs on")
    parser.add_argument("--three-objectives", action="store_true", help="the same as --task three_objectives")
    parser.add_argument("--lr-factors", nargs="+", type=float, default=list(LR_FACTORS),
                        help="the sweep's rates, as multiples of each variant's base rate (1 alone: no sweep)")
    parser.add_argument("--evaluations", type=int, default=4, help="validation evaluations per training (KL path)")
    parser.add_argument("--test-prompts", type=int, default=64, help="held-out prompts of the test evaluation")
    parser.add_argument("--compare-to", default=None,
                        help="the variant the others are compared with, paired (default: rs_lora if run, else first)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--variant-seeds", nargs="+", default=[], metavar="VARIANT=SEEDS",
                        help="seeds of one variant instead of --seeds (or --fixed-seeds), e.g. mix_lora=0,1 (a swept "
                             "variant's sweep still runs at the first of --seeds; fixed, not swept, runs only these)")
    parser.add_argument("--every-checkpoint", nargs="+", default=[], metavar="VARIANT",
                        help="soups whose KL path evaluates every checkpoint their experts saved (more points, the "
                             "first at lower KL; one grid evaluation each) instead of the ones nearest each "
                             "evaluation of a fit")
    parser.add_argument("--sweep-only", action="store_true",
                        help="train the sweep's runs (first seed, every rate), print their validation hypervolumes "
                             "and stop: no rate is chosen, nothing is tested (to spread a sweep over processes)")
    args = parser.parse_args(argv)
    # refused here, not after the warm start: --evaluations 0 divides by zero, a rate of 0 or below is refused by
    # the optimizer, a bad grid step by the grid evaluation, and --steps -1 is Lightning's "no limit"
    for flag, value in (("--steps", args.steps), ("--sft-steps", args.sft_steps), ("--evaluations", args.evaluations),
                        ("--test-prompts", args.test_prompts), ("--bootstrap", args.bootstrap)):
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: expected an integer >= 1")
    if bad := [f for f in args.lr_factors if not (f > 0 and math.isfinite(f))]:
        parser.error(f"--lr-factors {bad}: expected positive finite multiples of the base rate")
    if args.grid_step is not None:
        try:
            simplex_grid(2, args.grid_step)
            if args.grid_step < 0.01:  # as GridEvaluation refuses it: reports name weightings to 2 decimals
                raise ValueError("expected a step >= 0.01")
        except ValueError as err:
            parser.error(f"--grid-step {args.grid_step}: {err}")
    if args.three_objectives and args.task not in ("quickstart", "three_objectives"):
        parser.error(f"--three-objectives is --task three_objectives; it contradicts --task {args.task}")
    task = TASKS["three_objectives" if args.three_objectives else args.task]
    if args.sft_steps is not None and task.warm_start is None:
        parser.error(f"--sft-steps {args.sft_steps}: --task {args.task} has no warm start (its config's model is the "
                     "starting policy)")
    variants = args.variants or list(task.variants or VARIANTS)
    if unsupported := [v for v in variants if task.variants is not None and v not in task.variants]:
        parser.error(f"--task {args.task} runs the variants {list(task.variants)}, not {unsupported}")
    variant_seeds = parse_variant_seeds(args.variant_seeds, variants, parser.error)
    # a seed given twice is one run counted twice: a spread of 0 between its copies, and more "seeds" than were run
    for flag, seeds in [("--seeds", args.seeds), ("--fixed-seeds", args.fixed_seeds or []),
                        *((f"--variant-seeds {v}=", s) for v, s in variant_seeds.items())]:
        if len(set(seeds)) != len(seeds):
            parser.error(f"{flag} {seeds}: a seed is repeated; each seed is one run")
    if not_soups := [v for v in args.every_checkpoint if v not in VARIANTS or VARIANTS[v].kind != "soup"]:
        parser.error(f"--every-checkpoint is for soups, not {not_soups}")
    # as --variant-seeds: a setting of a variant the study does not run would be ignored without a word
    if not_run := [v for v in args.every_checkpoint if v not in variants]:
        parser.error(f"--every-checkpoint {not_run}: not among the variants this study runs {variants}")
    if args.fixed_seeds is not None and "fixed" not in variants:
        parser.error(f"--fixed-seeds {args.fixed_seeds}: the study does not run the fixed-weighting baseline "
                     f"(variants {variants})")
    if args.compare_to is not None and args.compare_to not in variants:  # its column would read "—" throughout
        parser.error(f"--compare-to {args.compare_to}: not one of the variants this study runs, {variants}")
    out = Path(args.out)
    sft = None if task.warm_start is None else out / "sft" / "model"
    # GridEvaluation is the last callback of the task configs; jsonargparse applies init_args to the last list item
    grid = (f"--trainer.callbacks.init_args.grid_step={args.grid_step}",) if args.grid_step is not None else ()
    study = Study(out, sft, [CONF / c for c in task.configs], args.steps, (*task.overrides, *grid), args.evaluations,
                  args.test_prompts, task.test_size, task.variant_rates, task.expert_evaluations, task.ref_point,
                  tuple(args.every_checkpoint))
    if args.steps < study.num_objectives and (soups := [v for v in variants if VARIANTS[v].kind == "soup"]):
        parser.error(f"--steps {args.steps}: {soups} split the step budget over {study.num_objectives} experts; "
                     f"expected >= {study.num_objectives}")
    # a run's directory names its variant, rate and seed, not these: a study resumed in the same --out with others
    # would take the reports of the first one's runs as its own (a soup's validation and every test is not redone)
    settings = {"task": "three_objectives" if args.three_objectives else args.task, "steps": args.steps,
                "evaluations": args.evaluations, "test_prompts": args.test_prompts, "grid_step": args.grid_step}
    recorded = out / "study.json"
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        if changed := [f"{k} {before.get(k)} -> {v}" for k, v in settings.items() if before.get(k) != v]:
            parser.error(f"--out {out} holds a study with other settings ({', '.join(changed)}): its runs would be "
                         "reused as this one's; choose another --out, or give the settings it was run with")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(recorded, settings)
    if sft is not None and not sft.exists():
        extra = [f"--trainer.max_steps={args.sft_steps}", f"--trainer.val_check_interval={args.sft_steps}"] \
            if args.sft_steps else []
        cli("fit", [CONF / task.warm_start], [f"--model.init_args.output_dir={sft}",
                                              f"--trainer.logger.init_args.save_dir={out}", *extra])
    fixed_seeds = args.fixed_seeds or args.seeds[:1]
    results: dict[str, dict] = {}
    for name in variants:
        seeds = variant_seeds.get(name) or (fixed_seeds if VARIANTS[name].kind == "fixed" else args.seeds)
        # a swept variant chooses its rate at the study's first seed, as every other; one that is not swept has only
        # its base rate, so its "sweep" is its own first seed's run (not another G trainings at a seed it omits)
        sweep_seed = args.seeds[0] if VARIANTS[name].sweep else seeds[0]
        sweep = {lr: study.train(name, sweep_seed, lr)["hypervolume"]
                 for lr in study.lrs(name, tuple(args.lr_factors))}
        if args.sweep_only:
            print(f"{name}, seed {sweep_seed}: validation hypervolume by rate "
                  + ", ".join(f"{lr:.3g}: {hv:.4f}" for lr, hv in sweep.items()))
            continue
        lr = max(sweep, key=sweep.get)
        results[name] = {"lr": lr, "sweep": sweep, "seeds": seeds,
                         "test": [study.test(name, s, lr) for s in seeds],
                         "paths": [study.path(name, s, lr) for s in seeds]}
    if args.sweep_only:
        return ""
    compare_to = args.compare_to or ("rs_lora" if "rs_lora" in results else variants[0])
    summary = analyse(results, compare_to, args.bootstrap)
    table = tables(results, summary)
    write_text_atomic(out / "table.md", table + "\n")  # a study killed while writing it leaves the old one whole
    write_json(out / "results.json", {"summary": summary, "variants": {
        v: {k: x for k, x in r.items() if k != "test"} | {"test_reports": [str(study.run_dir(v, r["lr"], s))
                                                                           for s in r["seeds"]]}
        for v, r in results.items()}}, default=str)
    save_figure_atomic(overlay_figure([r["test"][0] for r in results.values()], list(results)), out / "fronts.png",
                       dpi=100)
    save_figure_atomic(kl_figure(results, summary["kl_budget"]), out / "kl.png", dpi=100)
    print(table)
    print(f"tables: {out / 'table.md'}; numbers: {out / 'results.json'}; figures: {out / 'fronts.png'}, "
          f"{out / 'kl.png'}")
    return table


if __name__ == "__main__":
    main()
