"""The independent speech judges (training/speech_judges.py): pocketsphinx transcribes real flite recordings of
held-out builtin:phrases prompts (nearly) right and white noise or silence not at all; the resemblyzer speaker
judge assigns real clips to their voices and follows the voice, not the words; word errors count as edit distance;
bad input (wrong sample rate, empty or multichannel audio, unknown grammar words, too few speakers) is a clear
ValueError."""

import json
import shutil
from pathlib import Path

import pytest
import soundfile
import torch

from data.builtin_phrases import COLOURS, DIGITS, OBJECTS, SPEAKERS, phrase_utterances
from data.builtin_speech import Utterance, synthesize
from model.audio.speaker_encoders import ResemblyzerEncoder
from training.speech_judges import SpeakerJudge, SpeechRecognizer, check_clip, slot_grammar, word_errors

pytest.importorskip("pocketsphinx", reason="pocketsphinx is not installed (pip install pocketsphinx)")
needs_flite = pytest.mark.skipif(shutil.which("flite") is None,
                                 reason="flite is not installed (apt-get install flite): builtin:phrases needs it")
SLOTS = (COLOURS, OBJECTS, DIGITS)
# Measured on the first 12 validation utterances (3 words each): grammar 0% and open 50% WER; on 200: 0% and 47.5%.
MAX_GRAMMAR_WER, MAX_OPEN_WER = 0.1, 0.7


@pytest.fixture(scope="module")
def recognisers():
    return {"grammar": SpeechRecognizer(grammar=SLOTS), "open": SpeechRecognizer()}


def clip(item: Utterance) -> tuple[torch.Tensor, int]:
    samples, rate = synthesize(item)
    return torch.from_numpy(samples), rate


def wer(recogniser, references: list[str], clips: list[tuple]) -> float:
    counts = [word_errors(text, recogniser.transcribe(*audio)) for text, audio in zip(references, clips)]
    return sum(errors for errors, _ in counts) / sum(words for _, words in counts)


def test_word_errors_count_substitutions_deletions_and_insertions():
    assert word_errors("red box seven", "red box seven") == (0, 3)
    assert word_errors("red box seven", "Red box, seven.") == (0, 3)  # case and punctuation do not count
    assert word_errors("red box seven", "red fox seven") == (1, 3)
    assert word_errors("red box seven", "red seven") == (1, 3)
    assert word_errors("red box seven", "the red box seven two") == (2, 3)
    assert word_errors("red box two", "two(2) red box") == (2, 3)  # pocketsphinx's alternative marks are dropped
    assert word_errors("red box seven", "") == (3, 3)
    with pytest.raises(ValueError, match="empty reference transcript"):
        word_errors(" ", "red")


def test_grammar_and_clip_errors(recognisers):
    assert slot_grammar((("Red", "blue"), ("box",))).endswith("public <utterance> = (red | blue) (box);\n")
    with pytest.raises(ValueError, match="every slot at least one word"):
        slot_grammar((("red",), ()))
    with pytest.raises(ValueError, match="missing from pocketsphinx's dictionary: zzyzxq"):
        SpeechRecognizer(grammar=(("red", "zzyzxq"), ("box",)))
    with pytest.raises(ValueError, match="takes 16000 Hz audio, got 22050 Hz: resample"):
        recognisers["grammar"].transcribe(torch.zeros(22050), 22050)
    with pytest.raises(ValueError, match="empty audio clip"):
        recognisers["open"].transcribe(torch.zeros(0), 16000)
    with pytest.raises(ValueError, match=r"one channel of samples \(S,\), got shape \(2, 100\)"):
        check_clip(torch.zeros(2, 100), 16000)
    with pytest.raises(ValueError, match="non-finite"):
        check_clip(torch.tensor([0.0, float("nan")]), 16000)
    with pytest.raises(ValueError, match="positive integer"):
        check_clip(torch.zeros(10), 0)


@needs_flite
def test_real_held_out_phrases_are_transcribed_and_noise_is_not(recognisers):
    items = list(phrase_utterances("validation", 12))
    texts, clips = [item.text for item in items], [clip(item) for item in items]
    assert wer(recognisers["grammar"], texts, clips) <= MAX_GRAMMAR_WER
    assert wer(recognisers["open"], texts, clips) <= MAX_OPEN_WER
    generator = torch.Generator().manual_seed(0)
    noise = [(0.3 * torch.randn(audio.numel(), generator=generator), rate) for audio, rate in clips[:4]]
    silence = [(torch.zeros(audio.numel()), rate) for audio, rate in clips[:4]]
    for recogniser in recognisers.values():
        assert wer(recogniser, texts[:4], noise) >= 0.9 and wer(recogniser, texts[:4], silence) >= 0.9


@needs_flite
def test_the_speaker_judge_finds_the_voice_not_the_words():
    train = {}
    for item in phrase_utterances("train", 40):
        train.setdefault(item.voice, []).append(clip(item))
    assert set(train) == {voice for voice, _ in SPEAKERS}
    encoder = ResemblyzerEncoder()
    judge = SpeakerJudge.fit(encoder, train)
    held_out = list(phrase_utterances("validation", 16))
    assert judge.classify([clip(item) for item in held_out]) == [item.voice for item in held_out]
    same_words = [Utterance("x", voice, rate, None, "green hat nine") for voice, rate in SPEAKERS]
    assert judge.classify([clip(item) for item in same_words]) == [voice for voice, _ in SPEAKERS]
    # without slt's centroid an slt clip goes to another voice; given slt's real clips it moves to slt
    slt_clip = clip(same_words[-1])
    without_slt = SpeakerJudge.fit(encoder, {voice: clips for voice, clips in train.items() if voice != "slt"})
    assert without_slt.classify([slt_clip]) != ["slt"] and judge.classify([slt_clip]) == ["slt"]
    similarities = judge.similarities([slt_clip])
    assert similarities.shape == (1, 4) and int(similarities.argmax()) == judge.speakers.index("slt")


def test_speaker_judge_errors():
    encoder = ResemblyzerEncoder()
    tone = (0.1 * torch.sin(torch.arange(16000) * 0.05), 16000)
    with pytest.raises(ValueError, match="at least two speakers, got 1: slt"):
        SpeakerJudge.fit(encoder, {"slt": [tone]})
    with pytest.raises(ValueError, match="no real clips for speaker.* awb"):
        SpeakerJudge.fit(encoder, {"slt": [tone], "awb": []})
    judge = SpeakerJudge.fit(encoder, {"slt": [tone], "awb": [(tone[0] * 0.5 + 0.05 * torch.randn(16000), 16000)]})
    with pytest.raises(ValueError, match="empty audio clip"):
        judge.classify([(torch.zeros(0), 16000)])


@needs_flite
def test_a_transcript_does_not_depend_on_the_clips_before_it(recognisers):
    items = list(phrase_utterances("validation", 6))
    clips = [clip(item) for item in items]
    for recogniser in recognisers.values():
        forward = [recogniser.transcribe(*audio) for audio in clips]
        assert [recogniser.transcribe(*audio) for audio in clips[::-1]] == forward[::-1]


@needs_flite
def test_the_bench_cli_judges_real_recordings_and_checks_its_flags(tmp_path, capsys):
    from bench import speech_judges

    assert speech_judges.main(["--num_items", "4", "--centroid_items", "12", "--output_dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "judges.json").read_text())
    real = report["sets"]["real"]
    assert set(report["sets"]) == {"real"} and real["overall"]["clips"] == 4
    assert len(list(tmp_path.glob("real/*.wav"))) == 4
    assert real["overall"]["wer_grammar"] <= MAX_GRAMMAR_WER and real["overall"]["speaker_accuracy"] == 1.0
    assert "real recordings (ceiling)" in capsys.readouterr().out
    assert speech_judges.main(["--run_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path)]) == 1
    assert "--run_dir needs --vocoder_checkpoint" in capsys.readouterr().err
    # a listing of wavs made elsewhere (bench/wm_speech_eval.py's prompts.tsv): one set per wav column
    (tmp_path / "noise").mkdir()
    rows = []
    for index, clip_row in enumerate(real["clips"]):
        wav = f"noise/{index:03d}.wav"
        noise = 0.3 * torch.randn(16000, generator=torch.Generator().manual_seed(index))
        soundfile.write(tmp_path / wav, noise.numpy(), 16000)
        rows.append(f"{index}\t{clip_row['speaker']}\t{clip_row['text']}\t{wav}\treal/{Path(clip_row['path']).name}\n")
    (tmp_path / "prompts.tsv").write_text("".join(rows))
    assert speech_judges.main(["--listing", str(tmp_path / "prompts.tsv"), "--centroid_items", "12"]) == 0
    printed = capsys.readouterr().out  # a listing's sets are named by their folders: its "real" may be decoded
    assert "\nreal " in printed and "\nnoise " in printed and "recordings (ceiling)" not in printed
    listed = json.loads((tmp_path / "judges.json").read_text())["sets"]
    assert listed["real"]["overall"] == real["overall"] and listed["noise"]["overall"]["wer_grammar"] == 1.0
    (tmp_path / "bad.tsv").write_text("0\tjohn\tred box one\treal/000.wav\n")
    assert speech_judges.main(["--listing", str(tmp_path / "bad.tsv")]) == 1
    assert "speaker 'john' is not a builtin:phrases voice" in capsys.readouterr().err
