"""``validate`` of a tiny policy with a sampled grid evaluation on 1 or 2 CPU processes (gloo); rank 0 writes its
report, and that of a second evaluation capped at max_prompts=3. Run by test_ddp_grid_evaluation.py."""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from clp_lightning.callbacks import GridEvaluation
from clp_lightning.conditioning.config import ConditioningConfig, PolicyConfig
from clp_lightning.config import GenerationSettings
from clp_lightning.data import SyntheticTLDRDataModule
from clp_lightning.module import CLPModule
from clp_lightning.rewards import LengthReward, RougeReward


class CappedGridEvaluation(GridEvaluation):
    """A second grid evaluation beside the first (a subclass: Lightning allows one stateful callback per class)."""


def main(out_dir: str, devices: int) -> None:
    torch.manual_seed(0)
    rewards = [RougeReward(name="coverage", target="source", rouge_key="rouge1", measure="recall"),
               LengthReward(name="brevity", unit="chars", scale=10.0)]
    policy = PolicyConfig("tiny:t5", ConditioningConfig(mode="mixing", options={"targets": "logits"}),
                          max_prompt_length=32)
    module = CLPModule(policy, rewards, samples_per_prompt=2)
    # sampled, 2 responses per prompt: batches of one prompt draw from a seed of that prompt, on any rank
    grid = GridEvaluation(grid_step=0.5, sample_prompts=1, num_samples=2,
                          generation=GenerationSettings(do_sample=True, max_new_tokens=6))
    capped = CappedGridEvaluation(grid_step=0.5, sample_prompts=0, max_prompts=3, kl_samples=0,
                                  output_dir=str(Path(out_dir, f"capped{devices}")))
    # 5 prompts in batches of 1: 2 ranks get 3 each, the distributed sampler repeating one
    data = SyntheticTLDRDataModule(num_train=4, num_val=5, batch_size=1, val_batch_size=1, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[grid, capped],
                        default_root_dir=out_dir)
    trainer.validate(module, datamodule=data)
    Path(out_dir, f"devices{devices}_rank{trainer.global_rank}.json").write_text(json.dumps(grid.last))
    Path(out_dir, f"capped{devices}_rank{trainer.global_rank}.json").write_text(json.dumps(capped.last))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
