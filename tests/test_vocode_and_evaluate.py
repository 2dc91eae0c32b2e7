"""vocode.py (audio file → mel → vocoder → audio, and a saved mel → audio) and evaluate_vocoder.py (PESQ, STOI,
mel L1, multi-resolution STFT, real-time factor over a cache), on a vocoder trained for a few steps; PESQ/STOI at
their maxima for identical clips and lower for noisy copies; skipped clips counted; clear errors for bad input.
evaluate_vocoder.py --input_dir (a folder of audio files: resampled, mixed to mono, unreadable and too short files
skipped and counted; an empty folder is an error), --baseline griffin_lim (its figures beside the vocoder's), and
the seed's inference/examples clips."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate_vocoder
import preprocess_vocoder_dataset
import pretrain_vocoder
import vocode
from data.audio_folder import folder_clips
from data.sharded_cache import ShardedCache
from model.audio.features import AudioFeatureConfig, log_mel
from model.pretrained import load_pretrained
from training.audio_metrics import MetricSkipped, pesq_wideband, stoi_score
from test_vocoder_training import FEATURES, HOP, TINY, tone, write_cache

EXAMPLES = Path(__file__).resolve().parent.parent / "inference" / "examples"
PESQ_MAXIMUM = 4.6439  # wideband MOS-LQO of a clip compared with itself (P.862.2's mapping tops out here)


@pytest.fixture(scope="module")
def tone_caches(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tones")
    write_cache(root / "train", [tone(1.0, seed=k) for k in range(4)])
    write_cache(root / "val", [tone(1.2, seed=10 + k) for k in range(2)])
    return root / "train", root / "val"


@pytest.fixture(scope="module")
def run_dir(tone_caches, tmp_path_factory) -> Path:
    """A tiny vocoder trained for 2 steps; evaluated (eval/mel_l1) on both validation clips at step 2."""
    runs = tmp_path_factory.mktemp("runs")
    train, val = tone_caches
    assert pretrain_vocoder.main(["--run_name", "tones", "--runs_dir", str(runs), "--vocoder_type", TINY,
                                  "--train_data_dir", str(train), "--val_data_dir", str(val), "--device", "cpu",
                                  "--max_steps", "2", "--batch_size", "2", "--eval_steps", "2", "--eval_batches", "2",
                                  "--sample_clips", "1", "--no_progress_bar"]) == 0
    return runs / "tones"


def vocode_main(run_dir: Path, *extra) -> int:
    return vocode.main(["--run_dir", str(run_dir), "--device", "cpu", *map(str, extra)])


def evaluate_main(*args) -> int:
    return evaluate_vocoder.main(["--device", "cpu", *map(str, args)])


# ----- vocode.py -----

def test_vocode_a_stereo_flac_at_another_rate(run_dir, tmp_path, capsys):
    stereo = torch.stack([tone(0.9, seed=1, sample_rate=22050), tone(0.9, seed=2, sample_rate=22050)], dim=1)
    soundfile.write(tmp_path / "in.flac", stereo.numpy(), 22050, subtype="PCM_24")
    assert vocode_main(run_dir, "--input", tmp_path / "in.flac", "--output", tmp_path / "out.wav",
                       "--subtype", "FLOAT") == 0
    out, rate = soundfile.read(tmp_path / "out.wav", dtype="float32")
    written, _ = soundfile.read(tmp_path / "in.flac", dtype="float32")  # (S, 2), 24-bit
    mono = torchaudio.functional.resample(torch.from_numpy(written).mean(dim=1), 22050, 16000)
    assert rate == 16000 and out.ndim == 1 and len(out) == len(mono)  # the input's duration, at 16 kHz
    vocoder = load_pretrained(run_dir / "checkpoint-2", family="vocoder")
    padded = torch.nn.functional.pad(mono, (0, -len(mono) % HOP))
    with torch.no_grad():
        expected = vocoder(log_mel(padded, FEATURES)[None])[0][0, :len(mono)].clamp(-1, 1)
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-5, rtol=1e-4)
    printed = capsys.readouterr().out
    assert "0.90 s at 16000 Hz" in printed and "real-time factor" in printed


@pytest.mark.parametrize("batched", [False, True])
def test_vocode_a_saved_mel(run_dir, tmp_path, batched):
    mel = log_mel(tone(0.7, seed=3), FEATURES)  # (80, 44)
    torch.save(mel[None] if batched else mel, tmp_path / "mel.pt")
    assert vocode.main(["--checkpoint", str(run_dir / "checkpoint-2"), "--device", "cpu", "--input",
                        str(tmp_path / "mel.pt"), "--output", str(tmp_path / "out.wav")]) == 0
    info = soundfile.info(tmp_path / "out.wav")
    assert info.subtype == "PCM_16" and info.samplerate == 16000 and info.frames == (mel.shape[-1] - 1) * HOP
    out, _ = soundfile.read(tmp_path / "out.wav", dtype="float32")
    with torch.no_grad():
        expected = load_pretrained(run_dir / "checkpoint-2", family="vocoder")(mel[None])[0][0].clamp(-1, 1)
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1 / 32767 + 1e-6, rtol=0)  # 16-bit samples


def test_vocode_bad_input(run_dir, tmp_path, capsys):
    torch.save(torch.zeros(64, 20), tmp_path / "wrong_mels.pt")
    torch.save({"mel": torch.zeros(80, 20)}, tmp_path / "dict.pt")
    (tmp_path / "text.wav").write_text("not audio")
    soundfile.write(tmp_path / "short.wav", tone(0.02, seed=0).numpy(), 16000)
    (tmp_path / "empty_run").mkdir()
    cases = [
        (["--input", tmp_path / "missing.wav"], "--input"),
        (["--input", tmp_path / "wrong_mels.pt"], "n_mels=80"),
        (["--input", tmp_path / "dict.pt"], "must hold a float tensor (n_mels, T), got dict"),
        (["--input", tmp_path / "text.wav"], "cannot read"),
        (["--input", tmp_path / "short.wav"], "the input has 320 samples"),
    ]
    for flags, message in cases:
        assert vocode_main(run_dir, *flags, "--output", tmp_path / "out.wav") == 1
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error, (flags, error)
    assert vocode_main(tmp_path / "empty_run", "--input", tmp_path / "dict.pt", "--output", tmp_path / "o.wav") == 1
    assert "no checkpoint-* directory" in capsys.readouterr().err
    assert not (tmp_path / "out.wav").exists()


# ----- PESQ and STOI -----

@pytest.fixture(scope="module")
def speech_cache(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): builtin:speech needs it")
    out = tmp_path_factory.mktemp("speech") / "val"
    assert preprocess_vocoder_dataset.main(["--dataset_name", "builtin:speech", "--split", "validation",
                                            "--num_items", "2", "--num_workers", "0", "--output_dir", str(out)]) == 0
    return out


def noisy(clip: torch.Tensor, snr_db: float) -> torch.Tensor:
    noise = torch.randn(clip.shape, generator=torch.Generator().manual_seed(0))
    return clip + noise * clip.pow(2).mean().sqrt() / noise.pow(2).mean().sqrt() * 10 ** (-snr_db / 20)


def test_pesq_and_stoi_peak_for_an_identical_clip_and_fall_with_noise(speech_cache):
    clip = ShardedCache(speech_cache)[0]["waveform"]
    assert pesq_wideband(clip, clip, 16000) == pytest.approx(PESQ_MAXIMUM, abs=1e-3)
    assert stoi_score(clip, clip, 16000) == pytest.approx(1.0, abs=1e-6)
    # measured on this clip: PESQ 1.32, 1.02, 1.02 and STOI 0.991, 0.905, 0.701 at 20, 5, -5 dB SNR
    pesq_scores = [pesq_wideband(clip, noisy(clip, snr), 16000) for snr in (20, 5, -5)]
    stoi_scores = [stoi_score(clip, noisy(clip, snr), 16000) for snr in (20, 5, -5)]
    assert PESQ_MAXIMUM - 1 > pesq_scores[0] > pesq_scores[1] > pesq_scores[2] >= -0.5
    assert 0.995 > stoi_scores[0] > stoi_scores[1] > stoi_scores[2] > 0
    resampled = torchaudio.functional.resample(clip, 16000, 22050)  # PESQ resamples to 16 kHz itself
    assert pesq_wideband(resampled, resampled, 22050) == pytest.approx(PESQ_MAXIMUM, abs=1e-3)


def test_silent_and_short_clips_are_skipped():
    silence, short = torch.zeros(16000), tone(0.2, seed=0)
    for metric in (pesq_wideband, stoi_score):
        with pytest.raises(MetricSkipped, match="silent reference clip"):
            metric(silence, silence, 16000)
    with pytest.raises(MetricSkipped, match="pesq: BufferTooShortError"):
        pesq_wideband(short, short, 16000)
    with pytest.raises(MetricSkipped, match="stoi: fewer than 30 frames of speech"):
        stoi_score(short, short, 16000)


# ----- evaluate_vocoder.py -----

def test_evaluate_writes_the_json_and_matches_the_training_evaluation(run_dir, tone_caches, capsys):
    assert evaluate_main("--run_dir", run_dir, "--data_dir", tone_caches[1]) == 0
    report = json.loads((run_dir / "eval_vocoder.json").read_text())
    assert report["clips"] == 2 and report["checkpoint"] == str(run_dir / "checkpoint-2")
    for name in ("pesq", "stoi", "mel_l1", "mrstft", "rtf"):
        assert report[name]["count"] == 2 and report[name]["skipped"] == 0, name
        assert report[name]["mean"] == pytest.approx(sum(c[name] for c in report["per_clip"]) / 2), name
    assert -0.5 <= report["pesq"]["mean"] <= PESQ_MAXIMUM and 0 <= report["stoi"]["mean"] <= 1
    assert report["rtf"]["mean"] > 0 and report["pesq_resampled_from"] is None
    # the run evaluated the same two clips with the same checkpoint
    logged = EventAccumulator(str(run_dir))
    logged.Reload()
    for name in ("mel_l1", "mrstft"):
        assert report[name]["mean"] == pytest.approx(logged.Scalars(f"eval/{name}")[-1].value, rel=1e-5), name
    printed = capsys.readouterr().out
    for label in ("PESQ (wideband)", "STOI", "mel L1", "MR-STFT distance", "real-time factor"):
        assert label in printed
    assert f"saved {run_dir / 'eval_vocoder.json'}" in printed


def test_evaluate_counts_the_clips_a_metric_skips(run_dir, tmp_path, capsys):
    cache = write_cache(tmp_path / "mixed", [tone(1.0, seed=4), torch.zeros(16000), tone(0.05, seed=5)])
    output = tmp_path / "report.json"
    assert evaluate_main("--checkpoint", run_dir / "checkpoint-2", "--data_dir", cache.directory,
                         "--output_json", output) == 0
    report = json.loads(output.read_text())
    counts = {name: (report[name]["count"], report[name]["skipped"]) for name in ("pesq", "stoi", "mel_l1", "rtf")}
    assert counts == {"pesq": (1, 2), "stoi": (1, 2), "mel_l1": (2, 1), "rtf": (3, 0)}
    assert report["skipped"] == {"pesq: silent reference clip": 1, "stoi: silent reference clip": 1,
                                 "pesq: BufferTooShortError": 1, "stoi: fewer than 30 frames of speech": 1,
                                 "mel_l1 and mrstft: fewer than 1025 samples": 1}
    assert [clip["pesq"] is None for clip in report["per_clip"]] == [False, True, True]
    assert "skipped 1 clip(s): pesq: silent reference clip" in capsys.readouterr().out


def test_evaluate_on_speech_with_max_items(run_dir, speech_cache, tmp_path):
    output = tmp_path / "speech.json"
    assert evaluate_main("--run_dir", run_dir, "--data_dir", speech_cache, "--max_items", 1,
                         "--output_json", output) == 0
    report = json.loads(output.read_text())
    assert report["clips"] == 1 and report["per_clip"][0]["source_id"] == ShardedCache(speech_cache)[0]["source_id"]
    assert report["pesq"]["count"] == report["stoi"]["count"] == 1
    assert report["pesq"]["mean"] < PESQ_MAXIMUM - 1  # two training steps on tones do not make speech


def test_evaluate_bad_input(run_dir, tmp_path, capsys):
    other = write_cache(tmp_path / "n_mels_64", [tone(1.0, seed=0)], AudioFeatureConfig(n_mels=64))
    cases = [
        (["--data_dir", tmp_path / "missing"], "preprocess_vocoder_dataset.py"),
        (["--data_dir", other.directory], "n_mels=64, but config"),
        (["--data_dir", other.directory, "--max_items", 0], "--max_items must be at least 1"),
    ]
    for flags, message in cases:
        assert evaluate_main("--run_dir", run_dir, *flags) == 1
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error, (flags, error)
    assert evaluate_main("--checkpoint", tmp_path, "--data_dir", other.directory) == 1
    assert "config.yaml and model.safetensors" in capsys.readouterr().err


# ----- evaluate_vocoder.py --input_dir and --baseline griffin_lim; inference/examples -----

@pytest.fixture
def audio_folder(tmp_path) -> Path:
    """Two good files (a 16 kHz wav and a stereo 22.05 kHz flac in a subfolder), a corrupt one, a too short one
    and a text file that is not audio."""
    root = tmp_path / "clips"
    (root / "more").mkdir(parents=True)
    soundfile.write(root / "a.wav", tone(1.1, seed=1).numpy(), 16000)
    stereo = torch.stack([tone(0.9, seed=2, sample_rate=22050), tone(0.9, seed=3, sample_rate=22050)], dim=1)
    soundfile.write(root / "more" / "b.flac", stereo.numpy(), 22050)
    (root / "broken.wav").write_bytes(b"RIFF\x00\x01\x00\x00WAVEfmt not audio")
    soundfile.write(root / "tiny.wav", np.zeros(300, np.float32) + 0.1, 16000)
    (root / "notes.txt").write_text("not audio")
    return root


def test_folder_clips_decode_resample_pad_and_skip(audio_folder):
    clips, skipped = folder_clips(audio_folder, FEATURES)
    assert [clip["source_id"] for clip in clips] == ["a.wav", "more/b.flac"]
    assert [skip["source_id"] for skip in skipped] == ["broken.wav", "tiny.wav"]
    assert skipped[0]["reason"].startswith("unreadable") and "too short (300 samples" in skipped[1]["reason"]
    data, rate = soundfile.read(audio_folder / "more" / "b.flac", dtype="float32")
    mono = torchaudio.functional.resample(torch.from_numpy(data).mean(dim=1), rate, 16000)  # 14400 samples
    expected = torch.nn.functional.pad(mono, (0, -len(mono) % 256))  # a multiple of the hop: 14592
    torch.testing.assert_close(clips[1]["waveform"], expected)
    torch.testing.assert_close(clips[1]["mel"], log_mel(expected, FEATURES))
    assert clips[0]["waveform"].numel() == 17664  # 17600 samples padded to 69 hops


def test_evaluate_a_folder_with_the_griffin_lim_baseline(run_dir, audio_folder, tmp_path, capsys):
    output = tmp_path / "report.json"
    assert evaluate_main("--run_dir", run_dir, "--input_dir", audio_folder, "--baseline", "griffin_lim",
                         "--griffin_lim_iters", 16, "--output_json", output) == 0
    report = json.loads(output.read_text())
    assert report["clips"] == 2 and report["input_dir"] == str(audio_folder) and report["data_dir"] is None
    assert [skip["source_id"] for skip in report["files_skipped"]] == ["broken.wav", "tiny.wav"]
    baseline = report["baseline"]
    assert baseline["n_iter"] == 16 and len(baseline["per_clip"]) == 2
    for name in ("pesq", "stoi", "mel_l1", "mrstft", "rtf"):
        assert report[name]["count"] == baseline[name]["count"] == 2, name
    # two training steps do not make a vocoder: Griffin-Lim on the same mels is closer to the clips (measured: mel
    # L1 0.43 against 0.72; the vocoder's magnitude starts at the mel's least-squares magnitude, its phase untrained)
    assert baseline["mel_l1"]["mean"] < report["mel_l1"]["mean"] - 0.15
    assert 0 < baseline["stoi"]["mean"] < 1 and baseline["stoi"]["mean"] != report["stoi"]["mean"]
    printed = capsys.readouterr().out
    assert "vocoder mean ± std" in printed and "Griffin-Lim mean ± std" in printed
    assert "skipped 2 file(s)" in printed and "broken.wav: unreadable" in printed


def test_evaluate_folder_errors(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.flac").write_bytes(b"fLaC nothing")
    cases = [
        (["--input_dir", tmp_path / "empty"], "holds no .wav/.flac/.ogg files"),
        (["--input_dir", tmp_path / "missing"], "does not exist"),
        (["--input_dir", tmp_path / "bad"], "every file of --input_dir"),
        (["--input_dir", tmp_path / "bad", "--baseline", "griffin_lim", "--griffin_lim_iters", 0],
         "--griffin_lim_iters must be at least 1"),
    ]
    for flags, message in cases:
        assert evaluate_main("--run_dir", run_dir, *flags) == 1
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and "Traceback" not in error, (flags, error)


def test_the_example_clips_are_small_speech_that_griffin_lim_resynthesises(run_dir, tmp_path):
    files = sorted(EXAMPLES.glob("*.flac"))
    readme = (EXAMPLES / "README.md").read_text()
    assert len(files) == 5 and sum(path.stat().st_size for path in files) < 1_000_000
    for path in files:
        info = soundfile.info(path)
        assert info.samplerate == 16000 and info.channels == 1 and 2 < info.duration < 6, path
        assert f"$T/{path.stem}.wav" in readme, path  # the README gives the command that made it
    clips, skipped = folder_clips(EXAMPLES, FEATURES)
    assert len(clips) == 5 and skipped == []
    output = tmp_path / "examples.json"
    assert evaluate_main("--run_dir", run_dir, "--input_dir", EXAMPLES, "--baseline", "griffin_lim",
                         "--griffin_lim_iters", 32, "--max_items", 2, "--output_json", output) == 0
    baseline = json.loads(output.read_text())["baseline"]
    # measured on the first two clips (espeak-ng en-gb+f3 and en-us), 32 iterations: PESQ-WB 2.39, STOI 0.94
    assert baseline["stoi"]["count"] == 2 and baseline["stoi"]["mean"] > 0.85
    assert baseline["pesq"]["mean"] > 1.6
