import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from clp_lightning.conditioning.mixing import MixedEmbedding, MixedLinear, WeightingState, resolve_targets
from clp_lightning.models import build_tiny_model


def _layer(conv: bool, m: int = 3) -> tuple[MixedLinear, WeightingState]:
    torch.manual_seed(0)
    state = WeightingState()
    base = Conv1D(5, 4) if conv else nn.Linear(4, 5)
    layer = MixedLinear(base, m, state)
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))
        layer.bias.add_(torch.randn_like(layer.bias))
    return layer, state


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("tokens", [1, 7])  # 1 token per row takes the per-copy path, 7 the grouped one
def test_mixed_linear_is_linear_in_w(conv, tokens):
    layer, state = _layer(conv)
    x = torch.randn(4, tokens, 4)
    w = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    with state.use(w):
        y = layer(x)
    per_copy = torch.stack([x @ layer.weight[i].t() + layer.bias[i] for i in range(3)])  # (m, B, T, out)
    want = torch.einsum("bm,mbto->bto", w, per_copy)
    assert torch.allclose(y, want, atol=1e-5)


def test_both_paths_and_cache_agree():
    layer, state = _layer(False)
    x = torch.randn(6, 3, 4)
    w = torch.softmax(torch.randn(6, 3), -1)
    with state.use(w):
        assert not layer._per_copy_is_cheaper(x, 6, 3)  # 18 tokens: mixing once per group is cheaper
        grouped = layer(x)
        per_copy = layer._per_copy(x, state.rows(6))
    assert torch.allclose(grouped, per_copy, atol=1e-5)
    two_groups = w[:2].repeat(3, 1)  # G = 2 <= m = 3: generate reads 2 cached mixed weights, not 3 copies
    with state.use(two_groups, cache=True):
        assert not layer._per_copy_is_cheaper(x, 2, 3) and layer._per_copy_is_cheaper(x, 4, 3)
        first = layer(x)
        layer.weight.data.mul_(0)  # the cached mixed weights are reused inside one generate call
        assert torch.allclose(layer(x), first)


def test_rows_repeat_for_beams_and_embedding_mixing():
    state = WeightingState()
    emb = MixedEmbedding(nn.Embedding(10, 3), 2, state)
    with torch.no_grad():
        emb.weight[1].add_(1.0)
    ids = torch.tensor([[1, 2], [3, 4]])
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    with state.use(w):
        out = emb(ids)
        assert torch.allclose(out[0], emb.weight[0][ids[0]] + 0.75)
        assert torch.allclose(out[1], emb.weight[0][ids[1]])
        repeated = emb(ids.repeat_interleave(2, 0))  # num_return_sequences=2 repeats each row
        assert torch.allclose(repeated[1], out[0]) and torch.allclose(repeated[2], out[1])
        with pytest.raises(RuntimeError, match="not a multiple"):
            emb(torch.zeros(3, 1, dtype=torch.long))


def test_named_targets_cover_the_expected_modules():
    t5 = build_tiny_model("t5")
    attn = resolve_targets(t5, "attention")
    assert any(".SelfAttention.q" in n for n in attn) and any(".EncDecAttention.o" in n for n in attn)
    assert len(attn) == 4 * (2 + 2 + 2)  # q,k,v,o x (enc self, dec self, dec cross) x 2 layers
    assert resolve_targets(t5, "logits") == ["lm_head"]
    all_t5 = resolve_targets(t5, "all")
    assert "shared" in all_t5 and not any("relative_attention_bias" in n for n in all_t5)
    gpt2 = build_tiny_model("gpt2")
    assert sorted(resolve_targets(gpt2, "attention")) == sorted(
        f"transformer.h.{i}.attn.{p}" for i in range(2) for p in ("c_attn", "c_proj")
    )
    assert resolve_targets(gpt2, ["logits", "mlp.c_fc"]) == [
        "lm_head",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.1.mlp.c_fc",
    ]
    with pytest.raises(ValueError, match="SelfAttention"):
        resolve_targets(t5, ["SelfAtention.q"])


def test_a_scaled_token_embedding_keeps_its_scale_and_class(tmp_path):
    # Gemma (like BART, M2M100, ...) multiplies its lookup by embed_scale = sqrt(d): a plain lookup in its place
    # would make the policy differ from the pretrained model at every w
    from transformers import AutoModelForCausalLM, GemmaConfig

    from clp_lightning.conditioning.config import ConditioningConfig
    from clp_lightning.conditioning.policy import ConditionalPolicy
    from clp_lightning.models import build_byte_tokenizer

    tok = build_byte_tokenizer("causal")
    config = GemmaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 200, (2, 5))
    want = model(input_ids=ids).logits
    scaled = type(model.get_input_embeddings())
    policy = ConditionalPolicy(model, tok, 2, ConditioningConfig(mode="mixing", options={"targets": "all"})).eval()
    with policy.conditioned(torch.tensor([[0.5, 0.5], [1.0, 0.0]])):
        assert torch.allclose(policy.model(input_ids=ids).logits, want, atol=1e-6)
    merged = policy.merged_model(torch.tensor([0.3, 0.7]))
    assert type(merged.get_input_embeddings()) is scaled
    assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-6)
    policy.save_pretrained(str(tmp_path))
    loaded = ConditionalPolicy.from_pretrained(str(tmp_path)).eval()
    with loaded.conditioned(torch.tensor([[0.2, 0.8], [0.0, 1.0]])):
        assert torch.allclose(loaded.model(input_ids=ids).logits, want, atol=1e-6)


def test_a_token_embedding_that_is_not_a_scaled_lookup_is_refused():
    class NormedEmbedding(nn.Embedding):
        def forward(self, ids):
            return nn.functional.normalize(super().forward(ids), dim=-1)

    with pytest.raises(ValueError, match="NormedEmbedding: its forward is not a \\(scaled\\) lookup"):
        MixedEmbedding(NormedEmbedding(10, 3), 2, WeightingState())
