"""``clp quickstart``: the offline quick start, warm start then CLP, with a closing summary of the trade-off."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path

from clp_lightning.cli import CONF_DIR, run_cli
from clp_lightning.evaluation.reports import read_report

SUMMARY_WEIGHTINGS = ([1.0, 0.0], [0.5, 0.5], [0.0, 1.0])


# CPU numerics the quick start pins, so that its numbers do not depend on the machine: the same kernels (ATen's AVX2
# ones, not AVX-512 where the CPU has it) and the same MKL code path (its AVX2 branch, on Intel and AMD alike) on every
# x86-64 CPU with AVX2. Values already in the environment win.
PINNED_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def quickstart(argv: list[str] | None = None) -> dict:
    """Run ``conf/quickstart_sft.yaml`` then ``conf/quickstart.yaml`` and print each objective's mean reward at
    ``w = (1,0), (0.5,0.5), (0,1)``. ``--sft-steps`` and ``--rl-steps`` shorten the stages (a smoke run)."""
    parser = argparse.ArgumentParser(prog="clp quickstart", description=quickstart.__doc__)
    parser.add_argument("--run-dir", default="runs/quickstart", help="where logs, checkpoints and reports go")
    parser.add_argument("--sft-steps", type=int, default=None, help="override the warm start's max_steps")
    parser.add_argument("--rl-steps", type=int, default=None, help="override the CLP run's max_steps")
    parser.add_argument("--skip-sft", action="store_true", help="reuse an existing warm start in the run directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an earlier quick start's stages (sft/, rl/) in the run directory first")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (the numbers depend on it: 1, the default, gives the README's)")
    args = parser.parse_args(argv)
    for flag, value in (("--threads", args.threads), ("--sft-steps", args.sft_steps), ("--rl-steps", args.rl_steps)):
        if value is not None and value < 1:  # 0 would otherwise run the stage's full length
            parser.error(f"{flag} must be >= 1, got {value}")
    run = Path(args.run_dir)
    existing = next(path for path in (run, *run.parents) if path.exists())
    if not existing.is_dir():  # else named late, as a --trainer.default_root_dir the user never gave
        parser.error(f"--run-dir {str(run)!r}: {str(existing)!r} is a file, not a directory; choose another --run-dir")
    if args.skip_sft and not (run / "sft" / "model" / "config.json").exists():
        # running the warm start anyway would spend its minutes on what the user asked to skip
        parser.error(f"--skip-sft: {run / 'sft' / 'model'} holds no warm start (no config.json) to reuse; run once "
                     "without --skip-sft, or choose the --run-dir of an earlier quick start")
    args.run_sft = not args.skip_sft
    earlier = [stage for stage in [run / "sft"] * args.run_sft + [run / "rl"] if _holds_something(stage)]
    if earlier and not args.overwrite:
        parser.error(f"{', '.join(map(str, earlier))} already holds an earlier run: this one would mix its "
                     "checkpoints, reports and TensorBoard logs with that one's; pass --overwrite to delete it first, "
                     "or choose another --run-dir")
    for stage in earlier:
        if stage.is_dir():
            shutil.rmtree(stage)
        else:
            stage.unlink()
    return _run(args)


def _holds_something(path: Path) -> bool:
    """Whether ``path`` exists and is not an empty directory."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def pin_cpu_numerics(threads: int) -> dict[str, str | int]:
    """Fix what the quick start's floating-point results depend on besides the seed: the thread count, ATen's kernel
    set and MKL's code path (``PINNED_ENVIRONMENT``). Returns the settings in force.

    Both libraries read their variable when first used, which in ``clp quickstart`` is after this call; in a process
    that already ran torch code, the kernel set may already be fixed, and the returned value says which it is.
    """
    import torch

    for name, value in PINNED_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    torch.set_num_threads(threads)
    return {"threads": torch.get_num_threads(), "kernels": torch.backends.cpu.get_cpu_capability(),
            "MKL_CBWR": os.environ["MKL_CBWR"]}


def _run(args: argparse.Namespace) -> dict:
    run = Path(args.run_dir)
    started = time.time()
    numerics = pin_cpu_numerics(args.threads)
    print(f"clp quickstart: run directory {run.resolve()}; numerics: {numerics}")
    sft_model = run / "sft" / "model"
    if args.run_sft:
        overrides = [f"--trainer.default_root_dir={run / 'sft'}", f"--trainer.logger.init_args.save_dir={run}",
                     f"--model.init_args.output_dir={sft_model}"]
        if args.sft_steps is not None:
            overrides += [f"--trainer.max_steps={args.sft_steps}",
                          f"--trainer.val_check_interval={validation_interval(args.sft_steps)}"]
        run_cli(["fit", "--config", str(CONF_DIR / "quickstart_sft.yaml"), *overrides])
    overrides = [f"--trainer.default_root_dir={run / 'rl'}", f"--trainer.logger.init_args.save_dir={run}",
                 f"--model.init_args.policy.model_name_or_path={sft_model}"]
    if args.rl_steps is not None:
        overrides += [f"--trainer.max_steps={args.rl_steps}",
                      f"--trainer.val_check_interval={validation_interval(args.rl_steps)}"]
    cli = run_cli(["fit", "--config", str(CONF_DIR / "quickstart.yaml"), *overrides])
    report_path = Path(cli.trainer.log_dir) / "evaluation" / "latest.json"
    report = read_report(report_path)
    print_summary(report)
    print(f"\nfinished in {time.time() - started:.0f} s; TensorBoard: tensorboard --logdir {run}")
    print(f"checkpoints: {run / 'rl' / 'checkpoints'}; reports: {report_path.parent}")
    return report


def validation_interval(steps: int) -> int:
    """Steps between validations of a stage shortened to ``steps``: half-way and at the end, or only at the end
    when ``steps`` is odd. It divides ``steps``, so the last step is evaluated: the summary reads the last report,
    and ``steps // 2`` (2 for 5) would leave it describing step 4 of a policy trained for 5."""
    return steps // 2 if steps % 2 == 0 else steps


def print_summary(report: dict) -> None:
    """Each objective's mean reward at a few weightings, from a grid-evaluation report, and the KL to the reference
    there (when the report estimated it by sampling)."""
    names = report["objectives"]
    evaluation = report.get("evaluation", {})
    decoding = "sampled" if evaluation.get("generation", {}).get("do_sample") else "greedy"
    if evaluation.get("num_samples", 1) > 1:
        decoding += f", {evaluation['num_samples']} responses per prompt"
    print(f"\nmean reward per objective at each weighting (validation prompts, {decoding} decoding):")
    print(f"  {'w':>12}  " + "  ".join(f"{n:>10}" for n in names))
    kl = []
    for target in SUMMARY_WEIGHTINGS:
        for g, (w, rewards) in enumerate(zip(report["grid"], report["rewards"])):
            if all(abs(a - b) < 1e-6 for a, b in zip(w, target)):
                label = "(" + ", ".join(f"{x:g}" for x in w) + ")"
                print(f"  {label:>12}  " + "  ".join(f"{r:>10.4f}" for r in rewards))
                if "kl_se" in report and not math.isnan(report["kl"][g]):
                    kl.append(f"{label} {report['kl'][g]:.3f} ± {report['kl_se'][g]:.3f}")
    print(f"  {'reference':>12}  " + "  ".join(f"{r:>10.4f}" for r in report["reference_rewards"]))
    if kl:
        print(f"KL to the reference (nats, ± SE over prompts; {evaluation.get('kl_samples', '?')} sampled responses "
              f"per prompt): " + ", ".join(kl))
    if "vertex_gain" in report:
        se = report.get("vertex_gain_se", {})
        gain = ", ".join(f"{n} {v:+.4f}" + (f" ± {se[n]:.4f}" if n in se else "")
                         for n, v in report["vertex_gain"].items())
        paired = " ± paired SE over prompts" if se else ""
        print(f"vertex gain (reward i at w = e_i minus the reference policy's{paired}): {gain}")
    steer = ", ".join(f"{n} {v:+.2f}" for n, v in report["steerability"].items())
    print(f"steerability (Spearman of w_i vs reward_i over the grid): {steer}")
    ref = [round(x, 4) for x in report["ref_point"]]
    print(f"hypervolume {report['hypervolume']:.4f} vs the reference policy's {report['reference_hypervolume']:.4f} "
          f"(reference point {ref})")
