"""The recurrent-depth LM: truncated backprop, sampled depth, adaptive exit, KV-cache generation, every config."""

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch
import torch.nn.functional as F
from torch.distributions import Categorical
from torch.func import functional_call

from helpers import count_calls
from megatransformer_utils import MegaTransformerConfig
from model import build_model, load_pretrained, save_pretrained
from model.megatransformer_recurrent import MegaTransformerRecurrentLM, lookup
from model.recurrent_criteria import CRITERIA, iterate_until_exit, make_criterion

SMALL_SIZES = {"hidden_size": 64, "n_heads": 4, "n_query_groups": 2, "intermediate_size": 96, "vocab_size": 256,
               "max_position_embeddings": 64, "d_queries": None, "d_values": None}


def shrink(config: MegaTransformerConfig, **extra) -> MegaTransformerConfig:
    """The same architecture at toy size, special token ids moved into the small vocabulary."""
    overrides = {**SMALL_SIZES, **extra}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(config, key) is not None and getattr(config, key) >= 256:
            overrides[key] = 255
    return config.with_overrides([f"{k}={'null' if v is None else v}" for k, v in overrides.items()])


def tiny(seed: int = 0, **extra) -> MegaTransformerRecurrentLM:
    torch.manual_seed(seed)
    return build_model(shrink(MegaTransformerConfig.from_name("recurrent_tiny"), **extra))


def random_ids(config, batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----- truncated backprop -----

def hand_built_loss(model: MegaTransformerRecurrentLM, input_ids, num_steps: int, backprop_depth: int):
    """The model unrolled by hand: iterations before the last `backprop_depth` use detached copies of the
    parameters, of the prelude output and of their input state, so no gradient can flow through them."""
    x, inputs = model.embedding(input_ids)
    for block in model.prelude:
        x, _ = block(x, inputs)
    e = x
    state = e  # recurrent_init_state: embed
    frozen = {name: p.detach() for name, p in model.named_parameters()}

    def call(module, prefix, *args, detached):
        if not detached:
            return module(*args)
        params = {n[len(prefix) + 1:]: p for n, p in frozen.items() if n.startswith(prefix + ".")}
        return functional_call(module, params, args)

    for i in range(num_steps):
        detached = i < num_steps - backprop_depth
        if detached:
            state_in, e_in = state.detach(), e.detach()
        else:
            state_in, e_in = state, e
        h = call(model.adapter, "adapter", state_in, e_in, detached=detached)
        for j, block in enumerate(model.core):
            h, _ = call(block, f"core.{j}", h, inputs, detached=detached)
        state = call(model.core_norm, "core_norm", h, detached=detached)
    for block in model.coda:
        state, _ = block(state, inputs)
    logits = model.lm_head(model.final_norm(state))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("adapter", ["sum", "gate", "linear"])
def test_truncated_backprop_equals_hand_built_unrolling(adapter):
    model = tiny(recurrent_adapter=adapter, recurrent_init_state="embed", recurrent_backprop_depth=2).train()
    input_ids = random_ids(model.config)
    model(input_ids, labels=input_ids, num_steps=5).loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    hand_built_loss(model, input_ids, num_steps=5, backprop_depth=2).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)

    model.zero_grad()  # backpropagating through every iteration gives a different gradient
    hand_built_loss(model, input_ids, num_steps=5, backprop_depth=5).backward()
    assert not torch.allclose(ours["core.0.attn.qkv_proj.weight"], model.core[0].attn.qkv_proj.weight.grad)


def test_gradient_checkpointing_gives_the_same_gradient():
    """4 iterations, backprop depth 2 (recurrent_tiny): the prelude and coda blocks run once each and every core
    block 4 times; checkpointing runs again, in the backward pass, those that ran with autograd: the prelude, the
    coda and the core blocks of the last 2 iterations."""
    grads, calls = [], []
    for enabled in (False, True):
        model = tiny(recurrent_init_state="embed").train()
        assert model.config.recurrent_backprop_depth == 2
        model.set_gradient_checkpointing(enabled)
        input_ids = random_ids(model.config)
        blocks = [*model.prelude, *model.core, *model.coda]
        with count_calls(blocks) as counts:
            model(input_ids, labels=input_ids, num_steps=4).loss.backward()
        grads.append([p.grad for p in model.parameters()])
        calls.append(list(counts.values()))
    assert [len(model.prelude), len(model.core), len(model.coda)] == [1, 2, 1]
    assert calls == [[1, 4, 4, 1], [2, 6, 6, 2]]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ----- sampled depth -----

@pytest.mark.parametrize("mean", [4, 32])
def test_sampled_depth_has_the_configured_mean(mean):
    model = tiny(recurrent_mean_thinking_steps=mean)
    draws = torch.tensor([model.sample_num_steps(step) for step in range(4000)], dtype=torch.float)
    sigma = model.config.recurrent_thinking_steps_sigma
    rate_mean = mean - 1  # r = 1 + Poisson(λ), E[λ] = mean - 1
    std = (rate_mean + rate_mean ** 2 * (torch.exp(torch.tensor(sigma ** 2)) - 1)) ** 0.5
    assert abs(draws.mean() - mean) < 5 * std / 4000 ** 0.5
    assert draws.min() >= 1
    assert draws.std() > 0.5 * std, "the depth must vary (log-normal rate, not a fixed one)"


def test_every_rank_draws_the_same_depth():
    rank0, rank1 = tiny(seed=0), tiny(seed=1)  # different weights and torch RNG state: two ranks
    torch.manual_seed(123)
    assert [rank0.sample_num_steps(s) for s in range(50)] == [rank1.sample_num_steps(s) for s in range(50)]
    assert len({rank0.sample_num_steps(s) for s in range(50)}) > 1
    rank1.depth_seed = 7
    assert [rank0.sample_num_steps(s) for s in range(50)] != [rank1.sample_num_steps(s) for s in range(50)]

    rank0.depth_seed = rank1.depth_seed = 0
    input_ids = random_ids(rank0.config)
    for step in range(3):  # training forwards draw the depth of consecutive steps
        torch.manual_seed(step)  # each rank's own RNG differs; the depth must not
        steps0 = rank0.train()(input_ids).num_steps
        torch.manual_seed(100 + step)
        steps1 = rank1.train()(input_ids).num_steps
        assert steps0 == steps1 == rank0.sample_num_steps(step)


# ----- adaptive exit -----

THRESHOLDS = {"kl_divergence": 1e-5, "entropy_diff": 1e-5, "latent_diff": 1e-3, "argmax_stability": 3,
              "cosine": 1e-6}
MAX_STEPS = 40


def synthetic_run(name: str, converging_rows: torch.Tensor):
    """A (2, 5, 16) state; rows where converging_rows is True contract towards a fixed point
    (s ← target + (s - target) / 2), the others alternate between two unrelated states."""
    generator = torch.Generator().manual_seed(0)
    target, a, b = (torch.randn(2, 5, 16, generator=generator) for _ in range(3))
    b = 3 * b
    readout_weight = torch.randn(16, 32, generator=generator)

    def step(state, i):
        contracting = target + (state - target) / 2
        alternating = a if i % 2 == 0 else b
        return torch.where(converging_rows[:, None, None], contracting, alternating)

    criterion = make_criterion(name, THRESHOLDS[name])
    return iterate_until_exit(step, torch.zeros(2, 5, 16), MAX_STEPS, criterion, lambda s: s @ readout_weight)


def fixed_pair(seed: int = 0):
    """Two successive (state (2, 6, 8), logits (2, 6, 10)) of 12 tokens that moved by different amounts."""
    generator = torch.Generator().manual_seed(seed)
    state, logits = torch.randn(2, 6, 8, generator=generator), 3 * torch.randn(2, 6, 10, generator=generator)
    amount = torch.linspace(0.01, 2.0, 12).reshape(2, 6, 1)
    return ((state, logits), (state + amount * torch.randn(2, 6, 8, generator=generator),
                              logits + amount * torch.randn(2, 6, 10, generator=generator)))


def reference_change(name: str, previous, current) -> torch.Tensor:
    """(2, 6) float64: each criterion's measure of how much a token changed, from scipy and torch.distributions."""
    (s0, l0), (s1, l1) = previous, current
    if name == "kl_divergence":
        p, q = (torch.softmax(x.double(), -1).numpy() for x in (l0, l1))
        return torch.from_numpy(scipy.stats.entropy(p, q, axis=-1))  # KL(p_prev || p_now)
    if name == "entropy_diff":
        return (Categorical(logits=l1.double()).entropy() - Categorical(logits=l0.double()).entropy()).abs()
    if name == "latent_diff":
        return torch.from_numpy(np.linalg.norm((s1 - s0).double().numpy(), axis=-1) /
                                np.linalg.norm(s1.double().numpy(), axis=-1))
    if name == "cosine":
        return torch.tensor([[scipy.spatial.distance.cosine(a, b) for a, b in zip(row1, row0)]
                             for row1, row0 in zip(s1.double().numpy(), s0.double().numpy())])
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["kl_divergence", "entropy_diff", "latent_diff", "cosine"])
def test_criterion_formula_on_fixed_values(name):
    """With the threshold between the 6th and 7th smallest of the 12 reference measures, exactly the 6 tokens below
    it converge."""
    previous, current = fixed_pair()
    change = reference_change(name, previous, current)
    ordered = change.flatten().sort().values
    threshold = float(ordered[5] + ordered[6]) / 2
    criterion = make_criterion(name, threshold)
    assert not criterion.update(*previous).any()  # nothing to compare with yet
    converged = criterion.update(*current)
    assert torch.equal(converged, change < threshold)
    assert int(converged.sum()) == 6


def test_argmax_stability_counts_successive_unchanged_steps():
    """patience 2: a token converges once its top token has stayed the same for 2 comparisons in a row."""
    tops = torch.tensor([[0, 0, 0, 0],   # stable from the start: converged at the third call
                         [0, 1, 1, 1],   # changes once, then stable: converged at the fourth
                         [0, 1, 0, 1]])  # never stable
    criterion = make_criterion("argmax_stability", 2)
    results = [criterion.update(torch.zeros(1, 3, 4), F.one_hot(tops[None, :, i], 5).float()) for i in range(4)]
    assert torch.stack(results).squeeze(1).tolist() == [[False, False, False], [False, False, False],
                                                        [True, False, False], [True, True, False]]
    assert make_criterion("argmax_stability", 0.5).patience == 5  # below 1: the default patience


@pytest.mark.parametrize("name", CRITERIA)
def test_criterion_stops_early_on_a_converged_state(name):
    _, steps, iterations = synthetic_run(name, torch.tensor([True, True]))
    assert steps.shape == (2, 5)
    assert (steps >= 2).all() and (steps < MAX_STEPS).all()
    assert iterations == int(steps.max()) < MAX_STEPS


@pytest.mark.parametrize("name", CRITERIA)
def test_criterion_runs_to_the_maximum_when_not_converged(name):
    _, steps, iterations = synthetic_run(name, torch.tensor([False, False]))
    assert (steps == MAX_STEPS).all() and iterations == MAX_STEPS


@pytest.mark.parametrize("name", CRITERIA)
def test_steps_are_counted_per_token(name):
    state, steps, _ = synthetic_run(name, torch.tensor([True, False]))
    assert (steps[0] < MAX_STEPS).all() and (steps[1] == MAX_STEPS).all()


def test_model_reports_steps_per_token():
    model = tiny(recurrent_max_thinking_steps=12).eval()
    input_ids = random_ids(model.config)
    with torch.no_grad():
        fixed = model(input_ids, num_steps=3)
        model.config.recurrent_exit_criteria_threshold = 1e9
        early = model(input_ids, exit_criteria="latent_diff")
        model.config.recurrent_exit_criteria_threshold = 0.0
        never = model(input_ids, exit_criteria="cosine")
    assert fixed.thinking_steps.shape == input_ids.shape and (fixed.thinking_steps == 3).all()
    assert (early.thinking_steps == 2).all() and early.num_steps == 2
    assert (never.thinking_steps == 12).all() and never.num_steps == 12


def test_model_exits_each_token_where_its_latent_stops_moving():
    """The steps the model reports per token, recomputed from the states each iteration produced (the core norm's
    outputs): a token stops at the first iteration i >= 2 with ||s_i - s_(i-1)|| / ||s_i|| < threshold, else runs
    every iteration. The threshold is chosen so that tokens stop at several different depths."""
    model = tiny(recurrent_max_thinking_steps=12).eval()
    input_ids = random_ids(model.config, length=16)
    states = []
    handle = model.core_norm.register_forward_hook(lambda module, inputs, output: states.append(output.clone()))
    with torch.no_grad():
        model(input_ids, num_steps=12)
        changes = torch.stack([(b - a).norm(dim=-1) / b.norm(dim=-1) for a, b in zip(states, states[1:])])  # (11, B, T)
        threshold = float(changes[4:8].median())
        model.config.recurrent_exit_criteria_threshold = threshold
        states.clear()
        output = model(input_ids, exit_criteria="latent_diff")
    handle.remove()
    assert len(states) == output.num_steps
    expected = torch.full(input_ids.shape, output.num_steps)
    for i in range(len(states) - 1, 0, -1):  # iteration i + 1 compares s_(i+1) with s_i
        change = (states[i] - states[i - 1]).norm(dim=-1) / states[i].norm(dim=-1)
        expected = torch.where(change < threshold, i + 1, expected)
    assert torch.equal(output.thinking_steps, expected)
    assert len(set(expected.flatten().tolist())) >= 3


def test_unknown_criterion_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown exit criterion 'kl'"):
        make_criterion("kl", 0.1)


# ----- KV cache -----

@pytest.mark.parametrize("init_state", ["zero", "embed"])
def test_cached_generation_equals_full_forward(init_state):
    model = tiny(recurrent_init_state=init_state).eval()
    prompt = random_ids(model.config, length=5)
    tokens = model.generate(prompt, max_new_tokens=6, num_steps=3)
    with torch.no_grad():
        full = model(tokens, num_steps=3).logits
    assert torch.equal(full[:, 4:-1].argmax(-1), tokens[:, 5:])

    with torch.no_grad():  # the logits themselves, one token at a time
        out = model(tokens[:, :5], num_steps=3, use_cache=True)
        logits = [out.logits]
        for t in range(5, tokens.shape[1]):
            out = model(tokens[:, t:t + 1], past_key_values=out.past_key_values, num_steps=3)
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-4, atol=1e-4)


def test_cached_generation_with_left_padding():
    model = tiny(recurrent_init_state="zero").eval()
    prompt = random_ids(model.config, length=6)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    tokens = model.generate(prompt, attention_mask=mask, max_new_tokens=4, num_steps=2)
    full_mask = torch.cat((mask, torch.ones(2, 4, dtype=mask.dtype)), dim=1)
    with torch.no_grad():
        full = model(tokens, attention_mask=full_mask, num_steps=2).logits
    assert torch.equal(full[:, 5:-1].argmax(-1), tokens[:, 6:])


def test_adaptive_depth_with_a_cache_runs():
    """Steps of different depth share one cache: shallower calls are filled with their deepest step."""
    model = tiny(recurrent_init_state="zero", recurrent_max_thinking_steps=6).eval()
    prompt = random_ids(model.config, length=5)
    with torch.no_grad():
        out = model(prompt, num_steps=4, use_cache=True)
        out = model(prompt[:, :1], past_key_values=out.past_key_values, num_steps=2)
        out = model(prompt[:, :1], past_key_values=out.past_key_values, num_steps=6)
    assert len(out.past_key_values) == 7 and out.logits.shape == (2, 1, model.config.vocab_size)
    for block in model.core:
        for step in range(6):
            assert out.past_key_values.get((block.attn.layer_index, step))[0].shape[2] == 7

    model.config.recurrent_exit_criteria = "latent_diff"  # generate at the adaptive default depth
    tokens = model.generate(prompt, max_new_tokens=3)
    assert tokens.shape == (2, 8)


@pytest.mark.parametrize("fields, message", [
    (dict(n_recurrent_layers=0), "'n_recurrent_layers' must be at least 1"),
    (dict(n_coda_layers=-1), "'n_coda_layers' must not be negative"),
    (dict(recurrent_thinking_steps_sigma=-0.5), "'recurrent_thinking_steps_sigma' must not be negative"),
    (dict(recurrent_adapter="concat"), "'recurrent_adapter' must be one of sum, gate, linear"),
])
def test_invalid_recurrent_config(fields, message):
    with pytest.raises(ValueError, match=message):
        MegaTransformerConfig.from_name("recurrent_tiny").with_overrides([f"{k}={v}" for k, v in fields.items()])


def test_prelude_and_coda_may_be_empty():
    model = tiny(n_prelude_layers=0, n_coda_layers=0, recurrent_init_state="zero").eval()
    prompt = random_ids(model.config, length=4)
    tokens = model.generate(prompt, max_new_tokens=3, num_steps=2)
    with torch.no_grad():
        full = model(tokens, num_steps=2).logits
    assert torch.equal(full[:, 3:-1].argmax(-1), tokens[:, 4:])


# ----- every config -----

def test_registry_names_every_recurrent_yaml():
    assert set(lookup) >= {"recurrent_tiny", "recurrent_small", "recurrent_small_sandwich", "recurrent_medium"}
    for name in lookup:
        config = MegaTransformerConfig.from_name(name)
        assert config.model_family == "recurrent"
    small = MegaTransformerConfig.from_name("recurrent_small")
    assert (small.hidden_size, small.n_prelude_layers, small.n_recurrent_layers, small.n_coda_layers) == (768, 2, 4, 2)
    assert MegaTransformerConfig.from_name("recurrent_medium").hidden_size == 1024
    sandwich = MegaTransformerConfig.from_name("recurrent_small_sandwich")
    assert sandwich.post_attn_norm and sandwich.post_ffn_norm and sandwich.pre_attn_norm


@pytest.mark.parametrize("name", sorted(lookup))
def test_config_builds_and_trains_a_step(name):
    torch.manual_seed(0)
    model = build_model(shrink(MegaTransformerConfig.from_name(name)))
    assert isinstance(model, MegaTransformerRecurrentLM)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    input_ids = random_ids(model.config, length=12)
    out = model(input_ids, labels=input_ids)
    assert out.logits.shape == (*input_ids.shape, 256) and torch.isfinite(out.loss)
    assert (out.thinking_steps == out.num_steps).all()
    out.loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{param_name} got no gradient"
    optimizer.step()
    assert model.flops_per_token(12, num_steps=8) > model.flops_per_token(12, num_steps=1)
    assert model.num_parameters(exclude_embeddings=True) < model.num_parameters()


@pytest.mark.parametrize("adapter", ["sum", "gate", "linear"])
@pytest.mark.parametrize("init_state", ["zero", "normal", "like-init", "embed"])
def test_adapters_and_initial_states(adapter, init_state):
    model = tiny(recurrent_adapter=adapter, recurrent_init_state=init_state).train()
    input_ids = random_ids(model.config)
    out = model(input_ids, labels=input_ids, num_steps=3)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.core[0].attn.qkv_proj.weight.grad.abs().sum() > 0


def test_save_load_round_trip(tmp_path):
    model = tiny(recurrent_init_state="embed").eval()
    save_pretrained(model, tmp_path / "checkpoint")
    loaded = load_pretrained(tmp_path / "checkpoint")
    assert isinstance(loaded, MegaTransformerRecurrentLM) and loaded.config == model.config
    input_ids = random_ids(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids, num_steps=3).logits, model(input_ids, num_steps=3).logits)
