"""Our causal LMs against Hugging Face: tiny random GPT-2, Llama (GQA), Mistral (sliding window) and Mixtral
models are saved locally, converted with convert_hf_checkpoint.py, and must give the same logits and the
same greedy generations (KV cache, left-padded batch)."""

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          MixtralConfig)

import convert_hf_checkpoint
from model import load_pretrained
from model.hf_conversion import convert_hf_model

VOCAB = 96
SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_SIZES = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80,
                   num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=128, **SPECIAL)

HF_CONFIGS = {
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, **SPECIAL),
    "llama_gqa": lambda: LlamaConfig(**LLAMA_SIZES, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama_mqa_tied_headdim": lambda: LlamaConfig(**{**LLAMA_SIZES, "num_key_value_heads": 1}, head_dim=24,
                                                  tie_word_embeddings=True, attention_bias=True),
    "mistral_window": lambda: MistralConfig(**LLAMA_SIZES, sliding_window=6),
    "mixtral": lambda: MixtralConfig(**LLAMA_SIZES, num_local_experts=4, num_experts_per_tok=2),
}


def make_hf_model(name: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(HF_CONFIGS[name]()).eval()
    with torch.no_grad():  # norms start at exactly 1 (and biases at 0): perturb them so a swap would show
        for param_name, param in model.named_parameters():
            if "norm" in param_name or "ln_" in param_name or param_name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def left_padded_batch():
    """Two prompts of lengths 9 and 5, left-padded: (input_ids (2, 9), attention_mask (2, 9))."""
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = SPECIAL["pad_token_id"], 0
    return ids, mask


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def converted(request, tmp_path_factory):
    """(hf_model, our model loaded from a converted checkpoint directory)."""
    hf_model = make_hf_model(request.param)
    hf_dir = tmp_path_factory.mktemp(request.param) / "hf"
    hf_model.save_pretrained(hf_dir)
    out_dir = hf_dir.parent / "ours"
    assert convert_hf_checkpoint.main(["--hf_model_dir", str(hf_dir), "--output_dir", str(out_dir)]) == 0
    return hf_model, load_pretrained(out_dir)


def test_logits_equal(converted):
    hf_model, ours = converted
    ids = torch.randint(0, VOCAB, (3, 17))
    with torch.no_grad():
        expected, actual = hf_model(ids).logits, ours(ids).logits
    assert (expected - actual).abs().max() < 1e-6  # measured: 0 (Llama family) to 9e-8 (GPT-2), logits ~0.5


def test_left_padded_logits_equal(converted):
    hf_model, ours = converted
    ids, mask = left_padded_batch()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf_model(ids, attention_mask=mask, position_ids=position_ids).logits
        actual = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (expected[real] - actual[real]).abs().max() < 1e-6


def test_greedy_generation_equal(converted):
    hf_model, ours = converted
    ids, mask = left_padded_batch()
    expected = hf_model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                 pad_token_id=SPECIAL["pad_token_id"], eos_token_id=None)
    actual = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(expected, actual)


def test_mixtral_aux_loss_equals_hf():
    """With one MoE layer our load-balancing loss is Mixtral's (HF pools several layers before multiplying)."""
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(MixtralConfig(**{**LLAMA_SIZES, "num_hidden_layers": 1},
                                                              num_local_experts=4)).eval()
    ours = convert_hf_model(hf_model)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = hf_model(ids, attention_mask=mask, output_router_logits=True).aux_loss
        actual = ours(ids, attention_mask=mask).moe_losses[0]
    assert torch.allclose(expected, actual, atol=1e-6)
    assert ours.config.moe_aux_loss_weight == hf_model.config.router_aux_loss_coef


@pytest.mark.parametrize("hf_config, message", [
    (GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
                   vocab_size=VOCAB), "model_type 'gpt_neox'"),
    (LlamaConfig(**LLAMA_SIZES, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
     "rope_type"),
    (LlamaConfig(**LLAMA_SIZES, mlp_bias=True), "mlp_bias"),
    (GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, scale_attn_by_inverse_layer_idx=True),
     "scale_attn_by_inverse_layer_idx"),
    (MixtralConfig(**LLAMA_SIZES, num_local_experts=4, router_jitter_noise=0.1), "router_jitter_noise"),
])
def test_unsupported_options_are_errors(hf_config, message):
    hf_model = AutoModelForCausalLM.from_config(hf_config)
    with pytest.raises(ValueError, match=message):
        convert_hf_model(hf_model)


def test_cli_reports_missing_directory(tmp_path, capsys):
    assert convert_hf_checkpoint.main(["--hf_model_dir", str(tmp_path / "nope"), "--output_dir",
                                       str(tmp_path / "out")]) == 1
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
