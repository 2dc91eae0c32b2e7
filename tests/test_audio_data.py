"""Audio sources (folder, saved dataset, hub, builtin:speech), segmenting, and preprocess_vocoder_dataset.py."""

import math
import shutil

import numpy as np
import pytest
import soundfile
import torch

import preprocess_vocoder_dataset
from data.audio_sources import AudioRecord, AudioSource, Segmenting, load_segments, rms_db
from data.builtin_speech import SPEAKERS
from data.sharded_cache import ShardedCache
from model.audio.features import AudioFeatureConfig, log_mel

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")
TONE_HZ, TONE_AMPLITUDE = 440.0, 0.3


def tone(seconds: float, sample_rate: int, hz: float = TONE_HZ, amplitude: float = TONE_AMPLITUDE) -> np.ndarray:
    """A sine, float32 (S,): amplitude * sin(2 pi hz t)."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def preprocess(*args) -> int:
    return preprocess_vocoder_dataset.main([str(arg) for arg in args])


@pytest.fixture
def audio_dir(tmp_path):
    """A folder with good files (44.1/22.05/16 kHz, stereo, wav/flac/ogg, transcripts), a corrupt file, a silent
    file and a too-short file."""
    root = tmp_path / "audio"
    (root / "alice").mkdir(parents=True)
    (root / "bob").mkdir()
    stereo = np.stack([tone(2.5, 44100), 0.5 * tone(2.5, 44100)], axis=1)  # mono mix: 0.75 * tone
    soundfile.write(root / "alice" / "hello.wav", stereo, 44100, subtype="FLOAT")
    (root / "alice" / "hello.txt").write_text("hello from alice\n")
    soundfile.write(root / "bob" / "story.flac", tone(1.5, 22050, hz=300), 22050)
    long = np.concatenate([tone(4, 16000), np.zeros(64000, np.float32), tone(1.5, 16000, hz=500)])
    soundfile.write(root / "long.wav", long, 16000, subtype="FLOAT")  # pieces: tone, silence, 1.5 s tail
    soundfile.write(root / "other.ogg", tone(1.2, 16000, hz=250), 16000)
    soundfile.write(root / "silent.wav", np.zeros(32000, np.float32), 16000)
    soundfile.write(root / "short.wav", tone(0.3, 16000), 16000)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x01\x00\x00WAVEfmt this is not audio")
    (root / "metadata.csv").write_text("file_name,text,speaker\nbob/story.flac,once upon a time,robert\n"
                                       "long.wav,a long one,\n")
    return root


def all_items(cache_dir) -> list[dict]:
    return list(ShardedCache(cache_dir))


def both_splits(tmp_path, source_args: list, *extra) -> dict[str, list[dict]]:
    items = {}
    for split in ("train", "validation"):
        assert preprocess(*source_args, "--split", split, "--output_dir", tmp_path / split, "--num_workers", 0,
                          *extra) == 0
        items[split] = all_items(tmp_path / split)
    return items


def assert_same_items(first: list[dict], second: list[dict]) -> None:
    """What a cache promises across runs, worker counts and thread counts: the same items in the same order, every
    key, text, id and integer tensor bit for bit, float tensors (waveforms, mels) equal to float32 rounding (their
    resampling and STFT kernels may sum in another order on another thread count or CPU)."""
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor) and a[key].is_floating_point():
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
            elif isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def test_assert_same_items_tolerates_rounding_but_not_different_audio():
    item = {"waveform": torch.linspace(-0.5, 0.5, 100), "length": torch.tensor(100), "text": "a"}
    rounded = dict(item, waveform=item["waveform"] + 1e-25)  # the size of a reordered float32 sum near silence
    assert_same_items([item], [rounded])
    for changed in (dict(item, waveform=item["waveform"] * 1.01), dict(item, length=torch.tensor(99)),
                    dict(item, text="b"), dict(item, waveform=item["waveform"][:99])):
        with pytest.raises(AssertionError):
            assert_same_items([item], [changed])


# ----- folders -----

def test_folder_round_trip(tmp_path, audio_dir, capsys):
    items = both_splits(tmp_path, ["--input_dir", audio_dir])
    by_id = {item["source_id"]: item for split in items.values() for item in split}
    assert sorted(by_id) == ["alice/hello.wav#0", "bob/story.flac#0", "long.wav#0", "long.wav#2", "other.ogg#0"]
    assert not {item["source_id"] for item in items["train"]} & {item["source_id"] for item in items["validation"]}
    assert items["train"] and items["validation"]

    config = AudioFeatureConfig()
    for item in by_id.values():
        assert item["waveform"].dtype == item["mel"].dtype == torch.float32 and item["waveform"].dim() == 1
        assert torch.allclose(item["mel"], log_mel(item["waveform"], config), atol=1e-5)

    hello = by_id["alice/hello.wav#0"]  # 44.1 kHz stereo -> 16 kHz mono, compared with the closed form
    assert hello["waveform"].numel() == 40000
    expected = torch.from_numpy(0.75 * tone(2.5, 16000))
    assert torch.allclose(hello["waveform"][200:-200], expected[200:-200], atol=2e-3)
    story = by_id["bob/story.flac#0"]  # 22.05 kHz -> 16 kHz; its spectrum peaks at 300 Hz
    assert story["waveform"].numel() == 24000
    spectrum = torch.fft.rfft(story["waveform"]).abs()
    assert abs(float(spectrum.argmax()) * 16000 / 24000 - 300) < 1

    assert (hello["text"], hello["speaker"]) == ("hello from alice", "alice")  # .txt beside, subfolder
    assert (story["text"], story["speaker"]) == ("once upon a time", "robert")  # metadata.csv
    assert (by_id["long.wav#0"]["text"], by_id["long.wav#0"]["speaker"]) == ("a long one", "")
    assert by_id["other.ogg#0"]["text"] == ""

    metas = {split: ShardedCache(tmp_path / split).meta for split in items}
    skipped = {skip["source_id"]: skip["reason"] for meta in metas.values() for skip in meta["skipped"]}
    assert sorted(skipped) == ["corrupt.wav", "short.wav", "silent.wav"]
    assert skipped["corrupt.wav"].startswith("unreadable") and skipped["silent.wav"].startswith("silent")
    assert skipped["short.wav"].startswith("too short")
    assert sum(meta["silent_segments_dropped"] for meta in metas.values()) == 1  # long.wav's middle piece
    assert sum(meta["records_read"] for meta in metas.values()) == 7
    assert all(meta["features"] == config.to_dict() for meta in metas.values())
    assert sum(meta["seconds"] for meta in metas.values()) == pytest.approx(2.5 + 1.5 + 4 + 1.5 + 1.2)
    printed = capsys.readouterr().out
    for name, reason in skipped.items():
        assert f"skipped {name}: {reason}" in printed


def test_workers_give_the_same_cache(tmp_path, audio_dir):
    for workers in (0, 2):
        assert preprocess("--input_dir", audio_dir, "--output_dir", tmp_path / f"w{workers}",
                          "--num_workers", workers, "--items_per_shard", 2) == 0
    assert_same_items(all_items(tmp_path / "w0"), all_items(tmp_path / "w2"))
    meta0, meta2 = (ShardedCache(tmp_path / name).meta for name in ("w0", "w2"))
    assert meta0["shards"] == meta2["shards"] and meta0["skipped"] == meta2["skipped"]


def test_segmenting_a_long_file(tmp_path):
    soundfile.write(tmp_path / "long.wav", tone(9.5, 8000), 8000, subtype="FLOAT")
    record = AudioRecord("long.wav", path=str(tmp_path / "long.wav"))
    loaded = load_segments(record, Segmenting(sample_rate=16000, segment_seconds=4.0, min_segment_seconds=1.0))
    assert loaded.skipped is None and loaded.silent_segments == 0
    assert {index: piece.numel() for index, piece in loaded.segments.items()} == {0: 64000, 1: 64000, 2: 24000}
    joined = torch.cat(list(loaded.segments.values()))
    assert torch.allclose(joined[200:-200], torch.from_numpy(tone(9.5, 16000))[200:-200], atol=2e-3)
    loaded = load_segments(record, Segmenting(sample_rate=16000, segment_seconds=3.0, min_segment_seconds=1.0))
    assert [piece.numel() for piece in loaded.segments.values()] == [48000] * 3  # the 0.5 s tail is dropped


def test_rms_db_closed_form():
    assert rms_db(torch.from_numpy(tone(1, 16000, amplitude=0.5))) == pytest.approx(20 * math.log10(0.5 / 2**0.5),
                                                                                   abs=1e-3)
    assert rms_db(torch.zeros(100)) == -math.inf


def test_folder_errors(tmp_path, audio_dir, capsys):
    assert preprocess("--input_dir", tmp_path / "missing", "--output_dir", tmp_path / "out") == 1
    assert "--input_dir" in capsys.readouterr().err
    (tmp_path / "one").mkdir()
    soundfile.write(tmp_path / "one" / "a.wav", tone(2, 16000), 16000)
    assert preprocess("--input_dir", tmp_path / "one", "--split", "validation", "--output_dir", tmp_path / "out") == 1
    assert "at least 2 files" in capsys.readouterr().err
    assert preprocess("--input_dir", audio_dir, "--split", "test", "--output_dir", tmp_path / "out") == 1
    assert "train or validation" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    for name in ("a.wav", "b.wav"):
        (tmp_path / "bad" / name).write_bytes(b"garbage")
    assert preprocess("--input_dir", tmp_path / "bad", "--output_dir", tmp_path / "out", "--num_workers", 0) == 1
    assert "no audio left to cache" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path, audio_dir, capsys):
    arguments = ["--input_dir", audio_dir, "--output_dir", tmp_path / "out", "--num_workers", 0]
    assert preprocess(*arguments) == 0
    assert preprocess(*arguments) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert preprocess(*arguments, "--overwrite", "--split", "val") == 0
    assert ShardedCache(tmp_path / "out").meta["source"]["split"] == "validation"


# ----- saved datasets and the hub -----

def test_from_disk_dataset_dict_and_single_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    path_file = tmp_path / "on_disk.flac"
    soundfile.write(path_file, tone(1.5, 22050), 22050)
    wav_bytes = (tmp_path / "b.wav")
    soundfile.write(wav_bytes, tone(2.0, 16000, hz=600), 16000)
    rows = {"audio": [{"bytes": wav_bytes.read_bytes(), "path": None}, {"bytes": None, "path": str(path_file)}],
            "text": ["first", "second"], "speaker_id": [11, 12], "id": ["u1", "u2"]}
    with_audio = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"train": with_audio, "validation": with_audio.select([1])}).save_to_disk(tmp_path / "dd")
    assert preprocess("--from_disk", tmp_path / "dd", "--split", "val", "--output_dir", tmp_path / "val",
                      "--num_workers", 0) == 0
    items = all_items(tmp_path / "val")
    assert [(item["source_id"], item["text"], item["speaker"]) for item in items] == [("u2#0", "second", "12")]
    assert items[0]["waveform"].numel() == 24000

    paths = datasets.Dataset.from_dict({"audio": [str(path_file), str(wav_bytes), str(path_file)],
                                        "transcript": ["x", "y", "z"]})
    paths.save_to_disk(tmp_path / "single")
    read = {}
    for split in ("train", "validation"):
        assert preprocess("--from_disk", tmp_path / "single", "--split", split, "--text_column", "transcript",
                          "--output_dir", tmp_path / split, "--num_workers", 0) == 0
        read[split] = [(item["source_id"], item["text"]) for item in all_items(tmp_path / split)]
    assert sorted(read["train"] + read["validation"]) == [("row-0#0", "x"), ("row-1#0", "y"), ("row-2#0", "z")]
    assert read["train"] and read["validation"]


def test_from_disk_errors(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "not_a_dataset").mkdir()
    assert preprocess("--from_disk", tmp_path / "not_a_dataset", "--output_dir", tmp_path / "out") == 1
    assert "not a dataset written by save_to_disk" in capsys.readouterr().err
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"sound": ["a.wav"]})}).save_to_disk(tmp_path / "dd")
    assert preprocess("--from_disk", tmp_path / "dd", "--split", "test", "--output_dir", tmp_path / "out") == 1
    assert "has no split 'test'; available: train" in capsys.readouterr().err
    assert preprocess("--from_disk", tmp_path / "dd", "--output_dir", tmp_path / "out") == 1
    assert "--audio_column" in capsys.readouterr().err


def test_streamed_dataset_by_name(tmp_path, capsys):
    """--dataset_name goes through datasets.load_dataset(..., streaming=True), as for the hub; a local folder of
    parquet files takes the same path with no network."""
    datasets = pytest.importorskip("datasets")
    (tmp_path / "hub" / "data").mkdir(parents=True)
    flac = tmp_path / "a.flac"
    soundfile.write(flac, tone(1.25, 22050, hz=350), 22050)
    rows = {"audio": [{"bytes": flac.read_bytes(), "path": "a.flac"}] * 2, "text": ["one", "two"],
            "speaker_id": [7, 8], "id": ["7-1-0", "8-1-0"]}
    dataset = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio())
    dataset.to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    assert preprocess("--dataset_name", tmp_path / "hub", "--output_dir", tmp_path / "out", "--num_workers", 0) == 0
    items = all_items(tmp_path / "out")
    assert [(item["source_id"], item["text"], item["speaker"]) for item in items] == [("7-1-0#0", "one", "7"),
                                                                                       ("8-1-0#0", "two", "8")]
    assert items[0]["waveform"].numel() == 20000
    assert preprocess("--dataset_name", tmp_path / "hub", "--audio_column", "sound", "--output_dir",
                      tmp_path / "out2") == 1
    assert "no column 'sound'" in capsys.readouterr().err


def test_hub_offline_names_the_local_alternatives(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert preprocess("--output_dir", tmp_path / "librispeech", "--split", "train.360") == 1
    error = capsys.readouterr().err
    assert "openslr/librispeech_asr" in error and "Traceback" not in error
    for alternative in ("--input_dir", "--from_disk", "builtin:speech"):
        assert alternative in error
    assert list(tmp_path.iterdir()) == []


# ----- builtin:speech -----

def test_unknown_builtin_and_missing_espeak(tmp_path, monkeypatch, capsys):
    assert preprocess("--dataset_name", "builtin:music", "--output_dir", tmp_path / "out") == 1
    assert "unknown built-in dataset 'builtin:music'; the audio one is builtin:speech" in capsys.readouterr().err
    monkeypatch.setattr("data.builtin_speech.shutil.which", lambda name: None)
    assert preprocess("--dataset_name", "builtin:speech", "--output_dir", tmp_path / "out") == 1
    assert "apt-get install espeak-ng" in capsys.readouterr().err


@needs_espeak
def test_builtin_speech_splits_are_disjoint_and_deterministic(tmp_path):
    source = ["--dataset_name", "builtin:speech", "--num_items", 3]
    items = both_splits(tmp_path, source)
    assert preprocess(*source, "--split", "train", "--output_dir", tmp_path / "again", "--num_workers", 0) == 0
    assert_same_items(items["train"], all_items(tmp_path / "again"))

    def utterances(split):
        return {item["source_id"].split("#")[0]: item["text"] for item in items[split]}

    train, validation = utterances("train"), utterances("validation")
    assert len(train) == len(validation) == 3
    assert not set(train) & set(validation) and not set(train.values()) & set(validation.values())
    voices = {voice for voice, _ in SPEAKERS}
    for item in items["train"] + items["validation"]:
        seconds = item["waveform"].numel() / 16000
        assert 1.0 <= seconds <= 4.0 and item["speaker"] in voices and len(item["text"].split()) >= 4
        assert rms_db(item["waveform"]) > -35  # speech, not silence
    assert len({item["speaker"] for item in items["train"] + items["validation"]}) > 1
    assert ShardedCache(tmp_path / "train").meta["source"]["kind"] == "builtin"


@needs_espeak
def test_builtin_speech_source_counts():
    records = list(AudioSource(dataset_name="builtin:speech", split="val", num_items=4).records())
    assert len(records) == 4 and all(record.utterance is not None and record.text for record in records)
    assert AudioSource(dataset_name="builtin:speech").expected_items == 1000
