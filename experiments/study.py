"""CLP variants against Rewarded Soups on the quick-start task, at equal total training steps, over seeds.

Every run starts from one warm start (conf/quickstart_sft.yaml) and is evaluated by the same grid evaluation.
Rewarded Soups splits the step budget across its m experts (each trained with the one-hot weighting of its
objective, only its own copies or adapters trained), then interpolates them without further training.

    python experiments/study.py --out runs/study                                   # the full study
    python experiments/study.py --out runs/study --variants all lora rs_lora --seeds 0 --steps 20   # smallest

Writes <out>/table.md (hypervolume mean +- std over seeds, steerability, training steps, parameters) and
<out>/fronts.png (one front per variant, seed 0), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clp_lightning.cli import CLPCLI  # noqa: E402
from clp_lightning.compare import overlay_figure  # noqa: E402

CONF = ROOT / "conf"
# variant -> conditioning fragment; "rs_<mode>" is Rewarded Soups with that mode's copies
VARIANTS = {
    "prompt": "prompt.yaml", "logits": "logits.yaml", "attention": "attention.yaml", "all": "all.yaml",
    "lora": "lora.yaml", "prompt_attention": "prompt_attention.yaml", "rs_lora": "lora.yaml",
    "rs_attention": "attention.yaml",
}


def cli(subcommand: str, configs: list[Path], overrides: list[str]) -> CLPCLI:
    args = [subcommand] + [a for c in configs for a in ("--config", str(c))] + overrides
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        return CLPCLI(args=args)
    finally:
        sys.argv = saved


def run_variant(variant: str, seed: int, steps: int, sft: Path, out: Path, task: list[Path]) -> dict:
    """Train (or, for Rewarded Soups, train the experts and soup them) and return the last grid report."""
    run = out / variant / f"seed{seed}"
    done = run / "evaluation" / ("validate.json" if variant.startswith("rs_") else "latest.json")
    if done.exists():  # finished earlier: an interrupted study picks up where it stopped
        report = json.loads(done.read_text())
        return {**report, "step": steps} if variant.startswith("rs_") else report
    configs = [*task, CONF / "conditioning" / VARIANTS[variant]]
    num_objectives = 3 if any(c.name == "three_objectives.yaml" for c in task) else 2
    common = [f"--seed_everything={seed}", f"--model.init_args.policy.model_name_or_path={sft}",
              f"--model.init_args.weight_seed={seed}", f"--trainer.logger.init_args.save_dir={run}",
              "--trainer.logger.init_args.name=", "--trainer.enable_progress_bar=false"]
    if "lora" in variant:  # a frozen base with small adapters wants a larger step than full finetuning
        common.append("--model.init_args.optimizer.lr=2e-3")
    if variant.startswith("rs_"):
        # only the experts' own copies / adapters train, so the soup is exactly their interpolation
        common.append("--model.init_args.policy.conditioning.train_shared=false")
        experts = []
        for i in range(num_objectives):
            expert = cli("fit", configs, common + [
                f"--trainer.logger.init_args.save_dir={run / f'expert{i}'}",
                f"--trainer.max_steps={steps // num_objectives}",
                f"--trainer.val_check_interval={steps // num_objectives}",
                "--model.init_args.sampler.kind=one_hot", f"--model.init_args.sampler.index={i}"])
            experts.append(str(Path(expert.trainer.log_dir) / "checkpoints" / "last.ckpt"))
        soup = cli("validate", configs, common + [f"--model.init_args.expert_checkpoints={json.dumps(experts)}"])
        report = json.loads((Path(soup.trainer.log_dir) / "evaluation" / "validate.json").read_text())
        report["step"] = steps  # the experts' steps together
        return report
    trained = cli("fit", configs, common + [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}"])
    return json.loads((Path(trained.trainer.log_dir) / "evaluation" / "latest.json").read_text())


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
            variant, f"{statistics.fmean(hv):.3f} ± {std:.3f} (n={len(hv)})", *[f"{s:+.2f}" for s in steer],
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
    results = {v: [run_variant(v, s, args.steps, sft, out, task) for s in args.seeds] for v in args.variants}
    table = summarise(results)
    (out / "table.md").write_text(table + "\n")
    first = [reports[0] for reports in results.values()]
    overlay_figure(first, list(results)).savefig(out / "fronts.png", dpi=100)
    print(table)
    print(f"table: {out / 'table.md'}; figure: {out / 'fronts.png'}")
    return table


if __name__ == "__main__":
    main()
