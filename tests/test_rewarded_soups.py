"""Rewarded Soups: experts trained with one-hot weightings, soup policy built from their copies."""

import lightning as L
import pytest
import torch
from reward_helpers import HashedTextReward

from clp_lightning.conditioning.lora import LoraSpec
from clp_lightning.conditioning.mixing import mixed_modules
from clp_lightning.conditioning.policy import ConditioningConfig, PolicyConfig
from clp_lightning.config import GenerationSettings, OptimizerConfig, SamplerConfig
from clp_lightning.data import SyntheticTLDRDataModule
from clp_lightning.module import CLPModule

ATTENTION = ConditioningConfig(targets="attention", train_shared=False)
LORA = ConditioningConfig(lora=LoraSpec(r=2, target_modules="attention"))


def make_module(conditioning, sampler=None, experts=None) -> CLPModule:
    torch.manual_seed(0)
    rewards = [HashedTextReward("first"), HashedTextReward("second")]
    policy = PolicyConfig("tiny:t5", conditioning, max_prompt_length=32)
    return CLPModule(
        policy,
        rewards,
        sampler=sampler,
        samples_per_prompt=2,
        expert_checkpoints=experts,
        generation=GenerationSettings(max_new_tokens=4),
        optimizer=OptimizerConfig(lr=5e-2),
    )


def train_expert(tmp_path, conditioning, index: int) -> tuple[CLPModule, str]:
    module = make_module(conditioning, SamplerConfig(kind="one_hot", index=index))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=SyntheticTLDRDataModule(num_train=8, num_val=2, batch_size=2, seed=index))
    path = tmp_path / f"expert{index}.ckpt"
    trainer.save_checkpoint(path)
    return module, str(path)


def _logits(module: CLPModule, w: torch.Tensor) -> torch.Tensor:
    enc = module.policy.encode(["SUBREDDIT: r/cooking\n\nPOST: my soup is too salty\n\nTL;DR:"])
    with module.policy.conditioned(w.view(1, -1)):
        return module.policy.model(**enc, decoder_input_ids=torch.tensor([[0, 70, 71]])).logits


@pytest.mark.parametrize("conditioning", [ATTENTION, LORA], ids=["attention", "lora"])
def test_soup_policy_interpolates_the_experts(tmp_path, conditioning):
    initial = make_module(conditioning)
    (expert0, path0), (expert1, path1) = (train_expert(tmp_path, conditioning, i) for i in (0, 1))
    soup = make_module(conditioning, experts=[path0, path1])
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # one-hot training touched only the expert's own copy
    assert torch.equal(_logits(expert0, e1), _logits(initial, e1))
    assert not torch.equal(_logits(expert0, e0), _logits(initial, e0))
    # the soup is expert i at e_i ...
    assert torch.allclose(_logits(soup, e0), _logits(expert0, e0), atol=1e-6)
    assert torch.allclose(_logits(soup, e1), _logits(expert1, e1), atol=1e-6)
    # ... and the parameter interpolation in between
    if conditioning.targets is not None:
        for name, module in mixed_modules(soup.policy.model).items():
            expert_weights = (
                dict(mixed_modules(expert0.policy.model))[name].weight[0],
                dict(mixed_modules(expert1.policy.model))[name].weight[1],
            )
            assert torch.equal(module.weight[0], expert_weights[0]) and torch.equal(module.weight[1], expert_weights[1])


def test_experts_that_differ_on_shared_weights_are_rejected(tmp_path):
    shared = ConditioningConfig(targets="attention", train_shared=True)
    paths = [train_expert(tmp_path, shared, i)[1] for i in (0, 1)]
    with pytest.raises(ValueError, match="differ on the shared parameter"):
        make_module(shared, experts=paths)
    with pytest.raises(ValueError, match="got 1 experts for 2 objectives"):
        make_module(shared, experts=paths[:1])
    with pytest.raises(FileNotFoundError, match="checkpoint 'missing.ckpt' not found"):
        make_module(shared, experts=["missing.ckpt", paths[1]])
