"""A reward learned from people's judgements: a small head on frozen sentence-encoder features of (article, summary).

Notation: ``b`` pairs in a micro-batch, ``H`` the encoder's hidden size (384 for all-MiniLM-L6-v2), ``F`` the
number of pair features.

A head directory (written by ``clp reward train-human``, see :mod:`clp_lightning.rewards.train`) holds:

- ``head.safetensors``: the head's tensors (feature standardisation buffers and the MLP's weights), nothing pickled;
- ``reward.json``: everything needed to rebuild and check the head (:class:`HeadSpec`): the encoder it was trained
  on and a probe embedding of that encoder, the feature list, the architecture sizes, the target's normalisation,
  and the training run's settings and metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from clp_lightning.files import fsync_directory, fsync_file, json_text
from clp_lightning.models import resolve_path
from clp_lightning.rewards.base import Reward
from clp_lightning.rewards.embedding import EmbeddingSimilarityReward

log = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"
SPEC_FILE = "reward.json"
FORMAT = "clp-human-score-head/1"

# Pair features of the article embedding u (b, H), the summary embedding v (b, H) and the summary's log word count:
# u, v, u * v and |u - v| are H wide; cos(u, v) and the log word count are one number each.
VECTOR_FEATURES = ("article", "summary", "product", "absdiff")
SCALAR_FEATURES = ("cosine", "log_words")
FEATURES = VECTOR_FEATURES + SCALAR_FEATURES

# Embedded at training time and again at load time: the same encoder (and tokenizer, pooling, max_length) gives
# the same vector whatever its name, so a head is never silently run on another encoder's features.
PROBE_TEXT = "Officials said on Tuesday that the new bridge across the river will open to traffic next spring."
PROBE_MIN_COSINE = 0.99  # float32 reloads match to ~1e-6; bfloat16 weights stay above 0.999


def log_word_counts(texts: Sequence[str]) -> Tensor:
    """``(b,)`` float32 ``log(1 + number of whitespace-separated words)``."""
    return torch.tensor([math.log1p(len(t.split())) for t in texts], dtype=torch.float32)


def check_features(features: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``features`` is a non-empty list of distinct names from :data:`FEATURES`."""
    if not features or any(f not in FEATURES for f in features) or len(set(features)) != len(features):
        raise ValueError(f"features must be distinct names from {list(FEATURES)}, got {list(features)}")


def feature_dim(features: Sequence[str], hidden_size: int) -> int:
    """``F``: the width of :func:`pair_features`' output."""
    return sum(hidden_size if f in VECTOR_FEATURES else 1 for f in features)


def pair_features(u: Tensor, v: Tensor, log_words: Tensor, features: Sequence[str]) -> Tensor:
    """Concatenate the named features of each (article, summary) pair.

    Args:
        u: ``(b, H)`` unit-norm article embeddings.
        v: ``(b, H)`` unit-norm summary embeddings.
        log_words: ``(b,)`` log word counts of the summaries (:func:`log_word_counts`).
        features: names from :data:`FEATURES`, in output order.

    Returns:
        ``(b, F)`` float32 features.
    """
    makers = {
        "article": lambda: u,
        "summary": lambda: v,
        "product": lambda: u * v,
        "absdiff": lambda: (u - v).abs(),
        "cosine": lambda: (u * v).sum(-1, keepdim=True),
        "log_words": lambda: log_words.to(u.device, u.dtype).unsqueeze(-1),
    }
    return torch.cat([makers[f]().float() for f in features], dim=-1)


class QualityHead(nn.Module):
    """Standardise the features, then a one-hidden-layer MLP (or a linear map when ``hidden == 0``).

    Input ``(b, F)`` features; output ``(b,)`` scores in the target's normalised units (train mean 0, std 1).
    """

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        if in_features < 1 or hidden < 0:
            raise ValueError(f"QualityHead needs in_features >= 1 and hidden >= 0, got {in_features} and {hidden}")
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))
        if hidden:
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(in_features, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.feature_mean) / self.feature_std).squeeze(-1)


def head_shapes(in_features: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The shapes of ``QualityHead(in_features, hidden).state_dict()``, computed without building (allocating) it."""
    shapes = {"feature_mean": (in_features,), "feature_std": (in_features,)}
    if hidden:
        return {**shapes, "net.0.weight": (hidden, in_features), "net.0.bias": (hidden,), "net.2.weight": (1, hidden),
                "net.2.bias": (1,)}
    return {**shapes, "net.0.weight": (1, in_features), "net.0.bias": (1,)}


@dataclass
class HeadSpec:
    """The contents of ``reward.json``.

    Attributes:
        encoder: the encoder the features came from (hub id, directory or ``pkg:`` name), as given to the trainer.
        hidden_size: ``H``, the encoder's embedding width.
        max_length: tokens per text the encoder read (longer articles were cut at the end).
        probe_embedding: the encoder's ``(H,)`` embedding of :data:`PROBE_TEXT`.
        features: feature names from :data:`FEATURES`, in order.
        in_features: ``F``, must equal ``feature_dim(features, hidden_size)``.
        hidden: the head's hidden width (0: linear head).
        target_mean: mean of the training targets (human mean scores); predictions are ``out * std + mean``.
        target_std: their standard deviation.
        training: settings and sizes of the training run (informational).
        metrics: validation/test correlations of the head and the baselines (informational).
    """

    encoder: str
    hidden_size: int
    max_length: int
    probe_embedding: list[float]
    features: list[str]
    in_features: int
    hidden: int
    target_mean: float
    target_std: float
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "encoder": {
                "model": self.encoder,
                "hidden_size": self.hidden_size,
                "max_length": self.max_length,
                "pooling": "mean over tokens, L2-normalised",
            },
            "features": list(self.features),
            "head": {"in_features": self.in_features, "hidden": self.hidden},
            "target": {"name": "mean_score", "mean": self.target_mean, "std": self.target_std},
            "training": self.training,
            "metrics": self.metrics,
            # Last: 384 numbers that no one reads, after the ones people do.
            "encoder_probe": {"text": PROBE_TEXT, "embedding": [round(x, 7) for x in self.probe_embedding]},
        }

    @classmethod
    def read(cls, path: str | Path) -> HeadSpec:
        """Parse and validate ``reward.json``.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not JSON, or a key is missing or has a bad value (the message names the file and the key).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a head directory needs {SPEC_FILE} next to {HEAD_FILE}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err

        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            node: Any = raw
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ValueError(f"{path}: missing key {key!r}")
                node = node[part]
            if not isinstance(node, kind) or isinstance(node, bool):
                raise ValueError(f"{path}: key {key!r} must be of type {kind}, got {node!r}")
            return node

        def number(key: str) -> float:
            try:
                return float(get(key, (int, float)))
            except OverflowError:  # JSON integers have no bound
                raise ValueError(f"{path}: key {key!r} must be a number in float range, got a larger integer") from None

        if get("format", str) != FORMAT:
            raise ValueError(f"{path}: key 'format' is {raw['format']!r}, expected {FORMAT!r}")
        spec = cls(
            encoder=get("encoder.model", str),
            hidden_size=get("encoder.hidden_size", int),
            max_length=get("encoder.max_length", int),
            probe_embedding=get("encoder_probe.embedding", list),
            features=get("features", list),
            in_features=get("head.in_features", int),
            hidden=get("head.hidden", int),
            target_mean=number("target.mean"),
            target_std=number("target.std"),
            training=raw.get("training", {}),
            metrics=raw.get("metrics", {}),
        )
        try:
            check_features(spec.features)
        except ValueError as err:
            raise ValueError(f"{path}: key 'features': {err}") from None
        for key, value in (("encoder.hidden_size", spec.hidden_size), ("encoder.max_length", spec.max_length)):
            if value < 1:
                raise ValueError(f"{path}: key {key!r} must be >= 1, got {value}")
        if spec.hidden < 0:
            raise ValueError(f"{path}: key 'head.hidden' must be >= 0, got {spec.hidden}")
        expected = feature_dim(spec.features, spec.hidden_size)
        if spec.in_features != expected:
            raise ValueError(
                f"{path}: key 'head.in_features' is {spec.in_features}, but features {spec.features} of an encoder "
                f"with hidden_size {spec.hidden_size} have width {expected}"
            )
        if not (math.isfinite(spec.target_std) and spec.target_std > 0 and math.isfinite(spec.target_mean)):
            raise ValueError(f"{path}: key 'target' needs a finite mean and std > 0, got {raw['target']}")
        if len(spec.probe_embedding) != spec.hidden_size or not all(
            isinstance(x, (int, float)) for x in spec.probe_embedding
        ):
            raise ValueError(f"{path}: key 'encoder_probe.embedding' must be {spec.hidden_size} numbers")
        try:
            spec.probe_embedding = [float(x) for x in spec.probe_embedding]
        except OverflowError:
            raise ValueError(f"{path}: key 'encoder_probe.embedding' must be {spec.hidden_size} numbers in float "
                             f"range, got a larger integer") from None
        return spec


def save_head(directory: str | Path, head: QualityHead, spec: HeadSpec) -> None:
    """Write ``head.safetensors`` and ``reward.json``, each to a temporary file renamed into place.

    Both temporary files are complete before either replaces a file, and the old ``reward.json`` is removed before
    the tensors are replaced: a failed or interrupted save leaves the previous head whole, or no ``reward.json`` (a
    directory that refuses to load), never new tensors read with the old spec's normalisation and probe.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    head_tmp, spec_tmp = directory / f".{HEAD_FILE}.tmp", directory / f".{SPEC_FILE}.tmp"
    try:
        save_file({k: t.detach().float().contiguous().cpu() for k, t in head.state_dict().items()}, str(head_tmp))
        spec_tmp.write_text(json_text(spec.to_json(), indent=2) + "\n")
        for tmp in (head_tmp, spec_tmp):  # on disk before the renames, which a crash could otherwise keep alone
            fsync_file(tmp)
    except BaseException:
        head_tmp.unlink(missing_ok=True)
        spec_tmp.unlink(missing_ok=True)
        raise
    (directory / SPEC_FILE).unlink(missing_ok=True)
    os.replace(head_tmp, directory / HEAD_FILE)
    os.replace(spec_tmp, directory / SPEC_FILE)
    fsync_directory(directory)


def load_head(directory: str | Path) -> tuple[QualityHead, HeadSpec]:
    """Read a head directory written by :func:`save_head`, checking tensor names and shapes against the spec.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        ValueError: ``reward.json`` is invalid, or ``head.safetensors`` is unreadable or does not fit the spec.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"head directory {str(directory)!r} does not exist (write one with `clp reward train-human --out DIR`)"
        )
    spec = HeadSpec.read(directory / SPEC_FILE)
    path = directory / HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    # The sizes in reward.json are untrusted: compare them with the shapes in the safetensors header (read without
    # the tensors) before a head is built, so a huge width is refused, not allocated.
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    expected = head_shapes(spec.in_features, spec.hidden)
    if found != expected:
        wrong = {k: (found[k], expected[k]) for k in expected.keys() & found.keys() if found[k] != expected[k]}
        raise ValueError(
            f"{path} does not match the architecture in {SPEC_FILE} (in_features={spec.in_features}, "
            f"hidden={spec.hidden}): missing {sorted(expected.keys() - found.keys())}, unexpected "
            f"{sorted(found.keys() - expected.keys())}, shapes (found, expected) {wrong}"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    bad = [k for k, t in tensors.items() if not t.is_floating_point() or not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: tensors {bad} are not finite floating-point values")
    if not (tensors["feature_std"] > 0).all():  # the head divides by it: every score would be inf or nan
        zero = (tensors["feature_std"] <= 0).nonzero().flatten().tolist()
        raise ValueError(f"{path}: feature_std must be > 0 (train-human writes 1 for a constant feature); entries "
                         f"{zero[:10]} are not")
    head = QualityHead(spec.in_features, spec.hidden)
    head.load_state_dict(tensors)
    return head, spec


def _same_source(a: str, b: str) -> bool:
    """Whether two model names point at the same place (``pkg:`` names resolved to their directories)."""
    try:
        return a == b or Path(resolve_path(a)).resolve() == Path(resolve_path(b)).resolve()
    except FileNotFoundError:  # e.g. the training run's pkg: encoder is not installed here
        return False


class HumanScoreReward(Reward):
    """Predicted mean human quality score of a summary of an article, on the people's own scale (about 0..4).

    A :class:`QualityHead` reads features of the frozen encoder's article and summary embeddings (the same mean
    pooling as :class:`EmbeddingSimilarityReward`, which loads and runs the encoder here). Train a head with
    ``clp reward train-human``; ``reward.json`` in its directory says which features, and how well the head ranks
    held-out summaries.

    Args:
        head: directory with ``head.safetensors`` and ``reward.json``.
        model: the encoder; must be the one the head was trained on (a different name is accepted only if it
            embeds a probe sentence the same way, with a warning).
        name: objective name used in metric keys.
        max_length: tokens per text; None uses the training run's value (another value shifts the features).
        batch_size: micro-batch size.
        trust_remote_code: run code shipped with the encoder.
        torch_dtype: encoder weights' dtype; the head stays in float32 unless the module is cast.
    """

    def __init__(
        self,
        head: str,
        model: str = "sentence-transformers/all-MiniLM-L6-v2",
        name: str = "quality",
        max_length: int | None = None,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        torch_dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, batch_size=batch_size)
        if max_length is not None and max_length < 1:  # `max_length or ...` below would take 0 as "the head's"
            raise ValueError(f"max_length must be >= 1 or None (the head's training value), got {max_length}")
        # The head's files are checked before the encoder is loaded: a bad directory fails in milliseconds.
        self.head, spec = load_head(head)
        if max_length is not None and max_length != spec.max_length:
            log.warning(
                "reward %r: max_length=%d, but the head was trained on features with max_length=%d",
                name,
                max_length,
                spec.max_length,
            )
        self.encoder = EmbeddingSimilarityReward(
            model,
            name=f"{name}/encoder",
            max_length=max_length or spec.max_length,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
            torch_dtype=torch_dtype,
        )
        self._check_encoder(model, spec, Path(head) / SPEC_FILE)
        self.features, self.head_dir = tuple(spec.features), str(head)
        self.target_mean, self.target_std = spec.target_mean, spec.target_std
        self.freeze()

    def _check_encoder(self, model: str, spec: HeadSpec, spec_path: Path) -> None:
        with torch.no_grad():
            probe = self.encoder.embed([PROBE_TEXT])[0].cpu()
        if probe.numel() != spec.hidden_size:
            raise ValueError(
                f"encoder {model!r} embeds to {probe.numel()} dimensions, the head in {spec_path} was "
                f"trained on {spec.encoder!r} with hidden_size {spec.hidden_size}"
            )
        cosine = float(F.cosine_similarity(probe, torch.tensor(spec.probe_embedding), dim=0))
        if not cosine >= PROBE_MIN_COSINE:  # also a nan probe (reward.json may hold NaN): no evidence of a match
            raise ValueError(
                f"the head in {spec_path} was trained on encoder {spec.encoder!r}, but model={model!r} embeds the "
                f"probe sentence differently (cosine {cosine:.4f} < {PROBE_MIN_COSINE}); pass model={spec.encoder!r}"
            )
        if not _same_source(model, spec.encoder):
            log.warning(
                "reward %r: model=%r differs from the encoder %r in %s, but it embeds the probe sentence "
                "the same way (cosine %.5f), so the head is used",
                self.name,
                model,
                spec.encoder,
                spec_path,
                cosine,
            )

    def prepare(
        self, sources: list[str], responses: list[str], references: list[str] | None
    ) -> contextlib.AbstractContextManager[None]:
        return self.encoder.remembering(sources)  # each distinct article embedded once per call

    def score(self, sources: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        u = self.encoder.embed_distinct(sources)  # (b, H)
        v = self.encoder.embed(responses)  # (b, H)
        x = pair_features(u, v, log_word_counts(responses), self.features)  # (b, F)
        out = self.head(x.to(self.head.feature_mean.dtype))
        return out.float() * self.target_std + self.target_mean

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, head={self.head_dir!r}, features={list(self.features)}"
