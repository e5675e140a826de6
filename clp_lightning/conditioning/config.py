"""The policy's configuration: what the model is (:class:`PolicyConfig`) and how it is conditioned on the weighting
(:class:`ConditioningConfig`); one YAML block, checked before any model loads."""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from clp_lightning.checks import is_integer, is_number
from clp_lightning.conditioning.mode import ConditioningMode, mode_class
from clp_lightning.conditioning.prompt import PromptConditioner

if TYPE_CHECKING:
    from clp_lightning.conditioning.policy import ConditionalPolicy


@dataclass
class ConditioningConfig:
    """How the policy is conditioned on the weighting.

    Attributes:
        prompt: write ``w`` (and ``alpha``) into the input text.
        prompt_template: prefix format with a ``{weights}`` field.
        alpha_template: prefix format used when conditioning on ``alpha`` too.
        prompt_precision: decimals per number in the prefix.
        mode: the parameter conditioning, by registered name or dotted path (:mod:`clp_lightning.conditioning.mode`):
            ``none``, ``mixing`` (``m`` copies of selected modules) or ``lora`` (``m`` LoRA adapters on a frozen base).
        options: the keyword options of ``mode``: ``mixing``: ``targets`` (``logits``, ``attention``, ``all`` or
            module-name patterns); ``lora``: ``r``, ``alpha``, ``dropout``, ``target_modules``.
        train_shared: also train the parameters the mode does not add (parameter mixing; our default); False
            trains only the mode's own (copies, adapters). LoRA freezes its base either way.
        condition_on_alpha: the policy also takes the KL strength ``alpha``, in the prompt (``prompt``) and/or in the
            parameters (``alpha_scale``).
        alpha_scale: alpha in the parameters: the mode's update to the model is scaled per row by
            ``alpha_scale / alpha`` (LoRA-CLP: ``Delta W(w, alpha) = (alpha_scale / alpha) sum_i w_i B_i A_i``), the
            form of the KL-regularised optimum, whose logits are the reference's plus ``w . R / alpha``; at
            ``alpha = alpha_scale`` the policy is the unscaled one. Needs a mode whose update is linear in the
            weighting (``lora``). None: alpha reaches the policy through the prompt only.
    """

    prompt: bool = False
    prompt_template: str = "<w {weights}> "
    alpha_template: str = "<w {weights} | kl {alpha}> "
    prompt_precision: int = 2
    mode: str = "none"
    options: dict[str, Any] = field(default_factory=dict)
    train_shared: bool = True
    condition_on_alpha: bool = False
    alpha_scale: float | None = None

    def __post_init__(self) -> None:
        self.options = dict(self.options or {})
        for flag in ("prompt", "train_shared", "condition_on_alpha"):  # the text "false" would count as true
            if type(getattr(self, flag)) is not bool:
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.condition_on_alpha and not (self.prompt or self.alpha_scale is not None):
            raise ValueError("condition_on_alpha=True needs a channel for alpha: prompt=True (alpha in the prompt) "
                             "and/or alpha_scale (alpha in the parameters)")
        if self.alpha_scale is not None:
            if not self.condition_on_alpha:
                raise ValueError(f"alpha_scale={self.alpha_scale} is set but condition_on_alpha is False")
            # inf scales every update to inf (nan logits), and True would pass as 1
            if not (is_number(self.alpha_scale) and math.isfinite(self.alpha_scale) and self.alpha_scale > 0):
                raise ValueError(f"alpha_scale must be > 0, a finite number (a KL strength), got {self.alpha_scale!r}")
        if self.prompt:  # a bad template or precision fails here, not when the policy is built or first encodes
            PromptConditioner(self.prompt_template, self.alpha_template, self.prompt_precision)
        mode = self.build_mode()  # an unknown mode or option fails here, before any model loads
        if self.alpha_scale is not None and not mode.update_linear_in_weights:
            raise ValueError(f"alpha_scale scales the mode's update, and mode {self.mode!r} has no update separate "
                             "from the model: use mode 'lora'")

    @property
    def name(self) -> str:
        """Short label such as ``prompt+attention``, ``lora``, ``lora+alpha`` (conditioned on alpha too) or ``none``."""
        parts = (["prompt"] if self.prompt else []) + [self.build_mode().label()]
        parts += ["alpha"] if self.condition_on_alpha else []
        return "+".join(p for p in parts if p) or "none"

    def build_mode(self) -> ConditioningMode:
        """The parameter conditioning: ``mode`` built with its ``options``."""
        cls = mode_class(self.mode)
        accepted = inspect.signature(cls).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            unknown = sorted(self.options.keys() - accepted.keys())
            missing = sorted(n for n, p in accepted.items() if p.default is p.empty and n not in self.options
                             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
            if unknown or missing:
                problem = f"has no option(s) {unknown}" if unknown else f"needs option(s) {missing}"
                raise ValueError(f"conditioning mode {self.mode!r} {problem} in conditioning.options; its options "
                                 f"are {sorted(accepted) or 'none'}")
        return cls(**self.options)

    def stored(self) -> dict[str, Any]:
        """The fields with the mode's options resolved (defaults filled): what checkpoints record and compare.

        ``alpha_scale`` only when set, so that checkpoints written before it existed still compare equal.
        """
        fields = {k: v for k, v in asdict(self).items() if k != "alpha_scale" or v is not None}
        return {**fields, "options": self.build_mode().options()}


TRUNCATION_SIDES = (None, "left", "right")  # None: the policy's default (see PolicyConfig.truncation_side)


def check_truncation_side(value: str | None) -> str | None:
    """``value`` if it is a prompt truncation side (``left``, ``right`` or None for the default).

    Raises:
        ValueError: naming the value and the choices.
    """
    if value not in TRUNCATION_SIDES:
        raise ValueError(f"truncation_side must be 'left' (keep a prompt's end), 'right' (keep its start) or null, "
                         f"got {value!r}")
    return value


def check_max_prompt_length(value: int) -> int:
    """``value`` if it is a prompt length (an integer >= 1).

    Raises:
        ValueError: naming the value: 0 would give a causal model empty prompts and leave a seq2seq one's uncut,
            and a bool would pass as 1 token.
    """
    if not (is_integer(value) and value >= 1):
        raise ValueError(f"max_prompt_length must be an integer >= 1 (prompt tokens kept), got {value!r}")
    return value


@dataclass
class PolicyConfig:
    """What the policy is and how it is conditioned (one YAML block).

    Attributes:
        model_name_or_path: hub id, local directory (e.g. a warm-start checkpoint) or ``tiny:<arch>[-size]``.
        conditioning: how the weighting enters the model.
        max_prompt_length: prompt tokens kept, from the end (see ``truncation_side``).
        truncation_side: which end of a long prompt is cut: ``left`` keeps the end (a trailing cue such as
            ``TL;DR:``), ``right`` the start (a leading one, such as T5's ``summarize:``, and an article's lede);
            null: ``right`` with a chat template, else ``left``.
        trust_remote_code: run code shipped with the model; off unless turned on here.
        torch_dtype: ``float32``, ``bfloat16``, ... or None for the checkpoint's dtype.
        seed: initialisation seed for ``tiny:`` models.
        tokenizer: ``tiny:`` models: ``bytes`` or ``synthetic-bpe``; others: a tokenizer to use instead of the model's.
        gguf_file: a GGUF file inside the hub repository or directory ``model_name_or_path`` (not needed when
            ``model_name_or_path`` is itself a ``.gguf`` path or ``pkg:<package>/<file>.gguf``).
        cache_dir: where GGUF checkpoints are converted to, once (default ``$CLP_CACHE`` or
            ``~/.cache/clp_lightning``).
        chat_template: format prompts with the tokenizer's chat template (instruct models).
        system_prompt: the chat template's system message.
    """

    model_name_or_path: str = "tiny:t5"
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    max_prompt_length: int = 512
    trust_remote_code: bool = False
    torch_dtype: str | None = None
    seed: int = 0
    tokenizer: str | None = None
    gguf_file: str | None = None
    cache_dir: str | None = None
    chat_template: bool = False
    system_prompt: str | None = None
    truncation_side: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.conditioning, dict):
            self.conditioning = ConditioningConfig(**self.conditioning)
        check_truncation_side(self.truncation_side)  # here, not after the model has loaded
        check_max_prompt_length(self.max_prompt_length)

    def build(self, num_objectives: int) -> ConditionalPolicy:
        from clp_lightning.conditioning.policy import ConditionalPolicy  # the policy module imports this one

        return ConditionalPolicy.from_pretrained(
            self.model_name_or_path,
            num_objectives,
            self.conditioning,
            max_prompt_length=self.max_prompt_length,
            trust_remote_code=self.trust_remote_code,
            torch_dtype=self.torch_dtype,
            seed=self.seed,
            tokenizer=self.tokenizer,
            gguf_file=self.gguf_file,
            cache_dir=self.cache_dir,
            chat_template=self.chat_template,
            system_prompt=self.system_prompt,
            truncation_side=self.truncation_side,
        )
