"""A 2-process CPU (gloo) fit of a tiny CLP run; each rank records what it saw. Run by test_ddp_fit.py."""

import json
import sys
from pathlib import Path

import lightning as L

from clp_lightning.callbacks import GridEvaluation
from clp_lightning.conditioning.config import ConditioningConfig, PolicyConfig
from clp_lightning.config import GenerationSettings, OptimizerConfig
from clp_lightning.data import SyntheticTLDRDataModule
from clp_lightning.module import CLPModule
from clp_lightning.rewards import LengthReward, RougeReward


class Record(L.Callback):
    """Prompts and weightings each rank trained on, and the metrics each rank logged."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids += batch["id"]


def main(out_dir: str, devices: int) -> None:
    L.seed_everything(0)
    rewards = [
        RougeReward(name="coverage", target="source", rouge_key="rouge1", measure="recall"),
        LengthReward(name="brevity", unit="chars", scale=10.0),
    ]
    conditioning = ConditioningConfig(mode="mixing", options={"targets": "logits"})
    policy = PolicyConfig("tiny:t5", conditioning, max_prompt_length=32)
    module = CLPModule(
        policy,
        rewards,
        samples_per_prompt=2,
        generation=GenerationSettings(max_new_tokens=3),
        optimizer=OptimizerConfig(lr=1e-2),
    )
    record = Record()
    grid = GridEvaluation(
        grid_step=0.5, sample_prompts=1, generation=GenerationSettings(do_sample=False, max_new_tokens=3)
    )
    data = SyntheticTLDRDataModule(num_train=16, num_val=4, batch_size=2, val_batch_size=2, seed=0)
    weights: list[list[float]] = []
    original = module.sample_weights

    def sample_and_record(n, generator=None):
        w, a = original(n, generator)
        weights.extend(w.tolist())
        return w, a

    module.sample_weights = sample_and_record
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=2,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record, grid],
        default_root_dir=out_dir,
    )
    trainer.fit(module, datamodule=data)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    params = {n: p.detach().sum().item() for n, p in module.policy.named_parameters() if p.requires_grad}
    result = {
        "rank": trainer.global_rank,
        "ids": record.ids,
        "weights": weights,
        "logged": logged,
        "report": grid.last,
        "params": params,
    }
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
