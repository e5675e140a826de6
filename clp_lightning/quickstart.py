"""``clp quickstart``: the offline quick start, warm start then CLP, with a closing summary of the trade-off."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from clp_lightning.cli import CLPCLI, CONF_DIR

SUMMARY_WEIGHTINGS = ([1.0, 0.0], [0.5, 0.5], [0.0, 1.0])


def quickstart(argv: list[str] | None = None) -> dict:
    """Run ``conf/quickstart_sft.yaml`` then ``conf/quickstart.yaml`` and print each objective's mean reward at
    ``w = (1,0), (0.5,0.5), (0,1)``. Extra ``--set key=value`` pairs are passed to both stages' CLI (e.g.
    ``--set trainer.max_steps=20`` for a smoke run)."""
    parser = argparse.ArgumentParser(prog="clp quickstart", description=quickstart.__doc__)
    parser.add_argument("--run-dir", default="runs/quickstart", help="where logs, checkpoints and reports go")
    parser.add_argument("--sft-steps", type=int, default=None, help="override the warm start's max_steps")
    parser.add_argument("--rl-steps", type=int, default=None, help="override the CLP run's max_steps")
    parser.add_argument("--skip-sft", action="store_true", help="reuse an existing warm start in the run directory")
    args = parser.parse_args(argv)
    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # each stage's CLI gets its arguments explicitly
    try:
        return _run(args)
    finally:
        sys.argv = saved_argv


def _run(args: argparse.Namespace) -> dict:
    run = Path(args.run_dir)
    started = time.time()
    print(f"clp quickstart: run directory {run.resolve()}")
    sft_model = run / "sft" / "model"
    if not (args.skip_sft and sft_model.exists()):
        overrides = [f"--trainer.default_root_dir={run / 'sft'}", f"--trainer.logger.init_args.save_dir={run}",
                     f"--model.init_args.output_dir={sft_model}"]
        if args.sft_steps:
            overrides += [f"--trainer.max_steps={args.sft_steps}",
                          f"--trainer.val_check_interval={max(args.sft_steps // 2, 1)}"]
        CLPCLI(args=["fit", "--config", str(CONF_DIR / "quickstart_sft.yaml"), *overrides])
    overrides = [f"--trainer.default_root_dir={run / 'rl'}", f"--trainer.logger.init_args.save_dir={run}",
                 f"--model.init_args.policy.model_name_or_path={sft_model}"]
    if args.rl_steps:
        interval = max(args.rl_steps // 2, 1)
        overrides += [f"--trainer.max_steps={args.rl_steps}", f"--trainer.val_check_interval={interval}"]
    cli = CLPCLI(args=["fit", "--config", str(CONF_DIR / "quickstart.yaml"), *overrides])
    report_path = Path(cli.trainer.log_dir) / "evaluation" / "latest.json"
    report = json.loads(report_path.read_text())
    print_summary(report)
    print(f"\nfinished in {time.time() - started:.0f} s; TensorBoard: tensorboard --logdir {run}")
    print(f"checkpoints: {run / 'rl' / 'checkpoints'}; reports: {report_path.parent}")
    return report


def print_summary(report: dict) -> None:
    """Each objective's mean reward at a few weightings, from a grid-evaluation report."""
    names = report["objectives"]
    print("\nmean reward per objective at each weighting (validation prompts, greedy decoding):")
    print(f"  {'w':>12}  " + "  ".join(f"{n:>10}" for n in names))
    for target in SUMMARY_WEIGHTINGS:
        for w, rewards in zip(report["grid"], report["rewards"]):
            if all(abs(a - b) < 1e-6 for a, b in zip(w, target)):
                label = "(" + ", ".join(f"{x:g}" for x in w) + ")"
                print(f"  {label:>12}  " + "  ".join(f"{r:>10.4f}" for r in rewards))
    print(f"  {'reference':>12}  " + "  ".join(f"{r:>10.4f}" for r in report["reference_rewards"]))
    if "vertex_gain" in report:
        gain = ", ".join(f"{n} {v:+.4f}" for n, v in report["vertex_gain"].items())
        print(f"vertex gain (reward i at w = e_i minus the reference policy's): {gain}")
    steer = ", ".join(f"{n} {v:+.2f}" for n, v in report["steerability"].items())
    print(f"steerability (Spearman of w_i vs reward_i over the grid): {steer}")
    ref = [round(x, 4) for x in report["ref_point"]]
    print(f"hypervolume {report['hypervolume']:.4f} vs the reference policy's {report['reference_hypervolume']:.4f} "
          f"(reference point {ref})")
