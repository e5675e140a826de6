"""TRL's ``RLOOTrainer`` on one cell of the RL step benchmark: the baseline of ``rl_step.py``'s ``trl`` suite.

The work is clp-lightning's for the same cell (``rl_step.py`` says what it is): the same saved model, prompts and
reward objects (``rl_cell.py``), the rewards wrapped as TRL reward functions with fixed ``reward_weights = 1/m``;
clp-lightning's KL coefficient is TRL's ``beta``. A Transformers ``on_step_end`` callback times the steps, as
Lightning's ``on_train_batch_end`` times clp-lightning's. The prompts are built in a child process (``prompt_rows``),
so that this worker, whose peak resident memory is reported as TRL's, does not import Lightning.

Not a script: ``rl_step.py``'s worker calls ``run_trl`` in a cell's subprocess. Needs TRL (``pip install -e
.[bench]``), imported only when a TRL cell runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Memory, step_times, sync
from rl_cell import Cell, prompt_rows, rewards


def run_trl(cell: Cell, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Train ``args.warmup + args.steps`` RLOO steps on ``cell``; the timed steps' times, peak memory, parameters."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    total = args.warmup + args.steps
    memory, ends = Memory(args.device), []
    scorers = [r.to(args.device) for r in rewards(cell.rewards, cell.objectives)]

    def reward_function(reward):
        def score(prompts, completions, source, reference, **kwargs):
            return reward.score(source, completions, reference).float().tolist()

        score.__name__ = reward.name
        return score

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            memory.reset()

        def on_step_begin(self, *a, **k):
            sync(args.device)
            if not ends:
                ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync(args.device)
            ends.append(time.perf_counter())

    # clp-lightning's rows, built in a child process: this one never imports Lightning, whose memory is not TRL's
    dataset = datasets.Dataset.from_dict(prompt_rows(cell, total, path))
    with tempfile.TemporaryDirectory() as out:
        config = RLOOConfig(
            output_dir=out, per_device_train_batch_size=cell.prompts * cell.samples, num_generations=cell.samples,
            max_completion_length=cell.new_tokens, generation_kwargs={"min_new_tokens": cell.new_tokens},
            temperature=1.0, top_p=1.0, top_k=0, beta=cell.kl_coef, learning_rate=1e-5, max_steps=total,
            reward_weights=[1.0 / cell.objectives] * cell.objectives, logging_steps=10**6, save_strategy="no",
            report_to="none", disable_tqdm=True, use_cpu=args.device == "cpu", bf16=False, fp16=False,
            dataloader_num_workers=0, seed=0, log_completions=False,
            # RLOOConfig's default is True: the backward would recompute the policy's forward, which clp-lightning's
            # step does not do, so TRL would do more work than the cell it is the baseline of
            gradient_checkpointing=False,
        )
        trainer = RLOOTrainer(
            model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
            reward_funcs=[reward_function(r) for r in scorers], args=config, train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(path), callbacks=[Timer()],
        )
        trainer.train()
        total_params = sum(p.numel() for p in trainer.model.parameters())
    return {"times": step_times(ends, args.warmup), "phases": {},
            "peak_mb": memory.peak_mb(), "trainable": total_params, "total": total_params}
