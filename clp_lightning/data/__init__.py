"""LightningDataModules that serve summarisation prompts as ``{"prompt", "source", "reference", "id"}`` batches."""

from clp_lightning.data.base import BATCH_KEYS, SummarizationDataModule, collate_prompts, truncate_words
from clp_lightning.data.cnndm import CNNDailyMailDataModule
from clp_lightning.data.synthetic import SyntheticTLDRDataModule, generate_examples
from clp_lightning.data.tldr import TLDR_TEMPLATE, RedditTLDRDataModule, format_tldr_prompt

__all__ = [
    "BATCH_KEYS",
    "TLDR_TEMPLATE",
    "CNNDailyMailDataModule",
    "RedditTLDRDataModule",
    "SummarizationDataModule",
    "SyntheticTLDRDataModule",
    "collate_prompts",
    "format_tldr_prompt",
    "generate_examples",
    "truncate_words",
]
