"""Decoding on the static KV cache (model/transformer/static_cache.py) and its torch.compile'd step give the tokens
of the default growing-cache path, for every attention variant; what cannot use it is refused clearly."""

import pytest
import torch

from megatransformer_utils import MegaTransformerConfig
from model import build_model

SMALL = ["vocab_size=300", "hidden_size=64", "n_layers=2", "n_heads=4", "intermediate_size=96", "bos_token_id=null",
         "eos_token_id=null", "pad_token_id=null", "max_position_embeddings=64"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the CUDA ids are gpu_check.sh's `-k cuda`
VARIANTS = {
    "gqa_rotary": ("tiny", ["n_query_groups=2"]),
    "mqa_partial_rotary": ("tiny", ["n_query_groups=1", "rotary_dim=8"]),
    "alibi": ("tiny", ["use_rotary_embedding=false", "use_alibi_bias=true"]),
    "sliding_window": ("tiny", ["sliding_window=5"]),
    "gpt2_learned_positions": ("gpt2_small", []),
    "moe": ("moe_small", ["n_query_groups=2"]),
}


def small_model(name: str, overrides: list) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MegaTransformerConfig.from_name(name).with_overrides(SMALL + overrides)).eval()


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 9, 8 and 6 tokens, left-padded to (3, 9)."""
    ids = torch.randint(1, 300, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :1] = 0
    mask[2, :3] = 0
    return ids, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_cache_greedy_tokens_equal_the_growing_cache(variant):
    model = small_model(*VARIANTS[variant])
    ids, mask = padded_prompts()
    # eos = the token that row 0 produces third, so one row finishes early and is padded
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    eos = int(reference[0, 9 + 2])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0,
                            static_cache=True)
    assert torch.equal(static, expected)
    assert (expected[0, 12:] == 0).all()  # row 0 did finish: the comparison covers finished rows


def test_static_cache_sampling_equals_the_growing_cache():
    model = small_model("tiny", ["n_query_groups=2"])
    ids, mask = padded_prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=40, top_p=0.9,
                  repetition_penalty=1.2)
    expected = model.generate(ids, generator=torch.Generator().manual_seed(3), **kwargs)
    static = model.generate(ids, generator=torch.Generator().manual_seed(3), static_cache=True, **kwargs)
    assert torch.equal(static, expected)


def test_static_cache_is_reused_and_stale_slots_do_not_leak():
    """A second call of the same shapes reuses the buffers that the first one filled: its tokens must not
    depend on what they held."""
    model = small_model("tiny", ["n_query_groups=2"])
    ids, mask = padded_prompts()
    other = torch.randint(1, 300, (3, 9), generator=torch.Generator().manual_seed(2))
    model.generate(other, max_new_tokens=12, static_cache=True)
    again = model.generate(ids, attention_mask=mask, max_new_tokens=12, static_cache=True)
    assert torch.equal(again, model.generate(ids, attention_mask=mask, max_new_tokens=12))


def test_static_cache_refusals():
    recurrent = build_model(MegaTransformerConfig.from_name("recurrent_tiny").with_overrides(["vocab_size=300"]))
    with pytest.raises(ValueError, match="decode_step"):
        recurrent.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2, compile=True)
    gpt2 = small_model("gpt2_small", [])  # 64 learned positions
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        gpt2.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=8, static_cache=True)


# Compiling the decode step with Inductor takes ~10 s with a warm Inductor cache and 1-2 minutes cold on
# 2 CPU cores (gcc builds the kernels), hence one compiled test on a model with GQA, rotary and padding.
@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [3, 1])
def test_compiled_decode_step_gives_the_same_tokens(rows, device):
    """rows=1: one prompt, where every step's (1, 1) position ids must keep the same strides or each step would
    recompile (12 steps pass dynamo's limit of 8 recompilations, a hard error under fullgraph). On CUDA the step
    runs as CUDA graphs ("reduce-overhead"), writing into the static cache's fixed buffers."""
    model = small_model("tiny", ["n_query_groups=2"]).to(device)
    ids, mask = padded_prompts()
    ids, mask = ids[-rows:].to(device), mask[-rows:].to(device)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    torch._dynamo.reset()
    for _ in range(2):  # the second call runs the compiled step of the first
        compiled = model.generate(ids, attention_mask=mask, max_new_tokens=12, compile=True)
        assert torch.equal(compiled, expected)
