"""The audio VAE: shapes, any length, FiLM speaker conditioning (identity at start, bounded, and, once briefly
trained, moving the decoded spectrum toward the conditioning speaker), config and input errors."""

import math

import pytest
import torch

from model.audio.vae import AudioVAEConfig, FiLM, build_audio_vae
from model.vae import VAELoss

N_MELS = 80


def tiny(**overrides) -> AudioVAEConfig:
    return AudioVAEConfig.from_name("tiny").with_overrides([f"{key}={value}" for key, value in overrides.items()])


@pytest.mark.parametrize("name, latent", [("tiny", (4, 10, 8)), ("small", (8, 10, 1))])
def test_named_configs_map_mels_to_their_latent_grid(name, latent):
    config = AudioVAEConfig.from_name(name)
    assert (config.latent_mels, config.time_downsample) == (10, 8 if name == "tiny" else 75)
    vae = build_audio_vae(config)
    frames = latent[2] * config.time_downsample
    mel = torch.randn(2, 1, N_MELS, frames) - 5
    reconstruction, posterior = vae(mel, torch.randn(2, config.speaker_embedding_dim))
    assert reconstruction.shape == mel.shape
    assert posterior.mean.shape == (2, *latent) and posterior.logvar.shape == (2, *latent)
    assert vae.decode(posterior.mode(), torch.randn(2, 192)).shape == mel.shape


def test_any_length_is_padded_with_silence_and_cropped_back():
    """T = 61 frames: encoded as 64 (padded on the right with pad_value, the log-mel floor), 8 latent frames,
    decoded to 64, and forward crops to 61. The padded encode equals encoding the explicitly padded mel."""
    vae = build_audio_vae(tiny()).eval()
    mel, speaker = torch.randn(1, 1, N_MELS, 61) - 5, torch.randn(1, 192)
    posterior = vae.encode(mel)
    assert posterior.mean.shape[-1] == 8 == vae.latent_frames(61)
    padded = torch.cat([mel, torch.full((1, 1, N_MELS, 3), math.log(1e-5))], dim=-1)
    torch.testing.assert_close(vae.encode(padded).mean, posterior.mean)
    reconstruction, _ = vae(mel, speaker, sample_posterior=False)
    assert reconstruction.shape == mel.shape
    torch.testing.assert_close(reconstruction, vae.decode(posterior.mode(), speaker)[..., :61])


def test_film_starts_as_identity_and_stays_bounded():
    vae = build_audio_vae(tiny(speaker_embedding_dim=16)).eval()
    latents = torch.randn(2, 4, 10, 3)
    speakers = torch.randn(2, 16)
    # at initialisation the speaker changes nothing
    torch.testing.assert_close(vae.decode(latents, speakers), vae.decode(latents, torch.randn(2, 16)))
    film = FiLM(16, 8, max_scale=0.5, max_shift=1.5)
    torch.nn.init.normal_(film.proj.weight, std=100.0)  # saturate the tanh
    scale, shift = film.scale_and_shift(torch.randn(64, 16))
    assert scale.min() >= 0.5 and scale.max() <= 1.5 and shift.abs().max() <= 1.5
    assert scale.max() > 1.45 and shift.abs().max() > 1.45  # the bounds are reached, not undershot
    # once FiLM is trained, different speakers decode one latent differently
    for module in vae.decoder.films:
        torch.nn.init.normal_(module.proj.weight, std=0.3)
    first, second = vae.decode(latents, speakers), vae.decode(latents, torch.randn(2, 16))
    assert (first - second).abs().mean() > 1e-2


def speaker_corpus(generator: torch.Generator, count: int, frames: int = 32):
    """Synthetic mels of two 'speakers': shared content (a loud band wandering over 4 segments) plus a speaker's
    spectral tilt (+-3 nats from the lowest to the highest band). Returns (mel (N, 1, 80, T), speaker id (N,))."""
    bands = torch.arange(N_MELS).float()
    speakers = torch.randint(0, 2, (count,), generator=generator)
    tilt = (bands / (N_MELS - 1) - 0.5) * 6.0  # (80,)
    mel = torch.full((count, N_MELS, frames), -6.0)
    for segment in range(4):
        centres = torch.randint(5, N_MELS - 5, (count, 1), generator=generator).float()
        bump = 4.0 * torch.exp(-0.5 * ((bands[None] - centres) / 3.0) ** 2)  # (N, 80)
        mel[:, :, segment * frames // 4:(segment + 1) * frames // 4] += bump[..., None]
    mel += torch.where(speakers[:, None, None] == 0, tilt[None, :, None], -tilt[None, :, None])
    return mel[:, None], speakers


def test_film_moves_the_decoded_spectrum_toward_the_conditioning_speaker():
    """A tiny VAE trained briefly (60 steps) on two synthetic speakers, told apart only by a spectral tilt, with
    their speaker embeddings. Decoding each validation latent with the other speaker's embedding instead of its own
    moves the decoded spectrum toward the other speaker: a judge (distance of the mean spectrum to each speaker's
    centroid over real mels) finds the swapped decode nearer the other speaker than the own decode, for at least
    90% of the latents. An untrained (identity-FiLM) decoder moves nothing: both decodes are equal.
    What it does not show: that the latent holds no speaker at all (the own speaker is still recognised in the
    swapped decode after this brief training; the KL weight makes carrying it costly, it does not forbid it)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    vae = build_audio_vae(tiny(speaker_embedding_dim=16, kl_weight=1.0, block_out_channels=[8, 16, 16, 16],
                               mid_attention=False))
    embeddings = torch.nn.functional.normalize(torch.randn(2, 16, generator=generator), dim=1)
    loss = VAELoss(reconstruction="l1", kl_weight=vae.config.kl_weight)
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for step in range(60):
        mel, speakers = speaker_corpus(generator, 8, frames=16)
        reconstruction, posterior = vae(mel, embeddings[speakers])
        terms = loss.generator_loss(mel, reconstruction, posterior, step)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    vae.eval()
    mel, speakers = speaker_corpus(generator, 64, frames=16)
    centroids = torch.stack([mel[speakers == s].mean(dim=(0, 1, 3)) for s in (0, 1)])  # (2, 80)
    rows = torch.arange(len(speakers))

    def distance_to(spectra: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
        return torch.cdist(spectra.mean(dim=(1, 3)), centroids)[rows, speaker]

    with torch.no_grad():
        latents = vae.encode(mel).mode()
        own = vae.decode(latents, embeddings[speakers])
        swapped = vae.decode(latents, embeddings[1 - speakers])
    assert (distance_to(swapped, 1 - speakers) < distance_to(own, 1 - speakers)).float().mean() >= 0.9
    assert (distance_to(own, speakers) < distance_to(swapped, speakers)).float().mean() >= 0.9


def test_bad_configs_and_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="one entry per downsampling"):
        tiny(time_strides=[2, 2])
    with pytest.raises(ValueError, match="n_mels=90 must be divisible"):
        tiny(n_mels=90)
    with pytest.raises(ValueError, match="film_max_scale"):
        tiny(film_max_scale=1.0)
    vae = build_audio_vae(tiny())
    with pytest.raises(ValueError, match=r"mel must be \(B, 1, 80, T\)"):
        vae.encode(torch.zeros(1, 80, 16))
    latents = torch.zeros(1, 4, 10, 2)
    with pytest.raises(ValueError, match="decodes with a speaker embedding of width 192"):
        vae.decode(latents)
    with pytest.raises(ValueError, match=r"shape \(1, 256\), the VAE expects \(1, 192\)"):
        vae.decode(latents, torch.zeros(1, 256))
    with pytest.raises(ValueError, match="speaker_embedding_dim 0"):
        build_audio_vae(tiny(speaker_embedding_dim=0)).decode(latents, torch.zeros(1, 192))
    assert build_audio_vae(tiny(speaker_embedding_dim=0)).decode(latents).shape == (1, 1, 80, 16)
