"""The text-to-speech pipeline end to end at tiny size, from builtin:phrases to a wav file:
preprocess_audio_diffusion_dataset.py (builtin:words, resemblyzer) -> pretrain_audio_vae.py (with the GAN and a
vocoder) -> pretrain_audio_diffusion.py (over VAE latents, and over mels) -> generate_audio.py; the cache against
the encoders themselves; bad input (corrupt audio, empty transcripts, missing speaker encoder, wrong embedding
width) as counted skips or clear errors."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import generate_audio
import preprocess_audio_diffusion_dataset
import pretrain_audio_diffusion
import pretrain_audio_vae
from bench import audio_vae_quality, speech_judges
from helpers import error_of
from data.builtin_phrases import phrase_utterances, prompts_of
from data.builtin_speech import synthesize
from data.sharded_cache import ShardedCache
from model.audio.features import AudioFeatureConfig, log_mel
from model.audio.speaker_encoders import ResemblyzerEncoder
from model.audio.vocoders.vocoders import VocoderWithLoss, build_vocoder
from model.pretrained import unique_tensors
from model.text_encoders import BuiltinWordEncoder

pytestmark = pytest.mark.skipif(shutil.which("flite") is None or shutil.which("espeak-ng") is None,
                                reason="needs flite (builtin:phrases) and espeak-ng (builtin:speech): "
                                       "apt-get install flite espeak-ng")
OFFLINE = ["--text_encoder", "builtin:words", "--speaker_encoder", "resemblyzer", "--num_workers", "0"]
TINY_RUN = ["--device", "cpu", "--batch_size", "4", "--eval_batches", "1", "--logging_steps", "1",
            "--no_progress_bar"]


def run_main(main, argv) -> tuple[int, str]:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = main([str(arg) for arg in argv])
    return code, output.getvalue()


def logged_tags(run_dir) -> dict:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "audio": 0})
    accumulator.Reload()
    return {kind: set(names) for kind, names in accumulator.Tags().items() if isinstance(names, list)}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("phrases")
    for split, count in (("train", 8), ("validation", 4)):
        code, _ = run_main(preprocess_audio_diffusion_dataset.main,
                           ["--dataset_name", "builtin:phrases", "--split", split, "--num_items", count,
                            "--output_dir", root / split, *OFFLINE])
        assert code == 0
    return root / "train", root / "validation"


@pytest.fixture(scope="module")
def vocoder_dir(tmp_path_factory):
    """An untrained tiny vocoder checkpoint as pretrain_vocoder.py writes one (config.yaml, model.safetensors)."""
    directory = tmp_path_factory.mktemp("vocoder")
    model = VocoderWithLoss(build_vocoder("tiny_lightheaded_freq_domain_vocoder"))
    model.vocoder.config.to_yaml(directory / "config.yaml")
    save_file(unique_tensors(model), str(directory / "model.safetensors"))
    return directory


def test_cache_items_match_the_encoders_and_hold_out_prompts(caches):
    train_dir, val_dir = caches
    train, val = ShardedCache(train_dir), ShardedCache(val_dir)
    assert len(train) == 8 and len(val) == 4
    assert train.meta["speaker_embedding_dim"] == 256 and train.meta["text_encoder"]["name"] == "builtin:words"
    assert {item["text"] for item in val} <= set(prompts_of("validation"))
    assert not {item["text"] for item in train} & set(prompts_of("validation"))
    utterance = next(phrase_utterances("validation", 1))
    item = val[0]
    samples, rate = synthesize(utterance)
    waveform = torch.from_numpy(samples)
    expected_mel = log_mel(torchaudio.functional.resample(waveform, rate, 16000), AudioFeatureConfig())
    torch.testing.assert_close(item["mel"], expected_mel, atol=1e-3, rtol=1e-3)
    assert item["frames"] == item["mel"].shape[-1] and item["speaker"] == utterance.voice
    text_emb, _ = BuiltinWordEncoder().encode([utterance.text])
    torch.testing.assert_close(item["text_emb"], text_emb[0])
    torch.testing.assert_close(item["speaker_embedding"], ResemblyzerEncoder().embed([waveform], rate)[0],
                               atol=1e-4, rtol=1e-4)
    assert train.meta["counts"] == {"utterances": 8, "skipped": 0, "truncated_texts": 0}


def test_from_builtin_phrases_to_a_wav(caches, vocoder_dir, tmp_path, capsys):
    train_dir, val_dir = caches
    runs = tmp_path / "runs"
    code, report = run_main(pretrain_audio_vae.main, [
        "--run_name", "vae", "--runs_dir", runs, "--config", "tiny", "--latent_channels", "2",
        "--speaker_embedding_dim", "256", "--set", "use_discriminator=true", "--disc_start_step", "1",
        "--train_cache_dir", train_dir, "--val_cache_dir", val_dir, "--vocoder_checkpoint", vocoder_dir,
        "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--segment_frames", "48",
        "--sample_clips", "1", *TINY_RUN])
    assert code == 0 and "latent 2 x 10 x T/8" in report
    tags = logged_tags(runs / "vae")
    assert {"train/reconstruction", "train/kl", "train/adversarial", "eval/mel_l1", "eval/mel_mse"} <= tags["scalars"]
    assert "samples/clip0/mel" in tags["images"]
    assert {"samples/clip0/vocoded_original", "samples/clip0/vocoded_reconstruction"} <= tags["audio"]
    code, printed = run_main(audio_vae_quality.main, [  # the VAE heard through the vocoder, on whole utterances
        "--vae_checkpoint", runs / "vae" / "checkpoint-2", "--vocoder_checkpoint", vocoder_dir, "--cache_dir", val_dir,
        "--max_items", "2", "--device", "cpu", "--output_json", tmp_path / "vae_quality.json"])
    assert code == 0 and "mel L1 (VAE vs real mel)" in printed
    quality = json.loads((tmp_path / "vae_quality.json").read_text())
    assert len(quality["clips"]) == 2 and quality["summary"]["mel_l1"]["mean"] > 0
    assert all(clip["pesq"] is None or -0.5 <= clip["pesq"] <= 4.65 for clip in quality["clips"])
    # the same utterances padded with silence to a longer clip first (the world model's clips): other figures
    code, _ = run_main(audio_vae_quality.main, [
        "--vae_checkpoint", runs / "vae" / "checkpoint-2", "--vocoder_checkpoint", vocoder_dir, "--cache_dir", val_dir,
        "--max_items", "2", "--device", "cpu", "--pad_to", "400", "--output_json", tmp_path / "vae_padded.json"])
    padded = json.loads((tmp_path / "vae_padded.json").read_text())
    assert code == 0 and padded["pad_to"] == 400
    assert [clip["mel_l1"] for clip in padded["clips"]] != [clip["mel_l1"] for clip in quality["clips"]]
    assert "shorter than utterance 0" in error_of(audio_vae_quality.main, [
        "--vae_checkpoint", runs / "vae" / "checkpoint-2", "--vocoder_checkpoint", vocoder_dir, "--cache_dir", val_dir,
        "--pad_to", "8", "--device", "cpu"], capsys)
    code, report = run_main(pretrain_audio_diffusion.main, [
        "--run_name", "dit", "--runs_dir", runs, "--diffusion_type", "tiny_dit", "--train_data_dir", train_dir,
        "--val_data_dir", val_dir, "--vae_checkpoint", runs / "vae" / "checkpoint-2", "--vocoder_checkpoint",
        vocoder_dir, "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--sample_clips", "1",
        "--sample_steps", "2", *TINY_RUN])
    assert code == 0 and "over latent frames of 20 channels" in report
    tags = logged_tags(runs / "dit")
    assert {"train/loss", "train/speaker_dropped", "eval/loss", "eval/ema_loss"} <= tags["scalars"]
    assert "samples/clip0/mel" in tags["images"] and "samples/clip0/generated" in tags["audio"]
    meta = json.loads((runs / "dit" / "checkpoint-2" / "diffusion_meta.json").read_text())
    assert meta["representation"] == "latent" and meta["latent_scale"] > 0
    reference = tmp_path / "ref.wav"
    samples, rate = synthesize(next(phrase_utterances("validation", 1)))
    soundfile.write(reference, samples, rate)
    outputs = []
    for name in ("a", "b"):
        code, printed = run_main(generate_audio.main, [
            "--run_dir", runs / "dit", "--prompt", "green cup four", "--speaker", reference, "--vocoder_checkpoint",
            vocoder_dir, "--output", tmp_path / f"{name}.wav", "--seconds", "1.0", "--steps", "2", "--seed", "5",
            "--device", "cpu"])
        assert code == 0, printed
        audio, sample_rate = soundfile.read(tmp_path / f"{name}.wav", dtype="float32")
        outputs.append(audio)
    assert sample_rate == 16000 and len(audio) == 62 * 256  # 1 + 16000 // 256 = 63 frames -> 62 hops
    np.testing.assert_array_equal(outputs[0], outputs[1])  # the same seed gives the same audio

    # bench/speech_judges.py speaks held-out prompts with the run, and no prompt at each generated clip's length
    code, printed = run_main(speech_judges.main, [
        "--run_dir", runs / "dit", "--vocoder_checkpoint", vocoder_dir, "--num_items", 2, "--centroid_items", 12,
        "--steps", 2, "--device", "cpu", "--output_dir", tmp_path / "judged"])
    assert code == 0 and "empty prompt (floor)" in printed
    report = json.loads((tmp_path / "judged" / "judges.json").read_text())
    assert {name: result["overall"]["clips"] for name, result in report["sets"].items()} == {
        "real": 2, "generated": 2, "empty_prompt": 2}
    for clip in report["sets"]["empty_prompt"]["clips"]:
        floor = Path(clip["path"])
        assert soundfile.info(floor).frames == soundfile.info(floor.parent.parent / "generated" / floor.name).frames


def test_mel_dit_takes_its_length_from_the_prompt(caches, vocoder_dir, tmp_path, capsys):
    train_dir, val_dir = caches
    runs = tmp_path / "runs"
    code, report = run_main(pretrain_audio_diffusion.main, [
        "--run_name", "mel", "--runs_dir", runs, "--diffusion_type", "tiny_dit", "--train_data_dir", train_dir,
        "--val_data_dir", val_dir, "--max_steps", "1", "--eval_steps", "1", "--save_steps", "1",
        "--sample_clips", "1", "--sample_steps", "1", *TINY_RUN])
    assert code == 0 and "over mel frames of 80 channels" in report
    meta = json.loads((runs / "mel" / "checkpoint-1" / "diffusion_meta.json").read_text())
    train = ShardedCache(train_dir)
    per_token = sum(item["frames"] for item in train) / sum(item["text_emb"].shape[0] for item in train)
    assert meta["frames_per_text_token"] == pytest.approx(per_token, rel=1e-6)
    reference = tmp_path / "ref.wav"
    soundfile.write(reference, 0.1 * np.sin(np.arange(16000) * 0.05).astype(np.float32), 16000)
    code, printed = run_main(generate_audio.main, [
        "--run_dir", runs / "mel", "--prompt", "red box one", "--speaker", reference, "--vocoder_checkpoint",
        vocoder_dir, "--output", tmp_path / "out.wav", "--steps", "1", "--device", "cpu"])
    assert code == 0
    assert f"({round(4 * per_token)} mel frames)" in printed  # 3 words + the end token
    common = ["--run_dir", runs / "mel", "--prompt", "", "--speaker", reference, "--vocoder_checkpoint", vocoder_dir,
              "--output", tmp_path / "empty.wav", "--steps", "1", "--device", "cpu"]
    code, printed = run_main(generate_audio.main, [*common, "--seconds", "0.5"])  # the floor of bench/speech_judges.py
    assert code == 0 and "(32 mel frames) for ''" in printed  # 1 + 8000 // 256
    assert run_main(generate_audio.main, common)[0] == 1
    assert "--prompt is empty" in capsys.readouterr().err


def test_corrupt_audio_and_empty_transcripts_are_counted_and_skipped(tmp_path):
    root = tmp_path / "audio"
    (root / "alice").mkdir(parents=True)
    tone = (0.2 * np.sin(2 * np.pi * 220 * np.arange(24000) / 16000)).astype(np.float32)
    for name, text in (("one", "a red box"), ("two", "a blue cup"), ("three", "")):
        soundfile.write(root / "alice" / f"{name}.wav", tone, 16000)
        (root / "alice" / f"{name}.txt").write_text(text)
    (root / "alice" / "broken.wav").write_bytes(b"RIFF\x00\x01\x00\x00WAVEfmt not audio")
    (root / "alice" / "broken.txt").write_text("never read")
    code, printed = run_main(preprocess_audio_diffusion_dataset.main, [
        "--input_dir", root, "--split", "train", "--val_fraction", "0.01", "--max_conditions", "2",
        "--output_dir", tmp_path / "cache", *OFFLINE])
    assert code == 0
    cache = ShardedCache(tmp_path / "cache")
    reasons = {skip["source_id"]: skip["reason"] for skip in cache.meta["skipped"]}
    kept = sorted(item["source_id"] for item in cache)
    assert kept == ["alice/one.wav"]  # alice/two.wav is the file the hash split holds out for validation
    assert reasons["alice/three.wav"] == "empty transcript"
    assert reasons["alice/broken.wav"].startswith("unreadable")
    assert cache.meta["counts"]["skipped"] == 2
    assert all(item["text_truncated"] and item["text_emb"].shape[0] == 2 for item in cache)  # 3 words + end > 2
    assert cache.meta["counts"]["truncated_texts"] == len(kept)


def test_bad_encoders_and_widths_stop_with_a_clear_message(caches, tmp_path, capsys):
    code, _ = run_main(preprocess_audio_diffusion_dataset.main, [
        "--dataset_name", "builtin:phrases", "--num_items", "2", "--output_dir", tmp_path / "x",
        "--text_encoder", "builtin:words", "--speaker_encoder", tmp_path / "no_such_ecapa"])
    assert code == 1
    error = capsys.readouterr().err
    assert "no such directory" in error and "--speaker_encoder resemblyzer" in error
    assert not (tmp_path / "x").exists()
    train_dir, val_dir = caches
    code, _ = run_main(pretrain_audio_vae.main, [
        "--run_name", "wrong", "--runs_dir", tmp_path / "runs", "--config", "tiny", "--speaker_embedding_dim", "192",
        "--train_cache_dir", train_dir, "--val_cache_dir", val_dir, "--max_steps", "1", *TINY_RUN])
    assert code == 1
    error = capsys.readouterr().err
    assert "--speaker_embedding_dim 192" in error and "256-dim" in error
    code, _ = run_main(pretrain_audio_diffusion.main, [
        "--run_name", "wrong", "--runs_dir", tmp_path / "runs", "--diffusion_type", "tiny_dit",
        "--speaker_embedding_dim", "192", "--train_data_dir", train_dir, "--val_data_dir", val_dir,
        "--max_steps", "1", *TINY_RUN])
    assert code == 1 and "--speaker_embedding_dim 192" in capsys.readouterr().err


def test_every_other_source_reaches_the_cache(tmp_path, monkeypatch, capsys):
    """--from_disk (audio bytes with transcripts and speakers) and builtin:speech write utterances; the hub,
    unreachable, stops with the offline alternatives and writes nothing."""
    datasets = pytest.importorskip("datasets")
    tone = (0.2 * np.sin(2 * np.pi * 330 * np.arange(20000) / 16000)).astype(np.float32)
    soundfile.write(tmp_path / "a.wav", tone, 16000)
    rows = {"audio": [{"bytes": (tmp_path / "a.wav").read_bytes(), "path": None}] * 2, "text": ["one two", ""],
            "speaker_id": [7, 8], "id": ["u1", "u2"]}
    saved = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"train": saved}).save_to_disk(tmp_path / "dd")
    code, _ = run_main(preprocess_audio_diffusion_dataset.main, [
        "--from_disk", tmp_path / "dd", "--output_dir", tmp_path / "disk", *OFFLINE])
    assert code == 0
    cache = ShardedCache(tmp_path / "disk")
    assert [(item["source_id"], item["text"], item["speaker"]) for item in cache] == [("u1", "one two", "7")]
    assert cache.meta["skipped"] == [{"source_id": "u2", "reason": "empty transcript"}]
    code, _ = run_main(preprocess_audio_diffusion_dataset.main, [
        "--dataset_name", "builtin:speech", "--num_items", "2", "--output_dir", tmp_path / "speech", *OFFLINE])
    assert code == 0 and len(ShardedCache(tmp_path / "speech")) == 2
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    capsys.readouterr()
    code, _ = run_main(preprocess_audio_diffusion_dataset.main, [
        "--split", "train.360", "--output_dir", tmp_path / "hub", *OFFLINE])
    assert code == 1
    error = capsys.readouterr().err
    assert "openslr/librispeech_asr" in error and "builtin:phrases" in error and "--input_dir" in error
    assert not (tmp_path / "hub").exists()
