"""Image VAE: parity with diffusers' AutoencoderKL, shapes, KL and hinge closed forms, the adaptive GAN weight,
the PatchGAN, LPIPS hook, configs, bfloat16, and a short run on builtin:shapes in which reconstruction improves."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from data.builtin_shapes import shape_spec
from data.image_sources import ImageRecord, load_image_item
from model.image.discriminators import PatchGANDiscriminator, build_discriminator
from model.image.losses import build_image_vae_loss, load_lpips
from model.image.vae import ImageVAEConfig, build_image_vae, model_config_lookup
from model.vae import (DiagonalGaussian, VAELoss, adaptive_generator_weight, hinge_discriminator_loss,
                       hinge_generator_loss)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_config(*overrides: str) -> ImageVAEConfig:
    return ImageVAEConfig.from_name("tiny").with_overrides(list(overrides))


def random_images(batch: int = 2, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


def shapes_batch(count: int, image_size: int = 32) -> torch.Tensor:
    """builtin:shapes images 0..count-1 as floats in [-1, 1]: (count, 3, S, S)."""
    items = [load_image_item(ImageRecord("shape", shape=shape_spec(i)), image_size)[0] for i in range(count)]
    return torch.stack([item["image"] for item in items]).float() / 127.5 - 1


@pytest.mark.parametrize("mid_attention", [True, False])
def test_matches_diffusers_autoencoder_kl(mid_attention):
    config = tiny_config("block_out_channels=[16, 32, 32]", "layers_per_block=2", f"mid_attention={mid_attention}")
    torch.manual_seed(0)
    levels = len(config.block_out_channels)
    reference = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                              up_block_types=("UpDecoderBlock2D",) * levels,
                              block_out_channels=tuple(config.block_out_channels),
                              layers_per_block=config.layers_per_block, latent_channels=config.latent_channels,
                              norm_num_groups=config.norm_num_groups, mid_block_add_attention=mid_attention).eval()
    vae = build_image_vae(config).eval()
    vae.load_state_dict(reference.state_dict(), strict=True)
    images = random_images(height=24, width=16)
    with torch.no_grad():
        expected = reference.encode(images).latent_dist
        posterior = vae.encode(images)
        torch.testing.assert_close(posterior.mean, expected.mean)
        torch.testing.assert_close(posterior.logvar, expected.logvar)
        latents = torch.randn_like(posterior.mean)
        torch.testing.assert_close(vae.decode(latents), reference.decode(latents).sample, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(vae(images, sample_posterior=False)[0],
                                   reference(images, sample_posterior=False).sample, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("height, width", [(16, 16), (24, 40), (8, 64)])
def test_shapes_for_any_multiple_of_the_factor(height, width):
    vae = build_image_vae(tiny_config())
    factor = vae.config.downsample_factor
    assert factor == 8
    reconstruction, posterior = vae(random_images(3, height, width))
    assert reconstruction.shape == (3, 3, height, width)
    assert posterior.mean.shape == posterior.logvar.shape == (3, 4, height // factor, width // factor)
    assert vae.decode(posterior.sample()).shape == (3, 3, height, width)


def test_bad_shapes_are_clear_errors():
    vae = build_image_vae(tiny_config())
    with pytest.raises(ValueError, match=r"20x16 is not a multiple of the VAE's downsample factor 8"):
        vae(random_images(1, 20, 16))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, h, w\)"):
        vae.decode(torch.zeros(1, 3, 2, 2))


def test_kl_equals_the_closed_form_and_torch_distributions():
    generator = torch.Generator().manual_seed(3)
    mean = torch.randn(2, 4, 3, 5, generator=generator)
    logvar = torch.randn(2, 4, 3, 5, generator=generator)
    posterior = DiagonalGaussian(mean, logvar)
    closed_form = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)).sum((1, 2, 3))
    torch.testing.assert_close(posterior.kl(), closed_form)
    torch.testing.assert_close(posterior.kl(), reference)
    inputs = torch.zeros(2, 3, 12, 20)  # the KL term is per input element: mean over the batch / (3 * 12 * 20)
    terms = VAELoss(kl_weight=0.5).generator_loss(inputs, inputs, posterior, step=0)
    torch.testing.assert_close(terms["kl"], closed_form.mean() / (3 * 12 * 20))
    torch.testing.assert_close(terms["loss"], 0.5 * terms["kl"])
    assert DiagonalGaussian(mean, torch.full_like(mean, 100.0)).logvar.max() == 20.0  # LDM's clamp


def test_reparameterised_sample():
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sample = DiagonalGaussian(mean, logvar).sample(torch.Generator().manual_seed(5))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sample, mean + (0.5 * logvar).exp() * noise)


@pytest.mark.parametrize("kind", ["l1", "mse", "l1+mse"])
def test_reconstruction_losses(kind):
    target, output = random_images(seed=1), random_images(seed=2)
    posterior = DiagonalGaussian(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))  # KL 0
    expected = {"l1": F.l1_loss(output, target), "mse": F.mse_loss(output, target),
                "l1+mse": F.l1_loss(output, target) + F.mse_loss(output, target)}[kind]
    terms = VAELoss(reconstruction=kind).generator_loss(target, output, posterior, step=0)
    torch.testing.assert_close(terms["loss"], expected)
    with pytest.raises(ValueError, match="reconstruction loss must be one of l1, mse, l1\\+mse"):
        VAELoss(reconstruction="l2")


def test_hinge_losses_closed_form():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.3, 1.0])
    # relu(1 - real) = [0, 0.5, 2] (mean 5/6); relu(1 + fake) = [0, 1.3, 2] (mean 1.1)
    torch.testing.assert_close(hinge_discriminator_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1.1)))
    torch.testing.assert_close(hinge_generator_loss(fake), torch.tensor(-(-2.0 + 0.3 + 1.0) / 3))


def gan_setup(disc_start_step: int = 0):
    torch.manual_seed(0)
    config = tiny_config("use_discriminator=true", "disc_layers=2", "disc_channels=8", "disc_weight=0.7",
                         f"disc_start_step={disc_start_step}", "kl_weight=0.01")
    return config, build_image_vae(config), build_discriminator(config), build_image_vae_loss(config)


def test_adaptive_weight_is_the_hand_computed_grad_norm_ratio():
    config, vae, discriminator, loss = gan_setup()
    images = random_images()
    reconstruction, posterior = vae(images, generator=torch.Generator().manual_seed(0))
    terms = loss.generator_loss(images, reconstruction, posterior, step=0, last_layer=vae.last_layer,
                                discriminator=discriminator)
    # by hand: gradients of each term alone at the decoder's output conv weight
    reconstruction_grad, = torch.autograd.grad(F.l1_loss(reconstruction, images), vae.decoder.conv_out.weight,
                                               retain_graph=True)
    adversarial_grad, = torch.autograd.grad(-discriminator(reconstruction).mean(), vae.decoder.conv_out.weight,
                                            retain_graph=True)
    ratio = reconstruction_grad.norm() / (adversarial_grad.norm() + 1e-4)
    assert torch.isfinite(terms["adaptive_weight"]) and terms["adaptive_weight"] > 0
    torch.testing.assert_close(terms["adaptive_weight"], config.disc_weight * ratio)
    torch.testing.assert_close(terms["loss"], terms["reconstruction"] + 0.01 * terms["kl"]
                               + terms["adaptive_weight"] * terms["adversarial"])
    for parameter in discriminator.parameters():
        parameter.grad = None
    terms["loss"].backward()
    assert all(parameter.grad is None for parameter in discriminator.parameters())  # the generator step leaves D
    assert all(parameter.requires_grad for parameter in discriminator.parameters())
    assert vae.decoder.conv_out.weight.grad is not None


def test_adaptive_weight_is_clamped():
    weight = torch.ones(3, requires_grad=True)
    large = adaptive_generator_weight((weight * 1e6).sum(), (weight * 1e-3).sum(), weight, max_weight=50.0)
    assert large == 50.0 and not large.requires_grad


def test_adversarial_terms_wait_for_disc_start_step():
    config, vae, discriminator, loss = gan_setup(disc_start_step=10)
    images = random_images()
    reconstruction, posterior = vae(images)
    before = loss.generator_loss(images, reconstruction, posterior, 9, vae.last_layer, discriminator)
    assert before["adaptive_weight"] == 0 and before["adversarial"] == 0
    torch.testing.assert_close(before["loss"], before["reconstruction"] + 0.01 * before["kl"])
    after = loss.generator_loss(images, reconstruction, posterior, 10, vae.last_layer, discriminator)
    assert after["adaptive_weight"] > 0 and not loss.discriminator_active(9) and loss.discriminator_active(10)
    discriminator.eval()  # BatchNorm with running statistics: both calls see the same function
    d_before = loss.discriminator_loss(images, reconstruction, 9, discriminator)
    d_after = loss.discriminator_loss(images, reconstruction, 10, discriminator)
    assert d_before["loss"] == 0 and d_before["hinge"] > 0
    expected = hinge_discriminator_loss(discriminator(images), discriminator(reconstruction.detach()))
    torch.testing.assert_close(d_after["loss"], expected)
    d_after["loss"].backward()
    assert vae.decoder.conv_out.weight.grad is None  # the discriminator step leaves the VAE
    with torch.no_grad():  # evaluation: no gradients, so no adaptive weight (as LDM)
        evaluated = loss.generator_loss(images, reconstruction, posterior, 10, vae.last_layer, discriminator)
    assert evaluated["adaptive_weight"] == 0 and evaluated["adversarial"] != 0


@pytest.mark.parametrize("size, n_layers", [(32, 3), (64, 3), (48, 2), (40, 1), (256, 3)])
def test_patchgan_output_shape(size, n_layers):
    discriminator = PatchGANDiscriminator(3, 8, n_layers)
    side = size // 2 ** n_layers - 2
    assert discriminator(torch.zeros(2, 3, size, size + 2 ** n_layers)).shape == (2, 1, side, side + 1)
    # pix2pix widths: 8, 16, 32, 64 (capped at 8x), one BatchNorm after each convolution but the first and last
    widths = [module.out_channels for module in discriminator.modules() if isinstance(module, torch.nn.Conv2d)]
    assert widths == [8 * min(2 ** n, 8) for n in range(n_layers + 1)] + [1]
    with pytest.raises(ValueError, match="at least"):
        discriminator(torch.zeros(1, 3, 3 * 2 ** n_layers - 1, 64))


def test_build_discriminator_follows_the_config():
    with pytest.raises(ValueError, match="use_discriminator: false"):
        build_discriminator(tiny_config())
    config = ImageVAEConfig.from_name("gan_4_2")
    discriminator = build_discriminator(config)
    assert discriminator.config is config and discriminator.n_layers == config.disc_layers == 3


def test_lpips_hook(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # as if not installed
    with pytest.raises(ValueError, match="pip install lpips.*perceptual_weight: 0"):
        build_image_vae_loss(tiny_config("perceptual_weight=1.0"))
    with pytest.raises(ValueError, match="needs a perceptual network"):
        VAELoss(perceptual_weight=1.0)

    def no_weights(**kwargs):
        raise RuntimeError("cannot download vgg16")

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=no_weights))
    with pytest.raises(ValueError, match="cannot download vgg16.*torch hub cache"):
        load_lpips()

    class MeanSquare(torch.nn.Module):  # stands in for LPIPS: (x, y) -> (B, 1, 1, 1)
        def __init__(self, net, verbose):
            super().__init__()
            self.net, self.dropout = net, torch.nn.Dropout(0.5)

        def forward(self, x, y):
            return self.dropout((x - y).square()).mean(dim=(1, 2, 3), keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=MeanSquare))
    loss = build_image_vae_loss(tiny_config("perceptual_weight=0.25", "kl_weight=0"))
    assert loss.perceptual.net == "vgg" and not loss.perceptual.training
    loss.train()
    assert not loss.perceptual.training  # LPIPS stays in eval mode
    target, output = random_images(seed=1), random_images(seed=2)
    terms = loss.generator_loss(target, output, DiagonalGaussian(torch.zeros(2, 4), torch.zeros(2, 4)), step=0)
    torch.testing.assert_close(terms["perceptual"], F.mse_loss(output, target))
    torch.testing.assert_close(terms["loss"], F.l1_loss(output, target) + 0.25 * F.mse_loss(output, target))


@pytest.mark.parametrize("name", sorted(model_config_lookup))
def test_every_config_builds_and_trains_one_step(name):
    assert {"tiny", "small", "small_4_2", "gan_4_2"} <= set(model_config_lookup)
    config = model_config_lookup[name]
    vae = build_image_vae(name)
    assert vae.config == config
    expected_factor = {"tiny": 8, "small": 8, "small_4_2": 4, "gan_4_2": 4}.get(name)
    if expected_factor:
        assert config.downsample_factor == expected_factor and config.latent_channels == 4
    assert config.use_discriminator == name.startswith("gan_")
    images = random_images(2, 32, 32)
    reconstruction, posterior = vae(images)
    discriminator = build_discriminator(config) if config.use_discriminator else None
    terms = build_image_vae_loss(config).generator_loss(images, reconstruction, posterior,
                                                        step=config.disc_start_step, last_layer=vae.last_layer,
                                                        discriminator=discriminator)
    terms["loss"].backward()
    assert all(parameter.grad is not None for parameter in vae.parameters())
    assert torch.isfinite(terms["loss"])
    if discriminator is not None:
        assert terms["adaptive_weight"] > 0
        d_terms = build_image_vae_loss(config).discriminator_loss(images, reconstruction, config.disc_start_step,
                                                                  discriminator)
        d_terms["loss"].backward()
        assert all(parameter.grad is not None for parameter in discriminator.parameters())


def test_config_round_trip_and_errors(tmp_path):
    config = ImageVAEConfig.from_name("gan_4_2")
    assert config.block_out_channels == [64, 128, 256] and config.disc_start_step == 5000  # extends small_4_2
    config.to_yaml(tmp_path / "config.yaml")
    assert ImageVAEConfig.from_yaml(tmp_path / "config.yaml") == config
    for override, message in [("block_out_channels=[]", "block_out_channels"),
                              ("block_out_channels=[16, 0]", "block_out_channels"),
                              ("block_out_channels=[16, 20]", "divisible by norm_num_groups"),
                              ("reconstruction_loss=l2", "reconstruction_loss"),
                              ("kl_weight=-1", "kl_weight"), ("dropout=1.0", "dropout"),
                              ("disc_layers=0", "disc_layers"), ("latent_chanels=4", "did you mean latent_channels")]:
        with pytest.raises(ValueError, match=message):
            tiny_config(override)
    with pytest.raises(ValueError, match="unknown config name 'gan_4_3': did you mean gan_4_2"):
        build_image_vae("gan_4_3")


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16(device):
    torch.manual_seed(0)
    config = tiny_config("use_discriminator=true", "disc_layers=2", "disc_channels=8")
    vae = build_image_vae(config).to(device)
    discriminator = build_discriminator(config).to(device)
    loss = build_image_vae_loss(config)
    images = random_images().to(device)
    with torch.autocast(device, dtype=torch.bfloat16):  # autocast
        reconstruction, posterior = vae(images)
        terms = loss.generator_loss(images, reconstruction, posterior, 0, vae.last_layer, discriminator)
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    vae.to(torch.bfloat16)  # bfloat16 weights (DeepSpeed bf16), with a float32 discriminator
    reconstruction, posterior = vae(images.to(torch.bfloat16))
    assert reconstruction.dtype == torch.bfloat16
    terms = loss.generator_loss(images, reconstruction, posterior, 0, vae.last_layer, discriminator)
    d_terms = loss.discriminator_loss(images, reconstruction, 0, discriminator)
    assert all(torch.isfinite(value) and value.dtype == torch.float32 for value in [*terms.values(), *d_terms.values()])
    terms["loss"].backward()
    assert vae.last_layer.grad.dtype == torch.bfloat16


def test_reconstruction_improves_on_builtin_shapes():
    torch.manual_seed(0)
    images = shapes_batch(4)
    config = tiny_config("block_out_channels=[16, 32]", "mid_attention=false")
    vae, loss = build_image_vae(config), build_image_vae_loss(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        reconstruction, posterior = vae(images)
        terms = loss.generator_loss(images, reconstruction, posterior, step)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["reconstruction"].item())
    with torch.no_grad():
        final = F.l1_loss(vae.eval()(images, sample_posterior=False)[0], images).item()
    constant = (images - images.mean()).abs().mean().item()  # the best one-colour guess is worse
    assert final < 0.4 * losses[0] and final < 0.5 * constant, (losses, final, constant)
