"""The comparison study: its variants table, the commands each kind of variant runs, resuming, the fixed-weighting
front's report, and (slow) its smallest version end to end."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from clp_lightning.callbacks import GridEvaluation
from clp_lightning.conditioning.policy import ConditioningConfig, PolicyConfig
from clp_lightning.config import GenerationSettings
from clp_lightning.data import SyntheticTLDRDataModule
from clp_lightning.evaluation import hypervolume
from clp_lightning.module import CLPModule
from clp_lightning.rewards import LengthReward, RougeReward

STUDY = Path(__file__).resolve().parents[1] / "experiments" / "study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("experiments_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look up their module there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def grid_evaluation_report(tmp_path_factory):
    """A report exactly as GridEvaluation writes it: `validate` of a tiny policy on a grid of step 0.5."""
    torch.manual_seed(0)
    rewards = [
        RougeReward(name="coverage", target="source", rouge_key="rouge1", measure="recall"),
        LengthReward(name="brevity", unit="chars", scale=10.0),
    ]
    policy = PolicyConfig("tiny:t5", ConditioningConfig(prompt=True), max_prompt_length=48)
    module = CLPModule(policy, rewards, samples_per_prompt=2, generation=GenerationSettings(max_new_tokens=3))
    callback = GridEvaluation(
        grid_step=0.5, sample_prompts=1, generation=GenerationSettings(do_sample=False, max_new_tokens=3)
    )
    data = SyntheticTLDRDataModule(num_train=4, num_val=2, batch_size=2, val_batch_size=2, seed=0)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=tmp_path_factory.mktemp("grid"),
    )
    trainer.validate(module, datamodule=data)
    return json.loads((Path(trainer.default_root_dir) / "evaluation" / "validate.json").read_text())


class FakeCLI:
    """Stands in for ``clp``: records each command and leaves the report (and checkpoint) a real run would."""

    def __init__(self, report: dict) -> None:
        self.report, self.calls = report, []

    def __call__(self, subcommand, configs, overrides):
        options = dict(o.removeprefix("--").split("=", 1) for o in overrides)
        self.calls.append((subcommand, [c.name for c in configs], options))
        if subcommand is None:  # only built: the fixed baseline reads its grid off the callbacks
            return SimpleNamespace(
                trainer=SimpleNamespace(callbacks=[GridEvaluation(grid_step=0.5)]),
                model=SimpleNamespace(num_objectives=2),
            )
        run = Path(options["trainer.logger.init_args.save_dir"])
        (run / "evaluation").mkdir(parents=True, exist_ok=True)
        name = "latest.json" if subcommand == "fit" else f"{subcommand}.json"
        (run / "evaluation" / name).write_text(json.dumps(self.report))
        if subcommand == "fit":
            (run / "checkpoints").mkdir(exist_ok=True)
            (run / "checkpoints" / "last.ckpt").write_bytes(b"")
        return SimpleNamespace(trainer=SimpleNamespace(log_dir=str(run)))


def test_variants_table_is_consistent(study):
    conditioning = Path(study.CONF) / "conditioning"
    for name, variant in study.VARIANTS.items():
        assert (conditioning / variant.fragment).is_file(), name
        if variant.experts_of is not None:  # the experts are trained by the variant that owns them
            owner = study.VARIANTS[variant.experts_of]
            assert owner.kind == "soup" and owner.experts_of is None, name
            assert (owner.fragment, owner.lr) == (variant.fragment, variant.lr), name
    with pytest.raises(ValueError, match="not one of"):
        study.Variant("lora.yaml", "sweep")
    with pytest.raises(ValueError, match="for soups"):
        study.Variant("lora.yaml", decoding="logit_mixture")


def test_fit_variant_trains_once_with_its_settings_and_resumes(study, grid_evaluation_report, monkeypatch, tmp_path):
    fake = FakeCLI(grid_evaluation_report)
    monkeypatch.setattr(study, "cli", fake)
    task = [study.CONF / "quickstart.yaml"]
    study.run_variant("lora", 1, 8, tmp_path / "sft", tmp_path, task)
    [(subcommand, configs, options)] = fake.calls
    assert subcommand == "fit" and configs == ["quickstart.yaml", "lora.yaml"]
    assert options["trainer.max_steps"] == "8" and float(options["model.init_args.optimizer.lr"]) == 2e-3
    assert options["trainer.logger.init_args.save_dir"] == str(tmp_path / "lora" / "seed1")
    study.run_variant("lora", 1, 8, tmp_path / "sft", tmp_path, task)
    assert len(fake.calls) == 1  # its report is there: an interrupted study does not run it again


def test_soups_train_experts_once_and_mixing_reuses_them(study, grid_evaluation_report, monkeypatch, tmp_path):
    fake = FakeCLI(grid_evaluation_report)
    monkeypatch.setattr(study, "cli", fake)
    task = [study.CONF / "quickstart.yaml"]
    reports = [study.run_variant(v, 0, 8, tmp_path / "sft", tmp_path, task) for v in ("mix_lora", "rs_lora")]
    assert [r["step"] for r in reports] == [8, 8]  # the experts' steps together
    fits = [options for subcommand, _, options in fake.calls if subcommand == "fit"]
    assert [f["trainer.logger.init_args.save_dir"] for f in fits] == [
        str(tmp_path / "rs_lora" / "seed0" / f"expert{i}") for i in range(2)
    ]
    assert [(f["trainer.max_steps"], f["model.init_args.sampler.index"]) for f in fits] == [("4", "0"), ("4", "1")]
    assert all(f["model.init_args.policy.conditioning.train_shared"] == "false" for f in fits)
    validates = [options for subcommand, _, options in fake.calls if subcommand == "validate"]
    assert [v.get("model.init_args.decoding") for v in validates] == ["logit_mixture", None]
    assert validates[0]["model.init_args.expert_checkpoints"] == validates[1]["model.init_args.expert_checkpoints"]
    fake.calls.clear()
    assert study.run_variant("mix_lora", 0, 8, tmp_path / "sft", tmp_path, task)["step"] == 8
    assert fake.calls == []


def test_fixed_report_has_the_keys_of_a_grid_evaluation_report(study, grid_evaluation_report, monkeypatch, tmp_path):
    """The fixed-weighting front is one more grid report: the same keys in the same order, so that nothing that
    reads reports (the table, ``clp compare``, the figures) needs to know how a front was made."""
    report = grid_evaluation_report
    grid = report["grid"]
    # policy g: the report's front moved by g / 10, so that point g of the fixed front is recognisably policy g's
    points = [
        {
            **report,
            "rewards": [[r + g / 10 for r in row] for row in report["rewards"]],
            "kl": [k + g for k in report["kl"]],
        }
        for g in range(len(grid))
    ]
    fixed = study.fixed_report(points, steps=4)
    assert list(fixed) == list(report)
    assert fixed["grid"] == grid and fixed["step"] == 4 * len(grid)
    assert fixed["rewards"] == [points[g]["rewards"][g] for g in range(len(grid))]
    assert fixed["kl"] == [points[g]["kl"][g] for g in range(len(grid))]
    front, ref_point = (torch.tensor(x, dtype=torch.float64) for x in (fixed["rewards"], report["ref_point"]))
    assert fixed["hypervolume"] == hypervolume(front, ref_point)  # JSON numbers are float64
    for key in ("objectives", "ref_point", "ref_point_from", "reference_rewards", "reference_hypervolume"):
        assert fixed[key] == report[key], key
    counts = report["parameters"]
    assert fixed["parameters"]["trainable_parameters"] == len(grid) * counts["trainable_parameters"]

    # and through the study: one policy per grid point, trained at that weighting, assembled into report.json
    fake = FakeCLI(report)
    monkeypatch.setattr(study, "cli", fake)
    returned = study.run_variant("fixed", 0, 4, tmp_path / "sft", tmp_path, [study.CONF / "quickstart.yaml"])
    fits = [options for subcommand, _, options in fake.calls if subcommand == "fit"]
    assert [json.loads(f["model.init_args.sampler.weights"]) for f in fits] == grid
    written = json.loads((tmp_path / "fixed" / "seed0" / "report.json").read_text())
    assert list(written) == list(report) and written == json.loads(json.dumps(returned))


@pytest.mark.slow
def test_smallest_study_writes_table_and_figure(study, tmp_path):
    variants = ["logits", "rs_lora", "mix_lora", "fixed"]
    options = "--seeds 0 --steps 4 --sft-steps 10 --grid-step 0.5".split()
    table = study.main(["--out", str(tmp_path), "--variants", *variants, *options])
    rows = table.splitlines()
    assert rows[0].startswith("| variant | hypervolume") and len(rows) == 2 + len(variants)
    assert [r.split("|")[1].strip() for r in rows[2:]] == variants
    assert (tmp_path / "table.md").read_text().strip() == table
    assert (tmp_path / "fronts.png").stat().st_size > 1000
    # decoding-time mixing reuses the Rewarded Soups experts instead of training its own
    assert (tmp_path / "rs_lora" / "seed0" / "expert1" / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "mix_lora" / "seed0" / "expert0").exists()
    # one fixed-weighting policy per grid point (step 0.5: 3 points), each point taken at its own weighting
    fixed = json.loads((tmp_path / "fixed" / "seed0" / "report.json").read_text())
    assert fixed["grid"] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]] and fixed["step"] == 3 * 4
    for g in range(3):
        own = json.loads((tmp_path / "fixed" / "seed0" / f"point{g}" / "evaluation" / "latest.json").read_text())
        assert fixed["rewards"][g] == own["rewards"][g]
        assert list(fixed) == list(own)  # the same report schema
    assert 0 <= fixed["hypervolume"]
    assert rows[-1].split("|")[5].strip() == "12"  # steps column: the G policies' budgets together
