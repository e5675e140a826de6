"""Command line: ``clp fit|validate|test|predict --config conf/<file>.yaml`` (LightningCLI), plus ``clp quickstart``
(the offline quick start), ``clp steer`` (generate at chosen weightings) and ``clp compare`` (overlay runs' fronts).

The model is any LightningModule of the project (``CLPModule`` for RL, ``SFTModule`` for the warm start) and the
data any LightningDataModule, both chosen in the YAML with ``class_path``. Configs may use OmegaConf
interpolation (``${...}``) so that shared values are written once.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class CLPCLI(LightningCLI):
    """LightningCLI with OmegaConf interpolation, subclass mode for model and data, and the seed from the config.

    Interpolations (``${trainer.default_root_dir}``) are resolved after every ``--config`` and command-line override
    has been merged (jsonargparse's ``omegaconf+`` mode), so overriding a value also changes what refers to it.
    """

    def __init__(self, *args, **kwargs) -> None:
        # configs write paths from the subcommand's root (`${trainer.max_steps}`, not `${fit.trainer.max_steps}`)
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf+"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``clp`` and ``python -m clp_lightning``."""
    argv = sys.argv[1:] if args is None else args
    tools = {"quickstart": "clp_lightning.quickstart:quickstart", "steer": "clp_lightning.steer:steer",
             "compare": "clp_lightning.compare:compare"}
    if argv[:1] and argv[0] in tools:
        import importlib

        module, _, function = tools[argv[0]].partition(":")
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    CLPCLI(args=args)


if __name__ == "__main__":
    main()
