"""A variational autoencoder for any modality, and its loss (reconstruction + KL + perceptual + hinge GAN).

    vae = VAE(encoder, decoder)                  # encoder: x -> moments (B, 2*Z, ...); decoder: z (B, Z, ...) -> x
    reconstruction, posterior = vae(x)           # posterior.mean, posterior.logvar: (B, Z, ...)
    z = vae.encode(x).sample()                   # or .mode() for the mean
    x_hat = vae.decode(z)

    loss = VAELoss(reconstruction="l1", kl_weight=1e-6, disc_weight=0.5, disc_start_step=10_000)
    terms = loss.generator_loss(x, reconstruction, posterior, step, vae.last_layer, discriminator)
    terms["loss"].backward()                     # then, for the discriminator's own step:
    loss.discriminator_loss(x, reconstruction.detach(), step, discriminator)["loss"].backward()

The loss follows LDM's `LPIPSWithDiscriminator` (taming-transformers / latent-diffusion), scaled to one input
element: reconstruction is a mean over elements, and the KL (summed over latent elements, as LDM does) is divided by
the elements of one input, so `kl_weight` means what it means in LDM configs (1e-6) and every term is LDM's divided
by C*H*W. The adversarial term is the generator hinge loss -mean(D(x_hat)), weighted by LDM's adaptive weight
||grad reconstruction|| / (||grad adversarial|| + 1e-4) at the decoder's last layer, clamped to
[0, adaptive_weight_max] and multiplied by disc_weight; it is off before `disc_start_step`.
Every loss is computed in float32 (inputs may be bfloat16).
"""

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

RECONSTRUCTION_LOSSES = ("l1", "mse", "l1+mse")
LOGVAR_RANGE = (-30.0, 20.0)  # LDM's and diffusers' clamp of the encoder's log-variance
ADAPTIVE_WEIGHT_EPS = 1e-4


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))). mean, logvar: (B, Z, ...); logvar clamped to LOGVAR_RANGE."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """moments: (B, 2*Z, ...), the mean's channels first."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps (the reparameterisation trick): (B, Z, ...), differentiable in mean and logvar."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over every non-batch dim, in float32: (B,)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


class VAE(nn.Module):
    """encoder: x -> moments (B, 2*Z, ...) (mean then log-variance); decoder: z (B, Z, ...) -> x.

    The decoder exposes `last_layer`, the weight of its output layer (for the adaptive GAN weight).
    Subclasses may override `encode_moments` and `decode` to add layers between the two halves.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.encode_moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """x -> (reconstruction like x, posterior); decodes a sample of the posterior, or its mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @property
    def last_layer(self) -> nn.Parameter:
        return self.decoder.last_layer


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))), in float32."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean(D(x_hat)), in float32."""
    return -logits_fake.float().mean()


def adaptive_generator_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor,
                              last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """LDM's balance of the two terms: ||d rec / d W|| / (||d gen / d W|| + 1e-4), clamped to [0, max_weight]
    and detached; W is the decoder's last layer. Both losses must still hold their graphs (they are kept)."""
    reconstruction_grad, = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    generator_grad, = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)
    ratio = reconstruction_grad.float().norm() / (generator_grad.float().norm() + ADAPTIVE_WEIGHT_EPS)
    return ratio.clamp(0.0, max_weight).detach()


def _as_input_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x in the dtype of `module`'s weights (a bfloat16 VAE may feed a float32 discriminator, and back)."""
    return x.to(next(module.parameters()).dtype)


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """No gradient reaches `module`'s parameters inside (the generator step must not train the discriminator)."""
    flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


class VAELoss(nn.Module):
    """Generator and discriminator objectives of a (GAN-)VAE; see the module docstring for the terms.

    perceptual: a frozen network (x, x_hat) -> distance per sample (B, 1, 1, 1) (LPIPS for images: see
    model/image/losses.py); needed when perceptual_weight > 0. It runs in float32 with autocast off.
    """

    def __init__(self, *, reconstruction: str = "l1", kl_weight: float = 1e-6,
                 perceptual: Callable | nn.Module | None = None, perceptual_weight: float = 0.0,
                 disc_weight: float = 0.5, disc_start_step: int = 0, adaptive_weight_max: float = 1e4):
        super().__init__()
        if reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction loss must be one of {', '.join(RECONSTRUCTION_LOSSES)}, "
                             f"got {reconstruction!r}")
        for name, value in (("kl_weight", kl_weight), ("perceptual_weight", perceptual_weight),
                            ("disc_weight", disc_weight), ("disc_start_step", disc_start_step),
                            ("adaptive_weight_max", adaptive_weight_max)):
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual network (e.g. model.image.losses.load_lpips())")
        self.reconstruction = reconstruction
        self.kl_weight = kl_weight
        self.perceptual = perceptual if perceptual_weight > 0 else None
        self.perceptual_weight = perceptual_weight
        self.disc_weight = disc_weight
        self.disc_start_step = disc_start_step
        self.adaptive_weight_max = adaptive_weight_max

    def train(self, mode: bool = True) -> "VAELoss":
        """The perceptual network stays in eval mode (LPIPS has dropout)."""
        super().train(mode)
        if isinstance(self.perceptual, nn.Module):
            self.perceptual.eval()
        return self

    def discriminator_active(self, step: int) -> bool:
        """Whether the adversarial terms count at this step (step >= disc_start_step)."""
        return step >= self.disc_start_step

    def generator_loss(self, inputs: torch.Tensor, reconstruction: torch.Tensor, posterior: DiagonalGaussian,
                       step: int, last_layer: torch.Tensor | None = None,
                       discriminator: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """inputs, reconstruction: (B, C, ...). Returns float32 scalars: "loss" (the weighted total),
        "reconstruction", "kl" (per input element), "perceptual", "adversarial" (-mean D(x_hat)), and
        "adaptive_weight" (disc_weight times the clamped grad-norm ratio; 0 before disc_start_step, without a
        discriminator, or where gradients are off, as in evaluation). The discriminator gets no gradient."""
        inputs, reconstruction_f32 = inputs.float(), reconstruction.float()
        reconstruction_term = self._reconstruction(inputs, reconstruction_f32)
        perceptual = torch.zeros((), device=inputs.device)
        if self.perceptual is not None:
            with torch.autocast(inputs.device.type, enabled=False):
                perceptual = self.perceptual(inputs, reconstruction_f32).mean()
        nll = reconstruction_term + self.perceptual_weight * perceptual
        kl = posterior.kl().mean() / inputs[0].numel()
        loss = nll + self.kl_weight * kl
        adversarial = torch.zeros((), device=inputs.device)
        weight = torch.zeros((), device=inputs.device)
        if discriminator is not None and self.discriminator_active(step):
            with _frozen(discriminator):
                adversarial = hinge_generator_loss(discriminator(_as_input_of(discriminator, reconstruction)))
            if torch.is_grad_enabled() and nll.requires_grad and adversarial.requires_grad:
                if last_layer is None:
                    raise ValueError("generator_loss with a discriminator needs last_layer (vae.last_layer)")
                weight = self.disc_weight * adaptive_generator_weight(nll, adversarial, last_layer,
                                                                      self.adaptive_weight_max)
            loss = loss + weight * adversarial
        return {"loss": loss, "reconstruction": reconstruction_term.detach(), "kl": kl.detach(),
                "perceptual": perceptual.detach(), "adversarial": adversarial.detach(), "adaptive_weight": weight}

    def discriminator_loss(self, inputs: torch.Tensor, reconstruction: torch.Tensor, step: int,
                           discriminator: nn.Module) -> dict[str, torch.Tensor]:
        """Hinge loss of the discriminator on real `inputs` and (detached) `reconstruction`: float32 scalars
        "loss" (the hinge loss, times 0 before disc_start_step, as in LDM), "hinge", "logits_real", "logits_fake"."""
        logits_real = discriminator(_as_input_of(discriminator, inputs.detach()))
        logits_fake = discriminator(_as_input_of(discriminator, reconstruction.detach()))
        hinge = hinge_discriminator_loss(logits_real, logits_fake)
        factor = 1.0 if self.discriminator_active(step) else 0.0
        return {"loss": factor * hinge, "hinge": hinge.detach(), "logits_real": logits_real.detach().float().mean(),
                "logits_fake": logits_fake.detach().float().mean()}

    def _reconstruction(self, inputs: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        if inputs.shape != reconstruction.shape:
            raise ValueError(f"reconstruction has shape {tuple(reconstruction.shape)}, inputs {tuple(inputs.shape)}")
        loss = torch.zeros((), device=inputs.device)
        if "l1" in self.reconstruction:
            loss = loss + F.l1_loss(reconstruction, inputs)
        if "mse" in self.reconstruction:
            loss = loss + F.mse_loss(reconstruction, inputs)
        return loss
