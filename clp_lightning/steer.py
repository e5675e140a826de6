"""``clp steer``: generate with a trained checkpoint at one or several weightings, with each response's rewards.

    clp steer --config conf/quickstart.yaml --ckpt_path runs/quickstart/rl/checkpoints/last.ckpt \\
        --weights 1,0 --weights 0.3,0.7 --prompts prompts.txt --output steered.jsonl

Prompts come from a text file (one per line; ``-`` or no file reads standard input) or a JSONL file with a
``prompt`` field (and optionally ``source`` and ``reference``, used by rewards that need them: text; a ``null``
reference is none).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from clp_lightning.callbacks.checkpoint import check_output_file, read_checkpoint
from clp_lightning.conditioning.weights import validate_weights
from clp_lightning.config import GenerationSettings
from clp_lightning.evaluation.generation import check_alpha
from clp_lightning.files import json_text, write_text_atomic


def read_prompts(path: str | None) -> list[dict[str, str]]:
    """Prompts from a text or JSONL file, or standard input."""
    try:
        if path in (None, "-"):  # read, not closed: standard input is the process's, not ours
            lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        else:
            with open(path, encoding="utf-8") as stream:
                lines = [line.rstrip("\n") for line in stream if line.strip()]
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {path!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if path is not None and path.endswith(".jsonl"):
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: row {number} is not JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}: row {number} has no 'prompt' text field")
            # found here, not after the model loaded: an empty prompt is no tokens, which a causal model cannot
            # continue (an IndexError inside generate), and JSON's "\ud800" escape is a lone surrogate, no text
            if not row["prompt"].strip():
                raise ValueError(f"{path}: row {number} has an empty 'prompt'; expected the post or article")
            try:
                row["prompt"].encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"{path}: row {number} has a 'prompt' with an unpaired UTF-16 surrogate at character "
                                 f"{err.start} ({row['prompt'][err.start]!r}), which is not text") from None
            # rewards read these as text; anything else would fail inside one, after the model loaded and generated
            for field, allowed in (("source", (str,)), ("reference", (str, type(None)))):
                if field in row and not isinstance(row[field], allowed):
                    raise ValueError(f"{path}: row {number} has a {field!r} field that is not text (got "
                                     f"{type(row[field]).__name__} {_short(row[field])}); expected a string"
                                     + (" or null (no reference)" if field == "reference" else ""))
            rows.append(row)
        return rows
    # one prompt per line; a literal "\n" in a line stands for a newline (TL;DR prompts span lines)
    return [{"prompt": line.replace("\\n", "\n")} for line in lines]


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def attach_weights(argv: list[str] | None, flag: str = "--weights") -> list[str]:
    """The command line (``sys.argv[1:]`` when None) with each ``flag`` value attached by ``=``: argparse would
    read ``--weights -1,2`` as an option, and attached it is the value it was meant as (and refused as one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return [f"{a}={argv[i + 1]}" if a == flag and i + 1 < len(argv) else a for i, a in enumerate(argv)
            if i == 0 or argv[i - 1] != flag]


def check_configs(configs: list[str]) -> None:
    """Every config file exists (checked before any model loads: loading takes seconds to minutes)."""
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config {config!r} not found")


def run_report(ckpt_path: str | Path) -> Path:
    """Where the run of a checkpoint (``<run>/checkpoints/<file>``) keeps its last grid evaluation."""
    return Path(ckpt_path).resolve().parent.parent / "evaluation" / "latest.json"


def load_module(config: list[str], ckpt_path: str, overrides: list[str], checkpoint: dict | None = None) -> Any:
    """Build the module from its config (no training) and load a checkpoint's trained weights into it.

    ``checkpoint`` is the already-read file, when the caller checked it before building anything.
    """
    from clp_lightning.cli import run_cli

    module = run_cli([a for c in config for a in ("--config", c)] + overrides, run=False).model
    return module.load_trained(ckpt_path, checkpoint).eval()


@torch.no_grad()
def steer_prompts(
    module: Any, rows: list[dict[str, str]], weightings: list[torch.Tensor], generation: GenerationSettings,
    score: bool = True, alpha: float | None = None,
) -> list[dict[str, Any]]:
    """Responses (and rewards) for every prompt at every weighting, through ``module.evaluate_weightings``.

    A reward that needs human references is left out when the prompts do not all come with one. ``alpha``: the KL
    strength for a policy conditioned on it (default: the low end of its ``alpha_range``).
    """
    prompts = [r["prompt"] for r in rows]
    out = module.evaluate_weightings({"prompt": prompts}, torch.stack(weightings), generation, score=False,
                                     alpha=alpha, log_ratio=False)  # no KL here: spare its two forward passes
    texts, rewards = out["texts"], {}
    if score:
        sources = [r.get("source", r["prompt"]) for r in rows] * len(weightings)
        references = [r.get("reference") for r in rows] * len(weightings)
        for reward in module.rewards:
            if reward.needs_references and None in references:
                continue  # no human reference given for these prompts
            refs = None if None in references else references
            rewards[reward.name] = reward(sources, texts, refs).tolist()
    # the KL strength an alpha-conditioned policy was given, as `clp serve` answers it
    given = {} if module.alpha_range is None else {"alpha": module.evaluation_alpha(alpha)}
    return [{"prompt": prompts[i % len(rows)], "weights": out["weights"][i].tolist(), **given, "response": text,
             "rewards": {name: values[i] for name, values in rewards.items()}}
            for i, text in enumerate(texts)]


def steer(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Command-line entry point (``clp steer``)."""
    parser = argparse.ArgumentParser(prog="clp steer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="the run's YAML config(s)")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `clp fit`")
    parser.add_argument("--weights", action="append", required=True,
                        help="a weighting such as 0.3,0.7 (repeat for several)")
    parser.add_argument("--prompts", default=None, help="text (one prompt per line) or JSONL file; default stdin")
    parser.add_argument("--output", default=None, help="write JSONL here instead of printing")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--alpha", type=float, default=None,
                        help="KL strength for a policy conditioned on it, within its alpha_range (default: the "
                             "range's low end, as in evaluation)")
    parser.add_argument("--no_score", action="store_true", help="skip scoring the responses")
    parser.add_argument("--set", action="append", default=[], metavar="--KEY=VALUE",
                        help="extra override for the config, e.g. --set=--model.init_args.policy.seed=1")
    args = parser.parse_args(attach_weights(argv))
    # every input is checked before any model is loaded: that takes seconds to minutes
    check_configs(args.config)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    checkpoint = read_checkpoint(args.ckpt_path)
    from clp_lightning.cli import parse_config
    from clp_lightning.export import check_config

    # the config's objectives and conditioning against the checkpoint's, from the parsed config alone (as clp export
    # does): building the module first loads the policy and every reward model before the mismatch is found
    setup = parse_config([a for c in args.config for a in ("--config", c)] + args.set)
    check_config(setup, checkpoint, args.ckpt_path)
    if args.alpha is not None:  # as the module's evaluation_alpha will, but before the module is built
        alpha_range = ((setup.get("model") or {}).get("init_args") or {}).get("alpha_range")
        if alpha_range is None:
            raise ValueError(f"--alpha {args.alpha} given, but the config's policy is not conditioned on alpha (no "
                             "model.init_args.alpha_range)")
        check_alpha(args.alpha, tuple(alpha_range), name="--alpha")
    objectives = (checkpoint.get("clp") or {}).get("objective_names")
    weightings = [validate_weights(w, None if objectives is None else len(objectives), name="--weights")
                  for w in args.weights]
    if any(w.dim() != 1 for w in weightings):
        raise ValueError(f"--weights takes one weighting per flag, got {args.weights}")
    rows = read_prompts(args.prompts)
    if not rows:
        raise ValueError(f"no prompts in {args.prompts or 'standard input'!r}")
    if args.output:
        check_output_file(args.output, "--output", "JSONL")  # found only at the end otherwise, after generating
    module = load_module(args.config, args.ckpt_path, args.set, checkpoint)
    weightings = [validate_weights(w, module.num_objectives, name="--weights") for w in weightings]
    generation = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    results = steer_prompts(module, rows, weightings, generation, score=not args.no_score, alpha=args.alpha)
    lines = [json_text(r) for r in results]  # a NaN reward as null
    if args.output:
        # a crash mid-write keeps the file that was there, never half of the new one
        write_text_atomic(Path(args.output), "\n".join(lines) + "\n")
        print(f"wrote {len(lines)} responses to {args.output}")
    else:
        for r in results:
            rewards = ", ".join(f"{k} {v:.3f}" for k, v in r["rewards"].items())
            alpha = f" alpha={r['alpha']:g}" if "alpha" in r else ""  # as the JSONL rows record it
            print(f"w={r['weights']}{alpha}: {r['response']!r}" + (f"  [{rewards}]" if rewards else ""))
    return results
