"""Supervised warm start: teacher-forced training on (prompt, reference summary) pairs.

Produces the checkpoint that RL starts from and uses as its reference policy: a plain Hugging Face directory
(``save_pretrained`` of the model and tokenizer), written atomically at the end of the fit, so an RL config points
``policy.model_name_or_path`` at it and loads it through the ordinary loading code.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from clp_lightning.callbacks.checkpoint import check_writable
from clp_lightning.callbacks.preemption import stopped_by_signal
from clp_lightning.checks import is_integer
from clp_lightning.conditioning.config import ConditioningConfig, PolicyConfig
from clp_lightning.conditioning.lm import check_positions, response_log_probs
from clp_lightning.conditioning.policy import ConditionalPolicy
from clp_lightning.config import OptimizerConfig, coerce, plain
from clp_lightning.files import publish

log = logging.getLogger(__name__)


class SFTModule(L.LightningModule):
    """Maximum likelihood of the reference summaries given the prompts.

    The loss is the negative log-likelihood per reference token of the whole optimizer step: with gradient
    accumulation or several devices, every token of the step weighs the same (as in one batch of all of them), not
    every micro-batch. ``train/sft_loss`` logs each micro-batch's own mean per token.

    Args:
        policy: the model to warm-start (its conditioning is ignored: the warm start is unconditioned).
        output_dir: where the final model and tokenizer are saved (``save_pretrained``); None saves nothing. The
            directory is replaced when the fit ends, so it must be new, empty, or a model saved there before
            (checked at construction, before any training).
        max_response_length: reference tokens kept (the stop token included: EOS, or a chat template's end of
            turn).
        optimizer: AdamW settings, warm-up and schedule.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        output_dir: str | None = None,
        max_response_length: int = 64,
        optimizer: OptimizerConfig | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        policy, optimizer = coerce(policy, PolicyConfig), coerce(optimizer, OptimizerConfig)
        # an integer: a float such as 64.0 passed and failed at the first step, in the targets' slice
        if not is_integer(max_response_length) or max_response_length < 1:
            raise ValueError(f"max_response_length must be an integer >= 1, got {max_response_length!r}")
        if output_dir is not None:
            check_output_dir(output_dir)
        # the warm start trains the plain model: the config's loading and prompt format, no conditioning
        self.policy = dataclasses.replace(policy, conditioning=ConditioningConfig()).build(1)
        # a learned position table (GPT-2) must hold the longest prompt and target: now, not as an IndexError inside the
        # model at the first long prompt of the data
        check_positions(self.policy.model, self.policy.max_prompt_length, max_response_length,
                        "model.init_args.policy.max_prompt_length or model.init_args.max_response_length")
        if self._stop_id() is None:
            raise ValueError(f"the tokenizer of {policy.model_name_or_path!r} has no EOS token: the warm start cannot "
                             "teach the policy where a response ends")
        self.output_dir = output_dir
        self.max_response_length = max_response_length
        self.optimizer_config = optimizer or OptimizerConfig(lr=1e-4)
        self._window_tokens = torch.zeros(())  # reference tokens of the accumulation window so far, this device

    def _targets(self, references: list[str]) -> tuple[Tensor, Tensor]:
        """Reference summaries as response ids ``(B, T)`` ending in the stop token, right-padded, and their mask.

        As the policy will answer: after a plain prompt's cue (``TL;DR:``) with a space first and EOS last; in a chat
        template's assistant turn as the template writes it, with no space first and its end-of-turn token last.
        """
        tok, chat = self.policy.tokenizer, self.policy.chat
        texts = list(references) if chat is not None else [" " + r for r in references]
        # split_special_tokens: a "</s>" or "<|im_end|>" written in a summary is text; read as the special token it
        # would end the target early (the stop token mid-response) or teach a control token as content. The stop
        # token is appended below; prompts keep their specials (a chat template writes real ones).
        ids = tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        stop = self._stop_id()
        rows = [row[: self.max_response_length - 1] + [stop] for row in ids]
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(out)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return out.to(self.device), mask.to(self.device)

    def _stop_id(self) -> int:
        """The token the policy must learn to end its response with: the chat template's end of turn where it has
        one (generation stops there), else the tokenizer's EOS."""
        chat = self.policy.chat
        if chat is not None and chat.end_of_turn_id is not None:
            return chat.end_of_turn_id
        return self.policy.tokenizer.eos_token_id

    def _nll_sum(self, batch: dict[str, list[str]]) -> tuple[Tensor, Tensor]:
        """Summed negative log-likelihood of the batch's reference tokens, and their number."""
        enc = self.policy.encode(batch["prompt"])
        ids, mask = self._targets(batch["reference"])
        logp = response_log_probs(self.policy.model, **enc, response_ids=ids, response_mask=mask).log_probs
        return -logp.sum(), mask.sum()

    def _nll(self, batch: dict[str, list[str]]) -> tuple[Tensor, Tensor]:
        nll, tokens = self._nll_sum(batch)
        return nll / tokens, tokens

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.output_dir is not None:
            check_apart_from_run(self.output_dir, self.trainer)

    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> Tensor:
        """The loss whose gradient, summed over the optimizer step's micro-batches and averaged over devices, is
        the gradient of the mean NLL per reference token of the whole step: every token weighs the same, however
        the tokens fall into micro-batches and devices, as one large batch would have it.

        One micro-batch per step: this device's NLL sum divided by the step's tokens per device (the token count
        all-reduced before the backward). With gradient accumulation the later micro-batches' tokens are unknown
        at the backward of the first: the step returns the NLL sum over a fixed ``max_response_length`` (the most
        tokens a row can have: a loss of the order of the rows' mean NLLs, which keeps fp16's loss scaler in range)
        and :meth:`optimizer_step` rescales the accumulated gradient once the window's tokens are counted.
        """
        nll, tokens = self._nll_sum(batch)
        self.log("train/sft_loss", nll.detach() / tokens, prog_bar=True, batch_size=int(tokens))
        if self.trainer.accumulate_grad_batches > 1:
            self._window_tokens = self._window_tokens + tokens.detach()
            return nll / self.max_response_length
        total = self.trainer.strategy.reduce(tokens.detach().clone(), reduce_op="sum")
        return nll / (total / self.trainer.world_size)  # one device: nll / tokens, the micro-batch's mean

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if self.trainer.accumulate_grad_batches == 1 or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

        def closure() -> Any:  # runs the window's last backward, then rescales before clipping and the step
            loss = optimizer_closure()
            self._scale_accumulated_gradients()
            return loss

        return super().optimizer_step(epoch, batch_idx, optimizer, closure)

    def _scale_accumulated_gradients(self) -> None:
        """Turn the accumulated gradient of ``sum_i nll_i / (max_response_length * accumulate)`` (Lightning divides
        each micro-batch's loss by ``accumulate_grad_batches``; DDP and FSDP average it over devices) into that of the
        NLL per token of the whole step, all devices' micro-batches together."""
        total = self.trainer.strategy.reduce(self._window_tokens.clone(), reduce_op="sum")
        self._window_tokens = torch.zeros((), device=self.device)
        scale = (self.max_response_length * self.trainer.accumulate_grad_batches * self.trainer.world_size
                 / max(float(total), 1.0))
        for p in self.policy.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)

    def validation_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        loss, tokens = self._nll(batch)
        self.log("val/sft_loss", loss, prog_bar=True, batch_size=int(tokens), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return self.optimizer_config.build(list(self.policy.parameters()), total)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hyper_parameters"] = plain(checkpoint.get("hyper_parameters", {}))

    def on_fit_end(self) -> None:
        # A fit that a signal stopped (StopOnSignal, SlurmRequeue) is not finished: it continues from its checkpoint,
        # and a model in output_dir would read as the finished warm start. (Every rank reads the same flag.)
        if stopped_by_signal(self.trainer):
            if self.output_dir is not None and self.trainer.is_global_zero:
                log.info("fit stopped by a signal at step %d: the warm-start model is saved to %s when a resumed fit "
                         "ends", self.trainer.global_step, self.output_dir)
            return
        if self.output_dir is not None and self.trainer.is_global_zero:
            save_pretrained_atomic(self.policy, self.output_dir)


def check_output_dir(output_dir: str | Path) -> Path:
    """The model directory ``output_dir`` (``~`` expanded), checked before training: it will be replaced, so it must
    not hold anything but an earlier saved model, and its parent must be writable.

    Raises:
        ValueError: ``output_dir`` is a file, or a directory with other contents (a run directory, checkpoints).
        PermissionError: its parent directory cannot be written.
    """
    target = Path(output_dir).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"output_dir {str(target)!r} is a file; expected a directory for the warm-start model")
    if target.is_dir():
        entries = sorted(target.iterdir())
        foreign = [p.name for p in entries if p.is_dir() or p.suffix == ".ckpt"]
        if foreign or (entries and not (target / "config.json").is_file()):
            shown = foreign or [p.name for p in entries]
            raise ValueError(
                f"output_dir {str(target)!r} holds more than a saved model ({', '.join(shown[:5])}"
                f"{', ...' if len(shown) > 5 else ''}): the warm start replaces that directory when it ends; point "
                "output_dir at a new directory or at a model it saved before"
            )
    check_writable(target.parent, "output_dir's parent directory")
    return target


def check_apart_from_run(output_dir: str | Path, trainer: L.Trainer) -> None:
    """Refuse an ``output_dir`` that is, or holds, a directory the run itself writes to (its root, log or checkpoint
    directory): the run's files would make the final save refuse to replace it, after all the training.

    Raises:
        ValueError: naming the directory the two share.
    """
    target = Path(output_dir).expanduser().resolve()
    written = [("trainer.default_root_dir", trainer.default_root_dir), ("the log directory", trainer.log_dir)]
    written += [("the checkpoint directory", cb.dirpath) for cb in trainer.checkpoint_callbacks
                if getattr(cb, "dirpath", None)]
    for what, directory in written:
        if directory is None:
            continue
        path = Path(directory).expanduser().resolve()
        if path == target or target in path.parents:
            raise ValueError(
                f"output_dir {str(output_dir)!r} holds {what} {str(directory)!r}: the warm start replaces output_dir "
                "with the model when it ends, and the run's own files there would stop it; point output_dir at a "
                "directory of its own, e.g. <default_root_dir>/model"
            )


def save_pretrained_atomic(policy: ConditionalPolicy, output_dir: str | Path) -> Path:
    """``save_pretrained`` of model and tokenizer into a temporary directory beside ``output_dir``, then moved into
    its place; an earlier model there is replaced only once the new one is complete."""
    target = check_output_dir(output_dir)
    # beside the directory that is replaced, which is the one a link at output_dir points to (see publish)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.resolve().parent))
    try:
        policy.model.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)
        publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the move
    log.info("warm-start model saved to %s", target)
    print(f"warm-start model saved to {target}")
    return target
