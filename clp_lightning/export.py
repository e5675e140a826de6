"""``clp export``: a trained checkpoint as a self-contained directory in Hugging Face's layout.

    clp export --config conf/quickstart.yaml --ckpt_path runs/quickstart/rl/checkpoints/last.ckpt --out exported
    clp export --config conf/quickstart.yaml --ckpt_path ... --weights 0.7,0.3 --out exported-0.7-0.3

Without ``--weights``, the steerable policy: the base model and tokenizer, ``clp_config.json`` and
``conditioning.safetensors`` (:meth:`ConditionalPolicy.save_pretrained`; LoRA-CLP adds each objective's adapter in
peft's layout under ``adapters/``), the run's last grid evaluation (``evaluation.json``, ``front.png``) and a model
card (``README.md``). ``ConditionalPolicy.from_pretrained(DIR)`` loads it without the run or its config.

With ``--weights``, a plain ``transformers`` model at that weighting (parameters mixed, LoRA merged), with its
tokenizer, generation config (the base's, less the penalties, n-gram bans and beams the policy never applies) and a
short card that says what ``generate()`` of it does by default. With prompt conditioning its prompts need the
prefix the card gives (also ``clp_prompt_prefix`` in ``generation_config.json``).

The directory is what ``huggingface_hub.upload_folder`` would upload; nothing is uploaded. It is written next to
``--out`` and renamed into place, so an interrupted export leaves no half-written directory.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from clp_lightning.callbacks.checkpoint import CheckpointError, check_setup, check_writable, read_checkpoint
from clp_lightning.checks import is_integer
from clp_lightning.conditioning.config import ConditioningConfig
from clp_lightning.conditioning.lm import PROCESSORS_OFF
from clp_lightning.conditioning.policy import ConditionalPolicy
from clp_lightning.conditioning.pretrained import CLP_CONFIG
from clp_lightning.conditioning.weights import validate_weights
from clp_lightning.evaluation.generation import check_alpha
from clp_lightning.evaluation.reports import read_report
from clp_lightning.files import json_text, publish

EVALUATION = "evaluation.json"
FRONT = "front.png"
CARD = "README.md"


def main(argv: list[str] | None = None) -> Path:
    """Command-line entry point (``clp export``); returns the exported directory."""
    args = _parse_args(argv)
    from clp_lightning.steer import check_configs

    # every input is checked before any model is loaded: that takes seconds to minutes
    check_configs(args.config)
    if args.alpha is not None and args.weights is None:
        # the steerable policy takes alpha as an input when it generates: an export of it fixes none
        raise ValueError(f"--alpha {args.alpha} applies only with --weights (a plain model fixed at one weighting "
                         "and KL strength); the steerable policy takes alpha when it generates")
    out = Path(args.out)
    checkpoint = read_checkpoint(args.ckpt_path)
    from clp_lightning.cli import parse_config

    setup = parse_config([a for c in args.config for a in ("--config", c)] + args.set)
    inputs = [("checkpoint", args.ckpt_path), *(("--config", c) for c in args.config)]
    base = (_init_args(setup.get("model")).get("policy") or {}).get("model_name_or_path")
    if isinstance(base, str) and Path(base).expanduser().exists():  # a warm start's directory, read when it loads
        inputs.append(("base model", str(Path(base).expanduser())))  # "~/sft/model" loads from the home directory
    check_output(out, args.overwrite, inputs + ([("--evaluation", args.evaluation)] if args.evaluation else []))
    # first: the checkpoint's fields are untrusted, and this checks its objectives against the config's
    check_config(setup, checkpoint, args.ckpt_path)
    step = checkpoint.get("global_step", 0)
    if not is_integer(step) or step < 0:
        raise CheckpointError(f"checkpoint {args.ckpt_path!r} has global_step {step!r}; expected an integer >= 0")
    stored = checkpoint.get("clp") if isinstance(checkpoint.get("clp"), dict) else {}
    objectives = stored.get("objective_names")
    weights = None
    if args.weights is not None:
        weights = validate_weights(args.weights, None if objectives is None else len(objectives), name="--weights")
        if weights.dim() != 1:
            raise ValueError(f"--weights takes one weighting, got {args.weights!r}")
    decoding = _init_args(setup.get("model")).get("decoding")
    if decoding not in (None, "policy"):
        # the export holds the policy's parameters; a loader of it generates with them, never by mixing logits
        raise ValueError(f"the config evaluates with decoding={decoding!r}, which neither export format keeps: the "
                         "exported policy would generate differently from this run's evaluation; export with "
                         "decoding='policy' (drop that setting) to take out the conditioned policy itself")
    facts = run_facts(setup)
    if args.alpha is not None and not facts["condition_on_alpha"]:
        raise ValueError(f"--alpha {args.alpha} given, but the policy is not conditioned on alpha")
    if args.alpha is not None and facts["training"].get("alpha_range") is not None:
        check_alpha(args.alpha, facts["training"]["alpha_range"], name="--alpha")  # as the loaded module would
    report_path, report = (None, None) if weights is not None else find_evaluation(args.ckpt_path, args.evaluation,
                                                                                  objectives)

    from clp_lightning.steer import load_module

    module = load_module(args.config, args.ckpt_path, args.set, checkpoint)
    facts["step"] = int(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        if weights is None:
            export_policy(module, tmp, facts, report, report_path)
        else:
            alpha = module.evaluation_alpha(args.alpha) if facts["condition_on_alpha"] else None
            export_weighting(module, tmp, weights.tolist(), alpha, facts)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = "the steerable policy" if weights is None else f"the policy at w={','.join(f'{x:g}' for x in weights)}"
    print(f"exported {what} to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clp export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="the run's YAML config(s)")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `clp fit`")
    parser.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    parser.add_argument("--weights", default=None, help="export a plain model at this weighting, e.g. 0.7,0.3")
    parser.add_argument("--alpha", type=float, default=None,
                        help="with --weights, the KL strength of an alpha-conditioned policy (default: the low end of "
                             "alpha_range)")
    parser.add_argument("--evaluation", default=None,
                        help="grid report to include (default: <checkpoint dir>/../evaluation/latest.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--set", action="append", default=[], metavar="--KEY=VALUE",
                        help="extra override for the config, e.g. --set=--model.init_args.policy.seed=1")
    from clp_lightning.steer import attach_weights

    return parser.parse_args(attach_weights(argv))


# ------------------------------------------------------------------------------------------------ input checks


def check_output(out: Path, overwrite: bool, inputs: list[tuple[str, str]]) -> None:
    """Refuse an ``--out`` that is a file, a non-empty directory (without ``overwrite``), one that is or holds one of
    the ``(what, path)`` inputs (the checkpoint, a config, the evaluation report, a base model's directory: replacing
    it would delete them), or one whose parent is not writable."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out {str(out)!r} exists and is not empty: choose another directory or pass "
                                  "--overwrite to replace it")
        for what, path in inputs:
            if Path(out).resolve() in (Path(path).resolve(), *Path(path).resolve().parents):
                raise ValueError(f"--out {str(out)!r} holds the {what} {path!r}: --overwrite would delete it")
    check_writable(out.resolve().parent, "--out's parent directory")


def check_config(setup: dict[str, Any], checkpoint: dict[str, Any], ckpt_path: str) -> None:
    """Refuse a config whose objectives or conditioning differ from the checkpoint's, from the parsed config alone
    (no model built); the base model is compared when the module loads the checkpoint."""
    model = setup.get("model")
    class_path = model.get("class_path") if isinstance(model, dict) else None
    if not _is_clp_module(class_path):
        # a warm start's config beside the RL run's checkpoint matched it (no objectives or conditioning to differ),
        # and failed after the model had loaded, as an AttributeError
        raise ValueError(f"the config's model is {class_path!r}, not a CLP run's (clp_lightning.module.CLPModule): "
                         "clp export takes the config of the run that wrote --ckpt_path; a warm start (SFTModule) "
                         "already saved a plain Hugging Face model in its output_dir")
    stored = checkpoint.get("clp")
    init = _init_args(setup.get("model"))
    names = [_init_args(r).get("name") for r in init.get("rewards") or []]
    conditioning = (init.get("policy") or {}).get("conditioning")
    known = stored if isinstance(stored, dict) else {}
    current = {
        "objective_names": names if names and None not in names else known.get("objective_names"),
        "conditioning": ConditioningConfig(**conditioning).stored() if isinstance(conditioning, dict)
        else known.get("conditioning"),
        "base_model": known.get("base_model"),
    }
    check_setup(stored, current, f"checkpoint {str(ckpt_path)!r}")


def _is_clp_module(class_path: Any) -> bool:
    """Whether ``class_path`` (the parsed config's ``model.class_path``, already imported by the parse) names
    ``CLPModule`` or a subclass."""
    from clp_lightning.module import CLPModule

    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, CLPModule)


def find_evaluation(ckpt_path: str, explicit: str | None, objectives: list[str] | None
                    ) -> tuple[Path | None, dict[str, Any] | None]:
    """The grid report to export: ``explicit``, else the run's ``evaluation/latest.json`` next to the checkpoint's
    directory; ``(None, None)`` when there is none (an explicit one must exist and be readable)."""
    from clp_lightning.steer import run_report

    path = Path(explicit) if explicit else run_report(ckpt_path)
    if not path.is_file():
        if explicit:
            raise FileNotFoundError(f"--evaluation {explicit!r} not found")
        return None, None
    try:
        report = read_report(path)
        problem = None if isinstance(report, dict) and isinstance(report.get("grid"), list) and isinstance(
            report.get("rewards"), list) else "it has no grid and rewards"
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        report, problem = None, f"it is not JSON ({err})"
    if problem is None and objectives is not None and report.get("objectives") != objectives:
        problem = f"its objectives {report.get('objectives')} are not the checkpoint's {objectives}"
    if problem is not None:
        if explicit:
            raise ValueError(f"--evaluation {explicit!r} is not a grid-evaluation report of this run: {problem}")
        print(f"clp export: ignoring {path}: {problem}", file=sys.stderr)
        return None, None
    return path, report


def _init_args(spec: Any) -> dict[str, Any]:
    return (spec.get("init_args") or {}) if isinstance(spec, dict) else {}


def run_facts(setup: dict[str, Any]) -> dict[str, Any]:
    """What the card says about the run, from its parsed config."""
    init = _init_args(setup.get("model"))
    policy = init.get("policy") or {}
    data = setup.get("data") or {}
    rewards = []
    for spec in init.get("rewards") or []:
        args = _init_args(spec)
        settings = {k: v for k, v in args.items() if k not in ("name", "batch_size") and v is not None}
        rewards.append({"name": args.get("name"), "class": spec.get("class_path", "?") if isinstance(spec, dict)
                        else "?", "settings": settings})
    data_args = _init_args(data)
    return {
        "base_model": policy.get("model_name_or_path"),
        "condition_on_alpha": bool((policy.get("conditioning") or {}).get("condition_on_alpha")),
        "rewards": rewards,
        "data": {"class": data.get("class_path") if isinstance(data, dict) else None,
                 "source": {k: data_args[k] for k in ("path", "name", "data_files") if data_args.get(k)}},
        "training": {k: init.get(k) for k in ("kl_coef", "alpha_range", "samples_per_prompt", "sampler", "baseline")
                     if init.get(k) is not None},
    }


# ------------------------------------------------------------------------------------------------------ export


def export_policy(module: Any, directory: Path, facts: dict[str, Any], report: dict[str, Any] | None,
                  report_path: Path | None) -> None:
    """Write the steerable policy, its last evaluation and its card into ``directory``."""
    policy: ConditionalPolicy = module.policy
    metadata = {"kl_coef": module.kl_coef, "alpha_range": None if module.alpha_range is None
                else list(module.alpha_range), "step": facts["step"], "base_model": facts["base_model"]}
    policy.save_pretrained(str(directory), module.objective_names, metadata)
    extras = json.loads((directory / CLP_CONFIG).read_text())["files"]["extras"]
    figure = False
    if report is not None:
        (directory / EVALUATION).write_text(json_text(report, indent=2) + "\n")
        figure = _front_png(report, directory / FRONT)
    (directory / CARD).write_text(policy_card(policy, module.objective_names, facts, report, report_path, figure,
                                              directory, extras))


def export_weighting(module: Any, directory: Path, weights: list[float], alpha: float | None,
                     facts: dict[str, Any]) -> None:
    """Write the plain model at one weighting (with tokenizer, generation config and card) into ``directory``."""
    policy: ConditionalPolicy = module.policy
    prefix = policy.prompt_prefix(weights, alpha)
    model = policy.merged_model(weights, alpha)
    config = model.generation_config
    off = {k: v for k, v in PROCESSORS_OFF.items() if getattr(config, k, v) != v}
    if "num_beams" in off:  # beam-only settings without beams: transformers refuses to save the config
        off.update({k: None for k in ("early_stopping", "length_penalty") if getattr(config, k, None) is not None})
    # the card names what the artifact no longer does (None: the base left it unset, nothing was turned off)
    base = {k: getattr(config, k) for k in off if getattr(config, k, None) is not None}
    if off:  # the policy never applies the base's penalties, n-gram bans or beams: a plain generate must not either
        config.update(**off)
    if prefix:  # the model's prompts must start with it; kept where a loader of the directory can read it
        config.clp_prompt_prefix = prefix
    if off or prefix:
        # a config "from the model config" is rebuilt from config.json on loading, with the base's values and
        # without the prefix
        config._from_model_config = False
    model.save_pretrained(str(directory))
    policy.tokenizer.save_pretrained(str(directory))
    (directory / CARD).write_text(weighting_card(policy, module.objective_names, weights, alpha, prefix, facts,
                                                 generation_section(config, base)))


def _front_png(report: dict[str, Any], path: Path) -> bool:
    from clp_lightning.evaluation.plots import front_figure, plt

    try:
        fig = front_figure(report)
    except (KeyError, TypeError, ValueError, IndexError) as err:  # a report of an older or other shape
        print(f"clp export: no front figure ({type(err).__name__}: {err})", file=sys.stderr)
        return False
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------------- cards


def _hub_id(name: Any) -> str | None:
    """``name`` when it reads as a hub repository id (``org/model``), not a local path, ``tiny:`` or ``pkg:`` name."""
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or Path(name).exists():
        return None
    return name


def _front_matter(policy: ConditionalPolicy, facts: dict[str, Any], library: str, tags: list[str]) -> str:
    lines = ["---", f"library_name: {library}", "tags:"] + [f"  - {t}" for t in tags]
    base = _hub_id(facts.get("base_model"))
    if base:
        lines.append(f"base_model: {base}")
    dataset = _hub_id(facts["data"]["source"].get("path"))
    if dataset:
        lines += ["datasets:", f"  - {dataset}"]
    lines += [f"pipeline_tag: {'text-generation' if policy.kind == 'causal' else 'text2text-generation'}", "---", ""]
    return "\n".join(lines)


def _short(value: Any, limit: int = 100) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _training_section(policy: ConditionalPolicy, names: list[str], facts: dict[str, Any]) -> list[str]:
    data = facts["data"]
    source = ", ".join(f"{k}: `{_short(v)}`" for k, v in data["source"].items())
    lines = ["## Training", "",
             f"- Base model: `{facts.get('base_model')}` ({policy.kind}, `{type(policy.model).__name__}`)",
             f"- Data: `{data['class']}`" + (f" ({source})" if source else ""),
             f"- Conditioning: `{policy.conditioning.name}` (mode `{policy.conditioning.mode}`, options "
             f"`{_short(policy.mode.options())}`, prompt conditioning {'on' if policy.conditioning.prompt else 'off'}"
             + (", conditioned on the KL strength alpha" if policy.conditioning.condition_on_alpha else "") + ")",
             f"- Training steps: {facts.get('step', '?')}"]
    lines += [f"- {k}: `{_short(v)}`" for k, v in facts["training"].items()]
    lines += ["", "## Objectives", "", "| # | objective | reward | settings |", "|---|---|---|---|"]
    rewards = {r["name"]: r for r in facts["rewards"]}
    for i, name in enumerate(names):
        r = rewards.get(name, {"class": "?", "settings": {}})
        settings = ", ".join(f"{k}={_short(v, 60)}" for k, v in r["settings"].items())
        lines.append(f"| {i} | {name} | `{r['class']}` | {settings.replace('|', '/')} |")
    return lines + [""]


def _evaluation_section(report: dict[str, Any] | None, report_path: Path | None, figure: bool) -> list[str]:
    lines = ["## Evaluation", ""]
    if report is None:
        return lines + ["No grid evaluation was found next to the checkpoint (`evaluation/latest.json` in the run "
                        "directory), so none is included. `clp validate --config ... --ckpt_path ...` writes one.", ""]
    try:
        names, grid, rewards = report["objectives"], report["grid"], report["rewards"]
        front = report.get("front_mask") or [False] * len(grid)
        kl = report.get("kl") if "kl_se" in report else None  # older reports' "kl" was not a KL
        lines += [f"The policy at each weighting of a grid, from `{report_path.name}` of the run (step "
                  f"{report.get('step', '?')}), as `{EVALUATION}`: mean raw rewards over the validation prompts."]
        if figure:
            lines += ["", f"![Pareto front]({FRONT})"]
        lines += ["", "| w | " + " | ".join(names) + (" | KL |" if kl else " |") + " on front |",
                  "|---|" + "---|" * len(names) + ("---|" if kl else "") + "---|"]
        for g, (w, r) in enumerate(zip(grid, rewards)):
            cells = [",".join(f"{x:.2f}" for x in w)] + [f"{x:.4g}" for x in r] + ([f"{kl[g]:.4g}"] if kl else [])
            lines.append("| " + " | ".join(cells) + f" | {'yes' if front[g] else ''} |")
        lines += ["", f"- Hypervolume: {report['hypervolume']:.4g}"
                  + (f" (reference policy: {report['reference_hypervolume']:.4g})"
                     if "reference_hypervolume" in report else "")
                  + (f", reference point {report['ref_point']}" if "ref_point" in report else "")]
        if isinstance(report.get("vertex_gain"), dict):
            lines.append("- Vertex gains (reward i at w = e_i minus the reference policy's): "
                         + ", ".join(f"{k} {v:+.4g}" for k, v in report["vertex_gain"].items()))
        if isinstance(report.get("steerability"), dict):
            lines.append("- Steerability (Spearman correlation of w_i with reward i over the grid): "
                         + ", ".join(f"{k} {v:.3g}" for k, v in report["steerability"].items()))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        lines.append(f"The evaluation report could not be tabulated ({type(err).__name__}: {err}); see `{EVALUATION}`.")
    return lines + [""]


def policy_card(policy: ConditionalPolicy, names: list[str], facts: dict[str, Any], report: dict[str, Any] | None,
                report_path: Path | None, figure: bool, directory: Path, extras: list[str]) -> str:
    """The model card (``README.md``) of an exported steerable policy saved in ``directory`` with the mode's
    ``extras`` (paths relative to it)."""
    m = len(names)
    example = [round(1.0 / m, 2)] * (m - 1) + [round(1 - round(1.0 / m, 2) * (m - 1), 2)]
    alpha = ""
    if policy.conditioning.condition_on_alpha:
        low = (facts["training"].get("alpha_range") or [0.05])[0]
        alpha = f", alpha={low}"
    tags = ["clp", "multi-objective", "steerable", "conditional-language-policy", "reinforcement-learning",
            f"clp-{policy.conditioning.name}"]
    lines = [_front_matter(policy, facts, "clp-lightning", tags),
             f"# A steerable policy over {m} objectives: {', '.join(names)}", "",
             "One model whose trade-off between the objectives is an input: give it a weighting `w` (one non-negative "
             "number per objective, summing to 1) and it answers as trained for that trade-off. Trained with "
             "Conditional Language Policy (K. Wang et al., *Conditional Language Policy: A General Framework for "
             "Steerable Multi-Objective Finetuning*, Findings of EMNLP 2024) with clp-lightning.", ""]
    lines += _training_section(policy, names, facts)
    lines += _evaluation_section(report, report_path, figure)
    lines += ["## Use", "", "```python", "from clp_lightning.conditioning import ConditionalPolicy", "",
              'policy = ConditionalPolicy.from_pretrained("path/to/this/directory")  # no training code or run needed',
              f"# w: one weight per objective, in the order {names}",
              f'texts = policy.generate_text(["<your prompt>"], {example}{alpha}, max_new_tokens=48, do_sample=False)',
              "```", "",
              "A plain `transformers` model at one fixed weighting (parameters mixed, adapters merged) comes from the "
              "training checkpoint:", "",
              "```bash", "clp export --config CONFIG.yaml --ckpt_path CHECKPOINT.ckpt --weights "
              + ",".join(str(x) for x in example) + " --out DIR", "```", "",
              "## Files", "",
              "- `config.json`, `model.safetensors`, `generation_config.json`, tokenizer files: the base model without "
              "its conditioning (parameter mixing: the conditioned modules at the uniform mixture of their copies; "
              "LoRA-CLP: the frozen base)",
              "- `clp_config.json`: how the base is conditioned on `w` (mode, options, objectives, prompt template)",
              "- `conditioning.safetensors`: the conditioned parameters (one copy or adapter per objective)"]
    for extra in extras:
        lines.append(f"- `{extra}/`: objective {extra.rpartition('_')[2]}'s adapter alone, loadable with "
                     f"`peft.PeftModel.from_pretrained(base, DIR/{extra})` (the policy at that objective's vertex)"
                     if (directory / extra / "adapter_config.json").is_file() else f"- `{extra}`")
    if report is not None:
        lines.append(f"- `{EVALUATION}`" + (f", `{FRONT}`" if figure else "") + ": the run's last grid evaluation")
    return "\n".join(lines) + "\n"


SAMPLING = ("temperature", "top_k", "top_p")  # what a sampling generate() of the saved config reads


def generation_section(config: Any, turned_off: dict[str, Any]) -> list[str]:
    """What ``generate()`` of the exported model does by default, read from the ``config`` it saves, and which of the
    base model's settings (``turned_off``: their base values) the export removed because the policy never used them.
    """
    if getattr(config, "do_sample", False):
        settings = ", ".join(f"{k} {getattr(config, k)}" for k in SAMPLING if getattr(config, k, None) is not None)
        default = (f"samples ({settings or 'the library defaults'}), as the base model's generation config asks; "
                   "pass `do_sample=False` for the policy's greedy outputs")
    else:
        default = "decodes greedily: its outputs are the policy's at this weighting"
    lines = ["## Generation", "", f"`model.generate()` without further arguments {default} (`generation_config.json`)."]
    if turned_off:
        removed = ", ".join(f"`{k}` {_short(v, 40)}" for k, v in turned_off.items())
        lines += ["", f"The base model's generation config set {removed}. The policy was trained and evaluated "
                  "without them, so this export turns them off (`generation_config.json` holds the neutral values); "
                  "passing them to `generate()` gives outputs the policy never produced."]
    return lines + [""]


def weighting_card(policy: ConditionalPolicy, names: list[str], weights: list[float], alpha: float | None,
                   prefix: str, facts: dict[str, Any], generation: list[str] = ()) -> str:
    """The model card of a plain model exported at one weighting; ``generation``: its :func:`generation_section`."""
    w = ", ".join(f"{n} {x:g}" for n, x in zip(names, weights))
    tags = ["clp", "multi-objective", "steerable", "conditional-language-policy", "merged"]
    auto = "AutoModelForCausalLM" if policy.kind == "causal" else "AutoModelForSeq2SeqLM"
    lines = [_front_matter(policy, facts, "transformers", tags),
             f"# A CLP policy at the weighting {w}", "",
             "A plain `transformers` model: the steerable Conditional Language Policy trained on the objectives "
             f"{names}, fixed at w = {weights}" + (f" and KL strength alpha = {alpha:g}" if alpha is not None else "")
             + " (conditioned parameters mixed at w, LoRA adapters merged into the base).", ""]
    if prefix:
        where = " inside the user turn of the chat template" if policy.chat is not None else ""
        lines += ["**Prompts must start with the conditioning prefix** (also `clp_prompt_prefix` in "
                  f"`generation_config.json`){where}:", "", "```text", prefix, "```", ""]
    kept = "last" if policy.prompt_truncation_side == "left" else "first"
    lines += [f"The policy saw at most the {kept} {policy.max_prompt_length} tokens of a prompt (before the prefix); "
              "truncate longer prompts the same way to reproduce it.", ""]
    lines += list(generation)
    lines += _training_section(policy, names, facts)
    lines += ["## Use", "", "```python", f"from transformers import {auto}, AutoTokenizer", "",
              f'model = {auto}.from_pretrained("path/to/this/directory")',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
              f"prompt = {prefix!r} + \"<your prompt>\"" if prefix else 'prompt = "<your prompt>"']
    if policy.chat is not None:
        # the policy only ever saw its prompts as the user turn of the chat template (after its system message)
        system = ([f'    {{"role": "system", "content": {policy.system_prompt!r}}},']
                  if policy.system_prompt is not None else [])
        lines += ["messages = [", *system, '    {"role": "user", "content": prompt},', "]",
                  'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
                  "return_dict=True)",
                  "out = model.generate(**ids, max_new_tokens=48)", "```", "",
                  "The policy was trained on its prompts as the user turn of the tokenizer's chat template"
                  + (", after the system message above" if policy.system_prompt is not None else "")
                  + ", and stops at the template's end of turn: a prompt given without the template is not what it "
                  "learned to answer.", ""]
    else:
        lines += ['out = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=48)', "```", ""]
    return "\n".join(lines) + "\n"
