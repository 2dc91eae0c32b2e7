"""Mixture-of-experts routing and losses against Mixtral's reference, and generation's logits processors
against Hugging Face's."""

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from megatransformer_utils import MegaTransformerConfig
from model import build_model
from model.generation import apply_repetition_penalty, apply_top_k, apply_top_p
from model.transformer.ffn import activate
from model.transformer.moe import MixtureOfExperts

CONFIG = MegaTransformerConfig.from_name("tiny").with_overrides(
    ["vocab_size=64", "hidden_size=32", "n_layers=2", "n_heads=4", "intermediate_size=40", "ffn_type=moe",
     "n_experts=5", "n_experts_per_token=2"])


def make_moe(seed: int = 0) -> MixtureOfExperts:
    torch.manual_seed(seed)
    moe = MixtureOfExperts(CONFIG)
    torch.nn.init.normal_(moe.experts_in, std=0.2)
    torch.nn.init.normal_(moe.experts_out, std=0.2)
    return moe


def test_dispatch_equals_per_token_loop():
    moe = make_moe()
    x = torch.randn(2, 9, 32)
    out, _ = moe(x)
    probs = moe.router(x.reshape(-1, 32)).softmax(-1)
    expected = []
    for token, p in zip(x.reshape(-1, 32), probs):
        weights, experts = p.topk(2)
        weights = weights / weights.sum()
        expected.append(sum(w * moe.experts_out[e] @ activate("swiglu", moe.experts_in[e] @ token)
                            for w, e in zip(weights, experts)))
    assert torch.allclose(out.reshape(-1, 32), torch.stack(expected), atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_load_balancing_loss_equals_mixtral(padded):
    moe = make_moe()
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[1, :4] = 0
    _, aux = moe(x, mask if padded else None)
    logits = moe.router(x.reshape(-1, 32))
    expected = load_balancing_loss_func((logits,), 5, 2, mask if padded else None)
    assert torch.allclose(aux[0], expected, atol=1e-6)
    valid = mask.reshape(-1).bool()
    assert torch.allclose(aux[1], torch.logsumexp(logits[valid], -1).square().mean(), atol=1e-6)


def test_balanced_routing_gives_load_balancing_loss_k():
    moe = make_moe()
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform router: every expert equally likely
    _, aux = moe(torch.randn(1, 10, 32))
    assert aux[0].item() == pytest.approx(2.0, rel=1e-5)


def test_moe_model_loss_includes_weighted_aux_terms():
    torch.manual_seed(0)
    model = build_model(CONFIG)
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, labels=ids)
    expected_aux = CONFIG.moe_aux_loss_weight * out.moe_losses[0] + CONFIG.moe_z_loss_weight * out.moe_losses[1]
    assert torch.allclose(out.aux_loss, expected_aux)
    assert out.aux_loss > 0
    out.loss.backward()
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0


def test_processors_equal_hugging_face():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    seen_ids = torch.randint(0, 50, (3, 12))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, seen_ids, True)
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3),
                          RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone()))
    assert torch.equal(apply_top_k(logits, 7), TopKLogitsWarper(7)(seen_ids, logits.clone()))
    for top_p in (0.05, 0.5, 0.9, 1.0):
        assert torch.equal(apply_top_p(logits, top_p).isinf(), TopPLogitsWarper(top_p)(seen_ids, logits.clone()).isinf())


def tiny_lm():
    torch.manual_seed(0)
    return build_model(CONFIG.with_overrides(["ffn_type=mlp", "eos_token_id=3", "pad_token_id=0"])).eval()


def test_eos_finishes_a_row_and_pads_it():
    model = tiny_lm()
    prompt = torch.randint(4, 64, (2, 5))
    greedy = model.generate(prompt, max_new_tokens=6)
    eos = int(greedy[0, 6])  # make row 0's second new token the end of sequence
    model.config.eos_token_id = eos
    out = model.generate(prompt, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out[0, 6] == eos and (out[0, 7:] == 0).all()
    first_eos = (greedy[1, 5:] == eos).nonzero()
    stop = 6 if len(first_eos) == 0 else int(first_eos[0]) + 1
    assert torch.equal(out[1, 5:5 + stop], greedy[1, 5:5 + stop])


def test_sampling_is_reproducible_and_varies():
    model = tiny_lm()
    prompt = torch.randint(4, 64, (1, 4))
    runs = [model.generate(prompt, max_new_tokens=20, do_sample=True, temperature=1.5, top_k=30, top_p=0.95,
                           repetition_penalty=1.2, generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_generation_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_lm().generate(torch.ones(1, 3, dtype=torch.long), **kwargs)
