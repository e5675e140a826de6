"""clp's ModelCheckpoint: a fit that ends off the checkpoint schedule still saves its last step."""

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from clp_lightning.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_module import make_data, make_module, make_trainer  # noqa: E402


def steps_saved(directory: Path) -> dict[str, int]:
    """``{file name without its epoch: global step}`` of the checkpoints in ``directory``."""
    return {p.name.split("-", 1)[-1]: torch.load(p, weights_only=True)["global_step"]
            for p in sorted(directory.iterdir())}


def test_a_fit_that_ends_between_scheduled_saves_saves_its_last_step(tmp_path):
    # 3 steps, a checkpoint every 2: Lightning's ModelCheckpoint ends with last.ckpt at step 2, so the final step is
    # lost (a resume retrains it, a test of last.ckpt reads the step-2 policy)
    def fit(cls, directory):
        checkpoint = cls(dirpath=directory, save_last=True, every_n_train_steps=2, save_top_k=-1)
        make_trainer(tmp_path, 3, callbacks=[checkpoint]).fit(make_module(), datamodule=make_data())
        return steps_saved(directory)

    assert fit(LightningModelCheckpoint, tmp_path / "lightning") == {"step=2.ckpt": 2, "last.ckpt": 2}
    assert fit(ModelCheckpoint, tmp_path / "clp") == {"step=2.ckpt": 2, "step=3.ckpt": 3, "last.ckpt": 3}


def test_a_fit_that_ends_on_a_scheduled_save_is_not_saved_twice(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=-1)
    make_trainer(tmp_path, 4, callbacks=[checkpoint]).fit(make_module(), datamodule=make_data())
    assert steps_saved(tmp_path / "ckpt") == {"step=2.ckpt": 2, "step=4.ckpt": 4, "last.ckpt": 4}


def test_a_monitored_top_k_is_left_to_its_metric(tmp_path):
    # a top-k by a validation metric must not file the final weights under an earlier step's value: only last.ckpt
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor="val/missing", save_top_k=1,
                                 every_n_train_steps=2)
    make_trainer(tmp_path, 3, callbacks=[checkpoint]).fit(make_module(), datamodule=make_data())
    assert steps_saved(tmp_path / "ckpt") == {"last.ckpt": 3}
