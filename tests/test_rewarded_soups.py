"""Rewarded Soups: experts trained with one-hot weightings, soup policy built from their copies (parameter mixing
and LoRA); at an interior ``w`` the soup is the model with the experts' parameters interpolated."""

import copy

import lightning as L
import pytest
import torch
from reward_helpers import HashedTextReward

from clp_lightning.callbacks.checkpoint import CheckpointError
from clp_lightning.conditioning.config import ConditioningConfig, PolicyConfig
from clp_lightning.config import GenerationSettings, OptimizerConfig, SamplerConfig
from clp_lightning.data import SyntheticTLDRDataModule
from clp_lightning.module import CLPModule

ATTENTION = ConditioningConfig(mode="mixing", options={"targets": "attention"}, train_shared=False)
LORA = ConditioningConfig(mode="lora", options={"r": 2, "target_modules": "attention"})


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


PROMPT = "SUBREDDIT: r/cooking\n\nPOST: my soup is too salty\n\nTL;DR:"
DECODER_IDS = torch.tensor([[0, 70, 71]])


def _logits(module: CLPModule, w: torch.Tensor) -> torch.Tensor:
    """The policy's next-token logits at weighting ``w``, through its mixed modules or adapters."""
    enc = module.policy.encode([PROMPT])
    with module.policy.conditioned(w.view(1, -1)):
        return module.policy.model(**enc, decoder_input_ids=DECODER_IDS).logits


def _plain_logits(model: torch.nn.Module, module: CLPModule) -> torch.Tensor:
    """The logits of a plain model (no mixing, no adapters) on the same input."""
    return model(**module.policy.encode([PROMPT]), decoder_input_ids=DECODER_IDS).logits


def _interpolate(models: list[torch.nn.Module], w: torch.Tensor) -> torch.nn.Module:
    """A plain model with parameters ``sum_i w_i theta_i``, written out here, not taken from the code under test."""
    states = [m.state_dict() for m in models]
    mixed = {n: sum(float(wi) * s[n] for wi, s in zip(w, states)) if t.is_floating_point() else t
             for n, t in states[0].items()}
    model = copy.deepcopy(models[0])
    model.load_state_dict(mixed)
    return model


@pytest.mark.parametrize("conditioning", [ATTENTION, LORA], ids=["attention", "lora"])
def test_soup_policy_interpolates_the_experts(tmp_path, conditioning):
    initial = make_module(conditioning)
    (expert0, path0), (expert1, path1) = (train_expert(tmp_path, conditioning, i) for i in (0, 1))
    soup = make_module(conditioning, experts=[path0, path1])
    e0, e1, w = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.3, 0.7])
    # one-hot training touched only the expert's own copy (or adapter)
    assert torch.equal(_logits(expert0, e1), _logits(initial, e1))
    assert not torch.equal(_logits(expert0, e0), _logits(initial, e0))
    # the soup is expert i at e_i ...
    assert torch.allclose(_logits(soup, e0), _logits(expert0, e0), atol=1e-6)
    assert torch.allclose(_logits(soup, e1), _logits(expert1, e1), atol=1e-6)
    # ... and in between, the model whose parameters are sum_i w_i theta_i of the experts' plain parameters
    # (for LoRA: base + sum_i w_i s B_i A_i, the same thing since sum_i w_i = 1)
    experts = [expert0.policy.merged_model(e0), expert1.policy.merged_model(e1)]
    for expert, e, plain in zip((expert0, expert1), (e0, e1), experts):
        assert torch.allclose(_plain_logits(plain, expert), _logits(expert, e), atol=1e-5)  # theta_i is expert i
    soup_at_w = _logits(soup, w)
    assert torch.allclose(soup_at_w, _plain_logits(_interpolate(experts, w), soup), atol=1e-5)
    assert not torch.allclose(soup_at_w, _logits(soup, e0), atol=1e-4)  # a point strictly between the experts
    assert not torch.allclose(soup_at_w, _logits(soup, e1), atol=1e-4)
    merged, expected = soup.policy.merged_model(w).state_dict(), _interpolate(experts, w).state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in merged.items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name


def test_experts_that_differ_on_shared_weights_are_rejected(tmp_path):
    shared = ConditioningConfig(mode="mixing", options={"targets": "attention"}, train_shared=True)
    paths = [train_expert(tmp_path, shared, i)[1] for i in (0, 1)]
    with pytest.raises(ValueError, match="differ on the shared parameter"):
        make_module(shared, experts=paths)
    with pytest.raises(ValueError, match="got 1 experts for 2 objectives"):
        make_module(shared, experts=paths[:1])
    with pytest.raises(FileNotFoundError, match="checkpoint 'missing.ckpt' not found"):
        make_module(shared, experts=["missing.ckpt", paths[1]])


def test_experts_trained_on_other_objectives_are_rejected(tmp_path):
    # objectives in another order: copy i would silently come from the expert of another objective
    paths = [train_expert(tmp_path, ATTENTION, i)[1] for i in (0, 1)]
    with pytest.raises(CheckpointError, match=r"expert checkpoint .*expert0\.ckpt.* objectives \['first', 'second'\]"):
        CLPModule(PolicyConfig("tiny:t5", ATTENTION, max_prompt_length=32),
                  [HashedTextReward("second"), HashedTextReward("first")], samples_per_prompt=2,
                  expert_checkpoints=paths, generation=GenerationSettings(max_new_tokens=4))


def test_experts_in_another_order_are_rejected(tmp_path):
    # expert 1 trained only its copy 1: as copy 0 of the soup it would be the untrained starting point
    paths = [train_expert(tmp_path, LORA, i)[1] for i in (0, 1)]
    with pytest.raises(CheckpointError, match=r"expert1\.ckpt' was trained at the weighting \[0\.0, 1\.0\], and "
                                              r"expert_checkpoints\[0\] must be"):
        make_module(LORA, experts=paths[::-1])
