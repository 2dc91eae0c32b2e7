"""The audio DiT: frame masks (padding changes nothing on real frames, the loss ignores it), the speaker in the
conditioning, text and speaker guidance against its formula, the frame codec, config and input errors."""

import pytest
import torch

from model.audio.diffusion import (AudioDiffusionConfig, FrameCodec, GuidedAudioDenoiser, audio_diffusion_loss,
                                   build_audio_diffusion)
from model.audio.vae import AudioVAEConfig, build_audio_vae

TEXT_DIM, SPEAKER_DIM, CHANNELS = 32, 16, 80


def tiny_dit(**overrides):
    values = {"text_embed_dim": TEXT_DIM, "speaker_embedding_dim": SPEAKER_DIM, **overrides}
    config = AudioDiffusionConfig.from_name("tiny_dit").with_overrides([f"{k}={v}" for k, v in values.items()])
    torch.manual_seed(0)
    model = build_audio_diffusion(config).eval()
    for module in model.modules():  # leave DiT's zero init, so that every input reaches the output
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.05)
    return model


def inputs(batch: int = 2, frames: int = 16, text: int = 3):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, CHANNELS, frames, generator=generator), torch.full((batch,), 500.0),
            torch.randn(batch, text, TEXT_DIM, generator=generator), torch.ones(batch, text, dtype=torch.bool),
            torch.randn(batch, SPEAKER_DIM, generator=generator))


def test_padding_changes_nothing_on_the_real_frames():
    """Row 1 has 8 real frames of 16: its prediction on them equals that of the row alone, cut to 8 frames,
    whatever the padded frames hold."""
    model = tiny_dit()
    x, t, text, mask, speaker = inputs()
    frame_mask = torch.ones(2, 16, dtype=torch.bool)
    frame_mask[1, 8:] = False
    with torch.no_grad():
        padded = model(x, t, text, mask, speaker=speaker, frame_mask=frame_mask)
        x_other = x.clone()
        x_other[1, :, 8:] = 100.0
        other = model(x_other, t, text, mask, speaker=speaker, frame_mask=frame_mask)
        alone = model(x[1:, :, :8], t[1:], text[1:], mask[1:], speaker=speaker[1:])
    torch.testing.assert_close(padded[1, :, :8], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(other[1, :, :8], padded[1, :, :8], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(other[0], padded[0])


def test_the_loss_counts_only_real_frames():
    model = tiny_dit()
    x, _, text, mask, speaker = inputs()
    frame_mask = torch.ones(2, 16, dtype=torch.bool)
    frame_mask[1, 8:] = False
    x_other = x.clone()
    x_other[1, :, 8:] = 100.0
    losses = [audio_diffusion_loss(model, frames, text, mask, speaker, frame_mask,
                                   generator=torch.Generator().manual_seed(3))[0] for frames in (x, x_other)]
    torch.testing.assert_close(losses[0], losses[1])
    unmasked = audio_diffusion_loss(model, x_other, text, mask, speaker, None,
                                    generator=torch.Generator().manual_seed(3))
    assert unmasked[0] > 10 * losses[0]


def test_speaker_and_its_null_reach_the_prediction():
    model = tiny_dit()
    x, t, text, mask, speaker = inputs()
    with torch.no_grad():
        first = model(x, t, text, mask, speaker=speaker)
        second = model(x, t, text, mask, speaker=torch.randn(2, SPEAKER_DIM))
        dropped = model(x, t, text, mask, speaker=speaker, drop_speaker=torch.tensor([True, True]))
        null = model(x, t, text, mask, speaker=model.null_speaker_embedding.detach().expand(2, -1))
    assert (first - second).abs().mean() > 1e-3
    torch.testing.assert_close(dropped, null)


def test_guidance_combines_three_predictions_as_documented():
    model = tiny_dit()
    x, t, text, mask, speaker = inputs()
    no = torch.tensor([True, True])
    with torch.no_grad():
        full = model(x, t, text, mask, speaker=speaker)
        text_only = model(x, t, text, mask, speaker=speaker, drop_speaker=no)
        neither = model(x, t, text, mask, drop_condition=no, speaker=speaker, drop_speaker=no)
        guided = GuidedAudioDenoiser(model, speaker, None, text_scale=3.0, speaker_scale=2.0)(x, t, text, mask)
        plain = GuidedAudioDenoiser(model, speaker, None, text_scale=1.0, speaker_scale=1.0)(x, t, text, mask)
    torch.testing.assert_close(guided, neither + 3.0 * (text_only - neither) + 2.0 * (full - text_only),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain, full)


def test_frame_codec_round_trips_mels_and_stacks_latents():
    mel = torch.randn(2, 80, 24) - 5
    codec = FrameCodec("mel", -5.0, 2.0)
    torch.testing.assert_close(codec.decode(codec.encode(mel), None), mel)
    vae = build_audio_vae(AudioVAEConfig.from_name("tiny").with_overrides(["speaker_embedding_dim=16"])).eval()
    latent = FrameCodec("latent", -5.0, 2.0, vae, latent_scale=2.0)
    frames = latent.encode(mel)
    assert frames.shape == (2, 4 * 10, 3) and latent.channels(80) == 40 and latent.frames_per_step == 8
    torch.testing.assert_close(frames, 2.0 * vae.encode(mel[:, None]).mode().flatten(1, 2))
    speaker = torch.randn(2, 16)
    torch.testing.assert_close(latent.decode(frames, speaker), vae.decode(frames.unflatten(1, (4, 10)) / 2.0,
                                                                          speaker)[:, 0])
    assert latent.sequence_frames(torch.tensor([17, 24])).tolist() == [3, 3]


def test_bad_configs_and_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="patch_height must be 1"):
        AudioDiffusionConfig.from_name("tiny_dit").with_overrides(["patch_height=2"])
    assert AudioDiffusionConfig.from_name("tiny_dit").with_overrides(["patch_size=2"]).patch_height == 1
    with pytest.raises(ValueError, match="representation"):
        AudioDiffusionConfig.from_name("tiny_dit").with_overrides(["representation=wave"])
    model = tiny_dit()
    x, t, text, mask, speaker = inputs()
    with pytest.raises(ValueError, match="not a multiple of patch_size=4"):
        model(x[..., :15], t, text, mask, speaker=speaker)
    with pytest.raises(ValueError, match=r"shape \(2, 192\), the model expects \(2, 16\)"):
        model(x, t, text, mask, speaker=torch.zeros(2, 192))
    with pytest.raises(ValueError, match="frame_mask must be"):
        model(x, t, text, mask, speaker=speaker, frame_mask=torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs the audio VAE"):
        FrameCodec("latent", 0.0, 1.0)


def test_loss_falls_when_fitting_one_masked_batch():
    """Learning: 40 Adam steps on one batch (fixed noise and levels, a padded row) halve the masked loss."""
    torch.manual_seed(0)
    model = build_audio_diffusion(AudioDiffusionConfig.from_name("tiny_dit").with_overrides(
        [f"text_embed_dim={TEXT_DIM}", f"speaker_embedding_dim={SPEAKER_DIM}"]))
    x, _, text, mask, speaker = inputs(batch=4)
    frame_mask = torch.ones(4, 16, dtype=torch.bool)
    frame_mask[1, 12:] = False
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss, _ = audio_diffusion_loss(model, x, text, mask, speaker, frame_mask,
                                       generator=torch.Generator().manual_seed(7), cfg_dropout=0.0,
                                       speaker_dropout=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
