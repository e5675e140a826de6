"""Grid evaluation during fit writes its reports and TensorBoard entries; validate on a checkpoint reproduces them."""

import json
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clp_lightning.callbacks import GridEvaluation, SafeCheckpointIO
from clp_lightning.conditioning.config import ConditioningConfig, PolicyConfig
from clp_lightning.config import GenerationSettings, OptimizerConfig
from clp_lightning.data import SyntheticTLDRDataModule
from clp_lightning.evaluation import prompt_digest, prompts_sha256
from clp_lightning.evaluation.reports import read_report
from clp_lightning.module import CLPModule
from clp_lightning.rewards import LengthReward, RougeReward


def make_module(objectives: int = 2) -> CLPModule:
    torch.manual_seed(0)
    rewards = [
        RougeReward(name="coverage", target="source", rouge_key="rouge1", measure="recall"),
        LengthReward(name="brevity", unit="chars", scale=10.0),
    ][:objectives]
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
    module.evaluate_reference = lambda batch, generation, **kw: module.reference_calls.append(batch["id"]) or (
        evaluate_reference(batch, generation, **kw))
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
    # the vertex gains' paired SE, from each prompt's difference to the reference on that prompt (3 prompts)
    rows = torch.tensor(report["per_prompt_rewards"])
    reference_rows = torch.tensor(report["reference_per_prompt_rewards"])
    assert rows.shape == (3, 3, 2) and reference_rows.shape == (3, 2)
    assert reference_rows.mean(0).tolist() == pytest.approx(reference)
    differences = {"coverage": rows[2, :, 0] - reference_rows[:, 0], "brevity": rows[0, :, 1] - reference_rows[:, 1]}
    assert report["vertex_gain_se"] == pytest.approx({n: float(d.std() / 3**0.5) for n, d in differences.items()})
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


def test_report_summary_by_hand():
    # the fit above checks which keys a report has, never the numbers grid_report derives from its rewards.
    # Grid e_b, (0.5, 0.5), e_a; objective a rises with w_a, objective b falls as w_b rises: only (3, 3) is on the
    # front, and b's two steps onto it are violations. Reference (1, 2); reference point (0, 0) on purpose apart from
    # it, so that a summary measured from the wrong one shows.
    from clp_lightning.callbacks.grid_evaluation import grid_report

    grid = torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    rewards = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    report = grid_report(["a", "b"], grid, rewards, torch.zeros(3), torch.tensor([1.0, 2.0]), torch.zeros(2),
                         ref_point_from="config", epoch=0, step=1)
    assert report["front_mask"] == [False, False, True]
    assert report["hypervolume"] == pytest.approx(9.0)  # the box [0, 3] x [0, 3]
    assert report["reference_hypervolume"] == pytest.approx(2.0)  # [0, 1] x [0, 2]
    assert report["vertex_gain"] == pytest.approx({"a": 3.0 - 1.0, "b": 1.0 - 2.0})  # e_a is row 2, e_b row 0
    assert report["steerability"] == pytest.approx({"a": 1.0, "b": -1.0})
    assert report["monotonicity_violations"] == {"a": 0, "b": 2}


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


def test_validate_on_a_checkpoint_names_its_epoch_as_it_names_its_step(fitted, tmp_path):
    """Only fit restores the loops, so the trainer of `validate` is at epoch 0 whatever the checkpoint's."""
    import csv

    fit_dir, trainer, callback = fitted
    ckpt = torch.load(fit_dir / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["epoch"] = 3
    torch.save(ckpt, tmp_path / "epoch3.ckpt")
    data = SyntheticTLDRDataModule(num_train=8, num_val=3, batch_size=2, val_batch_size=2, seed=0)
    again = grid_callback()
    make_trainer(tmp_path, [again]).validate(make_module(), datamodule=data, ckpt_path=str(tmp_path / "epoch3.ckpt"))
    assert (again.last["epoch"], again.last["step"]) == (3, 4)
    with (tmp_path / "run" / "evaluation" / "metrics.csv").open(newline="") as f:
        assert [(r["stage"], r["epoch"], r["step"]) for r in csv.DictReader(f)] == [("validate", "3", "4")]


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
    module.evaluate_reference = lambda batch, generation, **kw: measured.append(
        (batch["prompt"], evaluate_reference(batch, generation, **kw))) or measured[-1][1]
    make_trainer(tmp_path, [again]).validate(module, datamodule=other, ckpt_path=str(tmp_path / "stale.ckpt"))
    other.setup("validate")
    assert [p for prompts, _ in measured for p in prompts] == list(other.data["val"]["prompt"])
    mean = torch.cat([out["rewards"] for _, out in measured]).mean(0)
    # the reference point is this data's reference policy (the config sets none), not the checkpoint's numbers
    assert again.last["reference_rewards"] == pytest.approx(mean.tolist())
    assert again.last["ref_point"] == pytest.approx(mean.tolist())
    assert again.last["ref_point_from"] == "reference policy on these prompts"
    assert again.last["samples"][0]["reference"]["response"] == measured[0][1]["texts"][0]


def test_another_module_on_the_same_trainer_gets_its_own_reference(tmp_path):
    # The reference cache outlived the module it was measured for: trainer.validate(other_module) with the same
    # callback reported the first module's reference rewards (here brevity at another scale) for the second.
    data = SyntheticTLDRDataModule(num_train=8, num_val=3, batch_size=2, val_batch_size=2, seed=0)
    callback = grid_callback()
    trainer = make_trainer(tmp_path, [callback])
    first, second = make_module(), make_module()
    second.rewards[1].scale = 1.0  # brevity in characters, not tens of characters: ten times the first's
    trainer.validate(first, datamodule=data)
    before = callback.last["reference_rewards"]
    trainer.validate(second, datamodule=data)
    after = callback.last["reference_rewards"]
    assert after[0] == pytest.approx(before[0]) and after[1] == pytest.approx(10 * before[1])


def test_another_module_with_other_objectives_on_the_same_trainer(tmp_path):
    # The callback kept the first module's metric (its grid and (m,) reference point) and drew its front in the
    # second's figure: the second module's evaluation failed at the epoch's end, after all its generation.
    data = SyntheticTLDRDataModule(num_train=8, num_val=3, batch_size=2, val_batch_size=2, seed=0)
    callback = grid_callback()
    trainer = make_trainer(tmp_path, [callback])
    trainer.validate(make_module(objectives=1), datamodule=data)
    trainer.validate(make_module(objectives=2), datamodule=data)
    assert callback.last["grid"] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    assert callback.last["ref_point"] == pytest.approx(callback.last["reference_rewards"])
    assert (tmp_path / "run" / "evaluation" / "validate_front.png").exists()


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


def test_vertex_gain_standard_error_by_hand():
    from clp_lightning.callbacks.grid_evaluation import vertex_gain_standard_error

    grid = torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    rows = torch.zeros(3, 4, 2)  # (G, P, m)
    rows[2, :, 0] = torch.tensor([1.0, 2.0, 3.0, 6.0])  # objective 0 at its vertex e_0, row 2
    rows[0, :, 1] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # objective 1 at e_1, row 0
    rows[1] = 100.0  # off the vertices: never read
    reference = torch.tensor([[0.0, 4.0], [1.0, 3.0], [2.0, 2.0], [5.0, 1.0]])  # (P, m)
    se = vertex_gain_standard_error(grid, rows, reference)
    # differences: objective 0: [1, 1, 1, 1] -> SE 0 (the prompts' shared difficulty cancels); objective 1: [1, 2, 3, 4]
    assert se.tolist() == pytest.approx([0.0, (5 / 3) ** 0.5 / 2])
    with pytest.raises(ValueError, match="same prompts"):
        vertex_gain_standard_error(grid, rows, reference[:3])


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


# ---------------------------------------------------------------- standard errors, sampled KL, per-prompt rows


def test_report_has_standard_errors_per_prompt_rows_and_a_sampled_kl(fitted):
    tmp_path, trainer, callback = fitted
    report = callback.last
    per_prompt = torch.tensor(report["per_prompt_rewards"], dtype=torch.float64)
    assert per_prompt.shape == (3, 3, 2)  # (G, P, m): 3 weightings, the 3 validation prompts, 2 objectives
    assert torch.allclose(per_prompt.mean(1), torch.tensor(report["rewards"], dtype=torch.float64), atol=1e-6)
    expected_se = per_prompt.std(1) / 3**0.5  # the prompt is the unit
    assert torch.allclose(torch.tensor(report["rewards_se"], dtype=torch.float64), expected_se, atol=1e-9)
    # the prompts in digest order, and their digest
    data = SyntheticTLDRDataModule(num_train=8, num_val=3, batch_size=2, val_batch_size=2, seed=0)
    data.setup("validate")
    val = data.data["val"]
    digests = sorted(prompt_digest(*row) for row in zip(val["prompt"], val["source"], val["reference"]))
    assert report["prompts_sha256"] == prompts_sha256(digests)
    # greedy decoding: the KL comes from 4 samples per prompt at temperature 1, the greedy log-ratio apart
    assert report["evaluation"]["kl_samples"] == 4 and report["evaluation"]["kl_sampling"].startswith("separate")
    assert all(math.isfinite(k) for k in report["kl"]) and all(s >= 0 for s in report["kl_se"])
    assert len(report["greedy_log_ratio"]) == 3 and report["greedy_log_ratio"] != report["kl"]
    assert "by_alpha" not in report  # not conditioned on alpha
    events = EventAccumulator(str(next((tmp_path / "run").glob("events.out.tfevents.*"))))
    events.Reload()
    assert events.Scalars("val/kl")[-1].value == pytest.approx(sum(report["kl"]) / 3)  # the sampled KL
    assert "val/greedy_log_ratio" in events.Tags()["scalars"]


def sampled_callback(**kwargs) -> GridEvaluation:
    return GridEvaluation(grid_step=0.5, sample_prompts=1, num_samples=2,
                          generation=GenerationSettings(do_sample=True, max_new_tokens=5), **kwargs)


def test_sampled_evaluation_is_seeded_by_its_own_seed(fitted, tmp_path):
    fit_dir, _, _ = fitted
    ckpt = str(fit_dir / "run" / "checkpoints" / "last.ckpt")
    data = lambda: SyntheticTLDRDataModule(num_train=8, num_val=3, batch_size=2, val_batch_size=2, seed=0)  # noqa: E731
    reports = []
    for seed in (0, 0, 1):
        callback = sampled_callback(seed=seed)
        make_trainer(tmp_path, [callback]).validate(make_module(), datamodule=data(), ckpt_path=ckpt)
        reports.append(callback.last)
    same, other = reports[1], reports[2]
    assert reports[0]["per_prompt_rewards"] == same["per_prompt_rewards"] and reports[0]["kl"] == same["kl"]
    assert other["per_prompt_rewards"] != same["per_prompt_rewards"]  # another seed, other draws
    assert other["prompts_sha256"] == same["prompts_sha256"]  # the same prompts, in the same order: they pair
    report = same
    per_prompt = torch.tensor(report["per_prompt_rewards"])
    assert per_prompt.shape == (3, 3, 2) and torch.allclose(per_prompt.mean(1), torch.tensor(report["rewards"]),
                                                            atol=1e-6)
    # temperature 1, no truncation: the KL is estimated from the evaluation's own 2 samples per prompt
    assert report["evaluation"]["kl_samples"] == 2 and report["evaluation"]["kl_sampling"].startswith("the eval")
    assert "greedy_log_ratio" not in report and all(math.isfinite(k) for k in report["kl"])


def test_evaluation_draws_leave_the_global_generator_where_it_was():
    module = make_module()
    callback = sampled_callback(seed=3)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    with callback._seeded(module, "grid", None, "batch"):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with callback._seeded(module, "grid", None, "batch"):
        assert torch.equal(torch.rand(4), first)  # the same draws for the same (seed, parts)
    with callback._seeded(module, "kl", None, "batch"):
        assert not torch.equal(torch.rand(4), first)


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="num_samples=2 needs sampled decoding, but generation.do_sample is false"):
        GridEvaluation(num_samples=2, generation=GenerationSettings(do_sample=False))
    with pytest.raises(ValueError, match="kl_samples >= 0"):
        GridEvaluation(kl_samples=-1)
    with pytest.raises(ValueError, match="max_prompts must be >= 1 .* got 0"):
        GridEvaluation(max_prompts=0)
    # the decoding settings' own checks come when the callback is made, not at the first evaluation of a fit
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\].*got 0"):
        GridEvaluation(generation=GenerationSettings(do_sample=True, top_p=0.0))


@pytest.mark.parametrize("name, value", [("every_n_epochs", 1.5), ("max_prompts", 2.5), ("sample_prompts", 1.5),
                                         ("num_samples", 2.0), ("kl_samples", True), ("every_n_epochs", True)])
def test_counts_that_are_not_integers_are_refused(name, value):
    # every_n_epochs=1.5 evaluated every third epoch without a word; the others failed at the first evaluation of a fit
    with pytest.raises(ValueError, match=f"{name} must be an integer, got {value!r}"):
        GridEvaluation(**{name: value}, generation=GenerationSettings(do_sample=True))
    with pytest.raises(ValueError, match="sample_prompts must be >= 0"):
        GridEvaluation(sample_prompts=-1)


def test_kl_samples_zero_reports_nan_and_logs_no_kl(tmp_path):
    callback = GridEvaluation(grid_step=0.5, sample_prompts=0, kl_samples=0,
                              generation=GenerationSettings(do_sample=False, max_new_tokens=3))
    data = SyntheticTLDRDataModule(num_train=8, num_val=2, batch_size=2, val_batch_size=2, seed=0)
    make_trainer(tmp_path, [callback]).validate(make_module(), datamodule=data)
    assert all(math.isnan(k) for k in callback.last["kl"]) and callback.last["evaluation"]["kl_samples"] == 0
    # the files are strict JSON, the NaN KL null in them, and read back as NaN
    for name in ("validate.json", "latest.json"):
        text = (tmp_path / "run" / "evaluation" / name).read_text()
        assert json.loads(text, parse_constant=pytest.fail)["kl"] == [None] * len(callback.last["kl"])
        assert repr(read_report(tmp_path / "run" / "evaluation" / name)) == repr(callback.last)
    events = EventAccumulator(str(next((tmp_path / "run").glob("events.out.tfevents.*"))))
    events.Reload()
    assert "val/kl" not in events.Tags()["scalars"] and "val/greedy_log_ratio" in events.Tags()["scalars"]


def test_greedy_log_ratio_off_spares_its_forward_passes_and_changes_nothing_else(fitted, tmp_path, monkeypatch):
    fit_dir, _, _ = fitted
    ckpt = str(fit_dir / "run" / "checkpoints" / "last.ckpt")
    reports, scored = [], []
    for on in (True, False):
        module = make_module()
        reference_log_probs = module.policy.reference_log_probs
        def counted(*args, on=on, score=reference_log_probs, **kwargs):
            scored.append(on)
            return score(*args, **kwargs)

        monkeypatch.setattr(module.policy, "reference_log_probs", counted)
        callback = GridEvaluation(grid_step=0.5, sample_prompts=1, kl_samples=2, greedy_log_ratio=on,
                                  generation=GenerationSettings(do_sample=False, max_new_tokens=4))
        data = SyntheticTLDRDataModule(num_train=8, num_val=3, batch_size=2, val_batch_size=2, seed=0)
        make_trainer(tmp_path / str(on), [callback]).validate(module, datamodule=data, ckpt_path=ckpt)
        reports.append(callback.last)
    with_ratio, without = reports
    assert "greedy_log_ratio" in with_ratio and "greedy_log_ratio" not in without
    for key in ("rewards", "per_prompt_rewards", "kl", "hypervolume", "vertex_gain"):
        assert without[key] == with_ratio[key], key  # the same responses and the same sampled KL
    # each batch: the greedy pass and the KL samples' pass score with the reference; without the ratio, only the
    # samples (2 validation batches)
    assert scored.count(True) == 4 and scored.count(False) == 2


# ---------------------------------------------------------------- one front per alpha


def alpha_module(alpha_range=(0.01, 0.5)) -> CLPModule:
    torch.manual_seed(0)
    rewards = [RougeReward(name="coverage", target="source", rouge_key="rouge1", measure="recall"),
               LengthReward(name="brevity", unit="chars", scale=10.0)]
    policy = PolicyConfig("tiny:t5", ConditioningConfig(prompt=True, condition_on_alpha=True), max_prompt_length=48)
    return CLPModule(policy, rewards, samples_per_prompt=2, alpha_range=alpha_range,
                     generation=GenerationSettings(max_new_tokens=4))


def test_alpha_conditioned_policy_gets_a_front_per_alpha(tmp_path):
    callback = GridEvaluation(grid_step=0.5, sample_prompts=1, kl_samples=2,
                              generation=GenerationSettings(do_sample=False, max_new_tokens=4))
    data = SyntheticTLDRDataModule(num_train=8, num_val=2, batch_size=2, val_batch_size=2, seed=0)
    make_trainer(tmp_path, [callback]).validate(alpha_module(), datamodule=data)
    report = callback.last
    alphas = [entry["alpha"] for entry in report["by_alpha"]]
    assert alphas == pytest.approx([0.01, (0.01 * 0.5) ** 0.5, 0.5])  # low, geometric mean, high
    keys = {"alpha", "rewards", "rewards_se", "kl", "kl_se", "hypervolume", "steerability", "vertex_gain",
            "vertex_gain_se", "front_mask"}
    assert all(set(entry) == keys for entry in report["by_alpha"])
    low = report["by_alpha"][0]  # the top level is the low end of alpha_range, as evaluations always were
    assert report["evaluation"]["alpha"] == 0.01
    assert low["rewards"] == report["rewards"] and low["hypervolume"] == report["hypervolume"]
    assert low["kl"] == report["kl"]
    events = EventAccumulator(str(next((tmp_path / "run").glob("events.out.tfevents.*"))))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for alpha in alphas:
        assert {f"val/alpha={alpha:g}/pareto/hypervolume", f"val/alpha={alpha:g}/kl"} <= scalars
    from clp_lightning.evaluation.plots import front_figure

    legend = [t.get_text() for t in front_figure(report).axes[0].get_legend().get_texts()]
    assert any(text.startswith("alpha 0.01: KL ") for text in legend) and any("alpha 0.5:" in t for t in legend)


def test_alphas_are_checked_before_evaluating(tmp_path):
    data = SyntheticTLDRDataModule(num_train=8, num_val=2, batch_size=2, val_batch_size=2, seed=0)
    outside = GridEvaluation(grid_step=0.5, alphas=[0.1, 0.7])
    with pytest.raises(ValueError, match=r"alpha=0.7 is outside alpha_range \[0.01, 0.5\]"):
        make_trainer(tmp_path, [outside]).validate(alpha_module(), datamodule=data)
    unconditioned = GridEvaluation(grid_step=0.5, alphas=[0.1])
    with pytest.raises(ValueError, match=r"alphas \[0.1\] set, but the policy is not conditioned on alpha"):
        make_trainer(tmp_path, [unconditioned]).validate(make_module(), datamodule=data)
    chosen = GridEvaluation(grid_step=0.5, sample_prompts=0, kl_samples=0, alphas=[0.5, 0.02],
                            generation=GenerationSettings(do_sample=False, max_new_tokens=2))
    make_trainer(tmp_path, [chosen]).validate(alpha_module(), datamodule=data)
    assert [entry["alpha"] for entry in chosen.last["by_alpha"]] == [0.5, 0.02]  # as listed


def test_one_objective_evaluates_its_one_point(tmp_path):
    """A single reward makes a grid of one point: torchmetrics hands its one-element results back as scalars, which
    must not break the report (and there is no front to draw)."""
    data = SyntheticTLDRDataModule(num_train=4, num_val=2, batch_size=2, val_batch_size=2, seed=0)
    callback = grid_callback()
    make_trainer(tmp_path, [callback]).validate(make_module(objectives=1), datamodule=data)
    report = json.loads((tmp_path / "run" / "evaluation" / "latest.json").read_text())
    assert report["grid"] == [[1.0]] and len(report["rewards"]) == 1 and len(report["rewards"][0]) == 1
    assert len(report["per_prompt_rewards"][0]) == 2  # both validation prompts
    assert report["vertex_gain"]["coverage"] == pytest.approx(report["rewards"][0][0] - report["reference_rewards"][0])
    assert not list((tmp_path / "run" / "evaluation").glob("*.png"))


def test_metrics_csv_keeps_one_row_per_evaluation_across_resumes_and_grids(tmp_path):
    """A run resumed from an older checkpoint evaluates again at steps the file has: the abandoned rows go, and a
    changed grid adds columns instead of shifting values under the old header."""
    import csv

    callback = grid_callback()
    callback.names = ["coverage", "brevity"]

    def report(step, grid, value):
        return {"epoch": 0, "step": step, "hypervolume": value, "kl": [0.1] * len(grid),
                "steerability": {"coverage": 0.5, "brevity": 0.25}, "grid": grid,
                "rewards": [[value, -value]] * len(grid)}

    path, two = tmp_path / "metrics.csv", [[0.0, 1.0], [1.0, 0.0]]
    for step in (2, 4, 6):
        callback._append_csv(path, report(step, two, float(step)), "fit")
    callback._append_csv(path, report(4, two, 40.0), "fit")  # resumed from the step-2 checkpoint
    callback._append_csv(path, report(4, two, 41.0), "validate")
    callback._append_csv(path, report(4, two, 42.0), "validate")  # the same checkpoint validated again
    three = [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    callback._append_csv(path, report(6, three, 60.0), "fit")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["stage"], r["step"], float(r["hypervolume"])) for r in rows] == [
        ("fit", "2", 2.0), ("fit", "4", 40.0), ("validate", "4", 42.0), ("fit", "6", 60.0)]
    assert rows[1]["reward/coverage/w=1.00,0.00"] == "40.0" and rows[1]["reward/brevity/w=0.50,0.50"] == ""
    assert rows[3]["reward/brevity/w=0.50,0.50"] == "-60.0" and rows[3]["steerability/brevity"] == "0.25"
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_fit_resumed_from_a_step_checkpoint_keeps_the_every_n_epochs_schedule(tmp_path):
    """A checkpoint saved after a training batch (every_n_train_steps) whose step then validates resumes past that
    validation (Lightning fast-forwards it): the evaluation count must include it, or every later evaluation moves."""
    def run(directory, **fit):
        callback = GridEvaluation(grid_step=0.5, every_n_epochs=2, sample_prompts=0,
                                  generation=GenerationSettings(do_sample=False, max_new_tokens=3))
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1,
                                     save_on_train_epoch_end=False)
        data = SyntheticTLDRDataModule(num_train=32, num_val=2, batch_size=2, val_batch_size=2, seed=0)
        trainer = make_trainer(directory, [callback, checkpoint], max_steps=8, val_check_interval=2,
                               check_val_every_n_epoch=None)
        trainer.fit(make_module(), datamodule=data, **fit)
        return [entry["step"] for entry in callback.history]

    # validations at steps 2, 4, 6 and 8; every second one evaluates
    assert run(tmp_path / "full") == [2, 6]
    # saved at step 4 before its validation, which the resumed fit skips; the next evaluation is still at step 6
    assert run(tmp_path / "resumed", ckpt_path=str(tmp_path / "checkpoints" / "epoch=0-step=4.ckpt")) == [2, 6]


GOOD_HISTORY = [{"epoch": 0, "step": 2, "rewards": [[0.5, -1.0], [0.25, -0.5]]}]


@pytest.mark.parametrize("state, message", [
    ({"history": GOOD_HISTORY, "validations": "2"}, "validations='2'"),
    ({"history": GOOD_HISTORY, "validations": -1}, "validations=-1"),
    ({"history": "abc", "validations": 1}, "malformed history"),
    ({"history": [{"epoch": 0, "step": 2, "rewards": [["x", 1.0]]}], "validations": 1}, "malformed history"),
    ({"history": [{"epoch": 0, "rewards": [[0.5, 1.0]]}], "validations": 1}, "malformed history"),
])
def test_malformed_state_in_a_checkpoint_is_named_when_it_loads(state, message):
    # it used to load as it was and fail at the next validation's front figure, after minutes of generation
    from clp_lightning.callbacks import CheckpointError

    callback = GridEvaluation(grid_step=0.5)
    with pytest.raises(CheckpointError, match=message):
        callback.load_state_dict(state)
    callback.load_state_dict({"history": GOOD_HISTORY, "validations": 1})
    assert callback.history == GOOD_HISTORY and callback.validations == 1
    callback.load_state_dict({})  # a checkpoint without the callback's state starts afresh
    assert callback.history == [] and callback.validations == 0


def test_validate_after_fit_in_one_process_names_the_trained_step(tmp_path):
    """`trainer.validate(module)` on the weights in memory reported step 0 and epoch 0 (the numbers of a checkpoint
    that was never loaded), next to a policy trained for 4 steps."""
    data = SyntheticTLDRDataModule(num_train=8, num_val=3, batch_size=2, val_batch_size=2, seed=0)
    callback, module = grid_callback(), make_module()
    trainer = make_trainer(tmp_path, [callback], max_steps=4, val_check_interval=4, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=data)
    assert (callback.last["epoch"], callback.last["step"]) == (0, 4)
    trainer.validate(module, datamodule=data)
    # the step the weights were trained to; the epoch is the trainer's, 1 once the fit has finished epoch 0
    assert (callback.last["epoch"], callback.last["step"]) == (trainer.current_epoch, 4) == (1, 4)
    assert read_report(tmp_path / "run" / "evaluation" / "validate.json")["step"] == 4


def test_a_grid_finer_than_its_labels_is_refused():
    # weightings are named to 2 decimals in metric keys and metrics.csv: 0.004 apart, two of them shared a column
    class Module:  # what setup reads before the grid
        num_objectives, objective_names = 2, ["a", "b"]

    module = Module()
    with pytest.raises(ValueError, match=r"grid_step=0.004 gives weightings that differ by less than 0.01"):
        GridEvaluation(grid_step=0.004).setup(None, module, "validate")


@pytest.mark.parametrize("shuffle", [False, True])
def test_max_prompts_counts_the_loaders_prompts_on_every_rank(shuffle):
    # a shuffled distributed sampler (a user's validation loader) let every rank take max_prompts: W times as many
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, DistributedSampler

    callback, budgets = GridEvaluation(max_prompts=5), []
    for rank in range(2):
        sampler = DistributedSampler(range(10), num_replicas=2, rank=rank, shuffle=shuffle)
        trainer = SimpleNamespace(state=SimpleNamespace(fn="validate"), val_dataloaders=DataLoader(range(10),
                                                                                                   sampler=sampler))
        budgets.append(callback._rank_budget(trainer))
    assert budgets == [3, 2]
