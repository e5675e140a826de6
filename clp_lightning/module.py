"""CLPModule: the system that trains one steerable policy on several rewards with KL-regularised policy gradient.

One training step: prompts -> a weighting per prompt -> ``k`` responses per prompt -> rewards -> per-objective
normalisation -> scalarisation with ``w`` -> KL penalty from the frozen reference -> leave-one-out advantages ->
REINFORCE loss. Batch vocabulary (see :func:`~clp_lightning.config.batch_plan`): ``P`` prompts per device
micro-batch, ``k`` samples per prompt, ``N = P * k`` sequences, ``m`` objectives. Generation at given weightings
(every evaluation) is :class:`~clp_lightning.evaluation.generation.GenerationAtWeightings`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from clp_lightning import algorithms as alg
from clp_lightning.callbacks.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_expert,
    check_setup,
    policy_state,
    read_checkpoint,
)
from clp_lightning.checks import is_integer
from clp_lightning.conditioning.config import PolicyConfig
from clp_lightning.conditioning.lm import check_positions
from clp_lightning.conditioning.mixture import check_experts
from clp_lightning.conditioning.policy import ConditionalPolicy
from clp_lightning.conditioning.weights import validate_weights
from clp_lightning.config import (
    GenerationSettings,
    OptimizerConfig,
    SamplerConfig,
    batch_plan,
    coerce,
    loader_batch_size,
    plain,
)
from clp_lightning.evaluation.generation import GenerationAtWeightings
from clp_lightning.models import disable_dropout as disable_dropout_in
from clp_lightning.rewards import Reward, RewardNormalizer
from clp_lightning.sharding import is_sharded, shard_transformer

log = logging.getLogger(__name__)

class CLPModule(GenerationAtWeightings, L.LightningModule):
    """Conditional Language Policy training.

    Args:
        policy: the model, its loading and its conditioning on ``w``.
        rewards: the ``m`` objectives, in order (their ``name`` is used in logs).
        sampler: distribution of the training weightings (Dirichlet by default).
        samples_per_prompt: ``k`` responses per (prompt, ``w``); at least 2 with the leave-one-out baseline.
        share_prompt: compute each prompt once for its ``k`` samples (seq2seq: one encoder pass; causal: one prefill
            whose key/value cache the samples continue from), in generation and in both log-prob passes. Equal to
            the unshared path to rounding (tested); False runs every (prompt, sample) pair in full, for benchmarks
            and for a model whose cache cannot be repeated.
        kl_coef: KL strength ``alpha`` (when not conditioned on alpha).
        alpha_range: ``[low, high]``: sample ``alpha`` per prompt from this range and give it to the policy
            (needs ``conditioning.condition_on_alpha``); None uses ``kl_coef``.
        alpha_log_uniform: sample ``alpha`` log-uniformly in ``alpha_range``.
        kl_in_loss: put the KL in the loss (``kl_loss_estimator``) instead of as a per-sequence reward penalty. The
            reward penalty is always k1, ``log(pi(y|x,w) / pi_ref(y|x))``: detached and weighted by ``grad log pi(y)``
            through the advantage, ``E[k1(y) grad log pi(y)]`` is exactly the KL's gradient, so the fixed point is
            ``pi*_w``. With k2 or k3 in its place that expectation is another vector (for k3, even though
            ``E[k3]`` is the KL's value), and the policy converges elsewhere.
        kl_loss_estimator: with ``kl_in_loss``: ``k2`` (per position, ``sum_t d_t^2 / 2``: each position's exact KL
            gradient at its sampled prefix, ignoring how earlier tokens change later positions) or ``seq_k2``
            (``(sum_t d_t)^2 / 2``: the unbiased gradient of the sequence KL, with more variance). See
            :func:`clp_lightning.algorithms.kl_loss`.
        baseline: ``rloo`` (leave-one-out over the ``k`` samples) or ``mean`` (the mean of the micro-batch on each
            process, not over processes or accumulated micro-batches).
        whiten_advantages: standardise advantages over the micro-batch on each process (as ``mean``).
        normalization: per-objective reward normalisation: ``running`` mean/std, ``batch`` or ``none``.
        generation: sampling settings for training rollouts.
        optimizer: AdamW settings, warm-up and schedule.
        disable_dropout: turn every form of the policy's dropout off (modules and float attributes such as T5's
            ``dropout_rate``), so responses are scored under the distribution that sampled them and the KL to the
            reference is 0 before the first update.
        decoding: how evaluation generates: ``policy`` (the conditioned policy) or ``logit_mixture`` (decoding-time
            mixing of the experts' next-token logits, ``sum_i w_i logits_i``, the experts being the policy at the
            one-hot weightings; an evaluation-only baseline).
        predict_weights: weightings ``predict`` generates at (one per row); default: the uniform weighting.
        expert_checkpoints: Rewarded Soups: ``m`` checkpoints of experts (conditioned like this policy, each trained
            with the fixed one-hot weighting of its objective); copy ``i`` of the policy is loaded from expert ``i``.
        weight_seed: seed of the rollouts: the weightings, alphas and sampled responses of a batch are a function of
            (seed, rank, epoch, batch index), so ranks draw different ones and a resumed run draws the same ones
            as an uninterrupted run, with no random state to save.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        rewards: Sequence[Reward],
        sampler: SamplerConfig | None = None,
        samples_per_prompt: int = 4,
        share_prompt: bool = True,
        kl_coef: float = 0.05,
        alpha_range: tuple[float, float] | None = None,
        alpha_log_uniform: bool = False,
        kl_in_loss: bool = False,
        kl_loss_estimator: Literal["k2", "seq_k2"] = "k2",
        baseline: Literal["rloo", "mean"] = "rloo",
        whiten_advantages: bool = False,
        normalization: Literal["running", "batch", "none"] = "running",
        generation: GenerationSettings | None = None,
        optimizer: OptimizerConfig | None = None,
        disable_dropout: bool = True,
        decoding: Literal["policy", "logit_mixture"] = "policy",
        predict_weights: list[list[float]] | None = None,
        expert_checkpoints: list[str] | None = None,
        weight_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["rewards"])
        policy, sampler = coerce(policy, PolicyConfig), coerce(sampler, SamplerConfig)
        generation, optimizer = coerce(generation, GenerationSettings), coerce(optimizer, OptimizerConfig)
        rewards = list(rewards)
        names = [r.name for r in rewards]
        if not rewards:
            raise ValueError("rewards is empty: CLP needs at least one reward (one per objective)")
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique (they name the objectives in logs), got {names}")
        if not is_integer(samples_per_prompt) or samples_per_prompt < 1:  # 2.0 failed at the first step, not here
            raise ValueError(f"samples_per_prompt={samples_per_prompt!r}: an integer >= 1 of responses per prompt")
        if baseline not in ("rloo", "mean"):  # anything else would silently train with the batch-mean baseline
            raise ValueError(f"baseline must be 'rloo' or 'mean', got {baseline!r}")
        if baseline == "rloo" and samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt={samples_per_prompt}: the leave-one-out baseline needs k >= 2")
        if not (math.isfinite(kl_coef) and kl_coef >= 0):  # nan or inf would make every reward nan or infinite
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}")
        if alpha_range is not None:
            if not policy.conditioning.condition_on_alpha:
                raise ValueError("alpha_range is set but the policy is not conditioned on alpha (set "
                                 "policy.conditioning.condition_on_alpha: true, with prompt: true or alpha_scale)")
            if len(alpha_range) != 2:
                raise ValueError(f"alpha_range must be [low, high], got {list(alpha_range)}")
            alpha_low, alpha_high = alpha_range
            if not (0 <= alpha_low <= alpha_high and math.isfinite(alpha_high)):
                raise ValueError(f"alpha_range {list(alpha_range)} must satisfy 0 <= low <= high, both finite")
            if policy.conditioning.alpha_scale is not None and alpha_low <= 0:
                raise ValueError(f"alpha_range {list(alpha_range)}: with alpha_scale the update is scaled by "
                                 "alpha_scale / alpha, so alpha must be > 0")
            if alpha_log_uniform and alpha_low <= 0:
                raise ValueError(f"alpha_range {list(alpha_range)}: alpha_log_uniform samples log(alpha), so the low "
                                 "end must be > 0")
        elif policy.conditioning.condition_on_alpha:
            raise ValueError("policy is conditioned on alpha but alpha_range is None; "
                             "set e.g. alpha_range: [0.01, 0.5]")
        elif alpha_log_uniform:  # it would otherwise be ignored: every prompt gets kl_coef
            raise ValueError(f"alpha_log_uniform is set but alpha_range is None: alpha is kl_coef={kl_coef} for "
                             "every prompt; set alpha_range to sample it")
        self.objective_names = names
        self.num_objectives = len(rewards)
        self.sampler = (sampler or SamplerConfig()).build(self.num_objectives)
        self.samples_per_prompt, self.share_prompt = samples_per_prompt, share_prompt
        self.kl_coef, self.alpha_range, self.alpha_log_uniform = kl_coef, alpha_range, alpha_log_uniform
        if kl_loss_estimator not in ("k2", "seq_k2"):
            raise ValueError(f"kl_loss_estimator must be 'k2' or 'seq_k2' (the gradients of a KL), got "
                             f"{kl_loss_estimator!r}")
        if kl_loss_estimator != "k2" and not kl_in_loss:  # (the default k2 cannot be told from an explicit one)
            raise ValueError(f"kl_loss_estimator={kl_loss_estimator!r} has no effect without kl_in_loss: true (the "
                             "KL is then a k1 penalty on the reward)")
        self.kl_in_loss, self.kl_loss_estimator = kl_in_loss, kl_loss_estimator
        self.baseline, self.whiten_advantages = baseline, whiten_advantages
        self.generation = generation or GenerationSettings()
        # validate now, not at the first step; greedy rollouts: k equal responses, zero leave-one-out advantages
        if not self.generation.kwargs().get("do_sample"):
            raise ValueError("generation.do_sample is false: training rollouts must be sampled from the policy "
                             "(REINFORCE), greedy decoding gives every sample of a prompt the same response")
        self.optimizer_config = optimizer or OptimizerConfig()
        if decoding not in ("policy", "logit_mixture"):
            raise ValueError(f"decoding must be 'policy' or 'logit_mixture', got {decoding!r}")
        self.decoding = decoding
        self.predict_weights = predict_weights or [[1.0 / len(rewards)] * len(rewards)]
        validate_weights(self.predict_weights, len(rewards), name="predict_weights")
        # before the policy loads: an unknown mode here would otherwise fail only once the model is built
        normalizer = RewardNormalizer(self.num_objectives, mode=normalization)
        if expert_checkpoints is not None and len(expert_checkpoints) != self.num_objectives:
            raise ValueError(f"expert_checkpoints: got {len(expert_checkpoints)} experts for {self.num_objectives} "
                             f"objectives {names}; Rewarded Soups needs one expert checkpoint per objective")

        self.policy: ConditionalPolicy = policy.build(self.num_objectives)
        # a learned position table (GPT-2) must hold the longest prompt and response: now, not at a long prompt hours in
        check_positions(self.policy.model, self.policy.max_prompt_length, self.generation.max_new_tokens,
                        "model.init_args.policy.max_prompt_length or model.init_args.generation.max_new_tokens")
        if decoding == "logit_mixture":  # here, not at the first evaluation
            check_experts(self.policy)
        if disable_dropout:  # before the reference is copied from it
            disable_dropout_in(self.policy.model)
        self.policy.freeze_reference()
        if expert_checkpoints is not None:  # checked as --ckpt_path is: other objectives (order) or mode stop here
            experts = [(path, read_checkpoint(path)) for path in expert_checkpoints]
            for i, (path, checkpoint) in enumerate(experts):
                self.check_checkpoint(checkpoint, f"expert checkpoint {str(path)!r}")
                check_expert(checkpoint, i, self.num_objectives, f"expert checkpoint {str(path)!r}")
            self.policy.load_expert_copies([policy_state(path, checkpoint) for path, checkpoint in experts])
        self.rewards = nn.ModuleList(rewards)
        self.normalizer = normalizer
        self.weight_seed = weight_seed
        self.checkpoint_step = 0

    # --------------------------------------------------------------------------------------------------- helpers

    def sample_weights(self, num_prompts: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """A weighting ``(P, m)`` and a KL strength ``(P,)`` per prompt."""
        weights = validate_weights(self.sampler.sample(num_prompts, generator), self.num_objectives)
        if self.alpha_range is None:
            alpha = torch.full((num_prompts,), self.kl_coef, dtype=torch.float32)  # the default is bf16 in bf16-true
        else:
            low, high = self.alpha_range
            alpha = alg.sample_alpha(num_prompts, low, high, generator, self.alpha_log_uniform)
        return weights.to(self.device), alpha.to(self.device)

    def rollout_generator(self, batch_idx: int) -> torch.Generator:
        """Seed this batch's randomness from (seed, rank, epoch, batch index).

        Returns the generator of the weightings; also seeds torch's global generator, which ``generate`` samples
        responses with.
        """
        # Two 63-bit seeds from a hash of the four parts: every (seed, rank, epoch, batch) gets its own pair, and the
        # weightings' stream is never the responses' stream of another batch (a linear mix with the seed + 1 of the
        # weightings gave batches 0 and 1 of the default seed 0 the same draws).
        parts = json.dumps(["clp-rollout", self.weight_seed, self.global_rank, self.current_epoch, batch_idx])
        digest = hashlib.sha256(parts.encode()).digest()
        responses, weightings = (int.from_bytes(digest[i : i + 8], "little") >> 1 for i in (0, 8))
        torch.manual_seed(responses)
        return torch.Generator().manual_seed(weightings)

    def score(self, sources: Sequence[str], responses: Sequence[str], references: Sequence[str]) -> Tensor:
        """Raw rewards ``(N, m)``, one column per objective."""
        return torch.stack([r(sources, responses, references) for r in self.rewards], dim=-1).to(self.device)

    # --------------------------------------------------------------------------------------------------- training

    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> Tensor:
        if self.decoding != "policy":
            raise RuntimeError(f"decoding={self.decoding!r} is an evaluation baseline; train with decoding='policy'")
        rollout = self._rollout(batch, self.rollout_generator(batch_idx))
        rewards = self._score(batch, rollout)
        advantages, stats = self._advantages(rollout, rewards)
        loss = alg.reinforce_loss(rollout["seq_logp"], advantages, rollout.get("kl_loss"), rollout["alpha_rows"])
        self._log_train(loss, rollout, rewards, stats)
        return loss

    def _rollout(self, batch: dict[str, list[str]], generator: torch.Generator) -> dict[str, Any]:
        """Sample ``k`` responses per prompt under its weighting and compute their log-probabilities."""
        k = self.samples_per_prompt
        weights, alpha = self.sample_weights(len(batch["prompt"]), generator)  # (P, m), (P,)
        w_rows, alpha_rows = weights.repeat_interleave(k, 0), alpha.repeat_interleave(k, 0)  # (N, m), (N,)
        # shared: each prompt is encoded (prefilled) once for its k samples, here and in both log-prob passes
        if self.share_prompt:
            prompts, p_weights, p_alpha, per_prompt = batch["prompt"], weights, alpha, k
        else:
            prompts = [p for p in batch["prompt"] for _ in range(k)]
            p_weights, p_alpha, per_prompt = w_rows, alpha_rows, 1
        enc = self.policy.encode(prompts, p_weights, p_alpha)
        response_ids, response_mask = self.policy.generate(
            **enc, weights=p_weights, alpha=p_alpha, num_return_sequences=per_prompt, **self.generation.kwargs()
        )
        # the reference first: its activations are freed before the policy's graph is built, not on top of it
        ref_logp = self.policy.reference_log_probs(prompts, response_ids, response_mask)
        out = self.policy(**enc, response_ids=response_ids, response_mask=response_mask, weights=p_weights,
                          alpha=p_alpha, return_entropy=True)
        rollout = {
            "weights": w_rows, "alpha_rows": alpha_rows, "response_ids": response_ids, "response_mask": response_mask,
            "seq_logp": alg.sequence_log_probs(out.log_probs, response_mask),
            "seq_kl": alg.sequence_kl(out.log_probs.detach(), ref_logp, response_mask, "k1"),
            "entropy": alg.masked_mean(out.entropy, response_mask, dim=-1),  # (N,): each sequence weighs the same
            "texts": self.policy.decode(response_ids, response_mask),
        }
        if self.kl_in_loss:
            rollout["kl_loss"] = alg.kl_loss(out.log_probs, ref_logp, response_mask, self.kl_loss_estimator)
        return rollout

    def _score(self, batch: dict[str, list[str]], rollout: dict[str, Any]) -> Tensor:
        k = self.samples_per_prompt
        repeat = lambda xs: [x for x in xs for _ in range(k)]  # noqa: E731
        return self.score(repeat(batch["source"]), rollout["texts"], repeat(batch["reference"]))

    def _advantages(self, rollout: dict[str, Any], rewards: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        normalized = self.normalizer(rewards, update=True)  # (N, m)
        scalar = alg.scalarize(normalized, rollout["weights"])  # (N,)
        if self.kl_in_loss:
            total = scalar
        else:
            total = alg.kl_penalized_rewards(scalar, rollout["seq_kl"], rollout["alpha_rows"])
        if self.baseline == "rloo":
            advantages = alg.rloo_advantages(total, self.samples_per_prompt)
        else:
            advantages = alg.batch_mean_advantages(total)
        if self.whiten_advantages:
            advantages = alg.whiten(advantages)
        return advantages, {"scalarized": scalar, "total": total}

    def _log_train(self, loss: Tensor, rollout: dict[str, Any], rewards: Tensor, stats: dict[str, Tensor]) -> None:
        """Means over the step's sequences: ``train/reward/<name>`` raw, ``train/reward_scalarized`` (and the progress
        bar's ``reward``) ``w . R`` of the normalised rewards, ``train/reward_total`` that minus the KL penalty (the
        same with ``kl_in_loss``), ``train/entropy`` each response's mean next-token entropy over its tokens."""
        n = rewards.shape[0]
        metrics = {
            "train/loss": loss.detach(),
            "train/kl": rollout["seq_kl"].mean(),
            "train/reward_scalarized": stats["scalarized"].mean(),
            "train/reward_total": stats["total"].mean(),
            "train/response_length": rollout["response_mask"].sum(-1).float().mean(),
            "train/entropy": rollout["entropy"].mean(),
        }
        metrics.update({f"train/reward/{name}": rewards[:, i].mean() for i, name in enumerate(self.objective_names)})
        self.log_dict(metrics, prog_bar=False, on_step=True, on_epoch=False, batch_size=n, sync_dist=True)
        self.log("reward", stats["scalarized"].mean(), prog_bar=True, on_step=True, batch_size=n, logger=False)

    # ------------------------------------------------------------------------------------------------- evaluation

    def validation_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        # The grid evaluation runs in the GridEvaluation callback (on_validation_batch_end).
        pass

    def test_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        # The grid evaluation runs in the GridEvaluation callback (on_test_batch_end), on the test split.
        pass

    def predict_step(self, batch: dict[str, list[str]], batch_idx: int) -> list[dict[str, Any]]:
        """Responses and raw rewards for each prompt at each of ``predict_weights`` (greedy, eval generation)."""
        grid = validate_weights(self.predict_weights, self.num_objectives, name="predict_weights")
        out = self.evaluate_weightings(batch, grid.view(-1, self.num_objectives), GenerationSettings(
            do_sample=False, max_new_tokens=self.generation.max_new_tokens), log_ratio=False)
        n = len(batch["prompt"])
        return [
            {"id": batch["id"][r % n], "prompt": batch["prompt"][r % n], "weights": out["weights"][r].tolist(),
             "response": out["texts"][r], "rewards": dict(zip(self.objective_names, out["rewards"][r].tolist()))}
            for r in range(len(out["texts"]))
        ]

    # ------------------------------------------------------------------------------------------ optimizer, ckpts

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"policy conditioned as {self.policy.conditioning.name!r} has no trainable parameters")
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return self.optimizer_config.build(params, total)

    def _excluded_keys(self) -> set[str]:
        """Frozen weights rebuilt from the config at load time: rewards and the policy's frozen parameters (its
        reference copy included)."""
        params = self.policy.named_parameters(remove_duplicate=False)  # tied weights appear under every name
        frozen = {f"policy.{n}" for n, p in params if not p.requires_grad}
        state = super().state_dict()
        return frozen | {k for k in state if k.startswith("rewards.")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        excluded = self._excluded_keys()
        checkpoint["hyper_parameters"] = plain(checkpoint.get("hyper_parameters", {}))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in excluded}
        checkpoint["clp"] = {"format": CHECKPOINT_FORMAT, **self._weights_depend_on()}

    def _weights_depend_on(self) -> dict[str, Any]:
        """What the trained weights mean nothing without: stored in checkpoints and compared, never applied."""
        config = self.policy.model.config
        return {
            "objective_names": self.objective_names,
            "conditioning": self.policy.conditioning.stored(),
            "base_model": {"model_type": config.model_type, "vocab_size": config.vocab_size,
                           "hidden_size": config.get_text_config().hidden_size},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # before any weight is loaded: a checkpoint of another mode, objectives or base model stops here, named
        trainer_path = self._trainer.ckpt_path if self._trainer is not None else None
        self.check_checkpoint(checkpoint, f"checkpoint {str(trainer_path)!r}" if trainer_path else "the checkpoint")
        if "state_dict" in checkpoint:  # (a sharding strategy loads the weights itself first, and takes them out)
            current = super().state_dict()
            # keep strict loading: frozen weights come from this module's config, also where a checkpoint holds them
            for key in self._excluded_keys():
                checkpoint["state_dict"][key] = current[key]
        self.checkpoint_step = int(checkpoint.get("global_step", 0))  # reports of `validate` name the step

    def check_checkpoint(self, checkpoint: dict[str, Any], name: str) -> None:
        """Refuse a checkpoint whose weights depend on other objectives, conditioning or base model than the config's.

        Args:
            checkpoint: the checkpoint's contents (only its ``clp`` section is read).
            name: the checkpoint in error messages.

        Raises:
            CheckpointError: not a CLPModule checkpoint, written by a newer version, or trained with another setup.
        """
        check_setup(checkpoint.get("clp"), self._weights_depend_on(), name)

    def load_trained(self, path: str, checkpoint: dict[str, Any] | None = None) -> CLPModule:
        """Load a checkpoint's trained weights into this module, built from its config, as ``--ckpt_path`` does, for
        code that runs no Trainer (``clp steer``). The same checks apply; errors name ``path``.

        Args:
            path: the checkpoint file.
            checkpoint: the file already read with :func:`read_checkpoint` (callers that checked it first).
        """
        checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
        try:
            self.on_load_checkpoint(checkpoint)
        except CheckpointError as err:
            raise CheckpointError(f"{str(path)!r}: {err}") from None  # no trainer here to name the file
        self.load_state_dict(checkpoint["state_dict"])
        return self

    def configure_model(self) -> None:
        """Under a strategy that gives a device mesh (:class:`~clp_lightning.strategies.ShardedStrategy`), shard
        the policy and its frozen reference copy with FSDP2, one unit per transformer block
        (:mod:`clp_lightning.sharding`). The reward models stay whole on every rank: frozen, used without gradients.
        Without a mesh (one device, DDP) nothing changes."""
        mesh = self.device_mesh
        if mesh is None or is_sharded(self.policy.model):
            return
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(f"tensor_parallel_size={mesh['tensor_parallel'].size()}: the policy is sharded, not split "
                             "by tensor parallelism; set tensor_parallel_size: 1")
        data_parallel = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        shard_transformer(self.policy.model, data_parallel)
        if self.policy.reference_copy is not None:
            shard_transformer(self.policy.reference_copy, data_parallel)
        # The strategy loads a checkpoint's weights itself, before on_load_checkpoint (ShardedStrategy checks the
        # checkpoint first): the frozen weights that checkpoints leave out (reference copy, reward models, LoRA base)
        # keep their configured values there too.
        self.strict_loading = False

    def on_train_start(self) -> None:
        prompts = loader_batch_size(self.trainer.train_dataloader)
        if prompts is None:  # a loader without a fixed batch size (a custom batch sampler, an iterable of batches)
            log.info("batch plan: %d samples per prompt; prompts per batch set by the training loader",
                     self.samples_per_prompt)
            return
        plan = batch_plan(prompts, self.samples_per_prompt, self.trainer.accumulate_grad_batches,
                          self.trainer.world_size)
        log.info("batch plan: %s", plan)
