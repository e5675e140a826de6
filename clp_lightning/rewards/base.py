"""The reward contract: frozen ``nn.Module``s that score batches of text.

Notation: ``B`` is the number of (source, response) pairs scored in one call.

Every reward is called as ``reward(sources, responses, references) -> Tensor[B]`` (float32, on the reward's
device). It scores in micro-batches of ``batch_size``, never builds an autograd graph and stays in eval mode even when
the parent LightningModule calls ``train()``. Rewards are ``nn.Module``s so that moving the system (``.to(device)``,
``.to(dtype)``) moves them too; a reward without weights keeps an empty buffer only to know its device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer

from clp_lightning.checks import is_integer
from clp_lightning.models import load_pretrained, parse_dtype

# Names of learned absolute position tables: BERT-likes and RoBERTa, BART, GPT-2.
_POSITION_TABLES = ("position_embeddings", "embed_positions", "wpe")


def load_scorer(
    auto_cls: Any,
    model: str,
    tokenizer: str | None = None,
    *,
    trust_remote_code: bool = False,
    torch_dtype: str | None = None,
    check_tokenizer: Callable[[Any], None] | None = None,
    check_config: Callable[[Any], None] | None = None,
) -> tuple[Any, Any]:
    """Load a neural reward's tokenizer, then its model, through :func:`~clp_lightning.models.load_pretrained`.

    Args:
        auto_cls: the ``AutoModel*`` class to load ``model`` with.
        model: hub id (``owner/name@revision`` pins a branch, tag or commit), local directory or
            ``pkg:<package>/<subdir>``.
        tokenizer: tokenizer to load; defaults to ``model``'s.
        trust_remote_code: run code shipped with the model (and tokenizer).
        torch_dtype: weights' dtype name (see :func:`parse_dtype`); None keeps the checkpoint's.
        check_tokenizer: called with the tokenizer before the model loads; the reward's checks that need only the
            tokenizer raise here, before the (possibly many-gigabyte) model is read.
        check_config: called with the model's config (``AutoConfig``, a small file) before the model loads, for
            the checks that need only the config (a classifier's label names).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: ``torch_dtype`` is not a floating-point dtype (checked before anything is loaded), or the
            tokenizer has neither a padding nor an eos token.
        FileNotFoundError, OSError: the model or tokenizer cannot be found or read (see ``load_pretrained``).
    """
    dtype = parse_dtype(torch_dtype)
    dtype_kw = {"dtype": dtype} if dtype else {}
    tok = load_pretrained(AutoTokenizer, tokenizer or model, trust_remote_code=trust_remote_code)
    # Decoder-based reward models (GPT-2, Llama heads) often ship without a padding token, in the tokenizer or in the
    # config; they pool the last non-padding token, so without config.pad_token_id any batch of two fails. The config
    # must name the token the tokenizer pads with: a config that names another one (Llama-style configs say 0 while
    # the tokenizer has no padding token and pads with eos here) makes a shorter text of a batch read its logit at a
    # padding position.
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer of {model!r} has no padding token and no eos token to pad with")
        tok.pad_token = tok.eos_token
    # Scoring pads on the right whatever the tokenizer was saved with (decoder models' tokenizers often pad on the
    # left, for generation): models with absolute positions (BERT, GPT-2) count positions from the first column, so a
    # left-padded text would be read at shifted positions and score differently in a batch than alone.
    tok.padding_side = "right"
    # Likewise every reward documents that a long text loses its end (the end of the source, for pairs); a tokenizer
    # saved with truncation_side="left" would silently keep the end of each article instead of its start.
    tok.truncation_side = "right"
    if check_tokenizer is not None:
        check_tokenizer(tok)
    if check_config is not None:
        check_config(load_pretrained(AutoConfig, model, trust_remote_code=trust_remote_code))
    loaded = load_pretrained(auto_cls, model, trust_remote_code=trust_remote_code, **dtype_kw)
    if getattr(loaded.config, "pad_token_id", None) != tok.pad_token_id:
        loaded.config.pad_token_id = tok.pad_token_id  # the id the tokenizer pads with (see above)
    return loaded, tok


def position_limit(model: nn.Module) -> int | None:
    """Longest input, in tokens, that ``model``'s learned absolute position embeddings cover (BERT, RoBERTa, BART,
    GPT-2); None when no such table bounds it (T5's relative positions, DeBERTa-v3, rotary embeddings)."""
    limits = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            # BART's positions start at an offset of 2, RoBERTa's after its padding index: those rows are never used.
            offset = getattr(module, "offset", None)
            if offset is None:
                offset = 0 if module.padding_idx is None else module.padding_idx + 1
            limits.append(module.num_embeddings - offset)
    return min(limits, default=None)


def check_max_length(model: nn.Module, max_length: int, source: str) -> None:
    """Refuse a ``max_length`` longer than the model's position embeddings, at construction time.

    Without this check the reward loads and scores short inputs fine, and the first input longer than the table (a
    long article, hours into a run) crashes the model with an index or size error.

    Raises:
        ValueError: ``max_length`` exceeds :func:`position_limit`.
    """
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise ValueError(
            f"max_length={max_length} is longer than the {limit} positions of {source!r}'s position embeddings; "
            f"set max_length <= {limit}"
        )


class Reward(nn.Module):
    """Base class of all rewards: validation, micro-batching, no-grad scoring and freezing.

    Subclasses implement :meth:`score` on one micro-batch and call :meth:`freeze` at the end of ``__init__``.

    Attributes:
        name: the objective's name, used in metric keys (``train/reward/<name>``).
        batch_size: micro-batch size for scoring.
        needs_references: True when :meth:`forward` needs ``references``.
    """

    def __init__(self, name: str, batch_size: int = 32) -> None:
        super().__init__()
        if not name:
            raise ValueError("a reward needs a non-empty name (it becomes the metric key train/reward/<name>)")
        # An int: a float passes `>= 1` here and then fails in range() at the first call, after the model has loaded.
        if not is_integer(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.name = name
        self.batch_size = batch_size
        # Tracks the device for rewards without weights, so every reward returns on the module's device.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def needs_references(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (the anchor guarantees there is one)."""
        for tensor in self.parameters():
            return tensor.device
        return next(self.buffers()).device

    def freeze(self) -> None:
        """Turn off gradients and switch to eval mode (dropout off) for good."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Reward:
        # A reward is a fixed function: ignore Lightning's model.train() so dropout never turns on.
        return super().train(False)

    def forward(
        self,
        sources: Sequence[str],
        responses: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> Tensor:
        """Score ``B`` responses.

        Args:
            sources: ``B`` prompts (post or article text, without the policy's instruction decoration).
            responses: ``B`` decoded policy outputs.
            references: ``B`` human references (summaries), or None when the reward does not need them.

        Returns:
            ``(B,)`` float32 rewards on :attr:`device`.
        """
        for arg, value in (("sources", sources), ("responses", responses), ("references", references)):
            if isinstance(value, str):  # list("abc") would silently score three one-letter texts
                raise TypeError(f"reward {self.name!r}: {arg} must be a sequence of strings, got a single string")
        sources, responses = list(sources), list(responses)
        references = None if references is None else list(references)
        if len(sources) != len(responses) or (references is not None and len(references) != len(responses)):
            ref_len = "None" if references is None else len(references)
            raise ValueError(
                f"reward {self.name!r}: sources, responses and references must have the same length, got "
                f"{len(sources)}, {len(responses)} and {ref_len}"
            )
        if self.needs_references and references is None:
            raise ValueError(f"reward {self.name!r} needs references (human summaries), got references=None")
        out = []
        # autocast off: the reward computes in the dtype its config loads it in (torch_dtype), the same inside the
        # trainer's mixed-precision training step as in evaluation hooks, which run outside that autocast (T5 NLI
        # models overflow in float16)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False), self.prepare(sources, responses,
                                                                                             references):
            for i in range(0, len(responses), self.batch_size):
                j = i + self.batch_size
                scores = self.score(sources[i:j], responses[i:j], None if references is None else references[i:j])
                # a (b, 1) or (b, classes) output would fail later, in the stack of objectives, without the name
                expected = (len(responses[i:j]),)
                if not isinstance(scores, Tensor) or tuple(scores.shape) != expected:
                    found = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                    raise ValueError(f"reward {self.name!r}: score() returned {found}, expected a tensor of shape "
                                     f"{expected}, one score per response")
                out.append(scores)
        if not out:
            return torch.zeros(0, device=self.device)
        return torch.cat([o.to(device=self.device, dtype=torch.float32) for o in out])

    def prepare(
        self, sources: list[str], responses: list[str], references: list[str] | None
    ) -> contextlib.AbstractContextManager[None]:
        """Work shared by the micro-batches of one call, done after the inputs are checked and before the first
        :meth:`score`, undone when the call ends. The default does nothing; a reward whose micro-batches repeat
        inputs (evaluation scores every weighting of the same prompts in one call) computes them here once."""
        return contextlib.nullcontext()

    def score(self, sources: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        """Score one micro-batch of ``b <= batch_size`` pairs; returns ``(b,)`` (any float dtype and device)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, batch_size={self.batch_size}"


def to_device(batch: Any, device: torch.device) -> dict[str, Tensor]:
    """Move a tokenizer's ``BatchEncoding`` (or dict of tensors) to ``device``."""
    return {k: v.to(device) for k, v in batch.items()}
