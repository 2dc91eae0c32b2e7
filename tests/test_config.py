"""MegaTransformerConfig: loading named YAML files, `extends`, overrides, round trips and validation."""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from megatransformer_utils import CONFIG_DIR, MegaTransformerConfig
from model import build_model

# the YAML files of MegaTransformerConfig's families (the other families' configs are tested with their models)
ALL_YAML = sorted(path for family in MegaTransformerConfig.FAMILIES for path in (CONFIG_DIR / family).glob("*.yaml"))
DERIVED = ("n_query_groups", "d_queries", "d_values", "rotary_dim")


def raw_yaml(path: Path) -> dict:
    """The mapping written in a YAML file, before `extends` and defaults."""
    return yaml.safe_load(path.read_text()) or {}


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def small(**fields) -> MegaTransformerConfig:
    """A small valid config with `fields` changed (built directly, so every check runs on it)."""
    base = dict(vocab_size=128, max_position_embeddings=64, hidden_size=64, n_layers=2, n_heads=4,
                intermediate_size=96)
    return MegaTransformerConfig(**{**base, **fields})


# ----- every named config -----

def test_configs_exist():
    assert {p.stem for p in ALL_YAML} >= {"gpt2_small", "gpt2_medium", "alibi_small", "modern_small",
                                          "modern_medium", "moe_small", "tiny"}


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.stem)
def test_named_config_loads_and_resolves(path):
    config = MegaTransformerConfig.from_name(path.stem)
    assert config.name == path.stem
    for key, value in raw_yaml(path).items():
        if key != "extends":
            assert getattr(config, key) == value, key
    assert None not in (config.n_query_groups, config.d_queries, config.d_values)
    assert (config.rotary_dim is not None) == config.use_rotary_embedding
    assert config.n_heads % config.n_query_groups == 0


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.stem)
def test_named_config_round_trips(path, tmp_path):
    config = MegaTransformerConfig.from_name(path.stem)
    assert MegaTransformerConfig.from_dict(config.to_dict()) == config

    saved = tmp_path / "run" / "config.yaml"
    config.to_yaml(saved)
    assert MegaTransformerConfig.from_yaml(saved) == config
    written = raw_yaml(saved)
    assert "extends" not in written
    assert written == config.to_dict(), "the saved YAML must hold every resolved field"
    for key in ("n_query_groups", "d_queries", "d_values"):
        assert isinstance(written[key], int), key
    if config.use_rotary_embedding:
        assert isinstance(written["rotary_dim"], int)


def test_non_default_values_round_trip(tmp_path):
    config = small(n_query_groups=2, d_queries=24, d_values=8, rotary_dim=12, rotary_base=5e5, norm_eps=1e-6,
                   sliding_window=16, ffn_type="moe", n_experts=4, n_experts_per_token=1, pad_token_id=0,
                   name="custom")
    config.to_yaml(tmp_path / "c.yaml")
    assert MegaTransformerConfig.from_yaml(tmp_path / "c.yaml") == config
    assert MegaTransformerConfig.from_dict(config.to_dict()) == config


def test_from_name_accepts_a_yaml_path(tmp_path):
    path = write_yaml(tmp_path / "mine.yaml", "hidden_size: 64\nn_heads: 4\n")
    config = MegaTransformerConfig.from_name(str(path))
    assert (config.name, config.hidden_size, config.d_queries) == ("mine", 64, 16)


def test_yaml_floats_in_exponent_notation(tmp_path):
    """PyYAML reads `5e5` and `1e-6` as strings (YAML 1.1); configs must read them as floats."""
    path = write_yaml(tmp_path / "f.yaml", "rotary_base: 5e5\nnorm_eps: 1e-6\ninitializer_range: 2E-2\n")
    config = MegaTransformerConfig.from_yaml(path)
    assert (config.rotary_base, config.norm_eps, config.initializer_range) == (5e5, 1e-6, 0.02)


def test_integer_for_float_field_becomes_float():
    config = MegaTransformerConfig.from_dict({"rotary_base": 500000})
    assert config.rotary_base == 500000.0 and type(config.rotary_base) is float


# ----- extends -----

@pytest.mark.parametrize("path", [p for p in ALL_YAML if "extends" in raw_yaml(p)], ids=lambda p: p.stem)
def test_extends_inherits_unset_fields(path):
    """A child equals its parent except for the keys it writes itself (and the fields derived from them)."""
    own = raw_yaml(path)
    child = MegaTransformerConfig.from_name(path.stem)
    parent = MegaTransformerConfig.from_name(own["extends"])
    for field in MegaTransformerConfig.field_names():
        if field in own or field in DERIVED or field == "name":
            continue
        assert getattr(child, field) == getattr(parent, field), field
    assert child.name == path.stem != parent.name


def test_gpt2_medium_extends_gpt2_small():
    small_config = MegaTransformerConfig.from_name("gpt2_small")
    medium = MegaTransformerConfig.from_name("gpt2_medium")
    assert (medium.hidden_size, medium.n_layers, medium.n_heads, medium.intermediate_size) == (1024, 24, 16, 4096)
    assert medium.n_query_groups == 16, "n_query_groups is re-derived from the child's n_heads, not inherited"
    assert medium.d_queries == medium.d_values == 64
    for field in ("use_qkv_bias", "use_positional_embedding", "tie_word_embeddings", "norm_type",
                  "intermediate_activation", "vocab_size", "bos_token_id"):
        assert getattr(medium, field) == getattr(small_config, field), field
    assert medium.use_rotary_embedding is False and medium.rotary_dim is None


def test_extends_chain_by_file_name(tmp_path):
    write_yaml(tmp_path / "c.yaml", "name: base\nvocab_size: 100\nhidden_size: 64\nn_heads: 4\nn_layers: 3\n")
    write_yaml(tmp_path / "b.yaml", "extends: c.yaml\nn_layers: 2\nnorm_type: layernorm\n")
    write_yaml(tmp_path / "a.yaml", "extends: b.yaml\nvocab_size: 200\n")
    config = MegaTransformerConfig.from_yaml(tmp_path / "a.yaml")
    assert config.name == "a", "the name comes from the file loaded, not from a parent"
    assert (config.vocab_size, config.n_layers, config.hidden_size, config.norm_type) == (200, 2, 64, "layernorm")
    assert config.d_queries == 16


def test_extends_registry_name_from_another_directory(tmp_path):
    path = write_yaml(tmp_path / "deeper.yaml", "extends: tiny\nn_layers: 6\n")
    config = MegaTransformerConfig.from_yaml(path)
    tiny = MegaTransformerConfig.from_name("tiny")
    assert config == dataclasses.replace(tiny, name="deeper", n_layers=6)


# YAML files that must not load: {case: ({path: text}, the file loaded, the error it must raise)}
BAD_YAML_FILES = {
    "extends_cycle": ({"a.yaml": "extends: b.yaml\nn_layers: 2\n", "b.yaml": "extends: a.yaml\nn_layers: 3\n"},
                      "a.yaml", r"extends itself.*a\.yaml -> .*b\.yaml -> .*a\.yaml"),
    "extends_self": ({"a.yaml": "extends: a.yaml\n"}, "a.yaml", "extends itself"),
    # `../dir/b.yaml` names the same file each time round; the cycle must still be caught
    "extends_cycle_through_unnormalised_paths": ({"dir/a.yaml": "extends: ../dir/b.yaml\n",
                                                  "dir/b.yaml": "extends: ../dir/a.yaml\n"},
                                                 "dir/a.yaml", "extends itself"),
    "extends_missing_parent_file": ({"a.yaml": "extends: missing.yaml\n"}, "a.yaml",
                                    r"missing\.yaml does not exist \(extended by .*a\.yaml\)"),
    "extends_unknown_name_suggests": ({"a.yaml": "extends: gpt2_smal\n"}, "a.yaml",
                                      "unknown config name 'gpt2_smal'.*did you mean gpt2_small"),
    "extends_must_be_a_string": ({"a.yaml": "extends: [tiny]\n"}, "a.yaml",
                                 "'extends' in .*a.yaml must be a config name"),
    "unknown_key": ({"typo.yaml": "hidden_size: 64\nintermediate_sise: 128\n"}, "typo.yaml",
                    r"unknown config key 'intermediate_sise'; did you mean intermediate_size"),
    "not_a_mapping": ({"list.yaml": "- n_layers\n- 2\n"}, "list.yaml", r"list\.yaml must hold a mapping"),
    "invalid_yaml": ({"broken.yaml": "n_layers: [2\n"}, "broken.yaml", r"broken\.yaml is not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD_YAML_FILES))
def test_bad_yaml_file_is_a_clear_error(case, tmp_path):
    files, loaded, message = BAD_YAML_FILES[case]
    for name, text in files.items():
        write_yaml(tmp_path / name, text)
    with pytest.raises(ValueError, match=message):
        MegaTransformerConfig.from_yaml(tmp_path / loaded)


# ----- with_overrides -----

def test_overrides_are_typed_by_field():
    base = MegaTransformerConfig.from_name("modern_small")
    config = base.with_overrides(["n_layers=4", "rotary_base=5e5", "tie_word_embeddings=false", "ffn_type=moe",
                                  "norm_eps=1e-6", "sliding_window=128", "name=2024"])
    assert config.n_layers == 4 and type(config.n_layers) is int
    assert config.rotary_base == 5e5 and type(config.rotary_base) is float
    assert config.tie_word_embeddings is False
    assert config.ffn_type == "moe"
    assert config.norm_eps == 1e-6
    assert config.sliding_window == 128
    assert config.name == "2024", "a string field keeps the text as written"
    assert base.n_layers == 12 and base.ffn_type == "mlp", "with_overrides must not change the original"


def test_override_to_null_and_integer_for_float():
    config = small(sliding_window=8).with_overrides(["sliding_window=null", "rotary_base=20000"])
    assert config.sliding_window is None
    assert config.rotary_base == 20000.0 and type(config.rotary_base) is float


def test_override_n_heads_rederives_head_sizes():
    config = MegaTransformerConfig.from_name("gpt2_small").with_overrides(["n_heads=16"])
    assert (config.n_query_groups, config.d_queries, config.d_values) == (16, 48, 48)


def test_override_n_heads_keeps_explicit_d_queries():
    config = MegaTransformerConfig.from_name("gpt2_small").with_overrides(["n_heads=16", "d_queries=32"])
    assert (config.n_query_groups, config.d_queries, config.d_values) == (16, 32, 32)


def test_override_hidden_size_rederives_head_and_rotary_sizes():
    config = MegaTransformerConfig.from_name("modern_small").with_overrides(["hidden_size=384"])
    assert (config.d_queries, config.d_values, config.rotary_dim) == (32, 32, 32)
    assert config.n_query_groups == 4, "n_query_groups depends on n_heads only, so GQA survives"


def test_override_unrelated_key_keeps_derived_values():
    base = small(n_query_groups=2, d_queries=24, d_values=8, rotary_dim=12)
    config = base.with_overrides(["n_layers=3"])
    assert (config.n_query_groups, config.d_queries, config.d_values, config.rotary_dim) == (2, 24, 8, 12)


def test_override_rotary_switch_resolves_rotary_dim():
    gpt2 = MegaTransformerConfig.from_name("gpt2_small")
    with_rope = gpt2.with_overrides(["use_positional_embedding=false", "use_rotary_embedding=true"])
    assert with_rope.rotary_dim == 64
    without_rope = MegaTransformerConfig.from_name("modern_small").with_overrides(
        ["use_rotary_embedding=false", "use_alibi_bias=true"])
    assert without_rope.rotary_dim is None


@pytest.mark.parametrize("assignment", ["bad", "=4", " = 4"])
def test_override_without_key_value_form(assignment):
    with pytest.raises(ValueError, match=r"must look like KEY=VALUE"):
        small().with_overrides([assignment])


def test_override_unknown_key_suggests_closest():
    with pytest.raises(ValueError, match=r"unknown config key 'n_layer'; did you mean n_layers\b"):
        small().with_overrides(["n_layer=3"])


def test_override_wrong_type():
    with pytest.raises(ValueError, match=r"'n_layers' must be int, got 'four'"):
        small().with_overrides(["n_layers=four"])
    with pytest.raises(ValueError, match=r"'n_layers' must be int, got 4.5"):
        small().with_overrides(["n_layers=4.5"])


def test_override_invalid_yaml_value():
    with pytest.raises(ValueError, match=r"override n_layers=\[: the value is not valid YAML"):
        small().with_overrides(["n_layers=["])


def test_override_runs_full_validation():
    with pytest.raises(ValueError, match="n_experts_per_token=3 must be at most n_experts=2"):
        small().with_overrides(["ffn_type=moe", "n_experts=2", "n_experts_per_token=3"])


# ----- errors -----

def test_unknown_key_in_dict():
    with pytest.raises(ValueError, match=r"unknown config key 'hiden_size'; did you mean hidden_size"):
        MegaTransformerConfig.from_dict({"hiden_size": 64})


def test_every_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"'n_layer'.*n_layers.*'num_heads'.*n_heads"):
        MegaTransformerConfig.from_dict({"n_layer": 2, "num_heads": 4})


def test_unknown_non_string_key():
    with pytest.raises(ValueError, match="unknown config key '7'"):
        MegaTransformerConfig.from_dict({7: 1})


def test_from_dict_needs_a_mapping():
    with pytest.raises(ValueError, match="must be a mapping"):
        MegaTransformerConfig.from_dict([("n_layers", 2)])


@pytest.mark.parametrize("key, value, wanted", [
    ("n_layers", "4", "int"),
    ("n_layers", 4.5, "int"),
    ("n_layers", None, "int"),
    ("use_qkv_bias", 1, "bool"),
    ("use_qkv_bias", "true", "bool"),
    ("hidden_size", True, "int"),
    ("rotary_base", "fast", "float"),
    ("rotary_base", False, "float"),
    ("ffn_type", 1, "str"),
    ("name", 3, "str or null"),
    ("sliding_window", 1.5, "int or null"),
    ("d_queries", "16", "int or null"),
])
def test_wrong_types(key, value, wanted):
    with pytest.raises(ValueError, match=rf"config key '{key}' must be {wanted}, got "):
        MegaTransformerConfig.from_dict({key: value})


@pytest.mark.parametrize("fields, message", [
    (dict(n_heads=12, hidden_size=768, n_query_groups=5),
     r"n_heads=12 must be divisible by n_query_groups=5 \(valid n_query_groups: 1, 2, 3, 4, 6, 12\)"),
    (dict(n_query_groups=8), r"n_heads=4 must be divisible by n_query_groups=8 \(valid n_query_groups: 1, 2, 4\)"),
    (dict(use_alibi_bias=True), "use_rotary_embedding and use_alibi_bias cannot both be true"),
    (dict(use_positional_embedding=True, use_sinusoidal_embedding=True),
     "use_positional_embedding .* and use_sinusoidal_embedding cannot both be true"),
    (dict(ffn_type="moe", n_experts=4, n_experts_per_token=5), "n_experts_per_token=5 must be at most n_experts=4"),
    (dict(rotary_dim=7), r"rotary_dim=7 must be even and between 2 and d_queries=16"),
    (dict(rotary_dim=32), r"rotary_dim=32 must be even and between 2 and d_queries=16"),
    (dict(rotary_dim=0), r"rotary_dim=0 must be even"),
    (dict(use_rotary_embedding=False, rotary_dim=8), "rotary_dim is set but use_rotary_embedding is false"),
    (dict(hidden_size=100, n_heads=12), r"hidden_size=100 is not divisible by n_heads=12: set d_queries"),
    (dict(ffn_type="dense"), r"'ffn_type' must be one of mlp, moe, got 'dense'"),
    (dict(norm_type="batchnorm"), r"'norm_type' must be one of layernorm, rmsnorm, got 'batchnorm'"),
    (dict(intermediate_activation="tanh"), r"'intermediate_activation' must be one of gelu, gelu_tanh, relu, .*swiglu"),
    (dict(model_family="encoder"), r"'model_family' must be one of causal"),
    (dict(bos_token_id=128), r"bos_token_id=128 must be in \[0, vocab_size=128\)"),
    (dict(eos_token_id=-1), r"eos_token_id=-1 must be in \[0, vocab_size=128\)"),
    (dict(pad_token_id=1000), r"pad_token_id=1000 must be in \[0, vocab_size=128\)"),
    (dict(n_heads=0), r"'n_heads' must be a positive integer, got 0"),
    (dict(n_layers=0), r"'n_layers' must be a positive integer, got 0"),
    (dict(vocab_size=-5), r"'vocab_size' must be a positive integer"),
    (dict(n_query_groups=0), r"'n_query_groups' must be a positive integer"),
    (dict(attention_dropout=1.0), r"'attention_dropout' must be in \[0, 1\)"),
    (dict(hidden_dropout=-0.1), r"'hidden_dropout' must be in \[0, 1\)"),
    (dict(norm_eps=0.0), r"'norm_eps' must be positive"),
    (dict(ffn_type="moe", use_ffn_bias=True), "use_ffn_bias is not supported with ffn_type=moe"),
    (dict(sliding_window=0), "sliding_window must be null or >= 1"),
    (dict(use_rotary_embedding=False, use_sinusoidal_embedding=True, hidden_size=63, n_heads=3),
     "use_sinusoidal_embedding needs an even hidden_size, got 63"),
])
def test_impossible_combinations(fields, message):
    with pytest.raises(ValueError, match=message):
        small(**fields)


def test_valid_edge_values_are_accepted():
    """The checks above must not reject the valid values next to the invalid ones."""
    small(n_query_groups=1)
    small(rotary_dim=2)
    small(rotary_dim=16)
    small(bos_token_id=0, eos_token_id=127, pad_token_id=127)
    small(ffn_type="moe", n_experts=4, n_experts_per_token=4)
    small(use_rotary_embedding=False, use_alibi_bias=True)
    small(use_rotary_embedding=False, use_sinusoidal_embedding=True)
    small(hidden_size=100, n_heads=12, d_queries=8)


def test_unknown_config_name_suggests():
    with pytest.raises(ValueError, match=r"unknown config name 'gpt3_small': did you mean gpt2_small.*available: .*tiny"):
        MegaTransformerConfig.from_name("gpt3_small")


def test_missing_yaml_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=r"nope\.yaml does not exist"):
        MegaTransformerConfig.from_name(str(missing))
    with pytest.raises(ValueError, match=r"nope\.yaml does not exist"):
        MegaTransformerConfig.from_yaml(missing)


# ----- head sizes independent of hidden_size -----

@pytest.mark.parametrize("n_query_groups", [4, 2, 1])
def test_head_sizes_independent_of_hidden_size(n_query_groups):
    config = small(n_query_groups=n_query_groups, d_queries=24, d_values=8)
    assert (config.d_queries, config.d_values, config.rotary_dim) == (24, 8, 24)
    torch.manual_seed(0)
    model = build_model(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 10))
    out = model(input_ids, labels=input_ids)
    assert out.logits.shape == (2, 10, config.vocab_size)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


def test_odd_head_size_asks_for_an_even_rotary_dim():
    with pytest.raises(ValueError, match=r"rotary_dim=15 must be even .*odd d_queries, set an even rotary_dim"):
        small(hidden_size=60, n_heads=4)
    assert small(hidden_size=60, n_heads=4, rotary_dim=14).rotary_dim == 14


def test_name_in_two_families_is_ambiguous(tmp_path, monkeypatch):
    import megatransformer_utils

    write_yaml(tmp_path / "causal" / "twin.yaml", "n_layers: 2\n")
    write_yaml(tmp_path / "recurrent" / "twin.yaml", "n_layers: 3\n")
    write_yaml(tmp_path / "causal" / "single.yaml", "n_layers: 4\n")
    monkeypatch.setattr(megatransformer_utils, "CONFIG_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"config name 'twin' is ambiguous: .*causal/twin\.yaml, .*recurrent/twin\.yaml"):
        MegaTransformerConfig.from_name("twin")
    assert MegaTransformerConfig.from_name("single").n_layers == 4
    assert MegaTransformerConfig.from_name(str(tmp_path / "recurrent" / "twin.yaml")).n_layers == 3
