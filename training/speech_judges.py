"""Independent judges of speech, to score generated speech against real recordings (bench/speech_judges.py,
bench/audio_recipe.sh). Neither judge was trained by us or on our data: both ship their weights in pip wheels.

- Intelligibility: pocketsphinx 5 (CMU Sphinx; its US English acoustic model, CMUdict and 3-gram language model
  are inside the wheel) transcribes 16 kHz speech, open-vocabulary (`SpeechRecognizer()`) or restricted to a
  grammar of word slots (`SpeechRecognizer(grammar=...)`: one word of each slot in turn, compiled to JSGF).
  `word_errors` counts substitutions, deletions and insertions against the reference; WER = errors / words.
- Speaker: `SpeakerJudge` embeds clips with a pretrained speaker encoder (model/audio/speaker_encoders.py:
  `ResemblyzerEncoder` offline) and assigns each clip to the speaker whose centroid (the L2-normalised mean
  embedding of that speaker's real recordings) has the highest cosine similarity.

    recogniser = SpeechRecognizer(grammar=(COLOURS, OBJECTS, DIGITS))   # or SpeechRecognizer(): open vocabulary
    text = recogniser.transcribe(waveform, 16000)       # waveform (S,) float in [-1, 1] -> "red box two"
    errors, words = word_errors("red box seven", text)                  # (1, 3)
    judge = SpeakerJudge.fit(ResemblyzerEncoder(), {"slt": [(waveform, 16000), ...], "awb": [...]})
    speakers = judge.classify([(waveform, 16000), ...])                 # ["slt", ...]
"""

import importlib.util
import re
from collections.abc import Sequence

import numpy as np
import torch

RECOGNISER_RATE = 16000  # pocketsphinx's en-us acoustic model is trained on 16 kHz speech
GRAMMAR_SEARCH = "slots"


def check_clip(waveform, sample_rate: int, required_rate: int | None = None) -> torch.Tensor:
    """waveform (S,) (numpy or torch) at sample_rate -> float32 torch (S,); ValueError for an empty, non-1-D or
    non-finite waveform, a sample rate that is not a positive integer, or one other than required_rate."""
    waveform = torch.as_tensor(waveform, dtype=torch.float32)
    if waveform.dim() != 1:
        raise ValueError(f"a clip must be one channel of samples (S,), got shape {tuple(waveform.shape)}: mix to mono")
    if waveform.numel() == 0:
        raise ValueError("empty audio clip: a judge needs at least some samples")
    if not torch.isfinite(waveform).all():
        raise ValueError("the audio clip holds non-finite samples (NaN or inf)")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample rate must be a positive integer (Hz), got {sample_rate!r}")
    if required_rate is not None and sample_rate != required_rate:
        raise ValueError(f"pocketsphinx's en-us model takes {required_rate} Hz audio, got {sample_rate} Hz: resample "
                         f"first (torchaudio.functional.resample(waveform, {sample_rate}, {required_rate}))")
    return waveform


def normalise_words(text: str) -> list[str]:
    """Lower-case words without punctuation or pocketsphinx's alternative-pronunciation marks ("two(2)")."""
    words = re.sub(r"\(\d+\)", " ", text.lower()).replace("'", "").split()
    return [cleaned for word in words if (cleaned := re.sub(r"[^a-z0-9]", "", word))]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edit distance between them, words in reference) after normalise_words; ValueError for an empty
    reference."""
    ref, hyp = normalise_words(reference), normalise_words(hypothesis)
    if not ref:
        raise ValueError(f"empty reference transcript {reference!r}: WER needs the words that were meant")
    distances = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        diagonal, distances[0] = distances[0], i
        for j, hyp_word in enumerate(hyp, start=1):
            diagonal, distances[j] = distances[j], min(distances[j] + 1, distances[j - 1] + 1,
                                                       diagonal + (ref_word != hyp_word))
    return distances[-1], len(ref)


def slot_grammar(slots: Sequence[Sequence[str]]) -> str:
    """JSGF for "one word of slots[0], then one of slots[1], ...": e.g. (red | blue) (box | cup) (one | two)."""
    if not slots or any(not slot for slot in slots):
        raise ValueError("a slot grammar needs at least one slot, and every slot at least one word")
    body = " ".join("(" + " | ".join(word.lower() for word in slot) + ")" for slot in slots)
    return f"#JSGF V1.0;\ngrammar {GRAMMAR_SEARCH};\npublic <utterance> = {body};\n"


class SpeechRecognizer:
    """pocketsphinx with its wheel's US English model: open-vocabulary with its language model, or, given
    `grammar` (word slots, see slot_grammar), only the word sequences of the grammar."""

    def __init__(self, grammar: Sequence[Sequence[str]] | None = None):
        if importlib.util.find_spec("pocketsphinx") is None:
            raise ValueError("the speech judge needs pocketsphinx (its English model ships inside the wheel): "
                             "pip install pocketsphinx")
        from pocketsphinx import Decoder

        self.mode = "open" if grammar is None else "grammar"
        if grammar is None:
            self.decoder, self.grammar = Decoder(samprate=RECOGNISER_RATE, loglevel="FATAL"), None
            return
        self.decoder = Decoder(samprate=RECOGNISER_RATE, lm=None, loglevel="FATAL")
        unknown = sorted({word.lower() for slot in grammar for word in slot
                          if self.decoder.lookup_word(word.lower()) is None})
        if unknown:
            raise ValueError(f"grammar words missing from pocketsphinx's dictionary: {', '.join(unknown)}")
        self.grammar = slot_grammar(grammar)

    def transcribe(self, waveform, sample_rate: int) -> str:
        """waveform (S,) float in [-1, 1] at 16 kHz -> the recognised words, lower case ("" when none). Each clip
        is decoded from the decoder's initial state (reinit: about 0.5 s with the language model), since
        pocketsphinx otherwise adapts its cepstral mean and search to the clips before, and a transcript would
        depend on their order."""
        waveform = check_clip(waveform, sample_rate, RECOGNISER_RATE)
        pcm = (waveform.clamp(-1, 1) * 32767).round().to(torch.int16).numpy().tobytes()
        self.decoder.reinit()
        if self.grammar is not None:
            self.decoder.add_jsgf_string(GRAMMAR_SEARCH, self.grammar)
            self.decoder.activate_search(GRAMMAR_SEARCH)
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hypothesis = self.decoder.hyp()
        return " ".join(normalise_words(hypothesis.hypstr)) if hypothesis is not None else ""


class SpeakerJudge:
    """Nearest speaker centroid by cosine similarity of speaker-encoder embeddings. `centroids` (N, D) are
    L2-normalised; `speakers` names their rows."""

    def __init__(self, encoder, speakers: list[str], centroids: torch.Tensor):
        self.encoder, self.speakers, self.centroids = encoder, speakers, centroids

    @classmethod
    def fit(cls, encoder, clips_by_speaker: dict[str, list[tuple]]) -> "SpeakerJudge":
        """A judge whose centroids are the mean embeddings of each speaker's (waveform (S,), sample_rate) clips."""
        if len(clips_by_speaker) < 2:
            raise ValueError(f"a speaker judge needs real clips of at least two speakers, got "
                             f"{len(clips_by_speaker)}: {', '.join(clips_by_speaker) or 'none'}")
        empty = [speaker for speaker, clips in clips_by_speaker.items() if not clips]
        if empty:
            raise ValueError(f"no real clips for speaker(s) {', '.join(empty)}: each needs at least one")
        speakers = sorted(clips_by_speaker)
        judge = cls(encoder, speakers, torch.empty(0))
        means = [judge.embed(clips_by_speaker[speaker]).mean(dim=0) for speaker in speakers]
        judge.centroids = torch.nn.functional.normalize(torch.stack(means), dim=1)
        return judge

    def embed(self, clips: list[tuple]) -> torch.Tensor:
        """(waveform (S,), sample_rate) clips -> embeddings (B, D) float32 on the CPU."""
        return torch.cat([self.encoder.embed([check_clip(waveform, rate)], rate).float().cpu()
                          for waveform, rate in clips])

    def similarities(self, clips: list[tuple]) -> torch.Tensor:
        """Cosine similarity of each clip to each speaker's centroid: (B, N), columns in self.speakers' order."""
        return torch.nn.functional.normalize(self.embed(clips), dim=1) @ self.centroids.T

    def classify(self, clips: list[tuple]) -> list[str]:
        """The nearest speaker of each (waveform (S,), sample_rate) clip."""
        return [self.speakers[index] for index in self.similarities(clips).argmax(dim=1).tolist()]
