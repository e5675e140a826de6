"""Small typed settings shared by the training system and the evaluation callback (their docstrings become --help)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from clp_lightning.checks import is_integer
from clp_lightning.conditioning.weights import DirichletSampler, FixedSampler, OneHotSampler, WeightSampler


@dataclass
class SamplerConfig:
    """Distribution ``Q`` of the weighting given to each prompt during training.

    Attributes:
        kind: ``dirichlet`` (``concentration``), ``one_hot`` (``index``: fixed objective, or random when None) or
            ``fixed`` (``weights``: fixed-weighting policies and single-reward experts).
        concentration: Dirichlet ``beta`` (scalar) or one value per objective; 1 is uniform on the simplex.
        index: objective of the one-hot sampler.
        weights: the fixed weighting, e.g. ``[1.0, 0.0]``.
    """

    kind: Literal["dirichlet", "one_hot", "fixed"] = "dirichlet"
    concentration: float | list[float] = 1.0
    index: int | None = None
    weights: list[float] | None = None

    def build(self, num_objectives: int) -> WeightSampler:
        # a field of another kind is a config that meant that kind (`sampler.index=1` over a Dirichlet base config):
        # ignoring it would train another policy than the one asked for
        for name, kind in (("index", "one_hot"), ("weights", "fixed")):
            if getattr(self, name) is not None and self.kind != kind:
                raise ValueError(f"sampler {name}={getattr(self, name)} is only read by kind {kind!r}, and kind is "
                                 f"{self.kind!r}: set sampler.kind: {kind}, or remove {name}")
        if self.kind == "dirichlet":
            return DirichletSampler(num_objectives, self.concentration)
        if self.kind == "one_hot":
            return OneHotSampler(num_objectives, self.index)
        if self.kind == "fixed":
            if self.weights is None:
                raise ValueError("sampler kind 'fixed' needs weights, e.g. weights: [1.0, 0.0]")
            return FixedSampler(self.weights, num_objectives)
        raise ValueError(f"unknown sampler kind {self.kind!r}; expected 'dirichlet', 'one_hot' or 'fixed'")


@dataclass
class GenerationSettings:
    """How responses are generated.

    Attributes:
        max_new_tokens: response length cap.
        min_new_tokens: responses are at least this long. Above 0, ``generate`` masks EOS for the first tokens, so
            training samples come from a truncation of the policy whose log-probs the loss uses (a small bias, as
            with ``top_k`` or ``top_p``); the default 0 samples from the policy itself.
        do_sample: sample (training) or decode greedily.
        temperature: sampling temperature; 1 samples from the policy itself, as REINFORCE needs.
        top_k: 0 disables top-k filtering (so the sample comes from the policy, not a truncation of it).
        top_p: 1 disables nucleus filtering.
        extra: more ``generate`` keyword arguments (e.g. ``repetition_penalty``). A penalty, filter or beam search
            that the model's own generation config sets is not applied unless it is given here (a checkpoint does
            not reshape the sampling distribution); one given here makes training samples off-policy.
    """

    max_new_tokens: int = 48
    min_new_tokens: int = 0
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``."""
        # integers: generate rounded max_new_tokens=5.5 up to 6 tokens, and refused a fractional top_k or min_new_tokens
        # only at the first call, after the policy had loaded
        for name in ("max_new_tokens", "min_new_tokens", "top_k"):
            if not is_integer(getattr(self, name)):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        # generate only warns about these (or ignores them): min above max masks EOS at every step, so no response
        # ever ends; top_p 0 keeps only the likeliest token, so "sampled" rollouts are greedy and the k samples of a
        # prompt are one response with zero leave-one-out advantages; top_p above 1 or nan is dropped unnoticed
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got "
                             f"{self.min_new_tokens}")
        if self.do_sample:
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise ValueError(f"temperature must be a finite number > 0 when sampling, got {self.temperature}")
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0 (0 disables top-k filtering), got {self.top_k}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1] (1 disables nucleus filtering), got {self.top_p}")
        # extra is applied last: a field's name there would replace the value checked above (top_p 0: greedy rollouts),
        # and the caller passes num_return_sequences itself (a TypeError at the first generate, after loading)
        for key in self.extra:
            if key == "num_return_sequences" or key in {f.name for f in dataclasses.fields(self)}:
                where = ("samples_per_prompt (training) or num_samples (evaluation)" if key == "num_return_sequences"
                         else f"generation.{key}")
                raise ValueError(f"generation.extra sets {key!r}, which is not an extra generate argument: set {where}")
        args: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens)
        if self.do_sample:
            args.update(do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:
            args.update(do_sample=False, num_beams=1)
        return {**args, **self.extra}


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up and a schedule over the run's optimizer steps.

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: steps of linear warm-up from 0.
        schedule: after warm-up: ``constant``, ``linear`` (to 0) or ``cosine`` (to 0).
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"

    def __post_init__(self) -> None:
        # when the config is made, not at configure_optimizers once the policy has loaded; an unknown schedule (or a
        # negative warm-up) would otherwise train silently at a constant rate, and lr=inf passes AdamW's own check
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"optimizer.schedule must be 'constant', 'linear' or 'cosine', got {self.schedule!r}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"optimizer.lr must be a finite number >= 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"optimizer.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}")
        # an integer: 2.5 raised the rate past lr (to 1.2 * lr at step 2), nan made it nan, inf kept it at 0
        if not is_integer(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")

    def build(self, params: list[torch.nn.Parameter], total_steps: float) -> dict[str, Any]:
        """``configure_optimizers`` output for ``params`` over ``total_steps`` optimizer steps (Lightning's
        ``estimated_stepping_batches``).

        Raises:
            ValueError: the run's length is unknown (``inf``: no ``max_steps`` and no ``max_epochs``; -1: an unsized
                loader) and the schedule needs it to decay.
        """
        if not math.isfinite(total_steps) or total_steps < 1:
            if self.schedule != "constant":
                raise ValueError(
                    f"optimizer.schedule={self.schedule!r} decays over the run's optimizer steps, but this run's "
                    f"number of steps is not known (Lightning estimates {total_steps}): set trainer.max_steps (or "
                    "trainer.max_epochs), or use optimizer.schedule: constant"
                )
            total_steps = 1  # a constant schedule never reads it
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)
        warmup, total = self.warmup_steps, max(int(total_steps), 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            if self.schedule == "linear":
                return 1.0 - progress
            if self.schedule == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        # One closed-form factor rather than transformers.get_scheduler (its warm-up starts at lr 0, so step 0 makes no
        # update) or torch's SequentialLR of LinearLR and CosineAnnealingLR (cosine computed recursively, drifting
        # from the closed form): the schedule is a pure function of the step, which resumes exactly.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def plain(value: Any) -> Any:
    """Dataclasses (recursively) as dicts, so checkpoints hold only types that ``weights_only=True`` loads."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def coerce(value: Any, cls: type) -> Any:
    """Build ``cls`` from a dict (hyper-parameters read back from a checkpoint); instances and None pass through."""
    return cls(**value) if isinstance(value, dict) else value


def loader_batch_size(loader: Any) -> int | None:
    """Prompts per batch of a training loader: a ``DataLoader``'s ``batch_size``, else its batch sampler's; None
    where it has no fixed one (a custom batch sampler, a collection of loaders)."""
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size if isinstance(size, int) and size >= 1 else None


def batch_plan(prompts_per_device: int, samples_per_prompt: int, accumulate: int = 1, world_size: int = 1) -> dict:
    """Every batch size of a run, derived in one place from the four numbers that define it."""
    for name, value in (("batch_size", prompts_per_device), ("samples_per_prompt", samples_per_prompt),
                        ("accumulate_grad_batches", accumulate), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return {
        "prompts_per_device": prompts_per_device,
        "samples_per_prompt": samples_per_prompt,
        "sequences_per_device": prompts_per_device * samples_per_prompt,
        "prompts_per_optimizer_step": prompts_per_device * accumulate * world_size,
        "sequences_per_optimizer_step": prompts_per_device * samples_per_prompt * accumulate * world_size,
    }
