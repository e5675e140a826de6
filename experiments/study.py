"""CLP variants against the baselines on the quick-start task, at equal total training steps, over seeds.

Every run starts from one warm start (conf/quickstart_sft.yaml) and is evaluated by the same grid evaluation.
Rewarded Soups (``rs_*``) splits the step budget across its m experts (each trained with the one-hot weighting of
its objective, only its own copies or adapters trained), then interpolates them without further training.
``mix_lora`` mixes the same LoRA experts' logits at decoding time (``sum_i w_i * logits_i``) instead.
``fixed`` trains one policy per grid weighting (the sampler fixed at that weighting, the full step budget each)
and takes each policy's point at its own weighting: the expensive upper reference, costing G times the budget.

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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from clp_lightning.callbacks import GridEvaluation  # noqa: E402
from clp_lightning.cli import CLPCLI, run_cli  # noqa: E402
from clp_lightning.compare import overlay_figure  # noqa: E402
from clp_lightning.conditioning.weights import simplex_grid  # noqa: E402
from clp_lightning.evaluation.metrics import pareto_steerability  # noqa: E402

CONF = ROOT / "conf"
# variant -> conditioning fragment; "rs_<mode>" is Rewarded Soups with that mode's copies, "mix_lora" mixes the
# rs_lora experts' logits, "fixed" is one attention-conditioned policy per grid weighting
VARIANTS = {
    "prompt": "prompt.yaml", "logits": "logits.yaml", "attention": "attention.yaml", "all": "all.yaml",
    "lora": "lora.yaml", "prompt_attention": "prompt_attention.yaml", "rs_lora": "lora.yaml",
    "rs_attention": "attention.yaml", "mix_lora": "lora.yaml", "fixed": "attention.yaml",
}
EVALUATION_ONLY = ("rs_", "mix_")  # variants whose grid report comes from `validate` of experts, not from a fit


def cli(subcommand: str | None, configs: list[Path], overrides: list[str]) -> CLPCLI:
    """Run ``clp <subcommand>`` in this process; with None, only build the model, data and trainer."""
    args = ([subcommand] if subcommand else []) + [a for c in configs for a in ("--config", str(c))] + overrides
    return run_cli(args, run=subcommand is not None)


def run_variant(variant: str, seed: int, steps: int, sft: Path, out: Path, task: list[Path],
                overrides: list[str] = ()) -> dict:
    """Train (or, for Rewarded Soups, train the experts and soup them) and return the last grid report."""
    run = out / variant / f"seed{seed}"
    done = run / "evaluation" / ("validate.json" if variant.startswith(EVALUATION_ONLY) else "latest.json")
    if variant == "fixed":
        done = run / "report.json"
    if done.exists():  # finished earlier: an interrupted study picks up where it stopped
        report = json.loads(done.read_text())
        return {**report, "step": steps} if variant.startswith(EVALUATION_ONLY) else report
    configs = [*task, CONF / "conditioning" / VARIANTS[variant]]
    num_objectives = 3 if any(c.name == "three_objectives.yaml" for c in task) else 2
    common = [f"--seed_everything={seed}", f"--model.init_args.policy.model_name_or_path={sft}",
              f"--model.init_args.weight_seed={seed}", f"--trainer.logger.init_args.save_dir={run}",
              "--trainer.logger.init_args.name=", "--trainer.enable_progress_bar=false", *overrides]
    if "lora" in variant:  # a frozen base with small adapters wants a larger step than full finetuning
        common.append("--model.init_args.optimizer.lr=2e-3")
    if variant == "fixed":
        return run_fixed(run, configs, common, steps)
    if variant.startswith(EVALUATION_ONLY):
        # only the experts' own copies / adapters train, so the soup is exactly their interpolation
        common.append("--model.init_args.policy.conditioning.train_shared=false")
        # mix_lora decodes with the rs_lora experts (trained once, shared by both variants)
        expert_run = out / ("rs_lora" if variant == "mix_lora" else variant) / f"seed{seed}"
        experts = []
        for i in range(num_objectives):
            checkpoint = expert_run / f"expert{i}" / "checkpoints" / "last.ckpt"
            if not checkpoint.exists():
                cli("fit", configs, common + [
                    f"--trainer.logger.init_args.save_dir={expert_run / f'expert{i}'}",
                    f"--trainer.max_steps={steps // num_objectives}",
                    f"--trainer.val_check_interval={steps // num_objectives}",
                    "--model.init_args.sampler.kind=one_hot", f"--model.init_args.sampler.index={i}"])
            experts.append(str(checkpoint))
        decoding = ["--model.init_args.decoding=logit_mixture"] if variant.startswith("mix_") else []
        soup = cli("validate", configs, common + decoding +
                   [f"--model.init_args.expert_checkpoints={json.dumps(experts)}"])
        report = json.loads((Path(soup.trainer.log_dir) / "evaluation" / "validate.json").read_text())
        report["step"] = steps  # the experts' steps together
        return report
    trained = cli("fit", configs, common + [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}"])
    return json.loads((Path(trained.trainer.log_dir) / "evaluation" / "latest.json").read_text())


def run_fixed(run: Path, configs: list[Path], common: list[str], steps: int) -> dict:
    """One policy per grid weighting, each trained at that weighting only; point g is policy g's rewards at g."""
    points, grid = [], _grid(configs, common)
    for g, weights in enumerate(grid):
        policy_run = run / f"point{g}"
        latest = policy_run / "evaluation" / "latest.json"
        if not latest.exists():
            # the policy is evaluated on the whole grid like the others; only its own weighting is kept
            cli("fit", configs, common + [
                f"--trainer.logger.init_args.save_dir={policy_run}", f"--trainer.max_steps={steps}",
                f"--trainer.val_check_interval={steps}", "--model.init_args.sampler.kind=fixed",
                f"--model.init_args.sampler.weights={json.dumps(weights)}"])
        points.append(json.loads(latest.read_text()))
    first = points[0]
    means = torch.tensor([p["rewards"][g] for g, p in enumerate(points)], dtype=torch.float64)
    summary = pareto_steerability(torch.tensor(first["grid"], dtype=torch.float64), means,
                                  ref_point=torch.tensor(first["ref_point"], dtype=torch.float64))
    report = {
        **{k: first[k] for k in ("objectives", "grid", "ref_point", "reference_rewards", "reference_hypervolume")},
        "step": steps * len(points),  # G policies, each with the full budget
        "rewards": means.tolist(),
        "kl": [p["kl"][g] for g, p in enumerate(points)],
        "front_mask": summary["front_mask"].tolist(),
        "hypervolume": float(summary["hypervolume"]),
        "steerability": dict(zip(first["objectives"], summary["spearman"].tolist())),
        "parameters": {k: v * len(points) if k.endswith("_parameters") else v
                       for k, v in first.get("parameters", {}).items()},
    }
    run.mkdir(parents=True, exist_ok=True)
    (run / "report.json").write_text(json.dumps(report, indent=2))
    return report


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
    seeds = {v: (args.fixed_seeds or args.seeds[:1]) if v == "fixed" else args.seeds for v in args.variants}
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
