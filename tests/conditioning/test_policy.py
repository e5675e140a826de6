import pytest
import torch
from policy_helpers import MODES, PROMPTS, make_policy, perturb, plain_copy

from clp_lightning.conditioning.config import ConditioningConfig
from clp_lightning.conditioning.lora import adapter_name, lora_layers
from clp_lightning.conditioning.mixing import mixed_modules
from clp_lightning.conditioning.policy import ConditionalPolicy

GEN = dict(max_new_tokens=8, do_sample=False)


def _responses(policy, weights):
    enc = policy.encode(PROMPTS, weights)
    ids, mask = policy.generate(**enc, weights=weights, max_new_tokens=6, do_sample=True, top_k=0)
    return enc, ids, mask


def _logits(model, kind, enc, ids):
    if kind == "seq2seq":
        return model(**enc, decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=ids)).logits
    full = torch.cat([enc["input_ids"], ids], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(ids)], 1)
    return model(input_ids=full, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


@pytest.mark.parametrize("mode", list(MODES))
def test_one_hot_equals_plain_model_with_copy_i(arch, mode):
    policy = perturb(make_policy(arch, mode)).eval()
    torch.manual_seed(0)
    for i in range(2):
        w = torch.nn.functional.one_hot(torch.full((len(PROMPTS),), i), 2).float()
        enc = policy.encode(PROMPTS, w)
        ids = torch.randint(3, 200, (len(PROMPTS), 5))
        with policy.conditioned(w):
            got = _logits(policy.model, policy.kind, enc, ids)
        want = _logits(plain_copy(arch, policy, i), policy.kind, enc, ids)
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (arch, mode, i, (got - want).abs().max())


@pytest.mark.parametrize("mode", ["logits", "attention", "all", "lora"])
def test_at_initialisation_policy_equals_reference_for_every_w(arch, mode):
    policy = make_policy(arch, mode).eval()
    policy.freeze_reference()
    w = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.5, 0.5]])
    enc, ids, mask = _responses(policy, w)
    got = policy(**enc, response_ids=ids, response_mask=mask, weights=w).log_probs
    want = policy.reference_log_probs(PROMPTS, ids, mask)
    assert torch.allclose(got, want, atol=1e-5)
    perturb(policy)  # training moves the policy, never its reference
    assert torch.equal(policy.reference_log_probs(PROMPTS, ids, mask), want)
    assert not torch.allclose(policy(**enc, response_ids=ids, response_mask=mask, weights=w).log_probs, want)


@pytest.mark.parametrize("mode", list(MODES))
def test_per_row_weights_equal_rows_alone(arch, mode):
    policy = perturb(make_policy(arch, mode)).eval()
    w = torch.tensor([[0.9, 0.1], [0.0, 1.0], [0.35, 0.65]])
    enc, ids, mask = _responses(policy, w)
    batch = policy(**enc, response_ids=ids, response_mask=mask, weights=w)
    for r in range(len(PROMPTS)):
        enc_r = policy.encode(PROMPTS[r : r + 1], w[r : r + 1])
        ids_r = ids[r : r + 1, : int(mask[r].sum())]
        alone = policy(**enc_r, response_ids=ids_r, response_mask=torch.ones_like(ids_r), weights=w[r : r + 1])
        assert torch.allclose(batch.log_probs[r, : ids_r.shape[1]], alone.log_probs[0], atol=1e-5), (mode, r)


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_generation_per_row_equals_alone(arch, mode):
    policy = perturb(make_policy(arch, mode), scale=1.0).eval()
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.4, 0.6]])
    ids, mask = policy.generate(**policy.encode(PROMPTS, w), weights=w, **GEN)
    outputs = set()
    for r in range(len(PROMPTS)):
        ids_r, mask_r = policy.generate(**policy.encode(PROMPTS[r : r + 1], w[r : r + 1]), weights=w[r : r + 1], **GEN)
        n = int(mask_r.sum())
        assert ids[r, :n].tolist() == ids_r[0, :n].tolist(), (mode, r)
        outputs.add(tuple(ids_r[0, :n].tolist()))
    # the same prompt under different weightings must be able to differ: the weighting reaches the model
    same = PROMPTS[0:1] * 2
    w2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ids2, _ = policy.generate(**policy.encode(same, w2), weights=w2, **GEN)
    assert not torch.equal(ids2[0], ids2[1])


@pytest.mark.parametrize("mode", ["logits", "attention", "all"])
def test_gradients_reach_every_copy_scaled_by_weight(arch, mode):
    policy = make_policy(arch, mode)
    w = torch.tensor([[0.25, 0.75]] * len(PROMPTS))
    enc, ids, mask = _responses(policy, w)
    policy(**enc, response_ids=ids, response_mask=mask, weights=w).log_probs.sum().backward()
    for name, module in mixed_modules(policy.model).items():
        g = module.weight.grad
        assert g is not None and g[1].abs().sum() > 0, name
        assert torch.allclose(g[0] / 0.25, g[1] / 0.75, atol=1e-6, rtol=1e-4), name


def test_lora_gradients_scaled_by_weight(arch):
    policy = make_policy(arch, "lora")
    with torch.no_grad():  # equal A's, so B_i's gradient differs only by w_i
        for layer in lora_layers(policy.model):
            layer.lora_A[adapter_name(1)].weight.copy_(layer.lora_A[adapter_name(0)].weight)
    w = torch.tensor([[0.25, 0.75]] * len(PROMPTS))
    enc, ids, mask = _responses(policy, w)
    policy(**enc, response_ids=ids, response_mask=mask, weights=w).log_probs.sum().backward()
    for layer in lora_layers(policy.model):
        g0, g1 = layer.lora_B[adapter_name(0)].weight.grad, layer.lora_B[adapter_name(1)].weight.grad
        assert g1.abs().sum() > 0 and torch.allclose(g0 / 0.25, g1 / 0.75, atol=1e-6, rtol=1e-4)
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


@pytest.mark.parametrize("mode", ["attention", "lora", "all"])
def test_merged_model_equals_policy_at_w(arch, mode):
    # in float64: the merged weight and the conditioned layers sum the same terms in another order (float32 leaves
    # ~1e-5 of rounding on these logits), and exactness is the point
    policy = perturb(make_policy(arch, mode)).eval().double()
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    enc = policy.encode(PROMPTS)
    ids = torch.randint(3, 200, (len(PROMPTS), 4))
    with policy.conditioned(w.expand(len(PROMPTS), -1)):
        got = _logits(policy.model, policy.kind, enc, ids)
    merged = policy.merged_model(w)
    assert not mixed_modules(merged) and not lora_layers(merged)
    want = _logits(merged, policy.kind, enc, ids)
    assert torch.allclose(got, want, atol=1e-10, rtol=0), (got - want).abs().max()


def test_bad_inputs_fail_with_clear_messages():
    with pytest.raises(ValueError, match="matches no Linear.*did you mean"):
        ConditionalPolicy.from_pretrained(
            "tiny:gpt2", 2, ConditioningConfig(mode="mixing", options={"targets": ["attn.c_atn"]})
        )
    policy = make_policy("t5", "attention")
    with pytest.raises(ValueError, match="sums to"):
        policy.merged_model([0.5, 0.6])
    with pytest.raises(RuntimeError, match="inside policy.conditioned"):
        policy.model(**policy.encode(["x"]), decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="needs a channel for alpha"):
        ConditioningConfig(condition_on_alpha=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ConditionalPolicy.from_pretrained("./no/such/model", 2)


def test_prompt_conditioning_prefixes_and_keeps_the_cue():
    policy = ConditionalPolicy.from_pretrained(
        "tiny:gpt2", 2, ConditioningConfig(prompt=True, condition_on_alpha=True), max_prompt_length=12
    )
    w = torch.tensor([[0.3, 0.7]])
    enc = policy.encode(["a very long post that will be cut TL;DR:"], w, torch.tensor([0.1]))
    text = policy.tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True)
    assert text.startswith("<w 0.30,0.70 | kl 0.1> ") and text.endswith("TL;DR:")
    with pytest.raises(ValueError, match="pass alpha"):
        policy.encode(["x"], w)
    # one text where a list of them is expected: a prompt per character
    with pytest.raises(ValueError, match=r"prompts must be a list of texts, got one text 'xyz': pass \[text\]"):
        policy.encode("xyz", w.expand(3, -1), torch.tensor([0.1] * 3))
    with pytest.raises(ValueError, match="prompts must be a list of texts"):
        policy.generate_text("xyz", [0.3, 0.7], 0.1, max_new_tokens=2)
    assert policy.prompt_prefix([0.3, 0.7], 0.1) == "<w 0.30,0.70 | kl 0.1> "
    with pytest.raises(ValueError, match=r"prompt_prefix takes one weighting \(m,\), got shape \(1, 2\)"):
        policy.prompt_prefix(w, 0.1)
    # one weighting per prompt: zip used to drop the prompts beyond the weightings
    with pytest.raises(ValueError, match="2 prompts but 1 weightings"):
        policy.encode(["x", "y"], w, torch.tensor([0.1]))
    # one alpha per prompt: zip paired each prompt with the first alphas (here those of the first prompt's samples)
    with pytest.raises(ValueError, match=r"`alpha` must have shape \(B,\) = \(2,\).*got \(4,\)"):
        policy.encode(["x", "y"], w.expand(2, -1), torch.tensor([0.1, 0.1, 0.5, 0.5]))


def test_report_counts_conditioned_parameters():
    policy = make_policy("gpt2", "logits", m=3)
    lm = policy.model.get_output_embeddings()
    report = policy.report()
    assert report["conditioned_modules"] == 1
    # the tiny GPT-2 ties its output layer to the input embedding; mixing the output layer unties them, so the
    # embedding keeps the original and the head adds all 3 copies (counting m - 1 missed one)
    assert report["extra_parameters"] == 3 * lm.weight[0].numel()
    assert report["extra_megabytes"] == pytest.approx(report["extra_parameters"] * 4 / 2**20)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
@pytest.mark.parametrize("targets", ["logits", "attention", "all"])
@pytest.mark.parametrize("tie", [True, False])
def test_extra_parameters_are_what_conditioning_adds_to_the_model(arch, targets, tie):
    from clp_lightning.conditioning.mixing import WeightingState, apply_parameter_mixing
    from clp_lightning.models import build_tiny_model, count_parameters

    model = build_tiny_model(arch, seed=0)
    if not tie:  # a model whose output layer has its own weight
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    before = count_parameters(model)
    report = apply_parameter_mixing(model, targets, 3, WeightingState())
    assert report.extra_parameters == count_parameters(model) - before > 0


@pytest.mark.parametrize("mode", ["logits", "all", "lora"])
def test_causal_log_probs_with_head_on_response_only_equal_full_logits(mode, monkeypatch):
    from clp_lightning.conditioning import lm as lm_module

    policy = perturb(make_policy("gpt2", mode)).eval()
    w = torch.distributions.Dirichlet(torch.ones(2)).sample((len(PROMPTS),))
    enc, ids, mask = _responses(policy, w)
    with torch.no_grad():
        assert lm_module._accepts_logits_to_keep(policy.model)
        got = policy(**enc, response_ids=ids, response_mask=mask, weights=w).log_probs
        monkeypatch.setattr(lm_module, "_accepts_logits_to_keep", lambda model: False)
        want = policy(**enc, response_ids=ids, response_mask=mask, weights=w).log_probs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_stacked_lora_adapters_equal_peft_per_adapter_loop(arch):
    # adapter dropout keeps peft's loop over adapters (a mask per adapter), weighted by hooks; without dropout the
    # m adapters run stacked. In eval mode dropout is off, so both must give the same logits for per-row weights.
    from clp_lightning.conditioning.lora import _StackedForward

    stacked = perturb(make_policy(arch, "lora", m=3)).eval().double()
    config = ConditioningConfig(mode="lora", options={"r": 4, "target_modules": "all", "dropout": 0.1})
    looped = ConditionalPolicy.from_pretrained(f"tiny:{arch}", 3, config, seed=0).eval().double()
    looped.model.load_state_dict(stacked.model.state_dict())  # the same base and adapters
    assert all(isinstance(layer.forward, _StackedForward) for layer in lora_layers(stacked.model))
    assert not any(isinstance(layer.forward, _StackedForward) for layer in lora_layers(looped.model))
    w = torch.distributions.Dirichlet(torch.ones(3)).sample((len(PROMPTS),)).double()
    enc = stacked.encode(PROMPTS)
    ids = torch.randint(3, 200, (len(PROMPTS), 4))
    with stacked.conditioned(w), looped.conditioned(w):
        got, want = _logits(stacked.model, stacked.kind, enc, ids), _logits(looped.model, looped.kind, enc, ids)
    assert torch.allclose(got, want, atol=1e-10, rtol=0), (got - want).abs().max()
    with stacked.reference() as model:  # switched off: the base alone, as peft computes it
        base = _logits(model, stacked.kind, enc, ids)
    assert not torch.allclose(base, got)


def test_stacked_lora_is_assembled_once_per_generate_call(arch, monkeypatch):
    # Inside generate the stacked adapters and per-row scales are built once per layer and row count (the prefill's
    # P rows, the decoding's P k), not at every decoding step, and the tokens equal those of building them every step.
    from clp_lightning.conditioning.lora import _StackedForward

    policy = perturb(make_policy(arch, "lora", m=3)).eval()
    w = torch.distributions.Dirichlet(torch.ones(3)).sample((len(PROMPTS),))
    enc = policy.encode(PROMPTS, w)
    builds = []
    build = _StackedForward._build
    monkeypatch.setattr(_StackedForward, "_build",
                        lambda self, rows: builds.append((id(self), rows)) or build(self, rows))

    def sample():
        torch.manual_seed(0)
        return policy.generate(**enc, weights=w, max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=0,
                               num_return_sequences=2)

    cached = sample()
    # seq2seq: the encoder's layers see P rows and the decoder's P k; causal: every layer sees both
    assert {rows for _, rows in builds} == {len(PROMPTS), 2 * len(PROMPTS)}
    assert len(builds) == len(set(builds)), "a layer stacked its adapters twice for one row count"
    monkeypatch.setattr(type(policy.state), "use", _without_cache(type(policy.state).use))
    builds.clear()
    every_step = sample()
    assert max(builds.count(b) for b in builds) == 6  # one per decoding step: what the cache saves
    assert torch.equal(cached[0], every_step[0]) and torch.equal(cached[1], every_step[1])
    with torch.no_grad():  # a new call sees the adapters as they are then, not the last call's stack
        for layer in lora_layers(policy.model):
            for b in layer.lora_B.values():
                b.weight.mul_(-1.0)
    monkeypatch.undo()
    assert not torch.equal(sample()[0], cached[0])


def _without_cache(use):
    def patched(self, weights, alpha=None, cache=False):
        return use(self, weights, alpha, cache=False)

    return patched


def test_decode_drops_what_follows_each_rows_end_whatever_id_pads_it():
    """GPT-2, Llama 3 and Qwen2 put an ordinary token (``!``) at id 0 and pad with their EOS: a response shorter than
    its batch's longest must decode to its own tokens, with nothing added for the positions after its end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from clp_lightning.conditioning.lm import response_mask_from_ids

    vocab = {t: i for i, t in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()) + ["<|endoftext|>"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    gpt2_like = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert gpt2_like.convert_ids_to_tokens(0) == "!"
    eos = gpt2_like.eos_token_id
    short, full = gpt2_like("hi")["input_ids"], gpt2_like("hello")["input_ids"]
    ids = torch.tensor([short + [eos] + [eos] * 2, full])  # what generate returns: padded with EOS after the end
    mask = response_mask_from_ids(ids, eos)
    policy = make_policy("gpt2", "lora")
    policy.tokenizer = gpt2_like
    assert policy.decode(ids, mask) == ["hi", "hello"]
    # any pad id, 0 included: only the masked tokens are read
    assert policy.decode(ids.masked_fill(mask == 0, 0), mask) == ["hi", "hello"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_stop_token_the_caller_passes_ends_the_response_mask(arch):
    """``generate(eos_token_id=...)`` stops each row at the caller's token and pads after it: the mask must end there
    too, or the padding after it would count as response tokens (in the loss, the KL and the length)."""
    from clp_lightning.conditioning.lm import response_mask_from_ids

    policy = perturb(make_policy(arch, "attention")).eval()
    w = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.6, 0.4]])
    enc = policy.encode(PROMPTS, w)
    ids, _ = policy.generate(**enc, weights=w, do_sample=False, max_new_tokens=6)
    stop = int(ids[0, 0])  # row 0 stops at its first token
    ids, mask = policy.generate(**enc, weights=w, do_sample=False, max_new_tokens=6, eos_token_id=stop)
    assert mask[0].tolist() == [1] + [0] * (ids.shape[1] - 1)
    assert torch.equal(mask, response_mask_from_ids(ids, stop))
    assert policy.decode(ids, mask)[0] == policy.tokenizer.decode([stop], skip_special_tokens=True)


def test_prompt_prefix_goes_after_a_bos_the_tokenizer_adds():
    """Tokenizers that start every text with a BOS (Llama 3, Gemma) get the weighting prefix after it, where the
    text starts, as `tokenizer(prefix + prompt)` places it; one without (the byte tokenizer) gets it first."""
    from tokenizers import processors

    from clp_lightning.conditioning.prompt import leading_special_tokens
    from clp_lightning.models import build_byte_tokenizer, build_tiny_model

    def policy_with(tok):
        return ConditionalPolicy(build_tiny_model("gpt2", "tiny"), tok, 2, ConditioningConfig(prompt=True))

    w = torch.tensor([[0.3, 0.7]])
    no_bos, bos_tok = build_byte_tokenizer("causal"), build_byte_tokenizer("causal")
    bos = bos_tok.bos_token_id
    bos_tok._tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", bos)])
    assert leading_special_tokens(no_bos) == 0 and leading_special_tokens(bos_tok) == 1
    plain = policy_with(no_bos).encode(["post TL;DR:"], w)["input_ids"][0].tolist()
    with_bos = policy_with(bos_tok).encode(["post TL;DR:"], w)["input_ids"][0].tolist()
    assert plain == no_bos("<w 0.30,0.70> post TL;DR:")["input_ids"] and plain[0] != bos
    assert with_bos == [bos, *plain] == bos_tok("<w 0.30,0.70> post TL;DR:")["input_ids"]


@pytest.mark.parametrize("length", [0, -3, 1.5, True])
def test_a_max_prompt_length_that_is_not_a_positive_integer_is_refused(length):
    # 0 gave a causal policy empty prompts and left a seq2seq one's uncut, True kept 1 token, both without a word;
    # -3 and 1.5 failed inside the tokenizer at the first encode
    from clp_lightning.conditioning.config import PolicyConfig

    message = rf"max_prompt_length must be an integer >= 1 .*got {length!r}"
    with pytest.raises(ValueError, match=message):
        PolicyConfig("tiny:gpt2", max_prompt_length=length)  # when the config is made, before the model loads
    with pytest.raises(ValueError, match=message):
        ConditionalPolicy.from_pretrained("tiny:gpt2", 2, max_prompt_length=length)


def test_truncation_side_keeps_the_start_or_the_end_and_is_saved(tmp_path):
    """`left` (the default without a chat template) keeps a long prompt's end, its `TL;DR:` cue; `right` keeps its
    start, T5's `summarize:` and the article's lede. A saved policy keeps the setting; a bad value is refused when
    the config is made."""
    from clp_lightning.conditioning.config import PolicyConfig

    prompt = ["summarize: the lede comes first and the rest is detail TL;DR:"]

    def text(policy):
        return policy.tokenizer.decode(policy.encode(prompt)["input_ids"][0], skip_special_tokens=True)

    default = ConditionalPolicy.from_pretrained("tiny:gpt2", 2, max_prompt_length=12)
    start = ConditionalPolicy.from_pretrained("tiny:gpt2", 2, max_prompt_length=12, truncation_side="right")
    assert text(default) == "etail TL;DR:" and text(start) == "summarize: t"
    start.save_pretrained(tmp_path / "saved", objective_names=["a", "b"])
    loaded = ConditionalPolicy.from_pretrained(str(tmp_path / "saved"))
    assert loaded.truncation_side == "right" and text(loaded) == "summarize: t"
    with pytest.raises(ValueError, match="truncation_side must be 'left'.*got 'start'"):
        PolicyConfig(truncation_side="start")


def test_a_soup_with_frozen_shared_parameters_refuses_experts_that_moved_them():
    """Experts trained with train_shared=true moved their shared parameters apart. A soup built with
    train_shared=false freezes its own, and must refuse such experts rather than silently keep its own shared values
    under the experts' copies; experts that agree on a shared parameter give it their value."""
    attention = dict(mode="mixing", options={"targets": "attention"})
    experts = []
    for i in range(2):
        expert = make_policy("t5", "attention")
        with torch.no_grad():
            expert.model.encoder.final_layer_norm.weight.add_(0.1 * (i + 1))
        experts.append(expert.model.state_dict())
    soup = ConditionalPolicy.from_pretrained("tiny:t5", 2, ConditioningConfig(**attention, train_shared=False))
    assert not soup.model.encoder.final_layer_norm.weight.requires_grad
    with pytest.raises(ValueError, match="differ on the shared parameter 'encoder.final_layer_norm.weight'"):
        soup.load_expert_copies(experts)
    name = "encoder.final_layer_norm.weight"
    experts[1][name] = experts[0][name]
    soup.load_expert_copies(experts)
    assert torch.equal(soup.model.encoder.final_layer_norm.weight, experts[0][name])


@pytest.mark.parametrize("mode", ["attention", "all", "lora", "prompt+attention"])
def test_weightings_of_the_wrong_width_are_refused(mode):
    # a (B, 1) row broadcast against the m copies (every copy at weight 1) without a word; other widths failed deep
    # inside a module with a bare shape error
    policy = make_policy("t5", mode)
    w = torch.tensor([[0.3, 0.7]])
    enc = policy.encode(["x"], w)
    ids = torch.ones(1, 2, dtype=torch.long)
    for bad in (torch.ones(1, 1), torch.full((1, 3), 1 / 3)):
        wanted = rf"`weights` must have shape \(B, m\) = \(B, 2\).*got \(1, {bad.shape[1]}\)"
        with pytest.raises(ValueError, match=wanted):
            policy(**enc, response_ids=ids, response_mask=torch.ones_like(ids), weights=bad)
        with pytest.raises(ValueError, match=r"must have shape \(B, m\) = \(B, 2\)"):
            policy.generate(**enc, weights=bad, max_new_tokens=2, do_sample=False)
    if policy.prompt_conditioner is not None:  # the prefix wrote every entry it was given
        with pytest.raises(ValueError, match=r"must have shape \(B, m\) = \(B, 2\)"):
            policy.encode(["x"], torch.full((1, 3), 1 / 3))


@pytest.mark.parametrize("m", [0, 2.0, True])
def test_a_num_objectives_that_is_not_a_positive_integer_is_refused(m):
    # 2.0 and True passed the check (True as one objective) and sized every mixed layer with them
    with pytest.raises(ValueError, match=rf"num_objectives must be an integer >= 1, got {m!r}"):
        ConditionalPolicy.from_pretrained("tiny:gpt2", m, ConditioningConfig(mode="mixing",
                                                                             options={"targets": "logits"}))


def test_position_limit_reads_learned_position_tables_and_none_for_relative_or_rotary_positions():
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BartConfig, OPTConfig

    from clp_lightning.conditioning.lm import check_positions, position_limit
    from clp_lightning.models import build_tiny_model

    # OPT and BART keep 2 rows of their tables for themselves (offset): the limit is max_position_embeddings
    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, ffn_dim=16,
                                                     num_attention_heads=2, max_position_embeddings=40,
                                                     word_embed_proj_dim=8))
    bart = AutoModelForSeq2SeqLM.from_config(BartConfig(
        vocab_size=64, d_model=8, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16,
        encoder_attention_heads=2, decoder_attention_heads=2, max_position_embeddings=30))
    assert (position_limit(opt), position_limit(bart), position_limit(build_tiny_model("gpt2"))) == (40, 30, 512)
    assert position_limit(build_tiny_model("t5")) is None and position_limit(build_tiny_model("llama")) is None
    # causal: prompt and response in one sequence; seq2seq: each in its own (the decoder's after its start token)
    check_positions(opt, 32, 8, "x")
    with pytest.raises(ValueError, match="32 prompt tokens and up to 9 new tokens need 41 positions, but the learned "
                                         "position table of OPTForCausalLM holds 40; lower x"):
        check_positions(opt, 32, 9, "x")
    check_positions(bart, 30, 29, "x")
    for prompt, new in ((31, 1), (1, 30)):
        with pytest.raises(ValueError, match="positions, but the learned position table of BartForConditionalGen"):
            check_positions(bart, prompt, new, "x")


def test_generation_past_a_learned_position_table_is_refused_and_up_to_it_runs():
    # GPT-2's table holds 512 positions: a longer prompt + response had failed as an IndexError inside the model
    policy = ConditionalPolicy.from_pretrained("tiny:gpt2", 2, ConditioningConfig(), max_prompt_length=600)
    w = torch.tensor([[0.5, 0.5]])
    enc = policy.encode(["x" * 700], w)
    length = enc["input_ids"].shape[1]
    assert length == 600
    with pytest.raises(ValueError, match=r"600 prompt tokens and up to 8 new tokens need 608 positions, but the "
                                         r"learned position table of GPT2LMHeadModel holds 512; lower the prompts'"):
        policy.generate(**enc, weights=w, max_new_tokens=8, do_sample=False)
    enc = policy.encode(["x" * 500], w)
    ids, _ = policy.generate(**enc, weights=w, max_new_tokens=512 - enc["input_ids"].shape[1], do_sample=False,
                             min_new_tokens=512 - enc["input_ids"].shape[1])
    assert enc["input_ids"].shape[1] + ids.shape[1] == 512  # the last position of the table is used, and fits


def test_a_module_whose_longest_prompt_and_response_overflow_the_positions_is_refused_when_built():
    from clp_lightning.conditioning.config import PolicyConfig
    from clp_lightning.config import GenerationSettings
    from clp_lightning.module import CLPModule
    from clp_lightning.rewards import LengthReward

    rewards = [LengthReward(name="a"), LengthReward(name="b")]
    with pytest.raises(ValueError, match=r"500 prompt tokens and up to 13 new tokens need 513 positions, .* lower "
                                         r"model.init_args.policy.max_prompt_length or model.init_args.generation"):
        CLPModule(PolicyConfig("tiny:gpt2", max_prompt_length=500), rewards,
                  generation=GenerationSettings(max_new_tokens=13))
    CLPModule(PolicyConfig("tiny:gpt2", max_prompt_length=500), rewards,
              generation=GenerationSettings(max_new_tokens=12))


@pytest.mark.parametrize("model, prompt", [("tiny:gpt2", False), ("tiny:gpt2", True), ("tiny:t5", True)])
def test_a_special_token_written_in_a_prompt_is_text(model, prompt):
    # a post is data: an EOS string in it had become the EOS token, which ends the prompt for the model
    policy = ConditionalPolicy.from_pretrained(model, 2, ConditioningConfig(prompt=prompt))
    tok, w = policy.tokenizer, torch.tensor([[0.3, 0.7]])
    eos = tok.eos_token
    written = policy.encode([f"my post {eos} goes on"], w)["input_ids"][0].tolist()
    plain = policy.encode(["my post  goes on"], w)["input_ids"][0].tolist()
    assert written.count(tok.eos_token_id) == plain.count(tok.eos_token_id)  # only the tokenizer's own (T5's last)
    assert tok.decode(written, skip_special_tokens=True).count(eos) == 1  # the written string survives, as text
