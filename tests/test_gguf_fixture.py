"""The tiny GGUF fixture loads back through transformers as the model and tokenizer it was written from."""

import gguf
import numpy as np
import pytest
import torch
from fixtures import gguf_model
from fixtures.gguf_model import CHATML_TEMPLATE, build_chatml_bpe_tokenizer, write_tiny_llama_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

MESSAGES = [
    {"role": "system", "content": "You summarize posts."},
    {"role": "user", "content": "My knee hurts after running. What should I do?"},
]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, unseen wörds and an emoji 🙂\n\nnew lines",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
]


def load(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    path, source = write_tiny_llama_gguf(tmp_path_factory.mktemp("f32"))
    return path, source, *load(path)


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    path, source = write_tiny_llama_gguf(tmp_path_factory.mktemp("q8"), quantize=True)
    return path, source, *load(path)


def test_f32_weights_and_logits_match_the_source(f32):
    _, source, loaded, _ = f32
    expected, actual = source.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # no output.weight in the file: tied
    assert source.model.embed_tokens.weight[source.config.pad_token_id].abs().min() > 0  # pad row not zeroed
    ids = batch(source.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, source(ids).logits, rtol=0, atol=1e-5)


def test_logit_check_catches_unpermuted_qk(tmp_path, monkeypatch):
    """The writer's q/k permutation is load-bearing: without it the logits are far off (so 1e-5 means something)."""
    monkeypatch.setattr(gguf_model, "_permute_qk", lambda weight, n_head: weight)
    path, source = write_tiny_llama_gguf(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    ids = batch(source.config.vocab_size)
    with torch.no_grad():
        assert (loaded(ids).logits - source(ids).logits).abs().max() > 1e-2


def test_config_round_trips(f32):
    _, source, loaded, tokenizer = f32
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(loaded.config, key) == getattr(source.config, key), key
    assert loaded.config.rope_parameters["rope_theta"] == source.config.rope_parameters["rope_theta"]
    assert loaded.config.rms_norm_eps == pytest.approx(source.config.rms_norm_eps)  # stored as float32
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert loaded.config.eos_token_id == loaded.generation_config.eos_token_id == im_end
    assert loaded.config.pad_token_id == source.config.pad_token_id == im_end
    assert loaded.config.bos_token_id == source.config.bos_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_tokenizer_encodes_like_the_source(f32):
    *_, tokenizer = f32
    reference = build_chatml_bpe_tokenizer()
    rendered = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\n")
    for text in [*TEXTS, rendered]:
        assert tokenizer(text).input_ids == reference(text).input_ids, text
    assert tokenizer.decode(tokenizer(TEXTS[1]).input_ids) == TEXTS[1]
    assert tokenizer.get_vocab() == reference.get_vocab()
    for special in gguf_model.SPECIAL_TOKENS:  # whole tokens, not cut into bytes
        assert tokenizer(special).input_ids == [reference.convert_tokens_to_ids(special)]


def test_special_tokens_and_chat_template_round_trip(f32):
    *_, tokenizer = f32
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.bos_token == "<|im_start|>"
    reference = build_chatml_bpe_tokenizer()
    expected = reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    actual = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert actual == expected


def test_chat_template_can_be_left_out(tmp_path):
    path, _ = write_tiny_llama_gguf(tmp_path, name="plain.gguf", chat_template=None)
    assert AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name).chat_template is None


def test_q8_0_weights_are_the_rounded_source_and_logits_close(q8):
    path, source, loaded, _ = q8
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    expected, actual = source.state_dict(), loaded.state_dict()
    for name, tensor in expected.items():
        if tensor.ndim == 1:
            assert torch.equal(actual[name], tensor), name
            continue
        # Q8_0: int8 values times one float16 scale max|block| / 127 per block of 32 weights. Rounding is within
        # half a step, plus up to 127 steps times float16's relative error (2**-11) from the rounded scale.
        blocks = tensor.reshape(tensor.shape[0], -1, 32)
        step = (blocks.abs().amax(-1, keepdim=True) / 127).expand_as(blocks).reshape(tensor.shape)
        assert ((actual[name] - tensor).abs() <= (0.5 + 127 * 2**-11) * step + 1e-7).all(), name
        assert not torch.equal(actual[name], tensor), name  # it really was quantized
    ids = batch(source.config.vocab_size)
    with torch.no_grad():
        expected_logits, actual_logits = source(ids).logits, loaded(ids).logits
    assert (actual_logits - expected_logits).norm() / expected_logits.norm() < 0.05


def test_q8_0_file_is_smaller(tmp_path):
    f32_path, _ = write_tiny_llama_gguf(tmp_path, name="f32.gguf")
    q8_path, _ = write_tiny_llama_gguf(tmp_path, name="q8.gguf", quantize=True)
    assert q8_path.stat().st_size < 0.5 * f32_path.stat().st_size


def test_deterministic_under_seed(tmp_path):
    first, _ = write_tiny_llama_gguf(tmp_path / "a", seed=3, quantize=True)
    again, _ = write_tiny_llama_gguf(tmp_path / "b", seed=3, quantize=True)
    other, _ = write_tiny_llama_gguf(tmp_path / "c", seed=4, quantize=True)
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    reader_a, reader_c = gguf.GGUFReader(first), gguf.GGUFReader(other)
    assert reader_a.fields["tokenizer.ggml.tokens"].contents() == reader_c.fields["tokenizer.ggml.tokens"].contents()
    assert not np.array_equal(reader_a.tensors[0].data, reader_c.tensors[0].data)
