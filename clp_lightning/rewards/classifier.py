"""Rewards from sequence classifiers: NLI (roberta-large-mnli), faithfulness (bart-faithful-summary-detector) and
preference reward models (OpenAssistant/reward-model-deberta-v3-large-v2)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from transformers import AutoModelForSequenceClassification, BatchEncoding, PreTrainedConfig, PreTrainedTokenizerBase

from clp_lightning.rewards.base import Reward, check_max_length, load_scorer, to_device

ClassifierOutput = Literal["logit", "probability", "logit_diff"]


def resolve_label(config: PreTrainedConfig, label: int | str, model: str) -> int:
    """A class index from an index or a label name (matched case-insensitively against ``config.label2id``).

    Raises:
        ValueError: the index is out of range or the name is unknown; the message lists the model's labels.
    """
    num_labels = config.num_labels
    available = {str(name): int(i) for i, name in config.id2label.items()}
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        matches = [i for name, i in available.items() if name.lower() == label.lower()]
        if not matches:
            raise ValueError(f"label {label!r} is not a label of {model!r}; available labels: {available}")
        return matches[0]
    index = int(label)
    if not 0 <= index < num_labels:
        raise ValueError(f"label index {index} is out of range for {model!r} ({num_labels} labels: {available})")
    return index


class SequenceClassifierReward(Reward):
    """Score with a sequence-classification model: a chosen class's logit, its probability, or a logit difference.

    With ``pair=True`` the model reads ``tokenizer(source, response)`` (NLI premise/hypothesis, question/answer), or
    ``tokenizer(response, source)`` with ``pair_order="response_source"``. Only the end of the source is truncated
    to fit ``max_length``, so the response is seen whole unless it alone is longer than ``max_length`` (then both
    are cut, longest first). With ``pair=False`` the model reads the response alone.

    Typical setups:
        - ``roberta-large-mnli``: ``pair=True, output="probability", label="entailment"`` (index 2), ``max_length=512``.
        - ``CogComp/bart-faithful-summary-detector``: ``pair_order="response_source", output="probability",
          label=1`` (faithful).
        - ``OpenAssistant/reward-model-deberta-v3-large-v2``: ``pair=True, output="logit", label=0`` (one logit).

    Args:
        model: hub id, local directory or ``pkg:<package>/<subdir>`` of an ``AutoModelForSequenceClassification``.
        name: objective name used in metric keys.
        tokenizer: tokenizer to load; defaults to ``model``'s.
        pair: classify ``(source, response)`` pairs; False classifies the response alone.
        pair_order: ``"source_response"`` (NLI premise first, question first) or ``"response_source"`` (the
            summary first, as bart-faithful-summary-detector expects). Either way only the source is truncated.
        output: ``"logit"`` of ``label``; ``"probability"`` (softmax over classes, or sigmoid for a one-logit head);
            ``"logit_diff"``: logit of ``label`` minus logit of ``minus_label``.
        label: class index or label name (case-insensitive, from the model's ``config.label2id``).
        minus_label: class subtracted when ``output="logit_diff"`` (refused with another output).
        max_length: maximum tokens per input, special tokens included. Set explicitly: some tokenizers report a
            huge ``model_max_length``.
        source_max_chars: cut the source to this many characters before tokenising (saves time on long articles);
            None keeps it whole. Only with ``pair=True`` (as is ``pair_order``).
        batch_size: micro-batch size.
        trust_remote_code: run code shipped with the model.
        torch_dtype: weights' dtype (``"float32"``, ``"bfloat16"``, ...); None keeps the checkpoint's.
    """

    def __init__(
        self,
        model: str,
        name: str = "classifier",
        tokenizer: str | None = None,
        pair: bool = True,
        pair_order: Literal["source_response", "response_source"] = "source_response",
        output: ClassifierOutput = "probability",
        label: int | str = 0,
        minus_label: int | str | None = None,
        max_length: int = 512,
        source_max_chars: int | None = None,
        batch_size: int = 16,
        trust_remote_code: bool = False,
        torch_dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, batch_size=batch_size)
        if output not in ("logit", "probability", "logit_diff"):
            raise ValueError(f"output must be 'logit', 'probability' or 'logit_diff', got {output!r}")
        if output == "logit_diff" and minus_label is None:
            raise ValueError("output='logit_diff' needs minus_label (the class whose logit is subtracted)")
        if pair_order not in ("source_response", "response_source"):
            raise ValueError(f"pair_order must be 'source_response' or 'response_source', got {pair_order!r}")
        # Settings that would be silently ignored: the source is not read without pair, and only logit_diff subtracts.
        if minus_label is not None and output != "logit_diff":
            raise ValueError(f"minus_label={minus_label!r} has no effect with output={output!r}; use "
                             f"output='logit_diff' to subtract its logit, or leave minus_label unset")
        if not pair:
            for setting, value, default in (("source_max_chars", source_max_chars, None),
                                            ("pair_order", pair_order, "source_response")):
                if value != default:
                    raise ValueError(f"{setting}={value!r} has no effect with pair=False (the model reads the "
                                     f"response alone); set pair=True or leave {setting} unset")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if source_max_chars is not None and source_max_chars < 1:  # s[:0] empties every source, s[:-n] cuts its end
            raise ValueError(f"source_max_chars must be >= 1 or None (keep the whole source), got {source_max_chars}")

        def check_tokenizer(tok: PreTrainedTokenizerBase) -> None:
            # Room for one token of each text besides the special tokens. Below that the tokenizer cannot truncate:
            # the pair comes back whole, longer than max_length (past the position table on a long source), or as
            # special tokens only, which score every input the same.
            minimum = tok.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)
            if max_length < minimum:
                what = "a (source, response) pair" if pair else "a response"
                raise ValueError(
                    f"max_length={max_length} leaves no room for text: the tokenizer of {tokenizer or model!r} adds "
                    f"{minimum - (2 if pair else 1)} special tokens to {what}; set max_length >= {minimum}"
                )

        def check_config(config: PreTrainedConfig) -> None:
            # a label name the model does not have is found from its config, before a 1.7 GB DeBERTa loads
            index = resolve_label(config, label, model)
            minus = None if minus_label is None else resolve_label(config, minus_label, model)
            if output == "logit_diff" and minus == index:
                # a class minus itself scores every response 0 (a one-logit head has no other class)
                raise ValueError(f"output='logit_diff' with label={label!r} and minus_label={minus_label!r} subtracts "
                                 f"the same class ({index}) of {model!r} from itself; choose two different classes")

        self.model, self.tokenizer = load_scorer(
            AutoModelForSequenceClassification,
            model,
            tokenizer,
            trust_remote_code=trust_remote_code,
            torch_dtype=torch_dtype,
            check_tokenizer=check_tokenizer,
            check_config=check_config,
        )
        check_max_length(self.model, max_length, model)
        self.pair, self.pair_order, self.output = pair, pair_order, output
        self.max_length, self.source_max_chars = max_length, source_max_chars
        self.label = resolve_label(self.model.config, label, model)
        self.minus_label = None if minus_label is None else resolve_label(self.model.config, minus_label, model)
        self.freeze()

    def encode(self, sources: list[str], responses: list[str]) -> BatchEncoding:
        """Tokenise a micro-batch: ``input_ids`` etc. of shape ``(b, <= max_length)``, padded."""
        # Texts are data: a "</s>" or "[SEP]" in a post or a response is text, not the tokenizer's control token (an
        # extra </s> made BART classifiers refuse the batch: every row must have the same number of eos tokens).
        kw = dict(max_length=self.max_length, padding=True, return_tensors="pt", split_special_tokens=True)
        if not self.pair:
            return self.tokenizer(responses, truncation=True, **kw)
        if self.source_max_chars is not None:
            sources = [s[: self.source_max_chars] for s in sources]
        pairs = (sources, responses) if self.pair_order == "source_response" else (responses, sources)
        try:  # the common case: one fast batched call that cuts only the source
            return self.tokenizer(*pairs, truncation=self._cut_source, **kw)
        except Exception:  # tokenizers raises a bare Exception when the source would have to go entirely
            # Only the offending pairs fall back to cutting both sides, so the others keep their whole response.
            rows = [self._encode_one(first, second) for first, second in zip(*pairs)]
            return self.tokenizer.pad(rows, padding=True, return_tensors="pt")

    @property
    def _cut_source(self) -> str:
        return "only_first" if self.pair_order == "source_response" else "only_second"

    def _encode_one(self, first: str, second: str) -> dict:
        try:
            return self._pair(first, second, truncation=self._cut_source, max_length=self.max_length)
        except Exception:
            pass
        # tokenizers also refuses to cut the source to nothing: a response that fits beside an empty source (exactly
        # max_length with the special tokens) is kept whole, as documented, instead of being cut with the source.
        without_source = ("", second) if self.pair_order == "source_response" else (first, "")
        enc = self._pair(*without_source)
        if len(enc["input_ids"]) <= self.max_length:
            return enc
        return self._pair(first, second, truncation="longest_first", max_length=self.max_length)

    def _pair(self, first: str, second: str, **kw: Any) -> dict:
        # A batch of one: called with a single pair, the tokenizer reads an empty second text as no pair at all.
        return {k: v[0] for k, v in self.tokenizer([first], [second], split_special_tokens=True, **kw).items()}

    def score(self, sources: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        logits = self.model(**to_device(self.encode(sources, responses), self.device)).logits.float()  # (b, labels)
        if self.output == "logit":
            return logits[:, self.label]
        if self.output == "logit_diff":
            return logits[:, self.label] - logits[:, self.minus_label]
        if logits.shape[-1] == 1:  # a single-logit head is a binary classifier
            return torch.sigmoid(logits[:, 0])
        return logits.softmax(-1)[:, self.label]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pair={self.pair}, output={self.output!r}, label={self.label}"
