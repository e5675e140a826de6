"""Factuality as textual entailment with a seq2seq NLI model in the style of TRUE (``google/t5_xxl_true_nli_mixture``).

The model reads ``premise: {source} hypothesis: {response}`` and writes ``1`` when the premise entails the
hypothesis, ``0`` otherwise. The reward is the probability of the entailment token at the first decoder step, so one
encoder pass and one decoder step score a whole micro-batch (no generation).
"""

from __future__ import annotations

import string

import torch
from torch import Tensor
from transformers import AutoModelForSeq2SeqLM, PreTrainedTokenizerBase

from clp_lightning.rewards.base import Reward, check_max_length, load_scorer, to_device


def fit_source(
    tokenizer: PreTrainedTokenizerBase, template: str, source: str, response: str, max_length: int, rounds: int = 4
) -> str:
    """Render ``template`` with the end of ``source`` cut, at token boundaries, so the text fits ``max_length`` tokens.

    The response is never cut (unless it cannot fit even with an empty source; then the caller's truncation cuts the
    end). Cutting is done on characters at token offsets and re-checked, because tokenising a piece alone can differ
    from tokenising it in context by a token at the boundary.

    Args:
        tokenizer: a fast tokenizer (offsets are needed).
        template: a format string with ``{source}`` and ``{response}``.
        source, response: the texts.
        max_length: token budget, special tokens included.
        rounds: how many times to re-check after a cut.
    """
    start = len(template.split("{source}", 1)[0].format(response=response))  # where the source begins in the text
    text = template.format(source=source, response=response)
    for _ in range(rounds):
        # split_special_tokens: a "</s>" in a text is text (texts are data, not control input), as in the scoring call
        enc = tokenizer(text, return_offsets_mapping=True, split_special_tokens=True)
        excess = len(enc["input_ids"]) - max_length
        if excess <= 0:
            break
        # Token start offsets that lie inside the source; drop the last `excess` of them.
        starts = [a for a, b in enc["offset_mapping"] if b > a and a >= start and b <= start + len(source)]
        keep = len(starts) - excess
        source = source[: starts[keep] - start] if keep > 0 else ""
        text = template.format(source=source, response=response)
        if not source:
            break
    return text


def single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of ``token``, which must be one token of ``tokenizer``; ``ValueError`` naming its pieces otherwise.

    A string outside the vocabulary comes back as the one unknown token, so it is refused too: the reward would be
    the probability of ``<unk>``, and two such strings would share an id.
    """
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"output token {token!r} must be a single token, the tokenizer gives {pieces}")
    if ids[0] == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise ValueError(
            f"output token {token!r} is not in the tokenizer's vocabulary (it becomes the unknown token "
            f"{tokenizer.unk_token!r}); use a token of the model's output vocabulary"
        )
    return ids[0]


class Seq2SeqNLIReward(Reward):
    """Probability that the source entails the response, from a seq2seq NLI model (TRUE T5 format).

    Args:
        model: hub id, local directory or ``pkg:<package>/<subdir>`` of an ``AutoModelForSeq2SeqLM``
            (real configs: ``google/t5_xxl_true_nli_mixture``).
        name: objective name used in metric keys.
        tokenizer: tokenizer to load; defaults to ``model``'s. Must be a fast tokenizer.
        template: input format with ``{source}`` (the premise) and ``{response}`` (the hypothesis).
        entail_token: the output token meaning "entailed".
        not_entail_token: the output token meaning "not entailed" (used only with ``renormalize``).
        renormalize: return ``p(entail) / (p(entail) + p(not_entail))`` instead of ``p(entail)`` over the whole
            vocabulary.
        max_length: maximum encoder tokens; the end of the source is cut to fit, the response is kept whole.
        batch_size: micro-batch size.
        trust_remote_code: run code shipped with the model.
        torch_dtype: weights' dtype (``"float32"``, ``"bfloat16"``, ...); None keeps the checkpoint's.
    """

    def __init__(
        self,
        model: str = "google/t5_xxl_true_nli_mixture",
        name: str = "nli",
        tokenizer: str | None = None,
        template: str = "premise: {source} hypothesis: {response}",
        entail_token: str = "1",
        not_entail_token: str = "0",
        renormalize: bool = False,
        max_length: int = 512,
        batch_size: int = 8,
        trust_remote_code: bool = False,
        torch_dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, batch_size=batch_size)
        # Checked before the model loads: another field ("{extra}", "{0}") or a stray brace used to pass here and
        # raise a KeyError / IndexError / ValueError at the first score. fit_source also needs the plain "{source}".
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        except ValueError as err:
            raise ValueError(f"template {template!r} is not a valid format string: {err}") from None
        if sorted(fields) != ["response", "source"] or template.count("{source}") != 1:
            raise ValueError(
                f"template must contain {{source}} and {{response}} once each and no other field, got {template!r} "
                f"(fields {fields})"
            )
        if max_length < 1:  # before loading an 11B-parameter model; the template's own tokens are checked below
            raise ValueError(f"max_length must be >= 1, got {max_length}")

        def check_tokenizer(tok: PreTrainedTokenizerBase) -> None:  # before an 11B-parameter model loads
            if not tok.is_fast:
                raise ValueError(
                    f"{tokenizer or model!r}: Seq2SeqNLIReward needs a fast tokenizer (for source truncation)"
                )
            # The template and special tokens alone must leave room for the hypothesis: otherwise fit_source empties
            # the premise and the final truncation cuts the response to nothing, and every pair scores the same.
            # Texts are tokenized with special-token strings read as characters (a post may quote "</s>"), so a
            # special token written into the template would not be the control token it looks like.
            for special in tok.all_special_tokens:
                if special in template:
                    raise ValueError(
                        f"template {template!r} contains {special!r}, a special token of {tokenizer or model!r}: "
                        "the template is tokenized as text, so it would not be that token; leave special tokens to "
                        "the tokenizer"
                    )
            overhead = len(tok(template.format(source="", response=""))["input_ids"])
            if max_length <= overhead:
                raise ValueError(
                    f"max_length={max_length} leaves no room for text: the template {template!r} with its special "
                    f"tokens takes {overhead} tokens of {tokenizer or model!r}; set max_length >= {overhead + 1} "
                    "(enough for the longest response)"
                )
            entail_id, not_entail_id = (single_token_id(tok, token) for token in (entail_token, not_entail_token))
            # one id for both would make the renormalised reward 0.5 for every pair
            if renormalize and entail_id == not_entail_id:
                raise ValueError(
                    f"entail_token {entail_token!r} and not_entail_token {not_entail_token!r} are the same token "
                    f"(id {entail_id}) of {tokenizer or model!r}; they must be two different output tokens"
                )

        self.model, self.tokenizer = load_scorer(
            AutoModelForSeq2SeqLM,
            model,
            tokenizer,
            trust_remote_code=trust_remote_code,
            torch_dtype=torch_dtype,
            check_tokenizer=check_tokenizer,
        )
        check_max_length(self.model, max_length, model)  # T5 has relative positions; a BART-based scorer does not
        start = self.model.config.decoder_start_token_id
        if start is None:
            raise ValueError(f"{model!r} has no decoder_start_token_id in its config")
        self.template, self.max_length, self.renormalize = template, max_length, renormalize
        self.decoder_start_token_id = int(start)
        self.entail_id = single_token_id(self.tokenizer, entail_token)
        self.not_entail_id = single_token_id(self.tokenizer, not_entail_token)
        self.freeze()

    def score(self, sources: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        texts = [fit_source(self.tokenizer, self.template, s, r, self.max_length) for s, r in zip(sources, responses)]
        enc = to_device(
            self.tokenizer(
                texts,
                max_length=self.max_length,
                truncation=True,
                padding=True,
                return_tensors="pt",
                split_special_tokens=True,  # a "</s>" in a post is text, not the end of the premise
            ),
            self.device,
        )
        start = torch.full((len(texts), 1), self.decoder_start_token_id, dtype=torch.long, device=self.device)
        logits = self.model(**enc, decoder_input_ids=start).logits[:, 0].float()  # (b, vocab): first decoder step
        if self.renormalize:
            return logits[:, [self.entail_id, self.not_entail_id]].softmax(-1)[:, 0]
        return logits.softmax(-1)[:, self.entail_id]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, template={self.template!r}, renormalize={self.renormalize}"
