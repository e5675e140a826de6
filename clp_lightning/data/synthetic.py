"""The offline quick start's data module; its examples come from :mod:`clp_lightning.synthetic_text`."""

from __future__ import annotations

from typing import Any

import datasets

from clp_lightning.checks import is_integer
from clp_lightning.data.tldr import RedditTLDRDataModule
from clp_lightning.synthetic_text import generate_examples


class SyntheticTLDRDataModule(RedditTLDRDataModule):
    """Synthetic TL;DR data made in memory, passed through the same validation and formatting as the real data.

    Args:
        num_train: Training examples.
        num_val: Validation examples.
        num_test: Test (and predict) examples.
        seed: Seed of the generator, the training shuffle and the subsampling.
        **kwargs: Loader options of ``RedditTLDRDataModule`` / ``SummarizationDataModule`` (``batch_size``, ...).
    """

    def __init__(self, num_train: int = 2048, num_val: int = 64, num_test: int = 64, seed: int = 0,
                 **kwargs: Any) -> None:
        if kwargs.get("data_files") is not None:
            raise ValueError("SyntheticTLDRDataModule generates its data; use RedditTLDRDataModule for data_files")
        super().__init__(path="synthetic", schema="raw", seed=seed, **kwargs)
        self.sizes: dict[str, int] = {}
        for role, size in [("train", num_train), ("val", num_val), ("test", num_test)]:
            # checked here: 0 failed in setup as "Split 'train' is empty", a float as a TypeError, both after the
            # model had loaded and neither naming the argument
            if not (is_integer(size) and size >= 1):
                raise ValueError(f"num_{role} must be an integer >= 1, got {size!r}")
            split = self.splits[role]
            if self.sizes.get(split, size) != size:  # one split is one list of examples: it has one size
                raise ValueError(f"{role}_split {split!r} is also another role's split, with another size: "
                                 f"num_{role}={size} against {self.sizes[split]}; give the roles that share a "
                                 "split the same size")
            self.sizes[split] = size
        # num_test examples in a predict split of its own too: one had failed in setup as an unknown split
        self.sizes.setdefault(self.splits["predict"], num_test)

    def check_files(self, stage: str | None = None) -> None:
        pass  # no files: its path ("synthetic") must not be looked up, e.g. as a folder of that name in the cwd

    def prepare_data(self) -> None:
        pass  # nothing to download

    def _load_split(self, split: str) -> datasets.Dataset:
        if split not in self.sizes:
            raise ValueError(f"Unknown synthetic split {split!r}: expected one of {sorted(self.sizes)}")
        return datasets.Dataset.from_list(generate_examples(self.sizes[split], self.seed, split))
