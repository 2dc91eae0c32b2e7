"""The world model with text, images and speech end to end at tiny size: utterance caches of builtin:phrases
(preprocess_audio_diffusion_dataset.py, resemblyzer) and builtin:shapes images -> preprocess_multimodal_dataset.py
(untrained tiny image and audio VAEs) -> pretrain_wm.py (multimodal/tiny with all three modalities, and the
recurrent core) -> generate_wm.py (a transcript of a recording, speech in a reference voice); clear errors for
audio input that does not fit."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import generate_wm
import preprocess_audio_diffusion_dataset
import preprocess_multimodal_dataset
import pretrain_wm
from bench import wm_shapes_eval, wm_speech_eval
from data.multimodal_audio import ClipCodec
from data.sharded_cache import ShardedCache
from data.tokenizer import load_tokenizer
from helpers import error_of, events, run_main, scalars
from model.audio.vae import AudioVAEConfig, build_audio_vae
from model.image.vae import ImageVAEConfig, build_image_vae
from model.multimodal.generation import MediaSegment, TextSegment, generate_multimodal
from model.pretrained import load_pretrained, save_pretrained

RATE, HOP = 16000, 256
AUDIO_FRAMES = 128  # mel frames per clip: 16 frames of the tiny audio VAE (time stride 8)
TRAIN_FLAGS = ["--set", "n_layers=2", "--max_steps", 4, "--batch_size", 4, "--eval_steps", 4, "--eval_batches", 1,
               "--save_steps", 4, "--sample_steps", 2, "--sample_captions", 1, "--sample_transcripts", 1,
               "--sample_image_prompts", "a red circle", "--sample_guidance_scales", 2, "--no_progress_bar",
               "--learning_rate", 1e-3]


def utterances(work: Path, split: str, count: int) -> Path:
    code, _ = run_main(preprocess_audio_diffusion_dataset.main, [
        "--dataset_name", "builtin:phrases", "--split", split, "--num_items", count, "--text_encoder", "builtin:words",
        "--speaker_encoder", "resemblyzer", "--num_workers", 0, "--output_dir", work / f"utterances_{split}"])
    assert code == 0
    return work / f"utterances_{split}"


def interleaved(work: Path, split: str, output: str, *flags, images: int = 6, tokenizer=None) -> list:
    tokenizer_flags = ["--tokenizer", tokenizer] if tokenizer else ["--train_tokenizer", "--vocab_size", 300]
    return ["--split", split, "--dataset_name", "builtin:shapes", "--image_size", 32, "--max_images", images,
            "--vae_checkpoint", work / "image_vae", "--audio_cache_dir", work / f"utterances_{split}",
            "--audio_vae_checkpoint", work / "audio_vae", "--audio_frames", AUDIO_FRAMES, *tokenizer_flags,
            "--output_dir", work / output, *flags]


def write_wav(path: Path, seconds: float, frequency: float = 220.0) -> Path:
    t = np.arange(int(seconds * RATE)) / RATE
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * frequency * t) * (1 + 0.5 * np.sin(9 * t))).astype(np.float32),
                    RATE)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wm_audio")
    torch.manual_seed(0)
    save_pretrained(build_image_vae(ImageVAEConfig.from_name("tiny").with_overrides(["block_out_channels=[16,32,32]"])),
                    work / "image_vae")
    audio_vae = AudioVAEConfig.from_name("tiny").with_overrides(["speaker_embedding_dim=256"])  # resemblyzer's
    save_pretrained(build_audio_vae(audio_vae), work / "audio_vae")
    utterances(work, "train", 10)
    utterances(work, "validation", 4)
    assert run_main(preprocess_multimodal_dataset.main, interleaved(work, "train", "train"))[0] == 0
    assert run_main(preprocess_multimodal_dataset.main, interleaved(work, "validation", "val", images=2,
                                                                    tokenizer=work / "train" / "tokenizer"))[0] == 0
    return work


def test_the_cache_holds_clips_in_both_orders_and_records_every_encoder(work):
    cache = ShardedCache(work / "train")
    clips = [item for item in cache if "audio_latent_mean" in item]
    assert len(clips) == 20 and cache.meta["counts"]["clips"] == 10 and cache.meta["counts"]["images"] == 6
    assert {item["order"] for item in clips} == {"caption_first", "image_first"}
    assert clips[0]["audio_latent_mean"].shape == (40, 16) and clips[0]["audio_condition"].shape == (256,)
    assert clips[0]["caption"] and len(clips[0]["caption_ids"]) > 0 and "audio_latent_logvar" not in clips[0]
    audio = cache.meta["media"]["audio"]
    assert audio["latent_shape"] == [40, 16] and audio["representation"] == "latent" and audio["mel_frames"] == 128
    assert audio["vae_checkpoint"] == str((work / "audio_vae").resolve()) and len(audio["vae_fingerprint"]) == 16
    assert audio["speaker_encoder"]["name"] == "resemblyzer" and audio["speaker_embedding_dim"] == 256
    assert cache.meta["vae_checkpoint"] == str((work / "image_vae").resolve())  # the image VAE, as before
    # the scale factor makes the stored frames unit-variance
    frames = torch.stack([item["audio_latent_mean"].float() for item in clips[::2]])
    assert abs(float(frames.std()) * audio["latent_scale_factor"] - 1) < 0.05
    # log-mel frames instead of latents: the mel bands, normalised by the utterance cache's statistics
    code, _ = run_main(preprocess_multimodal_dataset.main, [
        "--audio_cache_dir", work / "utterances_validation", "--audio_representation", "mel", "--tokenizer",
        work / "train" / "tokenizer", "--output_dir", work / "mel", "--orders", "image_first"])
    mel = ShardedCache(work / "mel")
    assert code == 0 and len(mel) == 4 and mel.meta["media"]["audio"]["latent_shape"][0] == 80
    assert "image" not in mel.meta["media"] and mel.meta["media"]["audio"]["vae_checkpoint"] is None
    # and back: the codec of generate_wm.py turns the (scaled) frames into the utterance's log-mel, then silence
    meta = mel.meta["media"]["audio"]
    spoken = ShardedCache(work / "utterances_validation")[0]
    frames = mel[0]["audio_latent_mean"].float() * meta["latent_scale_factor"]
    restored = ClipCodec(meta, "cpu").mel(frames, None)
    frames_of_speech = spoken["mel"].shape[-1]
    assert restored.shape == (80, meta["mel_frames"])
    torch.testing.assert_close(restored[:, :frames_of_speech], spoken["mel"].float(), atol=0.02, rtol=0.0)
    assert torch.allclose(restored[:, frames_of_speech:], torch.full((1,), meta["silence"]), atol=0.02)
    # its sound ends where the utterance did (a real recording's quiet tail may go too); the padding only on request
    codec = ClipCodec(meta, "cpu")
    assert frames_of_speech - 8 <= codec.waveform(frames, None).numel() // HOP + 1 <= frames_of_speech
    assert codec.waveform(frames, None, trim_silence=False).numel() // HOP + 1 == meta["mel_frames"]


def test_three_modalities_train_then_transcribe_and_speak(work, capsys):
    runs = work / "runs"
    code, report = run_main(pretrain_wm.main, ["--run_name", "wm", "--runs_dir", runs, "--config", "multimodal/tiny",
                                               "--train_data_dir", work / "train", "--val_data_dir", work / "val",
                                               *TRAIN_FLAGS])
    assert code == 0, capsys.readouterr().err
    assert "audio_loss" in report and "transcripts of validation clips" in report
    accumulator = events(runs / "wm")
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/text_loss", "train/image_loss", "train/audio_loss", "eval/audio_loss", "eval/image_loss"} <= tags
    assert {"samples/speech_0", "samples/speech_1"} <= set(accumulator.Tags()["audio"])
    assert "samples/images" in accumulator.Tags()["images"]

    write_wav(work / "heard.wav", 1.0)
    write_wav(work / "voice.wav", 1.5, 150.0)
    code, printed = run_main(generate_wm.main, ["--run_dir", runs / "wm", "--audio", work / "heard.wav",
                                                "--max_new_tokens", 6, "--max_media", 0, "--temperature", 1.0])
    # the transcript is the model's continuation of [bos, begin-audio, the recording's frames, end-audio]
    checkpoint = runs / "wm" / "checkpoint-4"
    model = load_pretrained(checkpoint, family="multimodal")
    frames, voice = ClipCodec(ShardedCache(work / "train").meta["media"]["audio"], "cpu").read(work / "heard.wav")
    assert frames.shape == (40, 16) and voice.shape == (256,)
    expected = generate_multimodal(model, [TextSegment([model.config.bos_token_id]),
                                           MediaSegment("audio", frames, voice)], max_new_tokens=6, do_sample=True,
                                   max_media=0, generator=torch.Generator().manual_seed(0))
    text = load_tokenizer(str(checkpoint / "tokenizer")).decode(expected[0].token_ids, skip_special_tokens=True)
    assert code == 0 and text.strip() and printed.strip() == text.strip()
    code, printed = run_main(generate_wm.main, ["--run_dir", runs / "wm", "--prompt", "red box", "--speaker",
                                                work / "voice.wav", "--steps", 2, "--max_new_tokens", 2,
                                                "--output_dir", work / "spoken"])
    assert code == 0, capsys.readouterr().err
    samples, rate = soundfile.read(str(work / "spoken" / "0-0.wav"))
    # at most one clip of the run's length, cut after its last sound
    assert rate == RATE and 0 < len(samples) <= (AUDIO_FRAMES - 1) * HOP and len(samples) % HOP == 0

    # bench/wm_speech_eval.py: transcripts of validation clips, and their transcripts spoken in the clips' voices
    code, printed = run_main(wm_speech_eval.main, ["--run_dir", runs / "wm", "--val_data_dir", work / "val",
                                                   "--clips", 2, "--prompts", 2, "--steps", 2, "--device", "cpu",
                                                   "--output_dir", work / "wm_speech_eval"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((work / "wm_speech_eval" / "wm_speech_eval.json").read_text())
    assert report["recognition"]["clips"] == 2 and report["text_to_speech"]["prompts"] == 2
    listed = [line.split("\t") for line in (work / "wm_speech_eval" / "prompts.tsv").read_text().splitlines()]
    assert len(listed) == 2 and all((work / "wm_speech_eval" / row[3]).is_file() for row in listed)
    # whole clips with --keep_padding (the cut itself is tested on real clips above: this run's VAE is untrained)
    code, _ = run_main(wm_speech_eval.main, ["--run_dir", runs / "wm", "--val_data_dir", work / "val", "--clips", 1,
                                             "--prompts", 2, "--steps", 2, "--device", "cpu", "--keep_padding",
                                             "--output_dir", work / "wm_speech_padded"])
    assert code == 0, capsys.readouterr().err
    for row in listed:
        cut = soundfile.info(str(work / "wm_speech_eval" / row[4])).frames
        whole = soundfile.info(str(work / "wm_speech_padded" / row[4])).frames
        assert whole == (AUDIO_FRAMES - 1) * HOP and 0 < cut <= whole
    assert json.loads((work / "wm_speech_padded" / "wm_speech_eval.json").read_text())["padding"] == "kept"
    assert report["padding"] == "cut"
    # bench/wm_shapes_eval.py on the same run: captions and images from the three-modality model
    code, _ = run_main(wm_shapes_eval.main, ["--run_dir", runs / "wm", "--captions", 2, "--specs_per_color", 1,
                                             "--guidance_scales", 1, "--num_images", 1, "--steps", 2,
                                             "--output_dir", work / "wm_eval"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((work / "wm_eval" / "wm_eval.json").read_text())["captions"]["results"]["world model"]

    # bad input: a recording longer than the clips, a file that is not audio, speech without a voice
    write_wav(work / "long.wav", 3.0)
    assert "longer than the" in error_of(generate_wm.main, ["--run_dir", runs / "wm", "--audio", work / "long.wav"],
                                         capsys)
    (work / "noise.wav").write_text("not audio")
    assert "give a wav/flac/ogg recording" in error_of(generate_wm.main, ["--run_dir", runs / "wm", "--audio",
                                                                          work / "noise.wav"], capsys)
    assert "pass --speaker ref.wav" in error_of(generate_wm.main, ["--run_dir", runs / "wm", "--prompt", "red box",
                                                                   "--continue_with", "audio"], capsys)


def test_the_recurrent_core_trains_at_sampled_depths_and_is_evaluated_at_fixed_ones(work, capsys):
    code, report = run_main(pretrain_wm.main, ["--run_name", "wm_recurrent", "--runs_dir", work / "runs", "--config",
                                               "multimodal/tiny_recurrent", "--train_data_dir", work / "train",
                                               "--val_data_dir", work / "val", "--eval_thinking_steps", 1, 3,
                                               *TRAIN_FLAGS, "--set", "recurrent_mean_thinking_steps=2"])
    assert code == 0, capsys.readouterr().err
    accumulator = events(work / "runs" / "wm_recurrent")
    depths = scalars(accumulator, "train/thinking_steps")
    assert len(depths) >= 1 and all(value >= 1 for value in depths.values())
    one, three = scalars(accumulator, "eval/loss_steps_1")[4], scalars(accumulator, "eval/loss_steps_3")[4]
    assert one != three and "eval/audio_loss" in accumulator.Tags()["scalars"]


def test_the_blind_captioner_answers_with_an_image_caption():
    """In a cache where one transcript outnumbers every caption, the blind caption is still an image's."""
    image, clip = torch.zeros(4, 8, 8), torch.zeros(40, 16)
    items = ([{"caption": "red key four", "audio_latent_mean": clip}] * 5 + [{"caption": "hello"}] * 9 +
             [{"caption": "a red circle", "image_latent_mean": image}] * 3 +
             [{"caption": "a blue star", "image_latent_mean": image}] * 2)
    assert wm_shapes_eval.most_common_image_caption(items) == "a red circle"
    with pytest.raises(ValueError, match="no captioned images"):
        wm_shapes_eval.most_common_image_caption(items[:14])


def test_audio_input_that_does_not_fit_is_refused(work, capsys):
    main = preprocess_multimodal_dataset.main
    assert "needs --audio_vae_checkpoint" in error_of(main, [
        "--audio_cache_dir", work / "utterances_validation", "--tokenizer", work / "train" / "tokenizer",
        "--output_dir", work / "no_vae"], capsys)
    assert "is not an utterance cache" in error_of(main, [
        "--audio_cache_dir", work / "train", "--audio_representation", "mel", "--tokenizer",
        work / "train" / "tokenizer", "--output_dir", work / "not_utterances"], capsys)
    assert "log-mel frames need no VAE" in error_of(main, [
        "--audio_cache_dir", work / "utterances_validation", "--audio_representation", "mel", "--audio_vae_checkpoint",
        work / "audio_vae", "--tokenizer", work / "train" / "tokenizer", "--output_dir", work / "mel_and_vae"], capsys)
    assert "give --vae_checkpoint" in error_of(main, ["--tokenizer", work / "train" / "tokenizer", "--output_dir",
                                                      work / "nothing"], capsys)
    assert "no clip of" in error_of(main, [*interleaved(work, "validation", "too_short", "--audio_frames", 8,
                                                        tokenizer=work / "train" / "tokenizer")], capsys)
    # a validation cache of another clip length is refused before training
    run_main(main, interleaved(work, "validation", "val_long", "--audio_frames", 2 * AUDIO_FRAMES, images=2,
                               tokenizer=work / "train" / "tokenizer"))
    assert "audio frame shape" in error_of(pretrain_wm.main, [
        "--run_name", "bad", "--runs_dir", work / "runs", "--config", "multimodal/tiny", "--train_data_dir",
        work / "train", "--val_data_dir", work / "val_long", *TRAIN_FLAGS], capsys)
