"""ConditionalPolicy: a Hugging Face seq2seq or causal LM conditioned on a weighting ``w`` over ``m`` objectives.

Conditioning is prompt (``w`` written into the input) and/or a parameter conditioning mode
(:mod:`clp_lightning.conditioning.mode`): parameter mixing (``m`` copies of selected modules), LoRA-CLP (``m`` LoRA
adapters on a frozen base), or a mode of one's own. The policy only calls the mode's interface.

The language-model building blocks it uses (response log-probabilities, generation) are in
:mod:`clp_lightning.conditioning.lm`.

Notation: ``B`` rows, ``L`` prompt tokens, ``T`` response tokens, ``V`` vocabulary, ``m`` objectives.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clp_lightning.checks import is_integer
from clp_lightning.conditioning.config import ConditioningConfig, check_max_prompt_length, check_truncation_side
from clp_lightning.conditioning.lm import (
    PolicyOutput,
    _add_stop_token,
    generate_responses,
    response_log_probs,
)
from clp_lightning.conditioning.mixing import WeightingState
from clp_lightning.conditioning.prompt import ChatFormat, PromptConditioner, leading_special_tokens
from clp_lightning.conditioning.weights import validate_weights
from clp_lightning.models import count_parameters, load_policy_model, model_kind, sync_tied_config


def _check_prompts(prompts: Sequence[str]) -> None:
    if isinstance(prompts, str):  # a text is a sequence of texts too: one prompt per character, without a word
        raise ValueError(f"prompts must be a list of texts, got one text {prompts[:40]!r}: pass [text]")


class ConditionalPolicy(nn.Module):
    """A Hugging Face LM whose behaviour is a function of a weighting ``w`` over ``m`` objectives.

    Args:
        model: an ``AutoModelForSeq2SeqLM`` or ``AutoModelForCausalLM`` (conditioned in place).
        tokenizer: its tokenizer; causal tokenizers must pad on the left.
        num_objectives: ``m``.
        conditioning: how ``w`` enters the model.
        max_prompt_length: prompt tokens kept (from the end, so a trailing cue such as ``TL;DR:`` survives),
            not counting the conditioning prefix. With a chat template, from the start of the user's text (the
            template's assistant header is the cue), not counting the template's tokens.
        truncation_side: which end of a long prompt is cut: ``left`` keeps the end, ``right`` the start (a leading
            cue, e.g. T5's ``summarize:`` and a news article's lede); None: ``right`` with a chat template, else
            ``left``.
        chat_template: format prompts with the tokenizer's chat template (instruct models): ``system_prompt``, then
            the prompt as the user turn; generation also stops at the template's end-of-turn token.
        system_prompt: the system message of the chat template; None leaves the template's default.

    Attributes:
        objective_names: the objectives' names where known (a policy loaded from a saved directory), else None.
        metadata: facts stored with a saved policy (:meth:`save_pretrained`), never applied; empty otherwise.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        num_objectives: int,
        conditioning: ConditioningConfig | None = None,
        max_prompt_length: int = 512,
        chat_template: bool = False,
        system_prompt: str | None = None,
        truncation_side: str | None = None,
    ) -> None:
        super().__init__()
        if not (is_integer(num_objectives) and num_objectives >= 1):  # 2.0 or True would size every mixed layer
            raise ValueError(f"num_objectives must be an integer >= 1, got {num_objectives!r}")
        self.conditioning = conditioning = conditioning or ConditioningConfig()
        self.num_objectives = num_objectives
        self.tokenizer = tokenizer
        self.kind = model_kind(model)
        self.max_prompt_length = check_max_prompt_length(max_prompt_length)
        self.truncation_side = check_truncation_side(truncation_side)
        if self.kind == "causal" and tokenizer.padding_side != "left":
            raise ValueError("causal policies generate from left-padded prompts: set tokenizer.padding_side='left'")
        if system_prompt is not None and not chat_template:
            raise ValueError("system_prompt is set but chat_template is False: the system message needs the template")
        self.chat = ChatFormat(tokenizer, system_prompt) if chat_template else None
        self.system_prompt = system_prompt
        self.objective_names: list[str] | None = None
        self.metadata: dict[str, Any] = {}
        if self.chat is not None and self.chat.end_of_turn_id is not None:
            _add_stop_token(model, self.chat.end_of_turn_id)
        self.state = WeightingState()
        self.prompt_conditioner = (
            PromptConditioner(conditioning.prompt_template, conditioning.alpha_template, conditioning.prompt_precision)
            if conditioning.prompt
            else None
        )
        self._leading_specials = leading_special_tokens(tokenizer) if conditioning.prompt else 0
        self.mode = conditioning.build_mode()
        own = list(model.parameters())  # held, so that no parameter the mode adds can reuse a replaced one's id
        self.conditioned_modules, self.extra_parameters = self.mode.apply(model, num_objectives, self.state)
        if not conditioning.train_shared:  # only what the mode added trains
            own_ids = {id(p) for p in own}
            for param in model.parameters():
                if id(param) in own_ids:
                    param.requires_grad_(False)
        del own
        self.model = model
        self.reference_copy: PreTrainedModel | None = None  # set by freeze_reference (not for LoRA-CLP)

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str,
        num_objectives: int | None = None,
        conditioning: ConditioningConfig | None = None,
        *,
        max_prompt_length: int | None = None,
        trust_remote_code: bool = False,
        torch_dtype: str | None = None,
        seed: int = 0,
        tokenizer: str | None = None,
        gguf_file: str | None = None,
        cache_dir: str | None = None,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        truncation_side: str | None = None,
    ) -> ConditionalPolicy:
        """Load a model by hub id, local path, GGUF file or ``tiny:<arch>`` and condition it (see
        :func:`load_policy_model`), or load a policy saved by :meth:`save_pretrained` (a directory with
        ``clp_config.json``; see :mod:`clp_lightning.conditioning.pretrained`).

        For a saved policy, ``num_objectives`` and ``conditioning`` come from the directory (when given, they must
        agree with it), and ``max_prompt_length``, ``chat_template``, ``system_prompt`` and ``truncation_side``
        default to the saved values.
        Otherwise ``num_objectives`` is required and the defaults are 512, no chat template and no system prompt.

        Raises:
            ValueError: no ``num_objectives`` for a plain model, or a saved policy that disagrees with the arguments.
        """
        from clp_lightning.conditioning.pretrained import is_saved_policy, load_policy

        if is_saved_policy(model_name_or_path):
            if gguf_file is not None:
                raise ValueError(f"{model_name_or_path!r} is a saved CLP policy, not a GGUF checkpoint: drop gguf_file")
            return load_policy(
                cls, model_name_or_path, num_objectives, conditioning, max_prompt_length=max_prompt_length,
                chat_template=chat_template, system_prompt=system_prompt, truncation_side=truncation_side,
                trust_remote_code=trust_remote_code,
                torch_dtype=torch_dtype, tokenizer=tokenizer,
            )
        if num_objectives is None:
            raise ValueError(f"num_objectives is required for {model_name_or_path!r}: only a saved CLP policy (a "
                             "directory with clp_config.json) knows its own")
        model, tok = load_policy_model(
            model_name_or_path, trust_remote_code=trust_remote_code, torch_dtype=torch_dtype, seed=seed,
            tokenizer=tokenizer, gguf_file=gguf_file, cache_dir=cache_dir,
        )
        return cls(model, tok, num_objectives, conditioning, 512 if max_prompt_length is None else max_prompt_length,
                   bool(chat_template), system_prompt, truncation_side)

    # ------------------------------------------------------------------------------------------------ conditioning

    @contextlib.contextmanager
    def conditioned(self, weights: Tensor, alpha: Tensor | None = None, cache: bool = False) -> Iterator[None]:
        """Mixed modules and adapters read ``weights`` ``(B, m)`` inside the block (with ``alpha_scale``, scaled by
        ``alpha_scale / alpha`` per row)."""
        self._check_width(weights)
        alpha = self._alpha(alpha)
        with self.state.use(self._scaled(weights, alpha), alpha, cache=cache):
            yield

    def _check_width(self, weights: Tensor) -> None:
        # a (B, 1) row broadcasts against the m copies (every copy at weight 1: silently the wrong model), and any
        # other width fails deep in a module with a bare shape error
        if weights.dim() != 2 or weights.shape[1] != self.num_objectives:
            raise ValueError(f"`weights` must have shape (B, m) = (B, {self.num_objectives}), one weighting of the "
                             f"{self.num_objectives} objectives per row, got {tuple(weights.shape)}")

    def _scaled(self, weights: Tensor, alpha: Tensor | None) -> Tensor:
        scale = self.conditioning.alpha_scale
        if scale is None:
            return weights
        if alpha is None:
            raise ValueError("this policy is conditioned on alpha in its parameters: pass alpha with the weights")
        alpha = torch.as_tensor(alpha, dtype=weights.dtype, device=weights.device)
        if alpha.dim() > 1 or alpha.numel() not in (1, weights.shape[0]):  # expand's own error names no argument
            raise ValueError(f"`alpha` must be a number or have shape (B,) = ({weights.shape[0]},), one per "
                             f"weighting, got {tuple(alpha.shape)}")
        alpha = alpha.reshape(-1).expand(weights.shape[0])
        if not bool((alpha > 0).all()):
            raise ValueError(f"alpha must be > 0, got {alpha.tolist()}")
        return weights * (scale / alpha).unsqueeze(-1)  # (B, m): rows no longer sum to 1, the update's size

    def _alpha(self, alpha: Tensor | None) -> Tensor | None:
        # callers always pass the rollout's alpha; only a policy conditioned on it sees it
        return alpha if self.conditioning.condition_on_alpha else None

    # --------------------------------------------------------------------------------------------------- reference

    def freeze_reference(self) -> None:
        """Take the policy as it is now as its KL reference ``pi_ref``: a frozen plain copy of the model, or, for
        LoRA-CLP, nothing to copy (the base with adapters off is the reference).

        Call once before training (every copy still equals the pretrained value), after changes meant to hold for
        both (dropout turned off).
        """
        if self.mode.reference_in_model:
            self.reference_copy = None
            return
        reference = self.merged_model(torch.full((self.num_objectives,), 1.0 / self.num_objectives))
        self.reference_copy = reference.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ConditionalPolicy:
        super().train(mode)
        if self.reference_copy is not None:  # a fixed function: its dropout never turns on
            self.reference_copy.eval()
        return self

    @contextlib.contextmanager
    def reference(self) -> Iterator[PreTrainedModel]:
        """A block whose yielded model is the reference policy, in eval mode (a fixed function even while the
        policy trains with dropout): the frozen copy, or the LoRA base with adapters off."""
        if not self.mode.reference_in_model:
            if self.reference_copy is None:
                raise RuntimeError("the policy has no reference yet: call freeze_reference() before using it")
            yield self.reference_copy
            return
        training = self.model.training
        self.model.eval()
        try:
            with self.mode.switched_off(self.model):
                yield self.model
        finally:
            self.model.train(training)

    @torch.no_grad()
    def reference_log_probs(self, prompts: Sequence[str], response_ids: Tensor, response_mask: Tensor) -> Tensor:
        """``log pi_ref(y_t | x)`` ``(N, T)``: the reference sees the prompt without any conditioning.

        ``prompts`` holds each prompt once for its ``k`` consecutive responses (``N = k P``), or once per response.
        """
        enc = self.encode(prompts)
        with self.reference() as model:
            return response_log_probs(model, **enc, response_ids=response_ids, response_mask=response_mask).log_probs

    @torch.no_grad()
    def generate_reference(self, prompts: Sequence[str], **generation_kwargs: Any) -> tuple[Tensor, Tensor]:
        """The reference policy's responses ``(ids, mask)`` to unconditioned prompts."""
        enc = self.encode(prompts)
        with self.reference() as model:
            return generate_responses(model, self.tokenizer, **enc, **generation_kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------------------------------------------- encoding

    def encode(self, prompts: Sequence[str], weights: Tensor | None = None, alpha: Tensor | None = None) -> dict:
        """Tokenise prompts, with the conditioning prefix when prompt conditioning is on and ``weights`` is given.

        A prompt that fits ``max_prompt_length`` is tokenised as one text with its prefix, ``prefix + prompt``: the
        text that a plain export's users write (its card, ``clp_prompt_prefix``), which a byte-level BPE tokenises
        differently from the two apart (it merges the prefix's trailing space into the prompt's first word). A
        truncated prompt is cut alone and its ids follow the prefix's, so that the prefix always survives.

        Returns:
            ``{"input_ids": (B, L), "attention_mask": (B, L)}`` on the model's device, padded on the tokenizer's side.
        """
        _check_prompts(prompts)
        tok = self.tokenizer
        # a chat template adds its own specials around the user's text; split_special_tokens: a "</s>" or
        # "<|im_end|>" written in a post is text, not a control token that ends the prompt or the user's turn
        specials = dict(add_special_tokens=self.chat is None, split_special_tokens=True)
        side = tok.truncation_side
        tok.truncation_side = self.prompt_truncation_side
        try:
            body = tok(list(prompts), truncation=True, max_length=self.max_prompt_length, **specials)["input_ids"]
        finally:
            tok.truncation_side = side
        alpha = self._alpha(alpha)
        if self.prompt_conditioner is not None and weights is not None:
            if alpha is None and self.conditioning.condition_on_alpha:
                raise ValueError("this policy is conditioned on alpha: pass alpha with the weights")
            self._check_width(weights)  # the prefix would write every entry it is given
            if weights.shape[0] != len(body):  # zip below would drop the prompts without a weighting
                raise ValueError(f"{len(body)} prompts but {weights.shape[0]} weightings: pass one weighting per "
                                 "prompt")
            prefixes = self.prompt_conditioner.prefixes(weights.cpu(), None if alpha is None else alpha.cpu())
            heads = tok(prefixes, add_special_tokens=False)["input_ids"]
            lead = 0 if self.chat is not None else self._leading_specials  # a BOS stays first
            limit = self.max_prompt_length
            at_limit = [i for i, b in enumerate(body) if limit is not None and len(b) >= limit]
            whole = tok([prompts[i] for i in at_limit], **specials)["input_ids"] if at_limit else []
            cut = {i for i, w in zip(at_limit, whole) if len(w) > len(body[i])}
            fits = [i for i in range(len(body)) if i not in cut]
            joint = tok([prefixes[i] + prompts[i] for i in fits], **specials)["input_ids"] if fits else []
            joined = dict(zip(fits, joint))
            body = [joined[i] if i in joined else b[:lead] + h + b[lead:] for i, (h, b) in enumerate(zip(heads, body))]
        if self.chat is not None:
            body = [self.chat.wrap(b) for b in body]
        batch = tok.pad({"input_ids": body}, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    @property
    def prompt_truncation_side(self) -> str:
        """The end of a long prompt that is cut: the configured side, or by default the start of a plain prompt (its
        trailing cue, ``TL;DR:``, survives) and the end of a chat turn (the template's assistant header is the cue)."""
        return self.truncation_side or ("right" if self.chat is not None else "left")

    # ------------------------------------------------------------------------------------------- forward, generate

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_ids: Tensor,
        response_mask: Tensor,
        weights: Tensor,
        alpha: Tensor | None = None,
        return_entropy: bool = False,
    ) -> PolicyOutput:
        """Per-token log-probabilities ``(N, T)`` of ``response_ids`` under ``pi(. | x, w)``.

        The ``P`` prompts (``input_ids`` ``(P, L)``, ``weights`` ``(P, m)``, ``alpha`` ``(P,)``) each have ``k = N / P``
        consecutive responses; each prompt's computation is done once and shared by them (see
        :func:`~clp_lightning.conditioning.lm.response_logits`).
        """
        with self.conditioned(weights, alpha):
            return response_log_probs(
                self.model, input_ids, attention_mask, response_ids, response_mask, return_entropy
            )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        weights: Tensor,
        alpha: Tensor | None = None,
        **generation_kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Generate under per-row weightings ``(B, m)``; mixed weights are computed once for the whole call.

        Args:
            input_ids, attention_mask: prompts from :meth:`encode`.
            weights: ``(B, m)``.
            alpha: ``(B,)`` when the policy is conditioned on alpha (already in the prompt; kept for symmetry).
            **generation_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``do_sample``, ``top_k``, ...);
                ``num_return_sequences = k`` samples each prompt ``k`` times, computing the prompt once.

        Returns:
            ``(response_ids (B', T), response_mask (B', T))`` without the prompt; ``B' = B * num_return_sequences``,
            each prompt's responses consecutive.
        """
        with self.conditioned(weights, alpha, cache=True):
            return generate_responses(self.model, self.tokenizer, input_ids, attention_mask, **generation_kwargs)

    def decode(self, response_ids: Tensor, response_mask: Tensor) -> list[str]:
        """Response texts, special tokens dropped: each row's tokens where ``response_mask`` is 1, nothing of what
        lies after its end (whatever id pads it: id 0 is an ordinary token in some vocabularies, GPT-2's ``!``)."""
        rows = [ids[keep].tolist() for ids, keep in zip(response_ids, response_mask.bool())]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def generate_text(
        self, prompts: Sequence[str], weights: Tensor | Sequence[float] | Sequence[Sequence[float]],
        alpha: float | Tensor | None = None, **generation_kwargs: Any,
    ) -> list[str]:
        """Responses to ``prompts`` at one weighting ``(m,)`` for all or one per prompt ``(B, m)``: :meth:`encode`,
        :meth:`generate` and :meth:`decode` in one call.

        Args:
            prompts: ``B`` prompt texts.
            weights: ``(m,)`` or ``(B, m)``.
            alpha: the KL strength, for a policy conditioned on it (a number or ``(B,)``).
            **generation_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``do_sample``, ...).
        """
        _check_prompts(prompts)
        w = validate_weights(weights, self.num_objectives).to(self.device)
        w = w.expand(len(prompts), -1) if w.dim() == 1 else w
        if w.shape[0] != len(prompts):
            raise ValueError(f"got {w.shape[0]} weightings for {len(prompts)} prompts")
        if self.conditioning.condition_on_alpha and alpha is None:
            raise ValueError("this policy is conditioned on alpha: pass alpha (the KL strength)")
        a = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32, device=self.device)
        a = None if a is None else a.expand(len(prompts))
        enc = self.encode(prompts, w, a)
        return self.decode(*self.generate(**enc, weights=w, alpha=a, **generation_kwargs))

    def prompt_prefix(self, weights: Tensor | Sequence[float], alpha: float | None = None) -> str:
        """The text :meth:`encode` puts in front of a prompt at one weighting ``(m,)``: empty without prompt
        conditioning (inside the user turn when the policy uses a chat template)."""
        if self.prompt_conditioner is None:
            return ""
        if self.conditioning.condition_on_alpha and alpha is None:
            raise ValueError("this policy is conditioned on alpha: pass alpha (the KL strength)")
        w = validate_weights(weights, self.num_objectives)
        if w.dim() != 1:  # a (1, m) batch reached the formatter as a nested list: a bare TypeError
            raise ValueError(f"prompt_prefix takes one weighting (m,), got shape {tuple(w.shape)}")
        return self.prompt_conditioner.prefix(w, alpha if self.conditioning.condition_on_alpha else None)

    # -------------------------------------------------------------------------------------------- export, save, load

    def merged_model(self, weights: Tensor | Sequence[float], alpha: float | None = None) -> PreTrainedModel:
        """A plain Hugging Face model holding the parameters at one weighting ``(m,)`` (no mixing, no adapters).

        With prompt conditioning the merged model still expects the prefix in its input. ``alpha``: the KL strength
        of a policy conditioned on it in its parameters (``alpha_scale``); the prefix carries it otherwise.
        """
        w = validate_weights(weights, self.num_objectives)
        if w.dim() != 1:
            raise ValueError(f"merged_model takes one weighting (m,), got shape {tuple(w.shape)}")
        model = copy.deepcopy(self.model)
        w = w.to(self.device)
        if self.conditioning.alpha_scale is not None:
            if alpha is None:
                raise ValueError("this policy is conditioned on alpha in its parameters: pass alpha to merge it")
            w = self._scaled(w.unsqueeze(0), torch.tensor([float(alpha)], device=self.device))[0]
        return sync_tied_config(self.mode.merge(model, w))

    def save_pretrained(
        self, directory: str, objective_names: Sequence[str] | None = None, metadata: dict[str, Any] | None = None
    ) -> list[str]:
        """Save the policy in Hugging Face's layout: the plain base model and tokenizer, ``clp_config.json`` and the
        mode's parameters in ``conditioning.safetensors`` (see :mod:`clp_lightning.conditioning.pretrained`);
        :meth:`from_pretrained` loads it back. The frozen reference copy is not saved.

        Args:
            directory: created if missing.
            objective_names: the objectives' names (default: :attr:`objective_names`, else ``objective_<i>``).
            metadata: JSON-serialisable facts stored with the policy (added to :attr:`metadata`).

        Returns:
            The names written in ``directory``.
        """
        from clp_lightning.conditioning.pretrained import save_policy

        return save_policy(self, directory, None if objective_names is None else list(objective_names), metadata)

    @torch.no_grad()
    def load_expert_copies(self, experts: Sequence[dict[str, Tensor]]) -> None:
        """Rewarded Soups: copy ``i`` of every conditioned parameter comes from expert ``i``.

        Each expert is the model state (``self.model.state_dict()`` names) of a policy conditioned exactly like this
        one and trained with the fixed one-hot weighting ``e_i``, which trains only copy ``i`` (or adapter ``i``).
        The policy at ``w`` then interpolates the experts' parameters, ``theta(w) = sum_i w_i theta_i``.

        Raises:
            ValueError: wrong number of experts, a missing parameter, or experts that disagree on a parameter
                that is not conditioned, trained or frozen here (interpolating only the conditioned subset would
                then not be the experts' soup). A shared parameter the experts agree on takes their value.
        """
        if len(experts) != self.num_objectives:
            raise ValueError(f"got {len(experts)} experts for {self.num_objectives} objectives (one per objective)")
        conditioned = self.mode.expert_values(self.model, experts)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, param in params.items():
            missing = [i for i, e in enumerate(experts) if name not in e]
            if missing and param.requires_grad:
                raise ValueError(
                    f"experts {missing} have no parameter {name!r}: were they conditioned like this policy?"
                )
            if missing:
                continue
            if name in conditioned:
                param.copy_(conditioned[name])
            else:  # frozen here too: experts that trained it apart are no soup of this policy's
                values = [e[name] for e in experts]
                if any(not torch.equal(values[0], v) for v in values[1:]):
                    raise ValueError(f"experts differ on the shared parameter {name!r}: train the experts with "
                                     "conditioning.train_shared=false (or LoRA) so that only their copies differ")
                param.copy_(values[0])

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trained parameters only (for LoRA-CLP: the adapters, a small checkpoint)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def report(self) -> dict[str, Any]:
        """Conditioned modules and parameter counts (for logs and benchmark tables)."""
        bytes_per = next(self.model.parameters()).element_size()
        return {
            "conditioning": self.conditioning.name,
            "num_objectives": self.num_objectives,
            "conditioned_modules": len(self.conditioned_modules),
            "total_parameters": count_parameters(self.model),
            "trainable_parameters": count_parameters(self.model, trainable_only=True),
            "extra_parameters": self.extra_parameters,
            "extra_megabytes": self.extra_parameters * bytes_per / 2**20,
        }
