"""Reward functions: frozen ``nn.Module``s that score (source, response, reference) text, one family per file.

Each reward is called as ``reward(sources, responses, references) -> Tensor[B]`` and has a ``name`` used in metric
keys; :class:`RewardNormalizer` standardises the stacked ``(N, m)`` rewards per objective before they are combined.
"""

from clp_lightning.rewards.base import Reward
from clp_lightning.rewards.classifier import SequenceClassifierReward
from clp_lightning.rewards.embedding import EmbeddingSimilarityReward
from clp_lightning.rewards.learned import HumanScoreReward
from clp_lightning.rewards.length import LengthReward
from clp_lightning.rewards.nli import Seq2SeqNLIReward
from clp_lightning.rewards.normalize import RewardNormalizer
from clp_lightning.rewards.rouge import RougeReward

__all__ = [
    "EmbeddingSimilarityReward",
    "HumanScoreReward",
    "LengthReward",
    "Reward",
    "RewardNormalizer",
    "RougeReward",
    "Seq2SeqNLIReward",
    "SequenceClassifierReward",
]
