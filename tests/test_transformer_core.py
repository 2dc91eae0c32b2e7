"""The transformer core against independent references: ALiBi against BLOOM, partial rotary against GPT-NeoX,
attention against a plain softmax(QK^T)V, and the model's invariances (KV cache, padding, checkpointing)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPTNeoXConfig
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb

from helpers import count_calls
from megatransformer_utils import MegaTransformerConfig
from model import build_model
from model.transformer.attention import Attention, AttentionInputs, KVCache, build_attention_bias
from model.transformer.positions import (RotaryEmbedding, alibi_bias, alibi_slopes, apply_rotary,
                                         position_ids_from_mask, sinusoidal_table)

BASE = MegaTransformerConfig.from_name("tiny").with_overrides(
    ["vocab_size=97", "hidden_size=48", "n_layers=2", "n_heads=4", "n_query_groups=2", "intermediate_size=64"])

VARIANTS = {
    "rotary_gqa": [],
    "partial_rotary_mqa": ["n_query_groups=1", "rotary_dim=6"],
    "learned_gelu_layernorm": ["use_rotary_embedding=false", "use_positional_embedding=true",
                               "intermediate_activation=gelu_tanh", "norm_type=layernorm", "use_qkv_bias=true"],
    "sinusoidal_relu2": ["use_rotary_embedding=false", "use_sinusoidal_embedding=true", "intermediate_activation=relu2"],
    "alibi_6_heads": ["use_rotary_embedding=false", "use_alibi_bias=true", "n_heads=6", "n_query_groups=6"],
    "separate_head_sizes": ["d_queries=20", "d_values=6"],
    "moe_geglu": ["ffn_type=moe", "n_experts=4", "intermediate_activation=geglu"],
    "sandwich_norms": ["post_attn_norm=true", "post_ffn_norm=true"],
    "post_ln": ["pre_attn_norm=false", "pre_ffn_norm=false", "post_attn_norm=true", "post_ffn_norm=true",
                "use_final_norm=false", "norm_type=layernorm"],
    "sliding_window": ["sliding_window=4"],
}


def build(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(BASE.with_overrides(VARIANTS[variant])).eval()


@pytest.mark.parametrize("n_heads", [4, 6, 12, 20])
def test_alibi_equals_bloom(n_heads):
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    expected = build_alibi_tensor(mask, n_heads, torch.float32).view(2, n_heads, 1, 7)
    actual = alibi_bias(alibi_slopes(n_heads), position_ids_from_mask(mask))
    assert torch.allclose(actual, expected, atol=1e-6)


def test_partial_rotary_equals_gpt_neox():
    head_dim, rotary_dim = 16, 8
    neox_config = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, rotary_pct=rotary_dim / head_dim,
                                rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                                                 "partial_rotary_factor": rotary_dim / head_dim})
    position_ids = torch.tensor([[0, 1, 2, 5, 9], [3, 4, 5, 6, 7]])
    q, k = torch.randn(2, 2, 4, 5, head_dim).unbind(0)
    cos_ref, sin_ref = GPTNeoXRotaryEmbedding(neox_config)(q, position_ids)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    cos, sin = RotaryEmbedding(rotary_dim, 1000.0)(position_ids, torch.float32)
    assert torch.allclose(apply_rotary(q, cos, sin), expected_q, atol=1e-6)
    assert torch.allclose(apply_rotary(k, cos, sin), expected_k, atol=1e-6)


def test_sinusoidal_table_matches_formula():
    table = sinusoidal_table(50, 16)
    for pos, i in [(0, 0), (7, 2), (49, 14)]:
        angle = pos / 10000 ** (i / 16)
        assert table[pos, i] == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[pos, i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


def reference_attention(attention: Attention, x: torch.Tensor, causal_bias: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + bias) V written out by hand, key/value heads repeated for their query groups."""
    B, T, _ = x.shape
    q, k, v = attention.qkv_proj(x).split(attention.split_sizes, dim=-1)
    q = q.view(B, T, attention.n_heads, -1).transpose(1, 2)
    repeat = attention.n_heads // attention.n_query_groups
    k = k.view(B, T, attention.n_query_groups, -1).transpose(1, 2).repeat_interleave(repeat, dim=1)
    v = v.view(B, T, attention.n_query_groups, -1).transpose(1, 2).repeat_interleave(repeat, dim=1)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + causal_bias).softmax(-1)
    return attention.o_proj((weights @ v).transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("groups, d_queries, d_values", [(6, 8, 8), (3, 8, 8), (1, 8, 8), (2, 12, 5)])
def test_attention_equals_reference(groups, d_queries, d_values):
    config = BASE.with_overrides(["n_heads=6", f"n_query_groups={groups}", f"d_queries={d_queries}",
                                  f"d_values={d_values}", "use_rotary_embedding=false"])
    attention = Attention(config, 0)
    x = torch.randn(2, 7, config.hidden_size)
    causal = torch.full((7, 7), float("-inf")).triu(1)
    bias, is_causal = build_attention_bias(None, 7, 7, None, None, torch.float32, x.device)
    assert bias is None and is_causal  # the fast path
    fast = attention(x, AttentionInputs(rotary=None, bias=None, is_causal=True))
    masked_bias, _ = build_attention_bias(torch.ones(2, 7), 7, 7, 3, None, torch.float32, x.device)
    windowed = attention(x, AttentionInputs(rotary=None, bias=masked_bias, is_causal=False))
    window = causal.masked_fill(torch.ones(7, 7, dtype=torch.bool).tril(-3), float("-inf"))
    assert torch.allclose(fast, reference_attention(attention, x, causal), atol=1e-5)
    assert torch.allclose(windowed, reference_attention(attention, x, window), atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decoding_equals_full_forward(variant):
    model = build(variant)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        pieces = [out.logits]
        out = model(ids[:, 5:8], past_key_values=out.past_key_values, use_cache=True)  # a chunk of 3
        pieces.append(out.logits)
        for t in range(8, 11):  # then one token at a time
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            pieces.append(out.logits)
    assert len(out.past_key_values) == 11
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padded_batch_equals_single_sequences(variant):
    model = build(variant)
    long, short = torch.randint(0, 97, (9,)), torch.randint(0, 97, (6,))
    ids = torch.stack([long, torch.cat([torch.zeros(3, dtype=torch.long), short])])
    mask = torch.tensor([[1] * 9, [0] * 3 + [1] * 6])
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        alone_long, alone_short = model(long[None]).logits[0], model(short[None]).logits[0]
    assert torch.allclose(batched[0], alone_long, atol=1e-5)
    assert torch.allclose(batched[1, 3:], alone_short, atol=1e-5)


@pytest.mark.parametrize("variant", ["rotary_gqa", "moe_geglu", "learned_gelu_layernorm"])
def test_gradient_checkpointing_gives_same_gradients(variant):
    ids = torch.randint(0, 97, (2, 12))
    grads, calls = [], []
    for checkpointing in (False, True):
        model = build(variant).train()
        model.set_gradient_checkpointing(checkpointing)
        with count_calls(model.blocks) as counts:
            model(ids, labels=ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        calls.append(counts)
    assert calls == [{0: 1, 1: 1}, {0: 2, 1: 2}]  # checkpointed blocks run again in the backward pass
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    model = build("rotary_gqa")
    ids = torch.randint(0, 97, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, 3:-1].reshape(-1, 97), ids[:, 4:].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.aux_loss == 0


def test_norm_positions_change_the_function():
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        outputs = [build(v)(ids).logits for v in ("rotary_gqa", "sandwich_norms", "post_ln")]
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])


def test_kv_cache_grows_and_keeps_earlier_entries():
    cache = KVCache()
    chunks = [torch.randn(1, 2, n, 4) for n in (10, 1, 9, 1)]
    for chunk in chunks:
        keys, values = cache.update(0, chunk, chunk * 2)
    assert torch.equal(keys, torch.cat(chunks, dim=2)) and torch.equal(values, 2 * keys)
    assert len(cache) == 21


def test_bad_attention_mask_and_positions_are_clear_errors():
    model = build("learned_gelu_layernorm")
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(0, 97, (1, BASE.max_position_embeddings + 1)))


def test_flops_per_token_matches_nanogpt_estimate():
    """nanoGPT: 6 N + 12 L H Q T per token, N = parameters without position embeddings (tied head counted once)."""
    config = MegaTransformerConfig.from_name("gpt2_small").with_overrides(["n_layers=2"])
    model = build_model(config)
    n = model.num_parameters() - model.embedding.positions.weight.numel()
    expected = 6 * n + 12 * config.n_layers * config.n_heads * config.d_queries * 1024
    assert model.flops_per_token(1024) == expected
