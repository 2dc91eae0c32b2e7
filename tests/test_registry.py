"""The causal-LM registry: every named config builds, trains one step, has the expected size, and saves/loads."""

import pytest
import torch
import torch.nn.functional as F

from megatransformer_utils import MegaTransformerConfig
from model import build_model, load_pretrained, save_pretrained
from model.megatransformer_causal import MegaTransformerCausalLM, lookup

SMALL_VOCAB = 256
SMALL_SIZES = {"hidden_size": 64, "n_layers": 2, "n_heads": 4, "intermediate_size": 96,
               "vocab_size": SMALL_VOCAB, "max_position_embeddings": 64}
TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id")
MOE_NAMES = [name for name in sorted(lookup) if MegaTransformerConfig.from_name(name).ffn_type == "moe"]


def shrink(config: MegaTransformerConfig) -> MegaTransformerConfig:
    """The same architecture at toy size: MHA stays MHA, GQA stays GQA, MQA stays MQA;
    head sizes are re-derived and special token ids are moved into the small vocabulary."""
    if config.n_query_groups == config.n_heads:
        groups = SMALL_SIZES["n_heads"]
    elif config.n_query_groups == 1:
        groups = 1
    else:
        groups = 2
    overrides = [f"{key}={value}" for key, value in SMALL_SIZES.items()]
    overrides += [f"n_query_groups={groups}", "d_queries=null", "d_values=null"]
    for key in TOKEN_KEYS:
        token = getattr(config, key)
        if token is not None and token >= SMALL_VOCAB:
            overrides.append(f"{key}={SMALL_VOCAB - 1}")
    return config.with_overrides(overrides)


def small_model(name: str, seed: int = 0) -> MegaTransformerCausalLM:
    torch.manual_seed(seed)
    return build_model(shrink(MegaTransformerConfig.from_name(name)))


def random_batch(config: MegaTransformerConfig, batch: int = 2, length: int = 16, seed: int = 1):
    """input_ids (B, T) and labels (B, T) with the first two labels of row 0 ignored (-100)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
    labels = input_ids.clone()
    labels[0, :2] = -100
    return input_ids, labels


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) at t against labels (B, T) at t + 1, -100 ignored."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def expected_parameters(c: MegaTransformerConfig, active_only: bool = False) -> int:
    """Parameter count worked out from the config alone (an independent check of the model code)."""
    H, I = c.hidden_size, c.intermediate_size
    norm = 2 * H if c.norm_type == "layernorm" else H
    q, k, v = c.n_heads * c.d_queries, c.n_query_groups * c.d_queries, c.n_query_groups * c.d_values
    attention = H * (q + k + v) + c.n_heads * c.d_values * H
    attention += (q + k + v) * c.use_qkv_bias + H * c.use_attn_output_bias
    width = I * (2 if c.intermediate_activation in ("swiglu", "geglu", "reglu") else 1)
    expert = H * width + I * H
    if c.ffn_type == "moe":
        ffn = H * c.n_experts + expert * (c.n_experts_per_token if active_only else c.n_experts)
    else:
        ffn = expert + (width + H) * c.use_ffn_bias
    block_norms = sum((c.pre_attn_norm, c.post_attn_norm, c.pre_ffn_norm, c.post_ffn_norm))
    blocks = c.n_layers * (attention + ffn + block_norms * norm)
    embeddings = c.vocab_size * H + c.max_position_embeddings * H * c.use_positional_embedding
    head = 0 if c.tie_word_embeddings else c.vocab_size * H
    return embeddings + blocks + norm * c.use_final_norm + head


def full_size_model(name: str) -> MegaTransformerCausalLM:
    """The full-size model on the meta device: real shapes, no memory, no initialisation cost."""
    with torch.device("meta"):
        return build_model(MegaTransformerConfig.from_name(name))


# ----- every registry name -----

def test_registry_names_every_causal_yaml():
    assert set(lookup) >= {"gpt2_small", "gpt2_medium", "alibi_small", "modern_small", "modern_medium",
                           "moe_small", "tiny"}
    for name, config in lookup.items():
        assert lookup.path(name).is_file() and lookup.path(name).stem == name
        assert config.name == name and config.model_family == "causal"


@pytest.mark.parametrize("name", sorted(lookup))
def test_shrink_keeps_the_architecture(name):
    original = MegaTransformerConfig.from_name(name)
    shrunk = shrink(original)
    changed = set(SMALL_SIZES) | {"n_query_groups", "d_queries", "d_values", "rotary_dim", *TOKEN_KEYS}
    for field in MegaTransformerConfig.field_names():
        if field not in changed:
            assert getattr(shrunk, field) == getattr(original, field), field
    is_mha, is_mqa = original.n_query_groups == original.n_heads, original.n_query_groups == 1
    assert (shrunk.n_query_groups == shrunk.n_heads) == is_mha
    assert (shrunk.n_query_groups == 1) == is_mqa
    assert shrunk.d_queries == shrunk.d_values == 16


@pytest.mark.parametrize("name", sorted(lookup))
def test_forward_backward(name):
    model = small_model(name).train()
    config = model.config
    input_ids, labels = random_batch(config)
    out = model(input_ids, labels=labels)

    assert out.logits.shape == (*input_ids.shape, config.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # An untrained model should be close to uniform over the vocabulary.
    assert abs(out.loss.item() - torch.log(torch.tensor(float(config.vocab_size))).item()) < 1.0
    if config.ffn_type == "moe":
        assert out.aux_loss > 0
    else:
        assert out.aux_loss == 0
    torch.testing.assert_close(out.loss, next_token_loss(out.logits, labels) + out.aux_loss)

    out.loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} has an all-zero gradient"


@pytest.mark.parametrize("name", MOE_NAMES)
def test_router_learns_from_the_language_model_loss(name):
    """The router gets a gradient through the expert mixing weights, not only from the aux losses."""
    model = small_model(name).train()
    input_ids, labels = random_batch(model.config)
    next_token_loss(model(input_ids).logits, labels).backward()
    for block in model.blocks:
        assert block.ffn.router.weight.grad is not None and block.ffn.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(lookup))
def test_parameter_count_matches_config(name):
    model = full_size_model(name)
    assert model.num_parameters() == expected_parameters(model.config)
    assert model.num_parameters(active_only=True) == expected_parameters(model.config, active_only=True)


@pytest.mark.parametrize("name, total", [
    ("gpt2_small", 124_439_808),   # Hugging Face GPT2LMHeadModel("gpt2")
    ("gpt2_medium", 354_823_168),  # Hugging Face GPT2LMHeadModel("gpt2-medium")
])
def test_gpt2_sizes_match_the_reference(name, total):
    assert full_size_model(name).num_parameters() == total


@pytest.mark.parametrize("name, low, high", [
    ("alibi_small", 120e6, 126e6),
    ("modern_small", 110e6, 130e6),
    ("modern_medium", 320e6, 360e6),
    ("tiny", 1e6, 3e6),
])
def test_dense_sizes_are_in_range(name, low, high):
    model = full_size_model(name)
    assert low <= model.num_parameters() <= high
    assert model.num_parameters(active_only=True) == model.num_parameters()


def test_moe_small_active_and_total_sizes():
    model = full_size_model("moe_small")
    total, active = model.num_parameters(), model.num_parameters(active_only=True)
    assert 280e6 <= total <= 310e6
    assert 115e6 <= active <= 135e6
    dense = full_size_model("modern_small").num_parameters()
    assert abs(active - dense) / dense < 0.01, "top-2 of 8 half-width experts ≈ the dense modern_small FFN"


def test_exclude_embeddings():
    tied, untied = full_size_model("gpt2_small"), full_size_model("modern_small")
    assert tied.num_parameters(exclude_embeddings=True) == 124_439_808 - 50257 * 768 - 1024 * 768
    assert untied.num_parameters(exclude_embeddings=True) == untied.num_parameters() - 32000 * 768


# ----- save_pretrained / load_pretrained -----

def logits_of(model: MegaTransformerCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids).logits


@pytest.mark.parametrize("name", ["tiny", "gpt2_small", "moe_small"])
def test_save_load_round_trip(name, tmp_path):
    model = small_model(name)
    input_ids, _ = random_batch(model.config)
    save_pretrained(model, tmp_path / "checkpoint")
    loaded = load_pretrained(tmp_path / "checkpoint")

    assert loaded.config == model.config
    assert not loaded.training
    torch.testing.assert_close(logits_of(loaded, input_ids), logits_of(model, input_ids), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"], "no staging directory may be left"


def test_tied_model_stays_tied(tmp_path):
    model = small_model("gpt2_small")
    assert model.config.tie_word_embeddings
    save_pretrained(model, tmp_path / "tied")
    loaded = load_pretrained(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.embedding.tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.embedding.tokens.weight, rtol=0, atol=0)
    assert loaded.num_parameters() == model.num_parameters()


def test_untied_model_loads_its_own_head(tmp_path):
    model = small_model("tiny")
    assert not model.config.tie_word_embeddings
    save_pretrained(model, tmp_path / "untied")
    loaded = load_pretrained(tmp_path / "untied")
    assert loaded.lm_head.weight is not loaded.embedding.tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_save_replaces_an_existing_checkpoint(tmp_path):
    first, second = small_model("tiny", seed=0), small_model("tiny", seed=1)
    input_ids, _ = random_batch(first.config)
    save_pretrained(first, tmp_path / "checkpoint")
    save_pretrained(second, tmp_path / "checkpoint")
    loaded = load_pretrained(tmp_path / "checkpoint")
    torch.testing.assert_close(logits_of(loaded, input_ids), logits_of(second, input_ids), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_load_with_dtype(tmp_path):
    model = small_model("gpt2_small")
    save_pretrained(model, tmp_path / "checkpoint")
    loaded = load_pretrained(tmp_path / "checkpoint", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.lm_head.weight is loaded.embedding.tokens.weight


def test_load_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.yaml not found: a checkpoint directory holds config\.yaml "
                                                r"and model\.safetensors .*save_pretrained"):
        load_pretrained(tmp_path / "empty")


def test_load_missing_weights(tmp_path):
    small_model("tiny").config.to_yaml(tmp_path / "half" / "config.yaml")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors not found"):
        load_pretrained(tmp_path / "half")


def test_load_weights_that_do_not_match_the_config(tmp_path):
    model = small_model("tiny")
    save_pretrained(model, tmp_path / "checkpoint")
    model.config.with_overrides(["n_layers=3"]).to_yaml(tmp_path / "checkpoint" / "config.yaml")
    with pytest.raises(ValueError, match=r"model\.safetensors does not match .*missing \['blocks\.2\."):
        load_pretrained(tmp_path / "checkpoint")
