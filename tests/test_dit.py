"""The DiT backbone and the image-diffusion configs: shapes, adaLN-Zero, text masking, positions, dtypes, registry."""

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import count_calls, perturbed_dit
from model.diffusion import DiT, diffusion_loss, sample
from model.diffusion.dit import sincos_2d, timestep_embedding
from model.image.diffusion import ImageDiffusionConfig, build_image_diffusion, model_config_lookup
from model.pretrained import load_weights, write_model_files

TINY = model_config_lookup["tiny_dit"]


def text_inputs(batch: int = 2, length: int = 6, dim: int = 32, seed: int = 1):
    """text_emb (B, L, dim) and a mask (B, L) whose first row is padded after 3 tokens."""
    generator = torch.Generator().manual_seed(seed)
    text_emb = torch.randn(batch, length, dim, generator=generator)
    text_mask = torch.ones(batch, length, dtype=torch.bool)
    text_mask[0, 3:] = False
    return text_emb, text_mask


def test_untrained_dit_outputs_zero_but_learns():
    """adaLN-Zero: gates and final layer start at zero, so the output is exactly zero, as in DiT;
    the final layer still gets a gradient, so training moves it."""
    torch.manual_seed(0)
    model = DiT(TINY)
    text_emb, text_mask = text_inputs()
    latents = torch.randn(2, 4, 8, 8)
    out = model(latents, torch.tensor([10.0, 900.0]), text_emb, text_mask)
    assert out.shape == latents.shape and torch.equal(out, torch.zeros_like(out))
    (out - latents).square().mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    assert all(block.adaLN_modulation.weight.grad is not None for block in model.blocks)


@pytest.mark.parametrize("height,width", [(8, 12), (16, 4), (6, 6)])
def test_non_square_latents(height, width):
    model = perturbed_dit()
    text_emb, text_mask = text_inputs()
    latents = torch.randn(2, 4, height, width)
    out = model(latents, torch.tensor([1.0, 500.0]), text_emb, text_mask)
    assert out.shape == latents.shape and torch.isfinite(out).all()
    # the output of a patch depends on where it is: positions are encoded for the actual grid
    same = latents[:, :, :2, :2].repeat(1, 1, height // 2, width // 2)
    out = model(same, torch.tensor([1.0, 500.0]), text_emb, text_mask)
    assert not torch.allclose(out[..., :2, :2], out[..., -2:, -2:], atol=1e-4)


def test_position_embedding_matches_dit_and_diffusers():
    """Square grids equal diffusers' get_2d_sincos_pos_embed (base_size = grid); non-square grids follow MAE's
    closed form with column coordinates in the first half and row coordinates in the second."""
    ours = sincos_2d(6, 6, 64, torch.device("cpu"), torch.float32)
    reference = get_2d_sincos_pos_embed(64, 6, base_size=6, output_type="pt")
    torch.testing.assert_close(ours, reference.float(), atol=1e-6, rtol=0)

    height, width, dim = 3, 5, 16
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    expected = np.zeros((height * width, dim))
    for row in range(height):
        for column in range(width):
            features = []
            for position in (column, row):
                features += [np.sin(position * omega), np.cos(position * omega)]
            expected[row * width + column] = np.concatenate(features)
    ours = sincos_2d(height, width, dim, torch.device("cpu"), torch.float32)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6)


def test_timestep_embedding_matches_diffusers():
    timesteps = torch.tensor([0.0, 1.0, 17.5, 999.0])
    reference = get_timestep_embedding(timesteps, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(timesteps, 256), reference, atol=1e-5, rtol=1e-5)


def test_padded_text_positions_are_ignored():
    model = perturbed_dit()
    text_emb, text_mask = text_inputs()
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 700.0])
    reference = model(latents, timesteps, text_emb, text_mask)

    changed_padding = text_emb.clone()
    changed_padding[0, 3:] = 100 * torch.randn(3, 32)
    torch.testing.assert_close(model(latents, timesteps, changed_padding, text_mask), reference)

    longer = torch.cat((text_emb, torch.randn(2, 4, 32)), dim=1)
    longer_mask = torch.cat((text_mask, torch.zeros(2, 4, dtype=torch.bool)), dim=1)
    torch.testing.assert_close(model(latents, timesteps, longer, longer_mask), reference, atol=1e-5, rtol=1e-5)

    changed_text = text_emb.clone()
    changed_text[0, 1] += 1.0  # a real token: the prediction must follow it
    out = model(latents, timesteps, changed_text, text_mask)
    assert not torch.allclose(out[0], reference[0], atol=1e-4)
    torch.testing.assert_close(out[1], reference[1])


def test_dropped_condition_uses_the_learned_null_embedding():
    model = perturbed_dit()
    text_emb, text_mask = text_inputs()
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 700.0])
    drop = torch.tensor([True, False])
    out = model(latents, timesteps, text_emb, text_mask, drop_condition=drop)

    other_text = torch.randn_like(text_emb)
    torch.testing.assert_close(model(latents, timesteps, other_text, text_mask, drop_condition=drop)[0], out[0])
    null_text = torch.zeros(2, 1, 32)
    null_text[:] = model.null_text_embedding.detach()
    null_only = model(latents, timesteps, null_text, torch.ones(2, 1, dtype=torch.bool))
    torch.testing.assert_close(out[0], null_only[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], model(latents, timesteps, text_emb, text_mask)[1])

    drop_all = torch.ones(2, dtype=torch.bool)
    model(latents, timesteps, text_emb, text_mask, drop_condition=drop_all).square().sum().backward()
    assert model.null_text_embedding.grad.abs().sum() > 0


def test_one_dimensional_latents_with_patch_height_one():
    config = TINY.with_overrides(["patch_height=1", "patch_size=4"])
    model = perturbed_dit(config)
    text_emb, text_mask = text_inputs()
    latents = torch.randn(2, 4, 24)
    out = model(latents, torch.tensor([5.0, 50.0]), text_emb, text_mask)
    assert out.shape == latents.shape
    torch.testing.assert_close(model(latents[:, :, None], torch.tensor([5.0, 50.0]), text_emb, text_mask)[:, :, 0], out)


def test_bad_inputs_give_clear_errors():
    model = perturbed_dit()
    text_emb, text_mask = text_inputs()
    t = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="divisible by the patch"):
        model(torch.randn(2, 4, 7, 8), t, text_emb, text_mask)
    with pytest.raises(ValueError, match="text_mask must be"):
        model(torch.randn(2, 4, 8, 8), t, text_emb, text_mask[:, :4])
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 3, 8, 8), t, text_emb, text_mask)
    with pytest.raises(ValueError, match="text_embed_dim=32"):
        model(torch.randn(2, 4, 8, 8), t, torch.randn(2, 6, 16), text_mask)
    with pytest.raises(ValueError, match="patch_height: 1"):
        model(torch.randn(2, 4, 8), t, text_emb, text_mask)
    with pytest.raises(ValueError, match="timesteps must be"):
        model(torch.randn(2, 4, 8, 8), torch.ones(3), text_emb, text_mask)
    empty = text_mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="at least one text token"):
        model(torch.randn(2, 4, 8, 8), t, text_emb, empty)
    # the same row is fine once its condition is dropped
    model(torch.randn(2, 4, 8, 8), t, text_emb, empty, drop_condition=torch.tensor([False, True]))


def test_bfloat16_weights_and_autocast():
    """bf16 weights (DeepSpeed bf16) and bf16 autocast (plain engine): close to float32, float32 loss, gradients."""
    model = perturbed_dit()
    text_emb, text_mask = text_inputs()
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 700.0])
    reference = model(latents, timesteps, text_emb, text_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_out = model(latents, timesteps, text_emb, text_mask)
    bf16_model = perturbed_dit().to(torch.bfloat16).train()
    bf16_out = bf16_model(latents, timesteps, text_emb, text_mask)
    assert bf16_out.dtype == torch.bfloat16
    scale = reference.abs().mean()
    for out in (autocast_out, bf16_out):
        assert (out.float() - reference).abs().mean() < 0.05 * scale

    loss, logs = diffusion_loss(bf16_model, latents, text_emb, text_mask, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bf16_model.parameters())
    samples = sample(bf16_model.eval(), (2, 4, 8, 8), text_emb, text_mask, steps=3)
    assert samples.dtype == torch.float32 and torch.isfinite(samples).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    model = perturbed_dit()
    text_emb, text_mask = text_inputs()
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 700.0])
    reference = model(latents, timesteps, text_emb, text_mask)
    full_mask = torch.ones_like(text_mask)  # no padding: the flash path
    full_reference = model(latents, timesteps, text_emb, full_mask)
    cuda_model = model.to("cuda", dtype)
    for mask, expected in ((text_mask, reference), (full_mask, full_reference)):
        out = cuda_model(latents.cuda(), timesteps.cuda(), text_emb.cuda(), mask.cuda())
        tolerance = 1e-3 if dtype == torch.float32 else 0.05
        assert (out.float().cpu() - expected).abs().mean() < tolerance * expected.abs().mean()
    generator = torch.Generator("cuda").manual_seed(0)
    loss, _ = diffusion_loss(cuda_model.train(), latents.cuda(), text_emb.cuda(), text_mask.cuda(), generator)
    loss.backward()
    assert torch.isfinite(loss)


def test_gradient_checkpointing_gives_the_same_gradients():
    text_emb, text_mask = text_inputs()
    latents = torch.randn(2, 4, 8, 8)
    grads, calls = [], []
    for checkpointing in (False, True):
        model = perturbed_dit().train()
        model.set_gradient_checkpointing(checkpointing)
        with count_calls(model.blocks) as counts:
            loss, _ = diffusion_loss(model, latents, text_emb, text_mask, torch.Generator().manual_seed(3))
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        calls.append(sum(counts.values()))
    assert calls == [len(model.blocks), 2 * len(model.blocks)]  # checkpointed blocks run again in the backward pass
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed)


def test_forward_flops_match_torch_flop_counter():
    model = perturbed_dit()
    text_emb, text_mask = text_inputs(batch=1, length=6)
    text_mask[:] = True
    # the math backend runs attention as matmuls the counter sees (it skips the fused CPU kernel)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 4, 8, 12), torch.tensor([3.0]), text_emb, text_mask)
    assert model.forward_flops(8, 12, 6) == counter.get_total_flops()


def expected_parameters(c: ImageDiffusionConfig) -> int:
    """Parameter count from the config alone: DiT's modules, plus text projection, pooling, null and cross-attention."""
    D, mlp = c.hidden_size, int(c.hidden_size * c.mlp_ratio)
    patch_values = c.patch_height * c.patch_size * c.latent_channels
    block = (3 * D * D + 3 * D) + (D * D + D)            # self-attention
    block += 2 * D + (D * D + D) + (2 * D * D + 2 * D) + (D * D + D)  # cross norm, q, kv, out
    block += (D * mlp + mlp) + (mlp * D + D) + (6 * D * D + 6 * D)  # MLP, adaLN
    outside = (patch_values * D + D) + (256 * D + D) + (D * D + D)  # patch embed, timestep MLP
    outside += (c.text_embed_dim * D + D) + (D * D + D) + (D * D + D) + c.text_embed_dim  # text, pool, null
    outside += (D * patch_values + patch_values) + (2 * D * D + 2 * D)  # final layer
    return c.depth * block + outside


@pytest.mark.parametrize("name", sorted(model_config_lookup))
def test_registry_configs_build_with_the_expected_size(name):
    config = model_config_lookup[name]
    assert config == ImageDiffusionConfig.from_name(name) and config.name == name
    with torch.device("meta"):
        model = build_image_diffusion(config)
    assert model.config is config
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(config)


def test_named_sizes_follow_dit():
    small, medium = model_config_lookup["small_dit"], model_config_lookup["medium_dit"]
    assert (small.hidden_size, small.depth, small.n_heads, small.patch_size) == (384, 12, 6, 2)  # DiT-S/2
    assert (medium.hidden_size, medium.depth, medium.n_heads, medium.patch_size) == (768, 12, 12, 2)  # DiT-B/2
    assert {"tiny_dit", "small_dit", "medium_dit"} <= set(model_config_lookup)


def test_config_validation():
    with pytest.raises(ValueError, match="objective"):
        TINY.with_overrides(["objective=score"])
    with pytest.raises(ValueError, match="does not fit objective"):
        TINY.with_overrides(["objective=flow_matching"])  # the default sampler is ddim
    TINY.with_overrides(["objective=flow_matching", "sampler=euler"])
    with pytest.raises(ValueError, match="divisible by n_heads"):
        TINY.with_overrides(["n_heads=3"])
    with pytest.raises(ValueError, match="latent_height"):
        TINY.with_overrides(["latent_height=9"])
    with pytest.raises(ValueError, match="cfg_dropout"):
        TINY.with_overrides(["cfg_dropout=1.0"])
    with pytest.raises(ValueError, match="unknown config key"):
        ImageDiffusionConfig.from_dict({"hidden": 64})
    assert TINY.with_overrides(["patch_size=4"]).patch_height == 4


def test_checkpoint_files_round_trip(tmp_path):
    """write_model_files (config.yaml + model.safetensors) reloads into an identical model."""
    model = perturbed_dit()
    write_model_files(model, tmp_path)
    config = ImageDiffusionConfig.from_yaml(tmp_path / "config.yaml")
    assert config == model.config
    restored = build_image_diffusion(config)
    load_weights(restored, tmp_path / "model.safetensors")
    text_emb, text_mask = text_inputs()
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 4.0])
    torch.testing.assert_close(restored.eval()(latents, timesteps, text_emb, text_mask),
                               model(latents, timesteps, text_emb, text_mask))
