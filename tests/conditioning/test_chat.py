"""Chat-template prompts for instruct models: formatting, truncation inside the user turn, end-of-turn stop."""

import pytest
import torch
from fixtures.gguf_model import write_tiny_llama_gguf
from torch import nn

from clp_lightning.conditioning.config import ConditioningConfig
from clp_lightning.conditioning.policy import ConditionalPolicy
from clp_lightning.conditioning.prompt import ChatFormat

SYSTEM = "You summarise news."


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf"))[0]


def make(gguf_path, tmp_path, conditioning=None, **kwargs) -> ConditionalPolicy:
    return ConditionalPolicy.from_pretrained(str(gguf_path), 2, conditioning, cache_dir=str(tmp_path),
                                             chat_template=True, **kwargs)


def test_prompts_are_the_chat_template_rendering(gguf_path, tmp_path):
    policy = make(gguf_path, tmp_path, system_prompt=SYSTEM)
    tok = policy.tokenizer
    prompts = ["Summarize: the fox jumps.", "Summarize: a much longer article about the lazy dog and the fox."]
    enc = policy.encode(prompts)
    for row, prompt in enumerate(prompts):
        ids = enc["input_ids"][row][enc["attention_mask"][row].bool()]
        expected = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                                           tokenize=False, add_generation_prompt=True)
        assert tok.decode(ids) == expected
    assert enc["attention_mask"][0, 0] == 0  # left-padded for generation


def test_long_prompts_are_cut_inside_the_user_turn(gguf_path, tmp_path):
    policy = make(gguf_path, tmp_path, system_prompt=SYSTEM)
    policy.max_prompt_length = 8
    text = policy.tokenizer.decode(policy.encode(["one two three four five six seven eight nine ten " * 5])
                                   ["input_ids"][0])
    assert text.startswith("<|im_start|>system\n" + SYSTEM) and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "one two" in text and "ten" not in text  # the start of the article is kept


def test_weighting_prefix_goes_inside_the_user_turn(gguf_path, tmp_path):
    policy = make(gguf_path, tmp_path, ConditioningConfig(prompt=True))
    text = policy.tokenizer.decode(policy.encode(["the fox"], torch.tensor([[0.3, 0.7]]))["input_ids"][0])
    assert text == "<|im_start|>user\n<w 0.30,0.70> the fox<|im_end|>\n<|im_start|>assistant\n"
    # the reference sees exactly the same format, without the prefix
    assert policy.tokenizer.decode(policy.encode(["the fox"])["input_ids"][0]) == (
        "<|im_start|>user\nthe fox<|im_end|>\n<|im_start|>assistant\n")


def test_weighting_prefix_and_prompt_are_tokenized_as_one_text(gguf_path, tmp_path):
    # "<w 0.30,0.70> " + "the fox": this byte-level BPE merges the prefix's space into " the", as it does in the text a
    # user writes; a prompt cut to max_prompt_length is tokenized alone after the whole prefix
    policy = make(gguf_path, tmp_path, ConditioningConfig(prompt=True))
    tok, w = policy.tokenizer, torch.tensor([[0.3, 0.7]])
    apart = tok("<w 0.30,0.70> ", add_special_tokens=False)["input_ids"] + tok("the fox", add_special_tokens=False)[
        "input_ids"]
    together = tok("<w 0.30,0.70> the fox", add_special_tokens=False)["input_ids"]
    assert apart != together  # the case this test is about
    expected = tok.apply_chat_template([{"role": "user", "content": "<w 0.30,0.70> the fox"}],
                                       add_generation_prompt=True, return_dict=True)["input_ids"]
    assert policy.encode(["the fox"], w)["input_ids"][0].tolist() == list(expected)
    policy.max_prompt_length = 2  # "the fox" is 2 tokens: it fits, as one text with the prefix
    assert policy.encode(["the fox"], w)["input_ids"][0].tolist() == list(expected)
    policy.max_prompt_length = 1  # cut: its first token, after the prefix's own
    head = tok("<w 0.30,0.70> ", add_special_tokens=False)["input_ids"]
    first = tok("the fox", add_special_tokens=False)["input_ids"][:1]
    user = policy.encode(["the fox"], w)["input_ids"][0].tolist()
    assert policy.chat.wrap(head + first) == user


def test_generation_stops_at_the_end_of_turn_token(gguf_path, tmp_path):
    policy = make(gguf_path, tmp_path)
    end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert policy.chat.end_of_turn_id == end
    # a model whose eos is another token: the template's end of turn must still stop generation
    model = policy.model
    model.generation_config.eos_token_id = 0
    policy = ConditionalPolicy(model, policy.tokenizer, 2, chat_template=True)
    assert model.generation_config.eos_token_id == [0, end]
    head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[end] = 1e4  # always says end of turn
    model.lm_head = head
    enc = policy.encode(["the fox", "the dog"])
    ids, mask = policy.generate(**enc, weights=torch.full((2, 2), 0.5), max_new_tokens=8, do_sample=False)
    assert ids.shape == (2, 1) and ids.eq(end).all() and mask.eq(1).all()


def test_chat_errors(gguf_path, tmp_path):
    policy = make(gguf_path, tmp_path)
    with pytest.raises(ValueError, match="system_prompt is set but chat_template is False"):
        ConditionalPolicy(policy.model, policy.tokenizer, 2, system_prompt=SYSTEM)
    tok = policy.tokenizer
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        ChatFormat(tok)
