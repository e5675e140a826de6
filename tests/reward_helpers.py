"""Rewards for tests: known values for any text, no model."""

import hashlib

import torch
from torch import Tensor

from clp_lightning.rewards import Reward


class HashedTextReward(Reward):
    """A fixed, known reward per response text, uniform in ``[0, 1)``: a hash of (seed, name, text).

    Any text gets a value, so the bandit's table needs no list of the responses the tokenizer can produce; the
    exact target is computed by calling this same reward on every one-token response.
    """

    def __init__(self, name: str, seed: int = 0) -> None:
        super().__init__(name=name, batch_size=1024)
        self.seed = seed
        self.freeze()

    def value(self, text: str) -> float:
        digest = hashlib.sha256(f"{self.seed}/{self.name}/{text}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64

    def score(self, sources: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        return torch.tensor([self.value(r) for r in responses], dtype=torch.float32)
