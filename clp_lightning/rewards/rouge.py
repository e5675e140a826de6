"""ROUGE-1/2/L per (response, target) pair, computed offline and fast.

Scores match torchmetrics' ``rouge_score`` (and Google's ``rouge_score``) with ``use_stemmer=False`` and the default
tokenizer: lowercase, every run of non-alphanumeric characters is a separator. ROUGE-L uses a bit-parallel LCS
(Allison-Dix / Hyyro) on Python integers, so a 500-word source costs about 500 big-integer operations instead of a
500 x 50 dynamic-programming table; torchmetrics' per-pair Python DP is far too slow to run on every RL batch.
``rougeLsum`` and the Porter stemmer need NLTK data that cannot be downloaded offline, so they are not offered;
``rougeL`` equals ``rougeLsum`` for single-paragraph text.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Literal

import torch
from torch import Tensor

from clp_lightning.rewards.base import Reward

RougeKey = Literal["rouge1", "rouge2", "rougeL"]
RougeMeasure = Literal["fmeasure", "precision", "recall"]
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """rouge_score's default tokenisation: lowercase, split on runs of non-alphanumeric characters."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists, bit-parallel in ``len(a)``."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()  # zero bits of v mark the LCS


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(zip(*(tokens[i:] for i in range(n))))


def rouge_pair(pred: list[str], target: list[str], key: RougeKey) -> tuple[float, float, float]:
    """``(precision, recall, fmeasure)`` of tokenised ``pred`` against ``target``; all zero if either is empty."""
    if key == "rougeL":
        hits, pred_len, target_len = lcs_length(pred, target), len(pred), len(target)
    else:
        n = int(key[len("rouge") :])
        pred_ngrams, target_ngrams = _ngrams(pred, n), _ngrams(target, n)
        hits = sum((pred_ngrams & target_ngrams).values())
        pred_len, target_len = sum(pred_ngrams.values()), sum(target_ngrams.values())
    if hits == 0 or pred_len == 0 or target_len == 0:
        return 0.0, 0.0, 0.0
    precision, recall = hits / pred_len, hits / target_len
    return precision, recall, 2 * precision * recall / (precision + recall)


class RougeReward(Reward):
    """ROUGE of each response against its reference summary (or its source), one score per pair.

    Args:
        name: objective name used in metric keys.
        target: ``"reference"`` (the human summary; the call must pass references) or ``"source"``.
        rouge_key: ``"rouge1"``, ``"rouge2"`` or ``"rougeL"`` (``rougeLsum`` needs NLTK data, unavailable offline).
        measure: ``"fmeasure"``, ``"precision"`` or ``"recall"``.
        batch_size: micro-batch size (scoring is pure Python; it only bounds memory).
    """

    _MEASURES = ("precision", "recall", "fmeasure")

    def __init__(
        self,
        name: str = "rouge",
        target: Literal["reference", "source"] = "reference",
        rouge_key: RougeKey = "rougeL",
        measure: RougeMeasure = "fmeasure",
        batch_size: int = 256,
    ) -> None:
        super().__init__(name=name, batch_size=batch_size)
        if rouge_key == "rougeLsum":
            raise ValueError(
                "rouge_key='rougeLsum' needs NLTK's sentence splitter data, which cannot be downloaded offline; "
                "use 'rougeL' (identical for text without newline-separated sentences)"
            )
        if rouge_key not in ("rouge1", "rouge2", "rougeL"):
            raise ValueError(f"rouge_key must be 'rouge1', 'rouge2' or 'rougeL', got {rouge_key!r}")
        if measure not in self._MEASURES:
            raise ValueError(f"measure must be one of {self._MEASURES}, got {measure!r}")
        if target not in ("reference", "source"):
            raise ValueError(f"target must be 'reference' or 'source', got {target!r}")
        self.target, self.rouge_key, self.measure = target, rouge_key, measure
        self.freeze()

    @property
    def needs_references(self) -> bool:
        return self.target == "reference"

    def score(self, sources: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        targets = references if self.target == "reference" else sources
        index = self._MEASURES.index(self.measure)
        values = [
            rouge_pair(rouge_tokenize(r), rouge_tokenize(t), self.rouge_key)[index] for r, t in zip(responses, targets)
        ]
        return torch.tensor(values, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, target={self.target!r}, rouge_key={self.rouge_key!r}, measure={self.measure!r}"
