"""Prompt conditioning: the weighting (and optionally the KL strength) written into the model's input text.

For seq2seq models the prefix goes in front of the encoder input; for causal models in front of the prompt. Either
way it is a prefix of the prompt text, so one implementation serves both. It goes after the special tokens a
tokenizer puts before every text (a BOS: Llama 3, Gemma), where the text itself starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from clp_lightning.checks import is_integer


def leading_special_tokens(tokenizer: Any) -> int:
    """How many special tokens ``tokenizer`` puts before a text (1 for a BOS, as Llama 3 and Gemma add; 0 for GPT-2,
    T5 and SmolLM2), found by tokenising a probe text with and without them."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
    return starts[0] if starts else 0


class PromptConditioner:
    """Formats ``w`` (and ``alpha``) as a text prefix.

    Args:
        template: prefix with a ``{weights}`` field, e.g. ``"<w {weights}> "``.
        alpha_template: prefix used when ``alpha`` is given, with ``{weights}`` and ``{alpha}`` fields.
        precision: decimals written per number; the policy sees ``w`` rounded to this.
        separator: between the entries of ``w``.
    """

    def __init__(
        self,
        template: str = "<w {weights}> ",
        alpha_template: str = "<w {weights} | kl {alpha}> ",
        precision: int = 2,
        separator: str = ",",
    ) -> None:
        if "{weights}" not in template:
            raise ValueError(f"prompt template {template!r} must contain a '{{weights}}' field")
        if "{weights}" not in alpha_template or "{alpha}" not in alpha_template:
            raise ValueError(f"alpha template {alpha_template!r} must contain '{{weights}}' and '{{alpha}}' fields")
        # a template that names another field (or a positional one) would fail at the first encode, mid-run
        for name, text, fields in (("prompt template", template, {"weights": ""}),
                                   ("alpha template", alpha_template, {"weights": "", "alpha": ""})):
            try:
                text.format(**fields)
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"{name} {text!r} is not a format with only the fields {sorted(fields)}: "
                                 f"{type(err).__name__} {err}") from None
        if not is_integer(precision) or precision < 0:  # 1.5 or True would fail only at the first prefix, mid-run
            raise ValueError(f"precision must be >= 0, an integer (decimals per number), got {precision!r}")
        self.template = template
        self.alpha_template = alpha_template
        self.precision = precision
        self.separator = separator

    def prefix(self, weights: Sequence[float] | Tensor, alpha: float | None = None) -> str:
        """The prefix for one weighting ``(m,)``."""
        values = weights.tolist() if isinstance(weights, Tensor) else list(weights)
        text = self.separator.join(f"{v:.{self.precision}f}" for v in values)
        if alpha is None:
            return self.template.format(weights=text)
        return self.alpha_template.format(weights=text, alpha=f"{float(alpha):.{self.precision}g}")

    def prefixes(self, weights: Tensor, alpha: Tensor | None = None) -> list[str]:
        """One prefix per row of ``weights`` ``(B, m)``, with ``alpha`` ``(B,)``."""
        if alpha is not None and tuple(alpha.shape) != (weights.shape[0],):
            # zip would pair each row with the first B alphas (per-response alphas with per-prompt weights: the
            # wrong KL strength in every prompt but the first) or drop the rows beyond them
            raise ValueError(f"`alpha` must have shape (B,) = ({weights.shape[0]},), one per weighting, got "
                             f"{tuple(alpha.shape)}")
        alphas = [None] * weights.shape[0] if alpha is None else alpha.tolist()
        return [self.prefix(w, a) for w, a in zip(weights, alphas)]


class ChatFormat:
    """Prompts through the tokenizer's chat template, for instruct models: an optional system message, the prompt
    (with any conditioning prefix) as the user turn, and the template's assistant header as the generation cue.

    The template is rendered once around a placeholder and split into the token ids before and after the user's
    text, so a long prompt is truncated inside the user turn (the turn's markers and the cue always survive) and
    every call formats identically, for the policy and the reference alike.

    Args:
        tokenizer: a tokenizer with a ``chat_template``.
        system_prompt: the system message; None leaves it to the template (which may insert its own default).

    Attributes:
        head_ids: ids before the user's text (system turn, user header).
        tail_ids: ids after it (end of the user turn, assistant header).
        end_of_turn_id: the token that closes an assistant turn (e.g. ChatML's ``<|im_end|>``), where the template
            ends turns with a special token; generation stops there. None otherwise.
    """

    _PLACEHOLDER = "\x00clp-user-turn\x00"

    def __init__(self, tokenizer: Any, system_prompt: str | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"chat_template=True but the tokenizer {type(tokenizer).__name__} "
                             f"({getattr(tokenizer, 'name_or_path', '?')!r}) has no chat template")
        system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        text = tokenizer.apply_chat_template(system + [{"role": "user", "content": self._PLACEHOLDER}],
                                             tokenize=False, add_generation_prompt=True)
        head, found, tail = text.partition(self._PLACEHOLDER)
        if not found:
            raise ValueError("the tokenizer's chat template does not reproduce the user's message verbatim; "
                             "it cannot be used to format prompts")
        self.head_ids: list[int] = tokenizer(head, add_special_tokens=False)["input_ids"]
        self.tail_ids: list[int] = tokenizer(tail, add_special_tokens=False)["input_ids"]
        self.end_of_turn_id = self._end_of_turn(tokenizer)

    @classmethod
    def _end_of_turn(cls, tokenizer: Any) -> int | None:
        turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": cls._PLACEHOLDER}]
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False)
        except Exception:  # a template that refuses assistant turns: no end-of-turn token to learn
            return None
        after = text.partition(cls._PLACEHOLDER)[2]
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        return ids[0] if ids and ids[0] in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder) \
            else None

    def wrap(self, user_ids: list[int]) -> list[int]:
        """Token ids of the full prompt around the user turn's ids."""
        return self.head_ids + user_ids + self.tail_ids
