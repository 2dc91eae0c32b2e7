"""builtin:speech's voices: espeak-ng's and flite's, picked by --voices (names and groups), the speaker being the
voice name; the default voices keep the corpus of espeak-ng alone; flite's speaking rate follows the utterance's
speed; a missing synthesiser is a clear error that names the package and the installed voices. builtin:phrases speaks
flite's four voices at varied rates, deterministically, and holds its validation prompts out of train."""

import dataclasses
import json
import shutil

import pytest

import preprocess_vocoder_dataset
from data.audio_sources import AudioSource, rms_db
from data.builtin_phrases import RATE_JITTER, phrase_records, phrase_utterances, prompts_of
from data.builtin_phrases import SPEAKERS as PHRASE_SPEAKERS
from data.builtin_speech import (DEFAULT_VOICES, ESPEAK_VOICES, FLITE_VOICES, SPEAKERS, SpeechUnavailableError,
                                 iter_utterances, parse_voices, synthesize, utterance)
from data.sharded_cache import ShardedCache

needs_flite = pytest.mark.skipif(shutil.which("flite") is None,
                                 reason="flite is not installed (apt-get install flite): its voices cannot be tested")
needs_both = pytest.mark.skipif(shutil.which("flite") is None or shutil.which("espeak-ng") is None,
                                reason="needs flite and espeak-ng (apt-get install flite espeak-ng)")


def preprocess(*args) -> int:
    return preprocess_vocoder_dataset.main([str(arg) for arg in args])


def test_parse_voices_names_groups_and_errors():
    assert parse_voices("all") == ESPEAK_VOICES + FLITE_VOICES and len(parse_voices("all")) == 16
    assert parse_voices("flite") == ("kal16", "awb", "rms", "slt")
    assert parse_voices(" slt, en-us ,slt,flite") == ("slt", "en-us", "kal16", "awb", "rms")
    assert parse_voices(["espeak"]) == tuple(voice for voice, _ in SPEAKERS) == DEFAULT_VOICES
    with pytest.raises(ValueError, match="unknown builtin:speech voice 'kal'.*groups espeak, flite, all"):
        parse_voices("slt,kal")
    with pytest.raises(ValueError, match="no builtin:speech voice given"):
        parse_voices(" , ")


def test_the_default_voices_keep_the_espeak_corpus_and_a_voice_list_picks_the_speakers():
    # the default is the 12 espeak-ng voices in their old order, so utterance k is what it was before flite
    assert all(utterance(k) == utterance(k, 0, ESPEAK_VOICES) for k in range(50))
    assert {utterance(k).voice for k in range(200)} == set(ESPEAK_VOICES)
    mixed = [utterance(k, 0, ("slt", "en-us")) for k in range(60)]
    assert {item.voice for item in mixed} == {"slt", "en-us"}
    assert all((item.pitch is None) == (item.voice == "slt") for item in mixed)  # flite keeps its own pitch
    # the split and the sentences do not depend on the voices
    keys = [item.key for item in iter_utterances("validation", 5, 0.2, voices=("awb",))]
    assert keys == [item.key for item in iter_utterances("validation", 5, 0.2)]


def test_voices_errors(tmp_path, monkeypatch, capsys):
    def preprocess_error(*flags) -> str:
        assert preprocess("--output_dir", tmp_path / "out", *flags) == 1
        return capsys.readouterr().err

    assert "unknown builtin:speech voice 'robot'" in preprocess_error("--dataset_name", "builtin:speech",
                                                                      "--voices", "slt,robot")
    (tmp_path / "audio").mkdir()
    assert "--voices picks the voices of builtin:speech" in preprocess_error("--input_dir", tmp_path / "audio",
                                                                             "--voices", "slt")
    monkeypatch.setattr("data.builtin_speech.shutil.which", lambda name: None if name == "flite" else f"/bin/{name}")
    error = preprocess_error("--dataset_name", "builtin:speech", "--voices", "en-us,slt,awb")
    assert "voice(s) slt, awb need flite, not installed: apt-get install flite" in error
    assert "--voices en-us" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
    with pytest.raises(SpeechUnavailableError, match="apt-get install flite"):
        synthesize(utterance(0, 0, ("rms",)))


def test_builtin_phrases_speak_the_flite_voices_at_varied_rates(monkeypatch):
    train = list(phrase_utterances("train", 200))
    assert train == list(phrase_utterances("train", 200)) and train[:5] != list(phrase_utterances("train", 5, seed=1))
    assert {item.voice for item in train} == set(FLITE_VOICES) and all(item.pitch is None for item in train)
    base_rate = dict(PHRASE_SPEAKERS)
    offsets = {item.speed - base_rate[item.voice] for item in train}
    assert offsets <= set(range(-RATE_JITTER, RATE_JITTER + 1)) and len(offsets) > RATE_JITTER
    held_out = set(prompts_of("validation"))
    assert {item.text for item in phrase_utterances("validation", 50)} <= held_out
    assert not {item.text for item in train} & held_out
    monkeypatch.setattr("data.builtin_speech.shutil.which", lambda name: None if name == "flite" else f"/bin/{name}")
    with pytest.raises(SpeechUnavailableError, match="kal16, awb, rms, slt need flite.*apt-get install flite"):
        phrase_records("train", 2)


@needs_flite
def test_flite_speed_sets_the_speaking_rate():
    item = utterance(3, 0, ("kal16",))
    slow_audio, rate = synthesize(dataclasses.replace(item, speed=140))
    fast_audio, fast_rate = synthesize(dataclasses.replace(item, speed=185))
    assert rate == fast_rate == 16000
    # duration_stretch = 160 / speed: the slow one lasts about 185 / 140 = 1.32 times as long (silences included)
    assert 1.15 < len(slow_audio) / len(fast_audio) < 1.45


@needs_both
def test_a_cache_of_flite_and_espeak_voices(tmp_path, capsys):
    voices = "slt,rms,en-gb"
    assert preprocess("--dataset_name", "builtin:speech", "--voices", voices, "--split", "train", "--num_items", 6,
                      "--num_workers", 0, "--output_dir", tmp_path / "train") == 0
    cache = ShardedCache(tmp_path / "train")
    speakers = {item["speaker"] for item in cache}
    assert speakers <= {"slt", "rms", "en-gb"} and len(speakers) >= 2
    assert cache.meta["speakers"] == sorted(speakers) and cache.meta["source"]["voices"] == ["slt", "rms", "en-gb"]
    for item in cache:
        assert item["waveform"].numel() >= 16000 and rms_db(item["waveform"]) > -35  # speech, not silence
    source = AudioSource(dataset_name="builtin:speech", voices=("slt", "rms", "en-gb"), num_items=6)
    assert [record.speaker for record in source.records()] == [record.utterance.voice for record in source.records()]
    assert json.loads((tmp_path / "train" / "meta.json").read_text())["records_skipped"] == 0
    assert f"{len(speakers)} speaker(s)" in capsys.readouterr().out


@needs_both
def test_a_breathy_espeak_voice_speaks_the_same_on_a_fresh_machine_and_after(tmp_path, monkeypatch):
    # +f3 draws breath noise from C rand(), which espeak-ng's PulseAudio probe also consumes, differently on the
    # first call of a machine (no ~/.config/pulse yet) than on later ones: each call must start from the same state
    monkeypatch.setenv("HOME", str(tmp_path))  # a machine on which espeak-ng has never run
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    item = dataclasses.replace(utterance(0), voice="en-gb-scotland+f3", pitch=60)
    first, rate = synthesize(item)
    again, _ = synthesize(item)
    assert rate == 22050 and first.tobytes() == again.tobytes()
