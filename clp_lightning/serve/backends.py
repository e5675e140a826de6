"""What ``clp serve`` serves: a trained policy behind three calls, from a checkpoint or an exported directory.

A backend has ``objectives`` (the names, one per weight), ``generate(prompt, weights) -> {"response", "rewards"}``
for one prompt at one weighting ``(m,)`` (greedy decoding, so a weighting always gives the same response), and
``front()``: what the page draws of the last grid evaluation's report (the JSON that
:class:`~clp_lightning.callbacks.GridEvaluation` writes), or None. The HTTP layer knows nothing else about models.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from clp_lightning.checks import is_number
from clp_lightning.config import GenerationSettings
from clp_lightning.evaluation.reports import read_report as read_report_file

log = logging.getLogger(__name__)
# what the page draws of a report (it also holds samples and per-prompt rewards, which the page does not need)
FRONT_KEYS = ("objectives", "grid", "rewards", "front_mask", "hypervolume", "reference_rewards", "epoch", "step")


class Backend(Protocol):
    """The interface the server talks to."""

    objectives: list[str]
    alpha_range: tuple[float, float] | None  # the KL strengths a policy conditioned on alpha was trained on

    def generate(self, prompt: str, weights: Tensor, alpha: float | None = None) -> dict[str, Any]:
        """The greedy response to ``prompt`` at ``weights`` ``(m,)`` (and KL strength ``alpha``, default the low end
        of ``alpha_range``) and its rewards ``{objective: value}``."""
        ...

    def front(self) -> dict[str, Any] | None:
        """The last grid evaluation's front (see :func:`read_report`), or None when there is none."""
        ...


def read_report(path: Path, objectives: list[str]) -> dict[str, Any] | None:
    """The parts of the grid evaluation report at ``path`` that the page draws, or None (with a warning) when it is
    missing, unreadable or not a front over ``objectives``.

    The report only decorates the page, so a bad one must not stop the server; it is untrusted input, read as JSON.
    """
    if not path.is_file():
        log.warning("no evaluation report at %s: the page will show no front", path)
        return None
    try:
        report = read_report_file(path)  # null where a number was NaN: refused below as NaN was
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("evaluation report %s is unreadable (%s): the page will show no front", path, err)
        return None
    m = len(objectives)
    if not (isinstance(report, dict) and report.get("objectives") == objectives and _matrix(report.get("grid"), m)
            and _matrix(report.get("rewards"), m) and len(report["grid"]) == len(report["rewards"])):
        log.warning("%s is not a grid evaluation over %s (objectives, grid and rewards): no front", path, objectives)
        return None
    # the optional parts decorate the front (the reference's cross, the filled points, the caption): one that is
    # malformed would skew or blank the whole plot (a reference of the wrong length sets every axis to NaN)
    g = len(report["grid"])
    well_formed = {
        "front_mask": lambda v: isinstance(v, list) and len(v) == g and all(isinstance(x, bool) for x in v),
        "reference_rewards": lambda v: _matrix([v], m),
        "hypervolume": lambda v: is_number(v) and math.isfinite(v),
        "epoch": lambda v: is_number(v) and isinstance(v, int), "step": lambda v: is_number(v) and isinstance(v, int),
    }
    if bad := [key for key, check in well_formed.items() if key in report and not check(report[key])]:
        log.warning("%s: leaving out %s, which the page cannot draw", path, ", ".join(bad))
    return {key: report[key] for key in FRONT_KEYS if key in report and key not in bad}


def _matrix(rows: Any, m: int) -> bool:
    return isinstance(rows, list) and all(
        isinstance(r, list) and len(r) == m and all(is_number(x) and math.isfinite(x) for x in r) for r in rows)


def score(rewards: Sequence[Any], prompt: str, response: str) -> dict[str, float]:
    """Each reward of ``rewards`` for one response; rewards that need a human reference are left out (none is given).
    """
    return {r.name: float(r([prompt], [response], None)[0]) for r in rewards if not r.needs_references}


class ModuleBackend:
    """A trained :class:`~clp_lightning.module.CLPModule` (a checkpoint loaded into the module its config builds).

    Generation and scoring go through :func:`clp_lightning.steer.steer_prompts`, the path ``clp steer`` takes, so a
    weighting gives the same response here as there.

    Args:
        module: the module, weights loaded, in eval mode.
        max_new_tokens: response length cap.
        report_path: the run's ``evaluation/latest.json``, when there is one.
    """

    def __init__(self, module: Any, max_new_tokens: int, report_path: Path | None = None) -> None:
        self.module = module
        self.objectives = list(module.objective_names)
        self.alpha_range = None if module.alpha_range is None else tuple(float(a) for a in module.alpha_range)
        self.generation = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False)
        check_served_lengths(module.policy, max_new_tokens)
        self.report = None if report_path is None else read_report(report_path, self.objectives)

    def generate(self, prompt: str, weights: Tensor, alpha: float | None = None) -> dict[str, Any]:
        from clp_lightning.steer import steer_prompts

        row = steer_prompts(self.module, [{"prompt": prompt}], [weights], self.generation, alpha=alpha)[0]
        return {"response": row["response"], "rewards": row["rewards"]}

    def front(self) -> dict[str, Any] | None:
        return self.report


def check_served_lengths(policy: Any, max_new_tokens: int) -> None:
    """Refuse to serve a policy whose longest prompt and response overflow its learned position table (GPT-2): every
    long request would end in a 500."""
    from clp_lightning.conditioning.lm import check_positions

    check_positions(policy.model, policy.max_prompt_length, max_new_tokens, "--max_new_tokens (or the policy's "
                    "max_prompt_length)")


class PolicyBackend:
    """An exported :class:`~clp_lightning.conditioning.policy.ConditionalPolicy`, with rewards when a config was given.

    Args:
        policy: the loaded policy.
        objectives: the objective names, one per weight.
        rewards: rewards to score responses with (may be empty).
        max_new_tokens: response length cap.
        report: the front from the directory's ``evaluation.json`` (:func:`read_report`), or None.
        alpha_range: the KL strengths a policy conditioned on alpha was trained on (required for one, ignored by
            others); it generates at the low end unless a request gives another.
    """

    def __init__(self, policy: Any, objectives: list[str], rewards: Sequence[Any], max_new_tokens: int,
                 report: dict[str, Any] | None = None, alpha_range: Sequence[float] | None = None) -> None:
        if len(objectives) != policy.num_objectives:
            raise ValueError(f"the policy takes {policy.num_objectives} weights but {len(objectives)} objectives were "
                             f"named ({objectives})")
        if policy.conditioning.condition_on_alpha and not alpha_range:
            raise ValueError("this policy is conditioned on alpha: give the range of KL strengths it was trained on")
        self.alpha_range = tuple(float(a) for a in alpha_range) if policy.conditioning.condition_on_alpha else None
        self.alpha = None if self.alpha_range is None else self.alpha_range[0]  # as grid evaluation and clp steer
        self.policy, self.rewards, self.report = policy, list(rewards), report
        self.objectives = list(objectives)
        self.generation = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False)
        check_served_lengths(policy, max_new_tokens)

    @torch.no_grad()
    def generate(self, prompt: str, weights: Tensor, alpha: float | None = None) -> dict[str, Any]:
        alpha = self.alpha if alpha is None or self.alpha is None else alpha  # ignored by a policy not conditioned
        [response] = self.policy.generate_text([prompt], weights, alpha, **self.generation.kwargs())
        return {"response": response, "rewards": score(self.rewards, prompt, response)}

    def front(self) -> dict[str, Any] | None:
        return self.report


def rewards_from_config(configs: Sequence[str]) -> list[Any]:
    """The rewards that ``model.init_args.rewards`` of the configs describes (the last config that sets it wins),
    built as LightningCLI builds them, without building the policy."""
    import yaml
    from jsonargparse import ArgumentParser

    from clp_lightning.rewards import Reward

    specs = None
    for config in configs:
        data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
        model = data.get("model") if isinstance(data, dict) else None
        model = (model.get("init_args", model) if isinstance(model, dict) else None) or {}
        if "rewards" in model:
            specs = model["rewards"]
    if specs is None:
        raise ValueError(f"no model.init_args.rewards in {list(configs)}: the config names the rewards to score with")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--rewards", type=list[Reward])
    # `instantiate` replaced `instantiate_classes` in jsonargparse 4.49; the project allows older releases
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return list(instantiate(parser.parse_object({"rewards": specs})).rewards)


def from_checkpoint(configs: Sequence[str], ckpt_path: str, overrides: Sequence[str],
                    max_new_tokens: int) -> ModuleBackend:
    """The module that ``configs`` build, with the checkpoint's weights; the front from the run's
    ``<ckpt dir>/../evaluation/latest.json``."""
    from clp_lightning.callbacks.checkpoint import read_checkpoint
    from clp_lightning.steer import check_configs, load_module, run_report

    check_configs(list(configs))
    checkpoint = read_checkpoint(ckpt_path)
    from clp_lightning.cli import parse_config
    from clp_lightning.export import check_config

    # the config's objectives and conditioning against the checkpoint's, from the parsed config alone (as clp steer
    # and clp export do): building the module first loads the policy and every reward model before the mismatch
    check_config(parse_config([a for c in configs for a in ("--config", c)] + list(overrides)), checkpoint, ckpt_path)
    module = load_module(list(configs), ckpt_path, list(overrides), checkpoint)
    return ModuleBackend(module, max_new_tokens, run_report(ckpt_path))


def from_directory(directory: str, configs: Sequence[str], max_new_tokens: int) -> PolicyBackend:
    """The policy exported to ``directory`` (by ``clp export``), scored with the rewards of ``configs`` if given; the
    front from the directory's ``evaluation.json``."""
    from clp_lightning.conditioning.policy import ConditionalPolicy
    from clp_lightning.conditioning.pretrained import read_clp_config

    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{directory!r} is not a directory: expected one written by `clp export`")
    if not (path / "clp_config.json").is_file():
        raise FileNotFoundError(f"{directory!r} has no clp_config.json: expected a directory written by `clp export`")
    from clp_lightning.conditioning.config import ConditioningConfig
    from clp_lightning.steer import check_configs

    check_configs(list(configs))
    # the directory's clp_config.json is untrusted and cheap to check: all of it before any model (the rewards' or the
    # policy's) loads, seconds to minutes
    record = read_clp_config(path)
    saved, conditioning = record["objective_names"], ConditioningConfig(**record["conditioning"])
    alpha_range = None
    if conditioning.condition_on_alpha:
        alpha_range = record["metadata"].get("alpha_range")
        if not (isinstance(alpha_range, list) and len(alpha_range) == 2 and all(is_number(a) for a in alpha_range)):
            raise ValueError(f"the policy in {directory!r} is conditioned on alpha but records no alpha_range (two "
                             f"numbers), got {alpha_range!r}: serve it from its checkpoint (clp serve --config CONF "
                             "--ckpt_path CKPT)")
        low, high = alpha_range  # untrusted: the default alpha of every request, and the page's slider
        if not (0 <= low <= high and math.isfinite(high)) or (conditioning.alpha_scale is not None and low <= 0):
            raise ValueError(f"the policy in {directory!r} records alpha_range {alpha_range!r}, not KL strengths "
                             "0 <= low <= high (low > 0 with alpha_scale) that it can have been trained on")
    rewards = rewards_from_config(configs) if configs else []
    if rewards and [r.name for r in rewards] != saved:  # weight i goes to the policy's objective i, whatever its name
        raise ValueError(f"the config's rewards {[r.name for r in rewards]} are not the objectives {saved} that the "
                         f"policy in {directory!r} was trained on, in that order: give the run's config")
    policy = ConditionalPolicy.from_pretrained(str(path))
    policy.eval()
    names = ([r.name for r in rewards] or policy.objective_names
             or [f"objective_{i + 1}" for i in range(policy.num_objectives)])
    return PolicyBackend(policy, names, rewards, max_new_tokens, read_report(path / "evaluation.json", names),
                         alpha_range)
