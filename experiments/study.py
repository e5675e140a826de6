"""CLP variants against the baselines on the quick-start task, at equal total training steps, over seeds.

Every run starts from one warm start (conf/quickstart_sft.yaml) and is evaluated by the same grid evaluation. The
variants are the rows of ``VARIANTS``; their kind says how a run gets its grid report:

- ``fit``: one CLP policy trained on the weight distribution, the full step budget.
- ``soup``: Rewarded Soups. The step budget is split across m experts (each trained with the one-hot weighting of its
  objective, only its own copies or adapters trained), which are then combined without further training: their
  parameters interpolated (``rs_*``), or their logits mixed at decoding time (``mix_lora``: ``sum_i w_i * logits_i``,
  with the ``rs_lora`` experts).
- ``fixed``: one policy per grid weighting (the sampler fixed at that weighting, the full step budget each), each
  policy's point taken at its own weighting: the expensive upper reference, costing G times the budget.

    python experiments/study.py --out runs/study                                   # the full study
    python experiments/study.py --out runs/study --variants all lora rs_lora --seeds 0 --steps 20   # smallest
    python experiments/study.py --out runs/study3 --three-objectives                               # m = 3

Writes <out>/table.md (hypervolume mean +- std over seeds, steerability, training steps, parameters) and
<out>/fronts.png (one front per variant, seed 0), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from clp_lightning.callbacks import GridEvaluation  # noqa: E402
from clp_lightning.callbacks.grid_evaluation import grid_report  # noqa: E402
from clp_lightning.cli import CLPCLI, run_cli  # noqa: E402
from clp_lightning.compare import overlay_figure  # noqa: E402
from clp_lightning.conditioning.weights import simplex_grid  # noqa: E402

CONF = ROOT / "conf"


@dataclass(frozen=True)
class Variant:
    """One row of the study.

    Attributes:
        fragment: the conditioning config, under ``conf/conditioning/``.
        kind: how the run gets its grid report (see the module docstring): ``fit``, ``soup`` or ``fixed``.
        decoding: ``model.decoding`` when a soup is evaluated (None: the config's, parameter interpolation).
        lr: the optimizer's learning rate (None: the config's).
        experts_of: the soup variant whose experts this soup reuses, trained once for both (None: its own).
    """

    fragment: str
    kind: Literal["fit", "soup", "fixed"] = "fit"
    decoding: str | None = None
    lr: float | None = None
    experts_of: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fit", "soup", "fixed"):
            raise ValueError(f"variant kind {self.kind!r} is not one of 'fit', 'soup', 'fixed'")
        if self.kind != "soup" and (self.decoding is not None or self.experts_of is not None):
            raise ValueError(f"decoding and experts_of are for soups, not for a {self.kind!r} variant")

    @property
    def done(self) -> str:
        """The report a finished run leaves under its directory: an interrupted study skips runs that have it."""
        return {"fit": "evaluation/latest.json", "soup": "evaluation/validate.json", "fixed": "report.json"}[self.kind]


LORA_LR = 2e-3  # a frozen base with small adapters wants a larger step than full finetuning
VARIANTS = {
    "prompt": Variant("prompt.yaml"),
    "logits": Variant("logits.yaml"),
    "attention": Variant("attention.yaml"),
    "all": Variant("all.yaml"),
    "lora": Variant("lora.yaml", lr=LORA_LR),
    "prompt_attention": Variant("prompt_attention.yaml"),
    "rs_lora": Variant("lora.yaml", "soup", lr=LORA_LR),
    "rs_attention": Variant("attention.yaml", "soup"),
    "mix_lora": Variant("lora.yaml", "soup", decoding="logit_mixture", lr=LORA_LR, experts_of="rs_lora"),
    "fixed": Variant("attention.yaml", "fixed"),
}


def cli(subcommand: str | None, configs: list[Path], overrides: list[str]) -> CLPCLI:
    """Run ``clp <subcommand>`` in this process; with None, only build the model, data and trainer."""
    args = ([subcommand] if subcommand else []) + [a for c in configs for a in ("--config", str(c))] + overrides
    return run_cli(args, run=subcommand is not None)


def run_variant(
    name: str, seed: int, steps: int, sft: Path, out: Path, task: list[Path], overrides: list[str] = ()
) -> dict:
    """Train the variant's policy (or experts, or fixed-weighting policies) and return its grid report."""
    variant = VARIANTS[name]
    run = out / name / f"seed{seed}"
    done = run / variant.done
    if done.exists():  # finished earlier: an interrupted study picks up where it stopped
        report = json.loads(done.read_text())
        return {**report, "step": steps} if variant.kind == "soup" else report
    configs = [*task, CONF / "conditioning" / variant.fragment]
    common = [
        f"--seed_everything={seed}",
        f"--model.init_args.policy.model_name_or_path={sft}",
        f"--model.init_args.weight_seed={seed}",
        f"--trainer.logger.init_args.save_dir={run}",
        "--trainer.logger.init_args.name=",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ]
    if variant.lr is not None:
        common.append(f"--model.init_args.optimizer.lr={variant.lr}")
    if variant.kind == "fixed":
        return run_fixed(run, configs, common, steps)
    if variant.kind == "soup":
        experts = out / (variant.experts_of or name) / f"seed{seed}"
        return run_soup(configs, common, steps, experts, variant.decoding)
    trained = cli("fit", configs, common + [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}"])
    return json.loads((Path(trained.trainer.log_dir) / "evaluation" / "latest.json").read_text())


def run_soup(configs: list[Path], common: list[str], steps: int, experts: Path, decoding: str | None) -> dict:
    """Train one expert per objective under ``experts`` (unless already there), then validate their combination."""
    # only the experts' own copies / adapters train, so the soup is exactly their interpolation
    common = common + ["--model.init_args.policy.conditioning.train_shared=false"]
    num_objectives = 3 if any(c.name == "three_objectives.yaml" for c in configs) else 2
    checkpoints = []
    for i in range(num_objectives):
        checkpoint = experts / f"expert{i}" / "checkpoints" / "last.ckpt"
        if not checkpoint.exists():
            expert = [
                f"--trainer.logger.init_args.save_dir={experts / f'expert{i}'}",
                f"--trainer.max_steps={steps // num_objectives}",
                f"--trainer.val_check_interval={steps // num_objectives}",
                "--model.init_args.sampler.kind=one_hot",
                f"--model.init_args.sampler.index={i}",
            ]
            cli("fit", configs, common + expert)
        checkpoints.append(str(checkpoint))
    decoded = [] if decoding is None else [f"--model.init_args.decoding={decoding}"]
    combined = f"--model.init_args.expert_checkpoints={json.dumps(checkpoints)}"
    validated = cli("validate", configs, [*common, *decoded, combined])
    report = json.loads((Path(validated.trainer.log_dir) / "evaluation" / "validate.json").read_text())
    report["step"] = steps  # the experts' steps together
    return report


def run_fixed(run: Path, configs: list[Path], common: list[str], steps: int) -> dict:
    """One policy per grid weighting, each trained at that weighting only; point g is policy g's rewards at g."""
    points, grid = [], _grid(configs, common)
    for g, weights in enumerate(grid):
        policy_run = run / f"point{g}"
        latest = policy_run / "evaluation" / "latest.json"
        if not latest.exists():
            # the policy is evaluated on the whole grid like the others; only its own weighting is kept
            policy = [
                f"--trainer.logger.init_args.save_dir={policy_run}",
                f"--trainer.max_steps={steps}",
                f"--trainer.val_check_interval={steps}",
                "--model.init_args.sampler.kind=fixed",
                f"--model.init_args.sampler.weights={json.dumps(weights)}",
            ]
            cli("fit", configs, common + policy)
        points.append(json.loads(latest.read_text()))
    report = fixed_report(points, steps)
    run.mkdir(parents=True, exist_ok=True)
    (run / "report.json").write_text(json.dumps(report, indent=2))
    return report


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

    return grid_report(
        first["objectives"],
        torch.tensor(first["grid"], dtype=torch.float64),
        column("rewards"),
        column("kl"),
        torch.tensor(first["reference_rewards"], dtype=torch.float64),
        torch.tensor(first["ref_point"], dtype=torch.float64),
        ref_point_from=first.get("ref_point_from", "not recorded"),  # reports before it was recorded
        epoch=first["epoch"],
        step=steps * len(points),  # G policies, each with the full budget
        samples=[],  # G policies' responses do not make one policy's table of responses
        parameters={k: v * len(points) if k.endswith("_parameters") else v for k, v in parameters.items()},
    )


def _grid(configs: list[Path], common: list[str]) -> list[list[float]]:
    """The evaluation grid the configs set up: the GridEvaluation callback's step over the task's objectives."""
    built = cli(None, configs, common)
    step = next(c.grid_step for c in built.trainer.callbacks if isinstance(c, GridEvaluation))
    return simplex_grid(built.model.num_objectives, step).tolist()


def summarise(results: dict[str, list[dict]]) -> str:
    names = next(iter(results.values()))[0]["objectives"]
    head = ["variant", "hypervolume (mean ± std)", *[f"steer {n}" for n in names], "steps", "trainable", "total"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, reports in results.items():
        hv = [r["hypervolume"] for r in reports]
        std = statistics.stdev(hv) if len(hv) > 1 else 0.0
        steer = [statistics.fmean(r["steerability"][n] for r in reports) for n in names]
        params = reports[0].get("parameters", {})
        lines.append("| " + " | ".join([
            variant, f"{statistics.fmean(hv):.3f} ± {std:.3f} (n={len(hv)})" if len(hv) > 1 else f"{hv[0]:.3f} (n=1)",
            *["nan" if math.isnan(s) else f"{s:+.2f}" for s in steer],
            str(reports[0]["step"]), str(params.get("trainable_parameters", "?")),
            str(params.get("total_parameters", "?"))]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/study", help="where runs, the table and the figure go")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=160, help="training steps per variant (RS: all experts)")
    parser.add_argument("--sft-steps", type=int, default=None, help="override the warm start's steps")
    parser.add_argument("--fixed-seeds", nargs="+", type=int, default=None,
                        help="seeds of the fixed-weighting baseline (G trainings per seed; default: the first seed)")
    parser.add_argument("--grid-step", type=float, default=None,
                        help="override the evaluation grid's step (and so the number of fixed-weighting policies)")
    parser.add_argument("--three-objectives", action="store_true",
                        help="add faithfulness as a third objective (conf/tasks/three_objectives.yaml)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    sft = out / "sft" / "model"
    if not sft.exists():
        extra = [f"--trainer.max_steps={args.sft_steps}", f"--trainer.val_check_interval={args.sft_steps}"] \
            if args.sft_steps else []
        cli("fit", [CONF / "quickstart_sft.yaml"], [f"--model.init_args.output_dir={sft}",
                                                    f"--trainer.logger.init_args.save_dir={out}", *extra])
    task = [CONF / "quickstart.yaml"] + ([CONF / "tasks" / "three_objectives.yaml"] if args.three_objectives else [])
    # GridEvaluation is the last callback of the task configs; jsonargparse applies init_args to the last list item
    grid = [f"--trainer.callbacks.init_args.grid_step={args.grid_step}"] if args.grid_step else []
    fixed_seeds = args.fixed_seeds or args.seeds[:1]
    seeds = {v: fixed_seeds if VARIANTS[v].kind == "fixed" else args.seeds for v in args.variants}
    results = {v: [run_variant(v, s, args.steps, sft, out, task, grid) for s in seeds[v]] for v in args.variants}
    table = summarise(results)
    (out / "table.md").write_text(table + "\n")
    first = [reports[0] for reports in results.values()]
    overlay_figure(first, list(results)).savefig(out / "fronts.png", dpi=100)
    print(table)
    print(f"table: {out / 'table.md'}; figure: {out / 'fronts.png'}")
    return table


if __name__ == "__main__":
    main()
