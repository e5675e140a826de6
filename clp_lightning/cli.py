"""Command line: ``clp fit|validate|test|predict --config conf/<file>.yaml`` (LightningCLI), plus ``clp quickstart``
(the offline quick start), ``clp steer`` (generate at chosen weightings), ``clp compare`` (overlay runs' fronts),
``clp data`` (write local datasets, e.g. ``cnndm-blanc``) and ``clp reward`` (train a learned reward, e.g.
``train-human``).

The model is any LightningModule of the project (``CLPModule`` for RL, ``SFTModule`` for the warm start) and the
data any LightningDataModule, both chosen in the YAML with ``class_path``. Configs may use OmegaConf
interpolation (``${...}``) so that shared values are written once.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from clp_lightning.callbacks.preemption import SlurmRequeue

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

    def _parse_ckpt_path(self) -> None:
        """Keep the parsed config as it is under ``--ckpt_path``.

        LightningCLI would parse the checkpoint's saved hyper-parameters over the config and the command line, so a
        checkpoint file could choose which model and code load (``trust_remote_code`` included) and silently undo
        explicit overrides. A checkpoint is untrusted input: it supplies state only (weights, optimizer, loops,
        normaliser), and the module compares what its weights depend on with the config before loading them
        (``CLPModule.on_load_checkpoint``).
        """

    def add_arguments_to_parser(self, parser) -> None:
        # always attached (inert outside a SLURM fit), configurable as `slurm_requeue.*`
        parser.add_lightning_class_args(SlurmRequeue, "slurm_requeue")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``clp`` and ``python -m clp_lightning``."""
    argv = sys.argv[1:] if args is None else args
    tools = {"quickstart": "clp_lightning.quickstart:quickstart", "steer": "clp_lightning.steer:steer",
             "compare": "clp_lightning.compare:compare", "data": "clp_lightning.data.prepare:main",
             "reward": "clp_lightning.rewards.train:main"}
    if argv[:1] and argv[0] in tools:
        import importlib

        module, _, function = tools[argv[0]].partition(":")
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    _show_info_logs()
    CLPCLI(args=args)


def _show_info_logs() -> None:
    """Print the package's INFO messages (resume points, requeues, reports) the way Lightning prints its own."""
    import logging

    logger = logging.getLogger("clp_lightning")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        # under DDP every rank logs; print rank 0's INFO lines and everyone's warnings
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or rank_zero_only.rank == 0)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


if __name__ == "__main__":
    main()
