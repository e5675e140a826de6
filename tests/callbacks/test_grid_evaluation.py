"""Grid evaluation during fit writes its reports and TensorBoard entries; validate on a checkpoint reproduces them."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clp_lightning.callbacks import GridEvaluation, SafeCheckpointIO
from clp_lightning.conditioning.policy import ConditioningConfig, PolicyConfig
from clp_lightning.config import GenerationSettings, OptimizerConfig
from clp_lightning.data import SyntheticTLDRDataModule
from clp_lightning.module import CLPModule
from clp_lightning.rewards import LengthReward, RougeReward


def make_module() -> CLPModule:
    torch.manual_seed(0)
    rewards = [
        RougeReward(name="coverage", target="source", rouge_key="rouge1", measure="recall"),
        LengthReward(name="brevity", unit="chars", scale=10.0),
    ]
    logits = ConditioningConfig(mode="mixing", options={"targets": "logits"})
    policy = PolicyConfig("tiny:t5", logits, max_prompt_length=48)
    return CLPModule(
        policy,
        rewards,
        samples_per_prompt=2,
        generation=GenerationSettings(max_new_tokens=5),
        optimizer=OptimizerConfig(lr=1e-2),
    )


def make_trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=TensorBoardLogger(tmp_path, name="run", version=""),
        callbacks=callbacks,
        plugins=[SafeCheckpointIO()],
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        **kwargs,
    )


def grid_callback() -> GridEvaluation:
    return GridEvaluation(
        grid_step=0.5, sample_prompts=2, generation=GenerationSettings(do_sample=False, max_new_tokens=5)
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("grid")
    data = SyntheticTLDRDataModule(num_train=8, num_val=3, batch_size=2, val_batch_size=2, seed=0)
    callback = grid_callback()
    checkpoint = ModelCheckpoint(save_last=True, save_on_train_epoch_end=False)
    trainer = make_trainer(
        tmp_path, [callback, checkpoint], max_steps=4, val_check_interval=2, check_val_every_n_epoch=None
    )
    module = make_module()
    module.reference_calls, evaluate_reference = [], module.evaluate_reference
    module.evaluate_reference = lambda batch, generation: module.reference_calls.append(batch["id"]) or (
        evaluate_reference(batch, generation))
    trainer.fit(module, datamodule=data)
    return tmp_path, trainer, callback


def test_fit_writes_reports_and_tensorboard(fitted):
    tmp_path, trainer, callback = fitted
    evaluation = tmp_path / "run" / "evaluation"
    reports = sorted(evaluation.glob("epoch_*_step_*.json"))
    assert len(reports) == 2 and len(list(evaluation.glob("*_front.png"))) == 2
    lines = (evaluation / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 3 and "hypervolume" in lines[0] and "steerability/coverage" in lines[0]
    report = json.loads(reports[-1].read_text())
    assert report["grid"] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]] and len(report["rewards"]) == 3
    assert len(report["samples"]) == 2 and len(report["samples"][0]["responses"]) == 3
    assert report["ref_point"] == pytest.approx(report["reference_rewards"])  # default: the reference policy
    rewards, reference = torch.tensor(report["rewards"]), report["reference_rewards"]
    assert report["vertex_gain"] == pytest.approx(  # grid [[0, 1], [0.5, 0.5], [1, 0]]: e_1 is row 2, e_2 row 0
        {"coverage": float(rewards[2, 0]) - reference[0], "brevity": float(rewards[0, 1]) - reference[1]})
    first = json.loads(reports[0].read_text())["samples"][0]
    assert first["reference"]["response"] is not None and len(first["reference"]["rewards"]) == 2
    assert report["samples"][0]["reference"] == first["reference"]  # cached: the reference does not change
    assert len(trainer.lightning_module.reference_calls) == 2  # two validations of 2 val batches: each batch once
    events = EventAccumulator(str(next((tmp_path / "run").glob("events.out.tfevents.*"))))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "val/pareto/hypervolume",
        "val/steerability/coverage",
        "val/kl",
        "train/loss",
        "train/kl",
        "train/reward/brevity",
        "val/reward/brevity/w=0.50,0.50",
    } <= scalars
    assert "val/pareto/front" in events.Tags()["images"]
    assert any("val/samples" in t for t in events.Tags()["tensors"])


def test_validate_on_checkpoint_reproduces_last_evaluation(fitted, tmp_path):
    fit_dir, trainer, callback = fitted
    last = callback.last
    data = SyntheticTLDRDataModule(num_train=8, num_val=3, batch_size=2, val_batch_size=2, seed=0)
    again = grid_callback()
    make_trainer(tmp_path, [again]).validate(
        make_module(), datamodule=data, ckpt_path=str(fit_dir / "run" / "checkpoints" / "last.ckpt")
    )
    assert again.last["step"] == last["step"] == 4
    assert torch.allclose(torch.tensor(again.last["rewards"]), torch.tensor(last["rewards"]), atol=1e-5)
    assert again.last["hypervolume"] == pytest.approx(last["hypervolume"], abs=1e-6)
    assert again.last["steerability"] == pytest.approx(last["steerability"], nan_ok=True)
    assert (tmp_path / "run" / "evaluation" / "validate.json").exists()
    assert again.last["reference_rewards"] == pytest.approx(last["reference_rewards"], abs=1e-6)


def test_validate_on_other_prompts_measures_the_reference_on_them(fitted, tmp_path):
    """Reference numbers belong to the prompts they were measured on: other data gets its own, and numbers stored in
    a checkpoint (as older versions wrote them) are ignored."""
    fit_dir, trainer, callback = fitted
    ckpt = torch.load(fit_dir / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("GridEvaluation"))
    assert set(state) == {"history", "validations"}
    state.update(ref_point=torch.tensor([9.0, 9.0]), reference_rewards=torch.tensor([9.0, 9.0]))
    torch.save(ckpt, tmp_path / "stale.ckpt")
    other = SyntheticTLDRDataModule(num_train=8, num_val=3, batch_size=2, val_batch_size=2, seed=7)
    again, module = grid_callback(), make_module()
    measured = []
    evaluate_reference = module.evaluate_reference
    module.evaluate_reference = lambda batch, generation: measured.append(
        (batch["prompt"], evaluate_reference(batch, generation))) or measured[-1][1]
    make_trainer(tmp_path, [again]).validate(module, datamodule=other, ckpt_path=str(tmp_path / "stale.ckpt"))
    other.setup("validate")
    assert [p for prompts, _ in measured for p in prompts] == list(other.data["val"]["prompt"])
    mean = torch.cat([out["rewards"] for _, out in measured]).mean(0)
    # the reference point is this data's reference policy (the config sets none), not the checkpoint's numbers
    assert again.last["reference_rewards"] == pytest.approx(mean.tolist())
    assert again.last["ref_point"] == pytest.approx(mean.tolist())
    assert again.last["ref_point_from"] == "reference policy on these prompts"
    assert again.last["samples"][0]["reference"]["response"] == measured[0][1]["texts"][0]


def test_ref_point_from_the_config_is_used_as_given(fitted, tmp_path):
    fit_dir, trainer, callback = fitted
    data = SyntheticTLDRDataModule(num_train=8, num_val=3, batch_size=2, val_batch_size=2, seed=0)
    again = GridEvaluation(grid_step=0.5, ref_point=[-1.0, -2.0],
                           generation=GenerationSettings(do_sample=False, max_new_tokens=5))
    make_trainer(tmp_path, [again]).validate(
        make_module(), datamodule=data, ckpt_path=str(fit_dir / "run" / "checkpoints" / "last.ckpt"))
    assert again.last["ref_point"] == [-1.0, -2.0] and again.last["ref_point_from"] == "config"


def test_vertex_gain_by_hand():
    from clp_lightning.callbacks.grid_evaluation import vertex_gain

    grid = torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    rewards = torch.tensor([[0.1, 5.0], [0.4, 3.0], [0.9, 1.0]])
    assert vertex_gain(grid, rewards, torch.tensor([0.5, 4.0])).tolist() == pytest.approx([0.4, 1.0])
    with pytest.raises(ValueError, match="every vertex"):
        vertex_gain(grid[1:2], rewards[1:2], torch.tensor([0.5, 4.0]))


def test_every_n_epochs_and_three_objective_figure(tmp_path):
    from clp_lightning.rewards import RougeReward

    torch.manual_seed(0)
    rewards = [
        RougeReward(name="coverage", target="source", rouge_key="rouge1", measure="recall"),
        RougeReward(name="precision", target="source", rouge_key="rouge1", measure="precision"),
        LengthReward(name="brevity", unit="chars", scale=10.0),
    ]
    logits = ConditioningConfig(mode="mixing", options={"targets": "logits"})
    policy = PolicyConfig("tiny:gpt2", logits, max_prompt_length=48)
    module = CLPModule(policy, rewards, samples_per_prompt=2, generation=GenerationSettings(max_new_tokens=3))
    callback = GridEvaluation(
        grid_step=0.5,
        every_n_epochs=2,
        sample_prompts=1,
        generation=GenerationSettings(do_sample=False, max_new_tokens=3),
    )
    data = SyntheticTLDRDataModule(num_train=8, num_val=2, batch_size=2, val_batch_size=2, seed=0)
    trainer = make_trainer(
        tmp_path,
        [callback],
        max_steps=3,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=data)
    reports = sorted((tmp_path / "run" / "evaluation").glob("epoch_*_step_*.json"))
    assert [json.loads(r.read_text())["step"] for r in reports] == [1, 3]  # validations 1 and 3 of 3
    assert callback.validations == 3
    report = json.loads(reports[-1].read_text())
    assert len(report["grid"]) == 6 and len(report["rewards"][0]) == 3  # m = 3, step 0.5
    from clp_lightning.evaluation.plots import front_figure

    assert len(front_figure(report).axes) == 3  # the pairwise projections
