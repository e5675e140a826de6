"""The comparison study: its variants table, the commands each kind of variant runs, resuming, the fixed-weighting
front's report, and (slow) its smallest version end to end."""

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from clp_lightning.callbacks import GridEvaluation
from clp_lightning.conditioning.config import ConditioningConfig, PolicyConfig
from clp_lightning.config import GenerationSettings
from clp_lightning.data import SyntheticTLDRDataModule
from clp_lightning.evaluation import hypervolume
from clp_lightning.evaluation.reports import read_report
from clp_lightning.files import json_text
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
    return read_report(Path(trainer.default_root_dir) / "evaluation" / "validate.json")


class FakeCLI:
    """Stands in for ``clp``: records each command and leaves the files a real run would (reports, checkpoints).

    A fit evaluates every ``val_check_interval`` steps (``epoch_*_step_*.json``, with a checkpoint each); its reports
    have the hypervolume ``hv(lr)`` and a KL that grows with the step, so that a study's choices can be checked.
    With ``checkpoint_every``, checkpoints come every that many steps instead; a fit with ``limit_val_batches=0``
    writes no reports.
    """

    def __init__(self, report: dict, hv=lambda lr: 1.0, checkpoint_every: int | None = None,
                 kl=lambda step: step / 10, dumps=json_text) -> None:
        self.report, self.hv, self.calls, self.checkpoint_every = report, hv, [], checkpoint_every
        self.kl, self.dumps = kl, dumps  # the KL of a fit's report at a step; the reports' JSON, as GridEvaluation's

    def __call__(self, subcommand, configs, overrides):
        options = dict(o.removeprefix("--").split("=", 1) for o in overrides)
        self.calls.append((subcommand, [c.name for c in configs], options))
        if subcommand is None:  # only built: the fixed baseline reads its grid off the callbacks
            return SimpleNamespace(
                trainer=SimpleNamespace(callbacks=[GridEvaluation(grid_step=0.5)]),
                model=SimpleNamespace(num_objectives=2),
            )
        if "model.init_args.output_dir" in options:  # the warm start
            Path(options["model.init_args.output_dir"]).mkdir(parents=True)
            return SimpleNamespace()
        run = Path(options["trainer.logger.init_args.save_dir"])
        (run / "evaluation").mkdir(parents=True, exist_ok=True)
        hv = self.hv(float(options["model.init_args.optimizer.lr"]))
        if subcommand == "fit":
            steps, every = int(options["trainer.max_steps"]), int(options["trainer.val_check_interval"])
            (run / "checkpoints").mkdir(exist_ok=True)
            scheduled = list(range(self.checkpoint_every or every, steps + 1, self.checkpoint_every or every))
            for step in {*scheduled, steps}:  # clp's ModelCheckpoint also saves the step a fit ends on
                (run / "checkpoints" / f"epoch=0-step={step}.ckpt").write_bytes(b"")
            (run / "checkpoints" / "last.ckpt").write_bytes(b"")
            if options.get("trainer.limit_val_batches") == "0":
                return SimpleNamespace(trainer=SimpleNamespace(log_dir=str(run)))
            for step in range(every, steps + 1, every):
                report = {**self.report, "hypervolume": hv * step / steps,
                          "kl": [self.kl(step)] * len(self.report["kl"]), "step": step}
                (run / "evaluation" / f"epoch_000_step_{step:06d}.json").write_text(self.dumps(report))
            (run / "evaluation" / "latest.json").write_text(self.dumps(report))
        else:
            (run / "evaluation" / f"{subcommand}.json").write_text(self.dumps({**self.report, "hypervolume": hv}))
        return SimpleNamespace(trainer=SimpleNamespace(log_dir=str(run)))


def new_study(study, tmp_path, steps=8):
    return study.Study(tmp_path, tmp_path / "sft", [study.CONF / "quickstart.yaml"], steps)


def test_variants_table_is_consistent(study):
    conditioning = Path(study.CONF) / "conditioning"
    for name, variant in study.VARIANTS.items():
        assert (conditioning / variant.fragment).is_file(), name
        if variant.experts_of is not None:  # the experts are trained by the variant that owns them
            owner = study.VARIANTS[variant.experts_of]
            assert owner.kind == "soup" and owner.experts_of is None, name
            assert (owner.fragment, owner.lr) == (variant.fragment, variant.lr), name
    # joint CLP trained like the Rewarded Soups experts (only the copies), to measure what training the rest adds
    assert study.VARIANTS["attention_own"].overrides == (study.OWN_ONLY,)
    assert study.VARIANTS["attention_own"].fragment == study.VARIANTS["rs_attention"].fragment
    with pytest.raises(ValueError, match="not one of"):
        study.Variant("lora.yaml", "sweep")
    with pytest.raises(ValueError, match="for soups"):
        study.Variant("lora.yaml", decoding="logit_mixture")


def test_learning_rates_are_the_base_rate_times_the_factors(study, tmp_path):
    runs = new_study(study, tmp_path)
    assert runs.base_lr("all") == 2e-4  # conf/quickstart.yaml's optimizer.lr
    assert runs.lrs("all", (1 / 3, 1.0, 3.0)) == [6.67e-5, 2e-4, 6e-4]
    assert runs.lrs("lora", (1.0, 3.0)) == [2e-3, 6e-3]  # the variant's own base
    assert runs.lrs("fixed", (1 / 3, 1.0, 3.0)) == [2e-4]  # not swept: G trainings per rate
    assert runs.run_dir("lora", 2e-3, 1) == tmp_path / "lora" / "lr0.002" / "seed1"


def test_fit_variant_trains_once_with_its_settings_and_resumes(study, grid_evaluation_report, monkeypatch, tmp_path):
    fake = FakeCLI(grid_evaluation_report)
    monkeypatch.setattr(study, "cli", fake)
    runs = new_study(study, tmp_path)
    runs.train("lora", 1, 2e-3)
    [(subcommand, configs, options)] = fake.calls
    assert subcommand == "fit" and configs == ["quickstart.yaml", "lora.yaml"]
    assert options["trainer.max_steps"] == "8" and float(options["model.init_args.optimizer.lr"]) == 2e-3
    assert options["trainer.val_check_interval"] == "2"  # 4 evaluations: the KL path
    assert options["trainer.logger.init_args.save_dir"] == str(tmp_path / "lora" / "lr0.002" / "seed1")
    runs.train("lora", 1, 2e-3)
    assert len(fake.calls) == 1  # its report is there: an interrupted study does not run it again
    assert "ckpt_path" not in options  # nothing to resume from
    # the test evaluation: the last checkpoint on the held-out prompts, once
    runs.test("lora", 1, 2e-3)
    runs.test("lora", 1, 2e-3)
    [(subcommand, _, options)] = fake.calls[1:]
    assert subcommand == "test" and options["data.init_args.num_test"] == "64"
    assert options["ckpt_path"] == str(tmp_path / "lora" / "lr0.002" / "seed1" / "checkpoints" / "last.ckpt")
    # the KL path: the reference point, then each evaluation's (mean sampled KL, hypervolume)
    path = runs.path("lora", 1, 2e-3)
    assert path[0] == (0.0, grid_evaluation_report["reference_hypervolume"])
    assert [round(kl, 6) for kl, _ in path[1:]] == [0.2, 0.4, 0.6, 0.8] and path[-1][1] == 1.0


def test_a_fit_cut_short_resumes_from_its_last_checkpoint(study, grid_evaluation_report, monkeypatch, tmp_path):
    fake = FakeCLI(grid_evaluation_report)
    monkeypatch.setattr(study, "cli", fake)
    runs = new_study(study, tmp_path)
    run = runs.run_dir("lora", 2e-3, 0)
    (run / "checkpoints").mkdir(parents=True)
    (run / "evaluation").mkdir(parents=True)
    # the study stopped mid-fit: a checkpoint, and the report of an evaluation before the last (step 8 of 8)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "evaluation" / "latest.json").write_text(json.dumps({**grid_evaluation_report, "step": 4}))
    runs.train("lora", 0, 2e-3)
    [(subcommand, _, options)] = fake.calls
    assert subcommand == "fit" and options["ckpt_path"] == str(run / "checkpoints" / "last.ckpt")
    runs.train("lora", 0, 2e-3)
    assert len(fake.calls) == 1  # now through its last evaluation: finished


@pytest.mark.parametrize("steps", [9, 8])
def test_a_fit_cut_short_after_its_last_evaluation_resumes(study, grid_evaluation_report, monkeypatch, tmp_path,
                                                          steps):
    # 9 steps, an evaluation every 2: the last is at step 8 and step 9 trains after it; 8 steps: the study was killed
    # between the step-8 evaluation and its checkpoint. Either way last.ckpt is short of the budget, and the test
    # would evaluate it as the finished run.
    fake = FakeCLI(grid_evaluation_report)
    monkeypatch.setattr(study, "cli", fake)
    runs = new_study(study, tmp_path, steps=steps)
    run = runs.run_dir("lora", 2e-3, 0)
    (run / "checkpoints").mkdir(parents=True)
    (run / "evaluation").mkdir(parents=True)
    saved = 8 if steps == 9 else 6
    for name in (f"epoch=0-step={saved}.ckpt", "last.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"")
    (run / "evaluation" / "latest.json").write_text(json.dumps({**grid_evaluation_report, "step": 8}))
    runs.train("lora", 0, 2e-3)
    [(subcommand, _, options)] = fake.calls
    assert subcommand == "fit" and options["ckpt_path"] == str(run / "checkpoints" / "last.ckpt")
    runs.train("lora", 0, 2e-3)
    assert len(fake.calls) == 1  # its last step saved: finished


def test_soups_train_experts_once_and_mixing_reuses_them(study, grid_evaluation_report, monkeypatch, tmp_path):
    fake = FakeCLI(grid_evaluation_report)
    monkeypatch.setattr(study, "cli", fake)
    runs = new_study(study, tmp_path)
    reports = [runs.train(v, 0, 2e-3) for v in ("mix_lora", "rs_lora")]
    assert [r["step"] for r in reports] == [8, 8]  # the experts' steps together
    fits = [options for subcommand, _, options in fake.calls if subcommand == "fit"]
    experts = tmp_path / "rs_lora" / "lr0.002" / "seed0"
    assert [f["trainer.logger.init_args.save_dir"] for f in fits] == [str(experts / f"expert{i}") for i in range(2)]
    assert [(f["trainer.max_steps"], f["model.init_args.sampler.index"]) for f in fits] == [("4", "0"), ("4", "1")]
    assert all(f["model.init_args.policy.conditioning.train_shared"] == "false" for f in fits)
    validates = [options for subcommand, _, options in fake.calls if subcommand == "validate"]
    assert [v.get("model.init_args.decoding") for v in validates] == ["logit_mixture", None]
    assert validates[0]["model.init_args.expert_checkpoints"] == validates[1]["model.init_args.expert_checkpoints"]
    fake.calls.clear()
    assert runs.train("mix_lora", 0, 2e-3)["step"] == 8
    assert fake.calls == []
    # the soup's KL path: the experts' checkpoints of each evaluation combined and validated, once each; the last
    # ones are the soup the training already validated
    path = runs.path("rs_lora", 0, 2e-3)
    validates = [options for subcommand, _, options in fake.calls if subcommand == "validate"]
    assert len(path) == 1 + 4 and len(validates) == 3
    assert json.loads(validates[0]["model.init_args.expert_checkpoints"]) == [
        str(experts / f"expert{i}" / "checkpoints" / "epoch=0-step=1.ckpt") for i in range(2)]
    runs.path("rs_lora", 0, 2e-3)
    assert len([c for c in fake.calls if c[0] == "validate"]) == 3


def test_experts_without_evaluations_are_done_by_their_checkpoint(study, grid_evaluation_report, monkeypatch,
                                                                   tmp_path):
    # the real-model task: experts skip the grid evaluation and checkpoint every 4 steps
    fake = FakeCLI(grid_evaluation_report, checkpoint_every=4)
    monkeypatch.setattr(study, "cli", fake)
    runs = study.Study(tmp_path, None, [study.CONF / "cnndm_smollm2.yaml"], 24, evaluations=2,
                       expert_evaluations=False)
    runs.train("rs_lora", 0, 5e-4)
    fits = [options for subcommand, _, options in fake.calls if subcommand == "fit"]
    assert [(f["trainer.max_steps"], f["trainer.limit_val_batches"]) for f in fits] == [("12", "0"), ("12", "0")]
    runs.train("rs_lora", 0, 5e-4)
    assert len([c for c in fake.calls if c[0] == "fit"]) == 2  # their step-12 checkpoints say they are done
    # the fit evaluates at steps 12 and 24: the experts' nearest checkpoints are 8 (of 4 and 8, the later) and 12,
    # and the soup of the last ones is the training's own report
    fake.calls.clear()
    path = runs.path("rs_lora", 0, 5e-4)
    [(subcommand, _, options)] = fake.calls
    experts = tmp_path / "rs_lora" / "lr0.0005" / "seed0"
    assert subcommand == "validate" and json.loads(options["model.init_args.expert_checkpoints"]) == [
        str(experts / f"expert{i}" / "checkpoints" / "epoch=0-step=8.ckpt") for i in range(2)]
    assert len(path) == 1 + 2
    # every checkpoint instead: steps 4 and 8 validated (8 read back), 12 the training's report
    fake.calls.clear()
    runs.every_checkpoint = ("rs_lora",)
    path = runs.path("rs_lora", 0, 5e-4)
    [(subcommand, _, options)] = fake.calls
    assert json.loads(options["model.init_args.expert_checkpoints"]) == [
        str(experts / f"expert{i}" / "checkpoints" / "epoch=0-step=4.ckpt") for i in range(2)]
    assert len(path) == 1 + 3


def test_hypervolume_at_a_kl_budget_interpolates_along_the_path(study):
    path = [(0.0, 1.0), (0.1, 2.0), (0.3, 3.0)]
    assert study.at_kl(path, 0.2) == pytest.approx(2.5)
    assert study.at_kl(path, 0.1) == pytest.approx(2.0)
    assert study.at_kl(path, 0.0) == pytest.approx(1.0)
    assert math.isnan(study.at_kl(path, 0.4))  # never reached
    assert math.isnan(study.at_kl([(0.0, 1.0), (math.nan, 2.0)], 0.1))  # KL not measured
    # KL that falls back below the budget later: the first crossing counts
    assert study.at_kl([(0.0, 1.0), (0.4, 3.0), (0.1, 5.0)], 0.2) == pytest.approx(2.0)


def test_no_kl_budget_when_a_run_did_not_measure_its_kl(study):
    # a run evaluated with kl_samples: 0 has a nan KL on its path after the reference's (0.0, hv) start: no budget
    # can be read then; its max over the path must not pass for "this run reaches KL 0" and set the budget to 0
    report = {"objectives": ["a", "b"], "grid": [[1.0, 0.0], [0.0, 1.0]], "ref_point": [0.0, 0.0],
              "prompts_sha256": "x", "per_prompt_rewards": [[[1.0, 0.5], [2.0, 0.5]], [[0.5, 1.0], [0.5, 2.0]]],
              "hypervolume": 1.0, "kl": [0.5, 0.5], "kl_se": [0.1, 0.1], "vertex_gain": {"a": 0.1, "b": 0.1},
              "steerability": {"a": 1.0, "b": 1.0}}
    results = {"measured": {"test": [report], "paths": [[(0.0, 1.0), (0.5, 2.0)]]},
               "unmeasured": {"test": [report], "paths": [[(0.0, 1.0), (math.nan, 2.0)]]}}
    summary = study.analyse(results, "measured", num_resamples=10)
    assert math.isnan(summary["kl_budget"])
    assert all(math.isnan(r["hypervolume_at_kl"]) for r in results.values())


def test_one_seed_has_no_spread_in_the_table(study):
    # one seed measures no seed-to-seed spread: "± 0.000" would read as a spread of zero
    report = {"objectives": ["a", "b"], "grid": [[1.0, 0.0], [0.0, 1.0]], "ref_point": [0.0, 0.0],
              "ref_point_from": "config", "prompts_sha256": "x",
              "per_prompt_rewards": [[[1.0, 0.5], [2.0, 0.5]], [[0.5, 1.0], [0.5, 2.0]]], "kl": [0.5, 0.5],
              "kl_se": [0.1, 0.1], "vertex_gain": {"a": 0.1, "b": 0.1}, "steerability": {"a": 1.0, "b": 1.0},
              "step": 8}
    results = {"three": {"lr": 1e-3, "sweep": {1e-3: 1.0}, "paths": [],
                         "test": [{**report, "hypervolume": hv} for hv in (1.0, 1.1, 1.2)]},
               "one": {"lr": 1e-3, "sweep": {1e-3: 1.0}, "paths": [], "test": [{**report, "hypervolume": 1.5}]}}
    table = study.tables(results, study.analyse(results, "three", num_resamples=10))
    assert "| three | 0.001 | 1.100 ± 0.100 |" in table
    assert "| one | 0.001 | 1.500 (1 seed) |" in table


def test_one_seed_has_an_undefined_std_in_results_json(study, grid_evaluation_report, monkeypatch, tmp_path):
    # the standard deviation of one sample is undefined: null in results.json, not 0.0 (a spread measured as zero)
    monkeypatch.setattr(study, "cli", FakeCLI(grid_evaluation_report))
    table = study.main(["--out", str(tmp_path), "--variants", "all", "logits", "--seeds", "0", "--steps", "8",
                        "--lr-factors", "1", "--variant-seeds", "logits=0,1", "--bootstrap", "20"])
    results = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert results["all"]["test_hypervolume"]["std"] is None and results["all"]["test_hypervolume"]["seeds"] == 1
    assert results["logits"]["test_hypervolume"]["std"] == 0.0 and results["logits"]["test_hypervolume"]["seeds"] == 2
    assert "| all | 0.0002 | 1.000 (1 seed) |" in table and "| logits | 0.0002 | 1.000 ± 0.000 |" in table


def test_a_kl_not_measured_is_null_in_results_json_and_the_reports_read_as_with_nan(study, grid_evaluation_report,
                                                                                     monkeypatch, tmp_path):
    # kl_samples: 0 leaves every report's KL NaN: the reports (null in them now, NaN before), the fixed baseline's
    # report.json and results.json are strict JSON, and the study reads null as it read NaN
    report = {**grid_evaluation_report, "kl": [math.nan] * len(grid_evaluation_report["kl"])}
    tables = []
    for dumps in (json.dumps, json_text):
        monkeypatch.setattr(study, "cli", FakeCLI(report, kl=lambda step: math.nan, dumps=dumps))
        out = tmp_path / dumps.__name__
        tables.append(study.main(["--out", str(out), "--variants", "all", "fixed", "--seeds", "0", "--steps", "4",
                                  "--lr-factors", "1", "--bootstrap", "20"]))
        refuse = pytest.fail  # NaN, Infinity: not JSON
        summary = json.loads((out / "results.json").read_text(), parse_constant=refuse)["summary"]
        assert summary["kl_budget"] is None
        json.loads((out / "fixed" / "lr0.0002" / "seed0" / "report.json").read_text(), parse_constant=refuse)
    assert tables[0] == tables[1] and "| all |" in tables[0] and "| fixed |" in tables[0]


def test_the_protocol_picks_the_rate_on_validation_and_compares_on_test(study, grid_evaluation_report, monkeypatch,
                                                                       tmp_path):
    # the validation hypervolume peaks at the base rate for `all` (2e-4); LoRA's base is 2e-3, so its best is 6e-4
    fake = FakeCLI(grid_evaluation_report, hv=lambda lr: 1.0 - abs(math.log(lr / 2e-4)))
    monkeypatch.setattr(study, "cli", fake)
    table = study.main(["--out", str(tmp_path), "--variants", "all", "lora", "--seeds", "0", "1", "--steps", "8",
                        "--bootstrap", "50"])
    results = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert results["all"]["lr"] == 2e-4 and results["lora"]["lr"] == 6.67e-4
    fits = [o for c, _, o in fake.calls if c == "fit" and "model.init_args.optimizer.lr" in o]
    seeds_by_lr = {}
    for f in fits:
        seeds_by_lr.setdefault(f["model.init_args.optimizer.lr"], set()).add(f["seed_everything"])
    # the sweep at the first seed only; the other seeds only at the chosen rate
    assert seeds_by_lr == {"6.67e-05": {"0"}, "0.0002": {"0", "1"}, "0.0006": {"0"},
                           "0.000667": {"0", "1"}, "0.002": {"0"}, "0.006": {"0"}}
    tests = [o for c, _, o in fake.calls if c == "test"]
    assert sorted((o["model.init_args.optimizer.lr"], o["seed_everything"]) for o in tests) == [
        ("0.0002", "0"), ("0.0002", "1"), ("0.000667", "0"), ("0.000667", "1")]
    assert "| all | 0.0002 |" in table and "HV - all [95% CI]" in table  # compared with the first variant
    assert "**1.000**" in table  # the chosen rate's validation hypervolume, in bold
    # the KL budget: the largest KL every run's path reaches (the fake's paths all end at KL 0.8), and every run
    # has a hypervolume there
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary["kl_budget"] == pytest.approx(0.8)
    assert all(not math.isnan(r["hypervolume_at_kl"]) for r in results.values())
    assert (tmp_path / "fronts.png").exists() and (tmp_path / "kl.png").exists()


def test_real_model_task_starts_from_its_config_and_tests_on_its_test_split(study, grid_evaluation_report,
                                                                         monkeypatch, tmp_path):
    fake = FakeCLI(grid_evaluation_report, hv=lambda lr: 1.0 - abs(math.log(lr / 5e-4)))
    monkeypatch.setattr(study, "cli", fake)
    with pytest.raises(SystemExit):  # a variant the task does not train is refused before anything runs
        study.main(["--task", "cnndm_smollm2", "--out", str(tmp_path), "--variants", "all"])
    assert fake.calls == []
    study.main(["--task", "cnndm_smollm2", "--out", str(tmp_path), "--seeds", "0", "--steps", "8",
                "--lr-factors", "1", "3", "--bootstrap", "20"])
    assert not any("model.init_args.output_dir" in o for _, _, o in fake.calls)  # no warm start
    fits = [(configs, o) for c, configs, o in fake.calls if c == "fit"]
    assert {tuple(configs) for configs, _ in fits} == {("cnndm_smollm2.yaml", "lora.yaml")}
    assert all("model.init_args.policy.model_name_or_path" not in o for _, o in fits)  # the config's model
    assert all(o["data.init_args.path"] == study.STUDY_DATA for _, o in fits)
    # LoRA's base rate is the task config's (5e-4), not the quick start's LoRA rate
    assert {o["model.init_args.optimizer.lr"] for _, o in fits} == {"0.0005", "0.0015"}
    # the soup's experts skip the grid evaluation there (minutes each on the real model); the CLP fits do not
    assert {o.get("trainer.limit_val_batches") for _, o in fits if "model.init_args.sampler.index" in o} == {"0"}
    assert all("trainer.limit_val_batches" not in o for _, o in fits if "model.init_args.sampler.index" not in o)
    tests = [o for c, _, o in fake.calls if c == "test"]
    assert {o["data.init_args.max_test_samples"] for o in tests} == {"64"}
    assert {o["trainer.callbacks.init_args.max_prompts"] for o in tests} == {"64"}  # the config caps validation
    results = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert set(results) == {"lora", "rs_lora", "mix_lora"} and results["lora"]["lr"] == 5e-4
    # the comparisons measure from the task's fixed point; the rate was chosen on the reports' own hypervolume
    fixed = hypervolume(torch.tensor(grid_evaluation_report["rewards"]), torch.tensor([0.0, -5.0]))
    assert results["lora"]["test_hypervolume"]["mean"] == pytest.approx(fixed)
    assert results["lora"]["sweep"] == {"0.0005": 1.0, "0.0015": pytest.approx(1.0 - math.log(3))}
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary["ref_point"] == [0.0, -5.0] and summary["ref_point_from"] == "the study's fixed point"


def test_a_study_resumed_with_other_settings_is_refused(study, grid_evaluation_report, monkeypatch, tmp_path,
                                                       capsys):
    # the runs' directories do not name the step budget: an 8-step study's soup and test reports would be taken as
    # those of a 16-step one
    fake = FakeCLI(grid_evaluation_report)
    monkeypatch.setattr(study, "cli", fake)
    options = ["--out", str(tmp_path), "--variants", "rs_lora", "--seeds", "0", "--lr-factors", "1", "--bootstrap",
               "20"]
    study.main([*options, "--steps", "8"])
    fake.calls.clear()
    study.main([*options, "--steps", "8"])  # resumed with the same settings: nothing runs again
    assert fake.calls == []
    with pytest.raises(SystemExit):
        study.main([*options, "--steps", "16"])
    assert "holds a study with other settings (steps 8 -> 16)" in capsys.readouterr().err
    assert fake.calls == []


def test_rebased_report_measures_the_same_rewards_from_another_point(study, grid_evaluation_report):
    report = {**grid_evaluation_report, "rewards": [[0.5, 0.0], [1.0, -1.0]], "reference_rewards": [0.8, -0.5]}
    moved = study.rebased(report, [0.0, -2.0])
    assert moved["hypervolume"] == pytest.approx(0.5 * 2.0 + 0.5 * 1.0)  # two boxes from (0, -2)
    assert moved["reference_hypervolume"] == pytest.approx(0.8 * 1.5)
    assert moved["rewards"] == report["rewards"] and moved["ref_point"] == [0.0, -2.0]
    with pytest.raises(ValueError, match=r"ref_point \[0.0\] has 1 values; the report has 2 objectives"):
        study.rebased(report, [0.0])


@pytest.mark.parametrize("task", ["quickstart", "cnndm_smollm2"])
def test_each_run_writes_its_checkpoints_into_its_own_directory(study, task, tmp_path):
    from clp_lightning.cli import parse_config

    spec, run = study.TASKS[task], tmp_path / "lora" / "lr0.001" / "seed0"
    runs = study.Study(tmp_path, None, [study.CONF / c for c in spec.configs], 8, spec.overrides)
    args = [a for c in runs._configs("lora") for a in ("--config", str(c))] + runs._common("lora", 0, 1e-3, run)
    config = parse_config(args)
    callbacks = config["trainer"]["callbacks"]
    [checkpoint] = [c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    # no dirpath: Lightning writes into the logger's directory, which is the run's
    assert checkpoint.get("dirpath") in (None, str(run / "checkpoints"))
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == str(run)


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
    for key in ("objectives", "ref_point", "ref_point_from", "reference_rewards", "reference_hypervolume",
                "reference_per_prompt_rewards"):
        assert fixed[key] == report[key], key
    # policy g's rows are the report's at g (each policy's own weighting): the vertex rows, so the report's SEs
    assert fixed["vertex_gain_se"] == pytest.approx(report["vertex_gain_se"])
    counts = report["parameters"]
    assert fixed["parameters"]["trainable_parameters"] == len(grid) * counts["trainable_parameters"]

    # and through the study: one policy per grid point, trained at that weighting, assembled into report.json
    fake = FakeCLI(report)
    monkeypatch.setattr(study, "cli", fake)
    returned = new_study(study, tmp_path, steps=4).train("fixed", 0, 2e-4)
    fits = [options for subcommand, _, options in fake.calls if subcommand == "fit"]
    assert [json.loads(f["model.init_args.sampler.weights"]) for f in fits] == grid
    written = json.loads((tmp_path / "fixed" / "lr0.0002" / "seed0" / "report.json").read_text())
    # as strict JSON on both sides: NaN (a Spearman correlation of constant rewards) is null in the file
    assert list(written) == list(report) and written == json.loads(json_text(returned))


def dies_half_way_writing(monkeypatch, name: str):
    """Make ``Path.write_text`` of a file whose name holds ``name`` write half its text and raise KeyboardInterrupt (a
    study killed while writing it); returns the real ``write_text``, to put back."""
    write_text = Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        if name in self.name:
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    return write_text


def test_a_fixed_report_cut_short_while_written_does_not_stop_the_resume(study, grid_evaluation_report,
                                                                        monkeypatch, tmp_path):
    """report.json marks a fixed-weighting run done: a write killed half-way must not leave half of one."""
    monkeypatch.setattr(study, "cli", FakeCLI(grid_evaluation_report))
    write_text = dies_half_way_writing(monkeypatch, "report.json")
    with pytest.raises(KeyboardInterrupt):
        new_study(study, tmp_path, steps=4).train("fixed", 0, 2e-4)
    monkeypatch.setattr(Path, "write_text", write_text)
    resumed = new_study(study, tmp_path, steps=4).train("fixed", 0, 2e-4)
    assert json.loads(json_text(resumed)) == json.loads(
        (tmp_path / "fixed" / "lr0.0002" / "seed0" / "report.json").read_text())


def test_a_table_cut_short_while_written_leaves_the_earlier_one_whole(study, grid_evaluation_report, monkeypatch,
                                                                      tmp_path):
    """A study resumed to rewrite its tables (more seeds, another --compare-to) and killed while writing table.md
    leaves the earlier table, not half of the new one."""
    monkeypatch.setattr(study, "cli", FakeCLI(grid_evaluation_report))
    options = ["--out", str(tmp_path), "--variants", "all", "--seeds", "0", "--steps", "4", "--lr-factors", "1",
               "--bootstrap", "20"]
    table = study.main(options)
    write_text = dies_half_way_writing(monkeypatch, "table.md")
    with pytest.raises(KeyboardInterrupt):
        study.main(options)
    monkeypatch.setattr(Path, "write_text", write_text)
    assert (tmp_path / "table.md").read_text() == table + "\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_fixed_test_cut_short_resumes_at_the_first_policy_not_tested(study, grid_evaluation_report, monkeypatch,
                                                                       tmp_path):
    """The fixed baseline tests G policies one by one: a study stopped part-way does not test the done ones again."""
    fake = FakeCLI(grid_evaluation_report)
    monkeypatch.setattr(study, "cli", fake)
    runs = new_study(study, tmp_path, steps=4)
    runs.train("fixed", 0, 2e-4)

    def stops_at_the_second_test(subcommand, configs, overrides):
        if subcommand == "test" and len([c for c in fake.calls if c[0] == "test"]) == 1:
            raise KeyboardInterrupt
        return fake(subcommand, configs, overrides)

    monkeypatch.setattr(study, "cli", stops_at_the_second_test)
    with pytest.raises(KeyboardInterrupt):
        runs.test("fixed", 0, 2e-4)
    monkeypatch.setattr(study, "cli", fake)
    fake.calls.clear()
    runs.test("fixed", 0, 2e-4)
    tested = [Path(options["trainer.logger.init_args.save_dir"]).parent.name for subcommand, _, options in fake.calls
              if subcommand == "test"]
    assert tested == ["point1", "point2"]  # point0's test report is there


@pytest.mark.slow
def test_smallest_study_writes_table_and_figure(study, tmp_path):
    variants = ["logits", "rs_lora", "mix_lora", "fixed"]
    options = ("--seeds 0 --steps 4 --sft-steps 10 --grid-step 0.5 --lr-factors 1 --evaluations 2 --test-prompts 4 "
               "--bootstrap 50").split()
    table = study.main(["--out", str(tmp_path), "--variants", *variants, *options])
    rows = table.split("\n\n")[0].splitlines()
    assert rows[0].startswith("| variant | lr | test HV") and len(rows) == 2 + len(variants)
    assert [r.split("|")[1].strip() for r in rows[2:]] == variants
    assert (tmp_path / "table.md").read_text().strip() == table
    assert (tmp_path / "fronts.png").stat().st_size > 1000 and (tmp_path / "kl.png").stat().st_size > 1000
    # decoding-time mixing reuses the Rewarded Soups experts instead of training its own
    runs = tmp_path / "rs_lora" / "lr0.002" / "seed0"
    assert (runs / "expert1" / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "mix_lora" / "lr0.002" / "seed0" / "expert0").exists()
    # the test evaluation: 4 held-out prompts, paired with every variant's
    test = json.loads((runs / "test" / "evaluation" / "test.json").read_text())
    assert len(test["per_prompt_rewards"][0]) == 4
    results = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert "versus" in results["logits"] and "versus" not in results["rs_lora"]  # compared with rs_lora
    # one fixed-weighting policy per grid point (step 0.5: 3 points), each point taken at its own weighting
    fixed_run = tmp_path / "fixed" / "lr0.0002" / "seed0"
    fixed = json.loads((fixed_run / "report.json").read_text())
    assert fixed["grid"] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]] and fixed["step"] == 3 * 4
    for g in range(3):
        own = json.loads((fixed_run / f"point{g}" / "evaluation" / "latest.json").read_text())
        assert fixed["rewards"][g] == own["rewards"][g]
        assert list(fixed) == list(own)  # the same report schema
    assert 0 <= fixed["hypervolume"]
    assert rows[-1].split("|")[-4].strip() == "12"  # steps column: the G policies' budgets together


def test_sweep_only_trains_the_sweep_and_tests_nothing(study, grid_evaluation_report, monkeypatch, tmp_path, capsys):
    fake = FakeCLI(grid_evaluation_report, hv=lambda lr: 1.0 - abs(math.log(lr / 2e-4)))
    monkeypatch.setattr(study, "cli", fake)
    assert study.main(["--out", str(tmp_path), "--variants", "all", "--seeds", "0", "1", "--steps", "8",
                       "--lr-factors", "1", "3", "--sweep-only"]) == ""
    fits = [o for c, _, o in fake.calls if c == "fit" and "model.init_args.optimizer.lr" in o]  # not the warm start
    assert sorted((o["model.init_args.optimizer.lr"], o["seed_everything"]) for o in fits) == [
        ("0.0002", "0"), ("0.0006", "0")]  # the first seed only, every rate
    assert not [c for c, _, _ in fake.calls if c != "fit"]  # no test, no path
    assert not (tmp_path / "results.json").exists()
    assert "all, seed 0: validation hypervolume by rate 0.0002: 1.0000, 0.0006: " in capsys.readouterr().out


def test_fixed_trains_only_at_its_own_seeds(study, grid_evaluation_report, monkeypatch, tmp_path):
    # `fixed` is not swept: its only rate needs no run at the study's first seed, which --fixed-seeds may omit
    # (each such run is G full trainings); the documented "G trainings per seed" is all it trains
    fake = FakeCLI(grid_evaluation_report)
    monkeypatch.setattr(study, "cli", fake)
    study.main(["--out", str(tmp_path), "--variants", "fixed", "--seeds", "0", "1", "--fixed-seeds", "1",
                "--steps", "4", "--bootstrap", "20"])
    fits = {o["seed_everything"] for c, _, o in fake.calls if c == "fit" and "model.init_args.optimizer.lr" in o}
    assert fits == {"1"}
    assert not (tmp_path / "fixed" / "lr0.0002" / "seed0").exists()
    results = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert results["fixed"]["seeds"] == [1] and list(results["fixed"]["sweep"]) == ["0.0002"]


def test_variant_seeds_narrow_one_variants_seeds(study, grid_evaluation_report, monkeypatch, tmp_path):
    fake = FakeCLI(grid_evaluation_report, hv=lambda lr: 1.0 - abs(math.log(lr / 2e-4)))
    monkeypatch.setattr(study, "cli", fake)
    with pytest.raises(SystemExit):  # a variant the study does not run, refused before anything runs
        study.main(["--out", str(tmp_path), "--variants", "all", "--variant-seeds", "lora=0"])
    with pytest.raises(SystemExit):
        study.main(["--out", str(tmp_path), "--variants", "all", "--variant-seeds", "all=one"])
    with pytest.raises(SystemExit):  # a KL path of every checkpoint is for soups
        study.main(["--out", str(tmp_path), "--variants", "all", "--every-checkpoint", "all"])
    with pytest.raises(SystemExit):  # a baseline of the paired differences that the study does not run
        study.main(["--out", str(tmp_path), "--variants", "all", "--compare-to", "rs_lora"])
    for repeated in (["--seeds", "0", "0"], ["--fixed-seeds", "1", "1"], ["--variant-seeds", "all=2,2"]):
        with pytest.raises(SystemExit):  # one run counted twice: a spread of 0 and one seed too many
            study.main(["--out", str(tmp_path), "--variants", "all", *repeated])
    assert fake.calls == []
    study.main(["--out", str(tmp_path), "--variants", "all", "lora", "--seeds", "0", "1", "--steps", "8",
                "--lr-factors", "1", "--variant-seeds", "lora=0", "--bootstrap", "20"])
    tests = sorted((o["model.init_args.optimizer.lr"], o["seed_everything"]) for c, _, o in fake.calls if c == "test")
    assert tests == [("0.0002", "0"), ("0.0002", "1"), ("0.002", "0")]  # all: seeds 0 and 1; lora: seed 0 only
    results = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert results["lora"]["seeds"] == [0] and results["all"]["seeds"] == [0, 1]


@pytest.mark.parametrize("bad, message", [
    (["--evaluations", "0"], "--evaluations 0: expected an integer >= 1"),
    (["--steps", "-1"], "--steps -1: expected an integer >= 1"),
    (["--sft-steps", "0"], "--sft-steps 0: expected an integer >= 1"),
    (["--test-prompts", "0"], "--test-prompts 0: expected an integer >= 1"),
    (["--bootstrap", "0"], "--bootstrap 0: expected an integer >= 1"),
    (["--lr-factors", "1", "0"], "--lr-factors [0.0]: expected positive finite"),
    (["--lr-factors", "nan"], "--lr-factors [nan]: expected positive finite"),
    (["--grid-step", "0"], "--grid-step 0.0: grid step must be in (0, 1]"),
    (["--grid-step", "0.3"], "--grid-step 0.3: grid step 0.3 does not divide 1"),
    (["--grid-step", "0.005"], "--grid-step 0.005: expected a step >= 0.01"),
    (["--variants", "rs_lora", "--steps", "1"], "--steps 1: ['rs_lora'] split the step budget over 2 experts"),
    (["--task", "cnndm_smollm2", "--three-objectives"], "--three-objectives is --task three_objectives"),
    (["--task", "cnndm_smollm2", "--sft-steps", "10"], "--sft-steps 10: --task cnndm_smollm2 has no warm start"),
    (["--every-checkpoint", "rs_lora"], "--every-checkpoint ['rs_lora']: not among the variants this study runs"),
    (["--fixed-seeds", "1"], "--fixed-seeds [1]: the study does not run the fixed-weighting baseline"),
])
def test_bad_arguments_are_refused_before_anything_runs(study, grid_evaluation_report, monkeypatch, tmp_path, capsys,
                                                     bad, message):
    # each would otherwise fail after the warm start (a division by zero, the optimizer's or the grid's refusal),
    # or run something else than asked (--steps -1 is Lightning's "no limit"; a soup expert of 0 steps)
    fake = FakeCLI(grid_evaluation_report)
    monkeypatch.setattr(study, "cli", fake)
    with pytest.raises(SystemExit):
        study.main(["--out", str(tmp_path / "study"), "--variants", "all", "--seeds", "0", "--steps", "8", *bad])
    assert message in capsys.readouterr().err
    assert fake.calls == [] and not (tmp_path / "study").exists()
