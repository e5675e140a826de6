"""Length rewards: prefer short responses, or responses of a target length."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from transformers import AutoTokenizer

from clp_lightning.models import load_pretrained
from clp_lightning.rewards.base import Reward

LengthUnit = Literal["words", "chars", "tokens"]


class LengthReward(Reward):
    """Reward on the response's length alone.

    Units: ``"words"`` counts whitespace-separated pieces (``str.split()``); ``"chars"`` counts Unicode code points
    (``len(text)``); ``"tokens"`` counts the ``tokenizer``'s tokens without special tokens (a special token's string
    written in a response, such as ``"[SEP]"``, counts as the text it is).

    Modes: ``"brevity"`` gives ``-length / scale`` (shorter is better); ``"target"`` gives
    ``-|length - target_length| / scale`` (0 at the target length, lower on either side).

    Args:
        name: objective name used in metric keys.
        mode: ``"brevity"`` or ``"target"``.
        unit: ``"words"``, ``"chars"`` or ``"tokens"``.
        target_length: the preferred length in ``unit``s; required for ``mode="target"``.
        scale: divides the length (difference), to bring the reward to a unit scale (e.g. 10 for words).
        tokenizer: tokenizer (hub id, local directory or ``pkg:...``) for ``unit="tokens"``.
        batch_size: micro-batch size.
    """

    def __init__(
        self,
        name: str = "length",
        mode: Literal["brevity", "target"] = "brevity",
        unit: LengthUnit = "words",
        target_length: float | None = None,
        scale: float = 1.0,
        tokenizer: str | None = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__(name=name, batch_size=batch_size)
        if mode not in ("brevity", "target"):
            raise ValueError(f"mode must be 'brevity' or 'target', got {mode!r}")
        if unit not in ("words", "chars", "tokens"):
            raise ValueError(f"unit must be 'words', 'chars' or 'tokens', got {unit!r}")
        if mode == "target" and target_length is None:
            raise ValueError("mode='target' needs target_length")
        # Ignored settings are refused: target_length without mode='target' trained for brevity (the default mode)
        # while the config asked for a length; a tokenizer without unit='tokens' counted words or characters.
        if mode != "target" and target_length is not None:
            raise ValueError(f"target_length={target_length} is used only with mode='target', got mode={mode!r}")
        if unit != "tokens" and tokenizer is not None:
            raise ValueError(f"tokenizer={tokenizer!r} is used only with unit='tokens', got unit={unit!r}")
        # A NaN target or scale makes every reward NaN, an infinite scale makes every reward 0, and a negative target
        # is no length: refuse them here rather than hours later, in the normaliser or as a flat objective.
        if target_length is not None and not (math.isfinite(target_length) and target_length >= 0):
            raise ValueError(f"target_length must be a finite length >= 0, got {target_length}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {scale}")
        if unit == "tokens" and tokenizer is None:
            raise ValueError("unit='tokens' needs a tokenizer (hub id, local directory or pkg:<package>/<dir>)")
        self.mode, self.unit, self.target_length, self.scale = mode, unit, target_length, scale
        self.tokenizer = load_pretrained(AutoTokenizer, tokenizer) if unit == "tokens" else None
        self.freeze()

    def lengths(self, responses: list[str]) -> Tensor:
        """``(b,)`` lengths in :attr:`unit`."""
        if self.unit == "words":
            counts = [len(r.split()) for r in responses]
        elif self.unit == "chars":
            counts = [len(r) for r in responses]
        else:
            # split_special_tokens: a "[SEP]" written in a response is five characters of text, not one control token
            ids = self.tokenizer(responses, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            counts = [len(row) for row in ids]
        return torch.tensor(counts, dtype=torch.float32)

    def score(self, sources: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        length = self.lengths(responses)
        if self.mode == "brevity":
            return -length / self.scale
        return -(length - self.target_length).abs() / self.scale

    def extra_repr(self) -> str:
        target = f", target_length={self.target_length}" if self.mode == "target" else ""
        return f"{super().extra_repr()}, mode={self.mode!r}, unit={self.unit!r}{target}, scale={self.scale}"
