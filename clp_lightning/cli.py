"""Command line: ``clp fit|validate|test|predict --config conf/<file>.yaml`` (LightningCLI), plus ``clp quickstart``
(the offline quick start), ``clp steer`` (generate at chosen weightings), ``clp compare`` (overlay runs' fronts),
``clp data`` (write local datasets, e.g. ``cnndm-blanc``) and ``clp reward`` (train a learned reward, e.g.
``train-human``).

The model is any LightningModule of the project (``CLPModule`` for RL, ``SFTModule`` for the warm start) and the
data any LightningDataModule, both chosen in the YAML with ``class_path``. Configs may use OmegaConf
interpolation (``${...}``) so that shared values are written once.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from clp_lightning.callbacks.checkpoint import check_writable, install_safe_checkpoint_io
from clp_lightning.callbacks.preemption import SlurmRequeue, StopOnSignal

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class CLPCLI(LightningCLI):
    """LightningCLI with OmegaConf interpolation, subclass mode for model and data, and the seed from the config.

    Interpolations (``${trainer.default_root_dir}``) are resolved after every ``--config`` and command-line override
    has been merged (jsonargparse's ``omegaconf+`` mode), so overriding a value also changes what refers to it.
    """

    def __init__(self, *args, **kwargs) -> None:
        # configs write paths from the subcommand's root (`${trainer.max_steps}`, not `${fit.trainer.max_steps}`)
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        # parse errors are raised, not printed with the whole usage: `main` prints them as one line
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf+", "exit_on_error": False, "prog": "clp",
                                            "description": HELP})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
                     ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:
            # the config a run saves (`<log dir>/config.yaml`) holds its subcommand's arguments (`ckpt_path`, ...);
            # code that only builds the model from it (`clp steer`, the experiments) takes the file as it is
            self.parser.add_method_arguments(self.trainer_class, "fit", skip=set(self.subcommands()["fit"]))

    def _parse_ckpt_path(self) -> None:
        """Keep the parsed config as it is under ``--ckpt_path``.

        LightningCLI would parse the checkpoint's saved hyper-parameters over the config and the command line, so a
        checkpoint file could choose which model and code load (``trust_remote_code`` included) and silently undo
        explicit overrides. A checkpoint is untrusted input: it supplies state only (weights, optimizer, loops,
        normaliser), and the module compares what its weights depend on with the config before loading them
        (``CLPModule.on_load_checkpoint``).
        """

    def before_instantiate_classes(self) -> None:
        # jsonargparse builds the model (minutes for a real one) before the data module: bad data files and a
        # read-only output directory are found first, from the parsed config
        config = self.config.get(str(self.subcommand), self.config)  # `run=False` parses no subcommand
        self._check_data_files(config.get("data"), self.subcommand)
        if self.subcommand not in ("fit", "validate", "test", "predict"):
            return
        root = config.trainer.get("default_root_dir") or "."
        check_writable(root, "trainer.default_root_dir")  # every stage writes there: its config, its reports
        # with a logger, the log directory (config.yaml, run_info, reports) is under its save_dir instead, which the
        # run creates only once the model is built
        loggers = config.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            save_dir = (logger.get("init_args") or {}).get("save_dir") if hasattr(logger, "get") else None
            if save_dir:
                check_writable(save_dir, f"log directory of {logger.get('class_path', 'a logger')}",
                               "with --trainer.logger.init_args.save_dir")
        if self.subcommand != "fit":
            return
        callbacks = config.trainer.get("callbacks") or []
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            dirpath = (callback.get("init_args") or {}).get("dirpath") if hasattr(callback, "get") else None
            if dirpath:
                check_writable(dirpath, f"checkpoint directory of {callback.get('class_path', 'a callback')}")

    @staticmethod
    def _check_data_files(data: Any, stage: str | None) -> None:
        if data is None or not data.get("class_path"):
            return
        from jsonargparse import namespace_to_dict

        from clp_lightning.data.base import SummarizationDataModule

        module, _, name = data["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, SummarizationDataModule):
            # the constructor only stores its arguments
            cls(**namespace_to_dict(data.get("init_args") or {})).check_files(stage)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # every run through `clp` writes checkpoints atomically and reads them with `read_checkpoint`, whether or
        # not the config lists SafeCheckpointIO, also under AsyncCheckpointIO; a checkpoint IO the config chose on
        # purpose is kept
        install_safe_checkpoint_io(trainer.strategy)
        return trainer

    def add_arguments_to_parser(self, parser) -> None:
        # always attached (inert outside a SLURM fit), configurable as `slurm_requeue.*`
        parser.add_lightning_class_args(SlurmRequeue, "slurm_requeue")
        # always attached (inert outside fit), configurable as `stop_on_signal.*`; `signals: []` turns it off
        parser.add_lightning_class_args(StopOnSignal, "stop_on_signal")

    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``subcommand``; exit with ``128 + signal`` when a signal stopped the fit, so a scheduler or a shell
        sees an interrupted run as one, not as a finished one.

        A ``SystemExit`` rather than a return code, so that it also leaves ``clp quickstart`` and any other caller
        that runs ``CLPCLI`` itself.
        """
        super()._run_subcommand(subcommand)
        codes = [cb.exit_code for cb in self.trainer.callbacks
                 if isinstance(cb, (StopOnSignal, SlurmRequeue)) and cb.exit_code]
        if codes:
            logging.getLogger("clp_lightning.cli").info("Stopped by a signal before the end of training: exit code %d",
                                                        codes[0])
            sys.exit(codes[0])


def run_cli(args: list[str], cli_class: type[CLPCLI] | None = None, **kwargs: Any) -> CLPCLI:
    """``CLPCLI`` on ``args`` as if they were this process's command line, whatever ``sys.argv`` holds.

    The one place where code of the project (``clp quickstart``, ``clp steer``, the experiments) runs the CLI:
    LightningCLI parses ``sys.argv`` and warns when it is given ``args`` beside one, and ``RunInfo`` records
    ``sys.argv`` as the run's command.
    """
    saved = sys.argv
    sys.argv = [saved[0] if saved else "clp", *args]
    try:
        return (cli_class or CLPCLI)(**kwargs)
    finally:
        sys.argv = saved


class _ParseOnly(CLPCLI):
    """Parses a config and runs the checks that come before building (data files), building nothing."""

    def instantiate_classes(self) -> None:
        pass


def parse_config(args: list[str]) -> dict[str, Any]:
    """The config ``args`` describe (every ``--config`` merged, overrides and defaults applied) as plain dicts, with no
    model or data built: for tools that check their inputs against it before loading anything (``clp export``)."""
    from jsonargparse import namespace_to_dict

    return namespace_to_dict(run_cli(args, cli_class=_ParseOnly, run=False).config)


TOOLS = {"quickstart": "clp_lightning.quickstart:quickstart", "steer": "clp_lightning.steer:steer",
         "compare": "clp_lightning.compare:compare", "data": "clp_lightning.data.prepare:main",
         "reward": "clp_lightning.rewards.train:main",
         "export": "clp_lightning.export:main", "serve": "clp_lightning.serve:main"}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# `clp --help` is LightningCLI's, which knows only its own subcommands: it names the others
HELP = ("Conditional Language Policy: train one policy steerable by a weighting over several rewards. Subcommands "
        "fit, validate, test and predict (below) run a YAML config. Other commands, each with its own --help: "
        "quickstart (the offline quick start), steer (generate at chosen weightings), compare (overlay runs' "
        "fronts), data (write local datasets), reward (train a learned reward), export (a checkpoint as a Hugging "
        "Face directory), serve (a web page and JSON endpoint that steer a policy).")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``clp`` and ``python -m clp_lightning``.

    An error in what the user gave (a config value, a path, a file, a checkpoint) prints as one line,
    ``clp: error: <message>``, and exits with code 2; ``--verbose`` (anywhere on the line) or ``CLP_VERBOSE=1``
    shows the full traceback instead. Other exceptions (bugs) always show their traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    verbose = "--verbose" in argv or os.environ.get("CLP_VERBOSE", "") not in ("", "0")
    argv = [a for a in argv if a != "--verbose"]
    try:
        if argv[:1] and argv[0] in TOOLS:
            module, _, function = TOOLS[argv[0]].partition(":")
            getattr(importlib.import_module(module), function)(argv[1:])
            return
        if argv[:1] and not argv[0].startswith("-") and argv[0] not in LIGHTNING_COMMANDS:
            # LightningCLI's own message would name only fit, validate, test and predict
            commands = ", ".join(LIGHTNING_COMMANDS + tuple(TOOLS))
            raise ValueError(f"unknown command {argv[0]!r}; expected one of {commands} (clp --help describes them)")
        _show_info_logs()
        run_cli(argv)
    except Exception as err:
        message = None if verbose else user_error(err)
        if message is None:
            raise
        print(f"clp: error: {message}\n(run again with --verbose for the full traceback)", file=sys.stderr)
        sys.exit(2)


def user_error(err: BaseException) -> str | None:
    """The one-line message of an error in the user's input, or None for an error that needs its traceback.

    jsonargparse wraps an error raised while it builds the model or data in a message that repeats the whole parsed
    config; the error of ours inside that chain (raised from this package) is the one that names the bad value.
    """
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    chain, seen = [], err
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for exc in chain:
        if isinstance(exc, (ValueError, OSError)) and _raised_here(exc):
            return _condense(str(exc))
    if isinstance(err, (ArgumentError, ValueError, OSError, MisconfigurationException)):
        return _condense(str(err))
    return None


def _raised_here(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{Path(__file__).parent.name}{os.sep}" in tb.tb_frame.f_code.co_filename


# lines of jsonargparse's messages that restate the config rather than say what is wrong
_NOISE = ("Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value type:", "Given value:",
          "Does not validate against any of the Union subtypes")


def _condense(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines()]
    kept = [line.removeprefix("- ") for line in lines if line and not line.startswith(_NOISE)]
    text = " ".join(kept) or message.strip()
    return text if len(text) <= 600 else text[:600] + " ..."


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to ``sys.stderr`` as it is when a record is logged, not as it was when the handler
    was made: one ``main`` call in a process (a test's captured stream, a notebook's redirect) would otherwise leave
    the handler writing to a stream that is closed by the time a later call logs."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _show_info_logs() -> None:
    """Print the package's INFO messages (resume points, requeues, reports) the way Lightning prints its own."""

    logger = logging.getLogger("clp_lightning")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        # under DDP every rank logs; print rank 0's INFO lines and everyone's warnings
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or rank_zero_only.rank == 0)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


if __name__ == "__main__":
    main()
