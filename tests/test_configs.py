"""Every YAML in ``conf/`` parses and validates through the real ``clp`` parser, without loading any model.

Real configs name hub models, so they are only parsed here: the parser checks keys, types and ``class_path``s and
resolves OmegaConf interpolation, and ``CLPModule`` runs its own checks of the composed model settings (it makes them
all before it loads a model, so it is built up to that point). Fragments (``conf/conditioning/``, ``conf/trainer/``)
are parsed on top of a base config, the way they are launched: ``clp fit --config <base> --config <fragment>``.
"""

from __future__ import annotations

import enum
import importlib
import re
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from jsonargparse import Namespace
from reward_helpers import HashedTextReward

from clp_lightning.cli import CLPCLI, CONF_DIR, main
from clp_lightning.conditioning.config import ConditioningConfig, PolicyConfig
from clp_lightning.config import GenerationSettings
from clp_lightning.module import CLPModule

REPO = CONF_DIR.parent
ALL_CONFIGS = sorted(CONF_DIR.rglob("*.yaml"))
FRAGMENT_DIRS = ("baselines", "conditioning", "tasks", "trainer")
# a fragment dir may hold one sub-folder per model with that model's presets (conditioning/smollm2/logits.yaml)
FRAGMENTS = [p for p in ALL_CONFIGS if p.parent.name in FRAGMENT_DIRS or p.parent.parent.name in FRAGMENT_DIRS]
STANDALONE = [p for p in ALL_CONFIGS if p not in FRAGMENTS]
BASE = CONF_DIR / "quickstart.yaml"
CLP_MODULE = "clp_lightning.module.CLPModule"


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


class _ParserReady(Exception):
    def __init__(self, parser: Any) -> None:
        super().__init__("parser built")
        self.parser = parser


class _ParserOnlyCLI(CLPCLI):
    """CLPCLI that stops once its parser is built: nothing is parsed, seeded or instantiated."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        raise _ParserReady(parser)


@pytest.fixture(scope="module")
def parser() -> Any:
    """The parser of ``clp`` (subcommands, omegaconf mode, subclass mode), built once for the module."""
    with pytest.raises(_ParserReady) as ready:
        _ParserOnlyCLI(args=[])
    return ready.value.parser


def parse(parser: Any, *configs: Path) -> Namespace:
    """``clp fit --config A --config B ...`` parsed and validated; returns the ``fit`` namespace."""
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    try:
        return parser.parse_args(args).fit
    except SystemExit as err:  # jsonargparse prints the reason to stderr, which pytest shows
        pytest.fail(f"{' '.join(args)} does not parse (exit {err.code}); see captured stderr")


def header(path: Path) -> str:
    """The comment block a config opens with."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


class _ChecksPassed(Exception):
    """Raised in place of loading the policy: every check CLPModule makes of its configuration has passed."""


def check_settings(cfg: Namespace) -> None:
    """Run the module's own validation on a parsed config, and build the callbacks' typed settings.

    CLPModule checks its whole configuration (rewards, alpha, sampler, generation, optimizer, decoding) before it
    loads a model, so it is constructed up to the policy's build, with stand-in rewards of the same names (the real
    ones would load hub models).
    """
    model = cfg.model
    if model.class_path != CLP_MODULE:
        return
    kwargs = model.init_args.as_dict()
    names = [r["init_args"].get("name") or f"reward{i}" for i, r in enumerate(kwargs["rewards"])]
    kwargs["rewards"] = [HashedTextReward(name) for name in names]
    with mock.patch.object(PolicyConfig, "build", side_effect=_ChecksPassed), pytest.raises(_ChecksPassed):
        CLPModule(**kwargs)
    for callback in cfg.trainer.callbacks or []:
        if callback.class_path.endswith("GridEvaluation") and callback.init_args.generation is not None:
            GenerationSettings(**callback.init_args.generation.as_dict()).kwargs()


def leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted.key, value)`` for each non-dict value of a loaded YAML mapping; a conditioning mode's ``options``
    is one value (a dict the mode takes whole)."""
    if not isinstance(tree, dict) or prefix.endswith("conditioning.options"):
        return [(prefix, tree)]
    return [leaf for key, value in tree.items() for leaf in leaves(value, f"{prefix}.{key}" if prefix else key)]


def same(raw: Any, parsed: Any) -> bool:
    """Whether a value written in a YAML file survived parsing (class lists compared by class path)."""
    if isinstance(parsed, enum.Enum):
        return parsed.name == raw
    if isinstance(raw, list):
        if raw and isinstance(raw[0], dict) and "class_path" in raw[0]:
            return [r["class_path"] for r in raw] == [p.class_path for p in parsed]
        return list(parsed) == raw
    return parsed == raw


# ------------------------------------------------------------------------------------------------------- files


def test_conf_tree_has_the_expected_configs() -> None:
    names = {_rel(p) for p in ALL_CONFIGS}
    for variant in ("prompt", "logits", "attention", "all", "lora", "prompt_attention", "alpha"):
        assert f"conf/conditioning/{variant}.yaml" in names
    for preset in ("cpu", "gpu", "ddp", "fsdp", "slurm"):
        assert f"conf/trainer/{preset}.yaml" in names
    for baseline in ("rs_expert", "rs_soup", "logit_mixture", "fixed_weighting"):
        assert f"conf/baselines/{baseline}.yaml" in names
    for config in ("quickstart", "quickstart_sft", "tldr_t5", "tldr_t5_sft", "cnndm_t5", "cnndm_t5_sft"):
        assert f"conf/{config}.yaml" in names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_rel)
def test_config_opens_with_a_header_and_a_launch_command(path: Path) -> None:
    text = header(path)
    assert text, f"{_rel(path)} must open with a comment block (what it runs, reproduces, hardware, launch)"
    for word in ("reproduce", "hardware", "launch"):
        assert word in text.lower(), f"{_rel(path)}'s header does not say {word!r}"
    assert re.search(r"\bclp (fit|validate|test|predict|quickstart)\b", text), f"{_rel(path)}: no `clp ...` command"
    for named in re.findall(r"--config (\S+\.yaml)\b", text):
        assert (REPO / named).is_file(), f"{_rel(path)}'s launch command names {named}, which does not exist"


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_rel)
def test_every_class_path_imports(path: Path) -> None:
    # Commented-out alternatives are checked too, so that they cannot rot either.
    for target in re.findall(r"class_path:\s*([\w.]+)", path.read_text()):
        module, _, name = target.rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"{_rel(path)}: {target} does not import"


# ------------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("path", STANDALONE, ids=_rel)
def test_standalone_config_parses(parser: Any, path: Path) -> None:
    cfg = parse(parser, path)
    assert "${" not in str(cfg.as_dict()), f"{_rel(path)} has an unresolved interpolation"
    assert isinstance(cfg.seed_everything, int), "the seed comes from the config"
    check_settings(cfg)


@pytest.mark.parametrize("path", FRAGMENTS, ids=_rel)
def test_fragment_overrides_the_base(parser: Any, path: Path) -> None:
    cfg = parse(parser, BASE, path)
    check_settings(cfg)
    for key, value in leaves(yaml.safe_load(path.read_text())):
        assert same(value, cfg[key]), f"{key}: {_rel(path)} sets {value!r}, the composed config has {cfg[key]!r}"


@pytest.mark.parametrize("path", sorted((CONF_DIR / "conditioning").rglob("*.yaml")), ids=_rel)
def test_conditioning_fragment_is_the_variant_it_is_named_after(parser: Any, path: Path) -> None:
    # The base (full-CLP) differs from every variant but "all": each fragment must clear what it does not use.
    conditioning = ConditioningConfig(**parse(parser, BASE, path).model.init_args.policy.conditioning.as_dict())
    expected = "prompt+alpha" if path.stem == "alpha" else path.stem.replace("_", "+")
    assert conditioning.name == expected
    assert conditioning.condition_on_alpha == expected.endswith("+alpha")


def test_fragments_stack_on_a_real_config(parser: Any) -> None:
    stack = [CONF_DIR / "cnndm_t5.yaml", CONF_DIR / "conditioning" / "lora.yaml", CONF_DIR / "trainer" / "slurm.yaml"]
    cfg = parse(parser, *stack)
    check_settings(cfg)
    # the fragment's options replace the base's ({targets: logits}); they are not merged into them
    assert cfg.model.init_args.policy.conditioning.mode == "lora"
    assert cfg.model.init_args.policy.conditioning.options == {"r": 8, "alpha": 16.0, "dropout": 0.0,
                                                              "target_modules": "attention"}
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.strategy == "ddp"
    assert [p.class_path.rsplit(".", 1)[1] for p in cfg.trainer.plugins] == ["SafeCheckpointIO", "SLURMEnvironment"]
    assert cfg.data.class_path == "clp_lightning.data.CNNDailyMailDataModule"  # the base's other parts are kept


@pytest.mark.parametrize(
    ("configs", "alpha_range", "message"),
    [
        ((BASE, CONF_DIR / "conditioning" / "alpha.yaml"), None, "conditioned on alpha but alpha_range is None"),
        ((BASE,), [0.01, 0.5], "not conditioned on alpha"),
        ((BASE, CONF_DIR / "conditioning" / "alpha.yaml"), [0.5, 0.01], r"alpha_range \[0.5, 0.01\] must satisfy"),
        ((BASE, CONF_DIR / "conditioning" / "lora_alpha.yaml"), [0.0, 0.5], "so alpha must be > 0"),
    ],
    ids=["alpha_without_range", "range_without_alpha", "reversed_range", "zero_alpha_in_the_parameters"],
)
def test_config_check_is_the_modules_own(parser: Any, configs: tuple[Path, ...], alpha_range: Any,
                                         message: str) -> None:
    # The negative control of check_settings: a composition the module refuses is refused here, with its message.
    cfg = parse(parser, *configs)
    cfg.model.init_args.alpha_range = alpha_range
    with pytest.raises(ValueError, match=message):
        check_settings(cfg)


def test_print_config_shows_the_merged_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The documented way to inspect a composition; it parses and exits before anything is instantiated.
    monkeypatch.setattr("sys.argv", ["clp"])  # pytest's own arguments are not the CLI's
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(BASE), "--config", str(CONF_DIR / "conditioning" / "lora.yaml"), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    conditioning = printed["model"]["init_args"]["policy"]["conditioning"]
    assert conditioning["mode"] == "lora" and conditioning["options"]["r"] == 8
    assert printed["trainer"]["max_steps"] == 160  # from the base


def test_overrides_propagate_through_interpolation(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # omegaconf+ mode: ${...} is resolved after every config and override is merged
    monkeypatch.setattr("sys.argv", ["clp"])
    config = CONF_DIR / "cnndm_t5.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--seed_everything", "7",
              "--model.init_args.generation.max_new_tokens", "99", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["weight_seed"] == 7 and printed["data"]["init_args"]["seed"] == 7
    grid = [c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("GridEvaluation")][0]
    assert grid["init_args"]["generation"]["max_new_tokens"] == 99
