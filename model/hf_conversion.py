"""Convert Hugging Face causal LMs (GPT-2, Llama, Mistral, Mixtral) into MegaTransformerCausalLM.

The Hugging Face model is loaded with transformers itself (so every on-disk layout it reads works);
its config becomes a MegaTransformerConfig and its weights are renamed, transposed (GPT-2's Conv1D)
or fused (q/k/v, gate/up) into ours. Options our architecture cannot reproduce raise ValueError
rather than converting into a model that computes something else.
"""

from pathlib import Path

import torch

from megatransformer_utils import MegaTransformerConfig
from model.megatransformer_causal import MegaTransformerCausalLM

SUPPORTED = ("gpt2", "llama", "mistral", "mixtral")
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                "silu": "silu", "swish": "silu"}
_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "relu": "reglu"}


def _unsupported(model_type: str, option: str, value) -> ValueError:
    return ValueError(f"cannot convert {model_type}: {option}={value!r} is not supported by MegaTransformerCausalLM")


def _special_tokens(c) -> dict:
    """pad/bos/eos ids that exist in the vocabulary (tiny test configs often keep the defaults of a bigger one)."""
    ids = {"pad_token_id": c.pad_token_id, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id}
    return {key: (value if isinstance(value, int) and 0 <= value < c.vocab_size else None) for key, value in ids.items()}


def config_from_hf(hf_config) -> MegaTransformerConfig:
    """A MegaTransformerConfig computing the same function as a transformers config of SUPPORTED types."""
    model_type = hf_config.model_type
    if model_type not in SUPPORTED:
        raise ValueError(f"cannot convert model_type '{model_type}': supported are {', '.join(SUPPORTED)}")
    if model_type == "gpt2":
        return _gpt2_config(hf_config)
    return _llama_family_config(hf_config)


def _gpt2_config(c) -> MegaTransformerConfig:
    for option, bad in (("add_cross_attention", True), ("scale_attn_by_inverse_layer_idx", True),
                        ("scale_attn_weights", False)):
        if getattr(c, option, not bad) == bad:
            raise _unsupported("gpt2", option, bad)
    if c.activation_function not in _ACTIVATIONS:
        raise _unsupported("gpt2", "activation_function", c.activation_function)
    return MegaTransformerConfig(
        name="converted_gpt2", vocab_size=c.vocab_size, max_position_embeddings=c.n_positions,
        hidden_size=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head,
        intermediate_size=c.n_inner or 4 * c.n_embd, use_qkv_bias=True, use_attn_output_bias=True,
        use_ffn_bias=True, use_positional_embedding=True, use_rotary_embedding=False, ffn_type="mlp",
        intermediate_activation=_ACTIVATIONS[c.activation_function], norm_type="layernorm",
        norm_eps=c.layer_norm_epsilon, tie_word_embeddings=c.tie_word_embeddings,
        attention_dropout=c.attn_pdrop, hidden_dropout=c.resid_pdrop, initializer_range=c.initializer_range,
        **_special_tokens(c),
    )


def _llama_family_config(c) -> MegaTransformerConfig:
    model_type = c.model_type
    rope = dict(c.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise _unsupported(model_type, "rope_parameters.rope_type", rope.get("rope_type"))
    if c.hidden_act not in _GATED:
        raise _unsupported(model_type, "hidden_act", c.hidden_act)
    if getattr(c, "mlp_bias", False):
        raise _unsupported(model_type, "mlp_bias", True)
    if getattr(c, "router_jitter_noise", 0.0):
        raise _unsupported(model_type, "router_jitter_noise", c.router_jitter_noise)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    sliding_window = getattr(c, "sliding_window", None)
    is_moe = model_type == "mixtral"
    return MegaTransformerConfig(
        name=f"converted_{model_type}", vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings,
        hidden_size=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        n_query_groups=c.num_key_value_heads, d_queries=head_dim, d_values=head_dim,
        intermediate_size=c.intermediate_size, use_qkv_bias=bool(getattr(c, "attention_bias", False)),
        use_attn_output_bias=bool(getattr(c, "attention_bias", False)), use_ffn_bias=False,
        use_rotary_embedding=True, rotary_base=float(rope.get("rope_theta", 10000.0)), rotary_dim=rotary_dim,
        sliding_window=sliding_window, attention_dropout=float(c.attention_dropout),
        ffn_type="moe" if is_moe else "mlp", intermediate_activation=_GATED[c.hidden_act],
        n_experts=c.num_local_experts if is_moe else 8, n_experts_per_token=c.num_experts_per_tok if is_moe else 2,
        moe_aux_loss_weight=float(c.router_aux_loss_coef) if is_moe else 0.01,
        moe_z_loss_weight=0.0 if is_moe else 0.001,
        norm_type="rmsnorm", norm_eps=c.rms_norm_eps, tie_word_embeddings=bool(c.tie_word_embeddings),
        initializer_range=c.initializer_range, scale_residual_init=False,
        **_special_tokens(c),
    )


def state_dict_from_hf(hf_state: dict, config: MegaTransformerConfig, model_type: str) -> dict:
    """Rename (and fuse, transpose) a transformers state dict into MegaTransformerCausalLM's names."""
    if model_type == "gpt2":
        return _gpt2_state(hf_state, config)
    return _llama_family_state(hf_state, config, model_type)


def _gpt2_state(s: dict, config: MegaTransformerConfig) -> dict:
    # GPT-2's Conv1D stores weights as (in_features, out_features): transpose into nn.Linear's layout.
    out = {"embedding.tokens.weight": s["transformer.wte.weight"],
           "embedding.positions.weight": s["transformer.wpe.weight"],
           "final_norm.weight": s["transformer.ln_f.weight"], "final_norm.bias": s["transformer.ln_f.bias"],
           "lm_head.weight": s.get("lm_head.weight", s["transformer.wte.weight"])}
    for i in range(config.n_layers):
        hf, ours = f"transformer.h.{i}.", f"blocks.{i}."
        for hf_name, our_name in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            out[ours + our_name + ".weight"] = s[hf + hf_name + ".weight"]
            out[ours + our_name + ".bias"] = s[hf + hf_name + ".bias"]
        for hf_name, our_name in (("attn.c_attn", "attn.qkv_proj"), ("attn.c_proj", "attn.o_proj"),
                                  ("mlp.c_fc", "ffn.fc_in"), ("mlp.c_proj", "ffn.fc_out")):
            out[ours + our_name + ".weight"] = s[hf + hf_name + ".weight"].t()
            out[ours + our_name + ".bias"] = s[hf + hf_name + ".bias"]
    return out


def _llama_family_state(s: dict, config: MegaTransformerConfig, model_type: str) -> dict:
    out = {"embedding.tokens.weight": s["model.embed_tokens.weight"], "final_norm.weight": s["model.norm.weight"],
           "lm_head.weight": s.get("lm_head.weight", s["model.embed_tokens.weight"])}
    for i in range(config.n_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        attn = hf + "self_attn."
        out[ours + "attn_norm.weight"] = s[hf + "input_layernorm.weight"]
        out[ours + "ffn_norm.weight"] = s[hf + "post_attention_layernorm.weight"]
        out[ours + "attn.qkv_proj.weight"] = torch.cat([s[f"{attn}{p}_proj.weight"] for p in "qkv"])
        out[ours + "attn.o_proj.weight"] = s[attn + "o_proj.weight"]
        if config.use_qkv_bias:
            out[ours + "attn.qkv_proj.bias"] = torch.cat([s[f"{attn}{p}_proj.bias"] for p in "qkv"])
            out[ours + "attn.o_proj.bias"] = s[attn + "o_proj.bias"]
        if model_type == "mixtral":
            out[ours + "ffn.router.weight"] = s[hf + "mlp.gate.weight"]
            out[ours + "ffn.experts_in"] = s[hf + "mlp.experts.gate_up_proj"]
            out[ours + "ffn.experts_out"] = s[hf + "mlp.experts.down_proj"]
        else:
            out[ours + "ffn.fc_in.weight"] = torch.cat([s[hf + "mlp.gate_proj.weight"], s[hf + "mlp.up_proj.weight"]])
            out[ours + "ffn.fc_out.weight"] = s[hf + "mlp.down_proj.weight"]
    return out


def convert_hf_model(hf_model) -> MegaTransformerCausalLM:
    """An eval-mode MegaTransformerCausalLM with the weights of a loaded transformers causal LM."""
    config = config_from_hf(hf_model.config)
    model = MegaTransformerCausalLM(config)
    state = state_dict_from_hf(hf_model.state_dict(), config, hf_model.config.model_type)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"conversion left parameters unmatched: missing {missing}, unexpected {unexpected}")
    return model.eval()


def convert_hf_checkpoint(hf_model_dir) -> MegaTransformerCausalLM:
    """Load a locally saved transformers model (in float32) and convert it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_model_dir = Path(hf_model_dir)
    if not (hf_model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_model_dir} has no config.json: pass a directory written by "
                                "transformers' save_pretrained")
    model_type = AutoConfig.from_pretrained(hf_model_dir).model_type
    if model_type not in SUPPORTED:
        raise ValueError(f"cannot convert model_type '{model_type}': supported are {', '.join(SUPPORTED)}")
    hf_model = AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32)
    return convert_hf_model(hf_model)
