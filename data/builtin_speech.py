"""`builtin:speech`: English speech synthesised offline with espeak-ng and flite, so audio pipelines need no
download.

Voices (the voice name is the speaker id): the 12 espeak-ng voices of SPEAKERS, each with its own base pitch
(the default set), and the flite voices of FLITE_VOICES (kal16 a diphone voice, awb, rms and slt statistical
voices built from CMU ARCTIC recordings). `parse_voices("all")`, `"espeak"`, `"flite"` or a comma-separated
list of names picks them (preprocess_vocoder_dataset.py --voices).

Utterance k (k = 0, 1, 2, ...) is fixed by `seed`, the voice list and k alone: a sentence made from the word
lists and templates below by `random.Random(f"{seed}:{k}")`, one of the voices, a speaking rate of 140-185
words per minute and, for espeak-ng, a pitch within ±6 of the voice's (flite voices keep their own pitch:
`int_f0_target_mean` moves some of them and not rms). Its key `speech-{k:06d}` decides its split: a hash of the
key below `val_fraction` puts it in validation, else in train. A split's items are the first `num_items`
utterances that fall in it, so train and validation are disjoint and every run gives the same items: the same
keys, texts, voices and lengths bit for bit, and waveforms equal to float32 rounding (after resampling, whose
float32 sums may run in another order on another CPU, thread count or worker count).

Synthesis runs `espeak-ng -v VOICE -s SPEED -p PITCH --stdout TEXT` (about 10 ms per sentence; 22050 Hz) or
`flite -voice VOICE --setf duration_stretch=160/SPEED -t TEXT -o FILE.wav` (about 50 ms; 16 kHz) and reads the
WAV with soundfile. Sentences last about 2 to 5 seconds.
"""

import dataclasses
import hashlib
import io
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import soundfile

BUILTIN_SPEECH_NAME = "builtin:speech"
ESPEAK = "espeak-ng"
FLITE = "flite"
SYNTHESIS_TIMEOUT_S = 60
SPEAKERS = (  # (espeak-ng voice, base pitch 0-99); each gives a distinct voice with espeak-ng 1.51; the default voices
    ("en-us", 45), ("en-gb", 40), ("en-gb-scotland", 50), ("en-gb-x-rp", 35), ("en-029", 55), ("en-us-nyc", 45),
    ("en-us+f3", 60), ("en+f2", 65), ("en-gb-x-rp+f4", 70), ("en-gb-scotland+f3", 60), ("en-us+m3", 30),
    ("en-029+f1", 62),
)
FLITE_VOICES = ("kal16", "awb", "rms", "slt")  # flite 2.2's 16 kHz English voices (kal is kal16 at 8 kHz)
ESPEAK_VOICES = tuple(voice for voice, _ in SPEAKERS)
BASE_PITCH = dict(SPEAKERS)
VOICE_GROUPS = {"espeak": ESPEAK_VOICES, "flite": FLITE_VOICES, "all": ESPEAK_VOICES + FLITE_VOICES}
DEFAULT_VOICES = ESPEAK_VOICES
SPEED_RANGE = (140, 185)
FLITE_REFERENCE_SPEED = 160  # words per minute at flite's duration_stretch 1
PITCH_JITTER = 6
INSTALL = {ESPEAK: "apt-get install espeak-ng", FLITE: "apt-get install flite"}

ADJECTIVES = ("quiet", "bright", "ancient", "narrow", "heavy", "gentle", "curious", "silver", "broken", "patient",
              "golden", "hollow", "tiny", "restless", "careful", "distant", "wooden", "frozen", "busy", "humble",
              "crooked", "shiny", "clever", "muddy", "lonely", "purple", "sturdy", "sleepy", "rusty", "noisy")
NOUNS = ("river", "teacher", "lantern", "garden", "engine", "painter", "harbor", "mountain", "kitchen", "letter",
         "village", "soldier", "window", "market", "farmer", "bridge", "island", "doctor", "violin", "forest",
         "captain", "bicycle", "library", "tailor", "meadow", "station", "blanket", "sailor", "castle", "pencil",
         "orchard", "student", "compass", "chimney", "baker", "tunnel")
PLURALS = ("apples", "stories", "coins", "letters", "songs", "stones", "candles", "maps", "shells", "feathers",
           "bottles", "ribbons", "puzzles", "lanterns", "seeds", "keys")
VERBS_PAST = ("found", "carried", "painted", "watched", "followed", "repaired", "visited", "remembered", "opened",
              "described", "counted", "gathered", "polished", "borrowed", "noticed", "ignored", "admired", "packed")
VERBS_INTRANSITIVE = ("waited", "laughed", "wandered", "listened", "whispered", "slept", "sang", "hesitated",
                      "arrived", "vanished", "shivered", "paused")
PLACES = ("near the old mill", "beside the station", "under the bridge", "across the valley", "inside the library",
          "along the coast", "behind the market", "at the edge of town", "on the hill", "by the harbor")
TIMES = ("this morning", "last winter", "before dawn", "after dinner", "on Sunday", "every evening",
         "in the spring", "at midnight", "yesterday", "long ago", "during the storm", "next week")
NAMES = ("Anna", "Peter", "Maria", "Thomas", "Julia", "Samuel", "Clara", "Oliver", "Nora", "Felix", "Ruth", "Hugo")
CONNECTIVES = ("and then", "but", "because", "while", "so", "although")
TEMPLATES = (
    "The {adj} {noun} {verb} the {adj2} {noun2} {place}.",
    "{name} {verb} {number} {plural} {time}.",
    "{Time}, the {noun} {intransitive} {place}.",
    "Why did the {adj} {noun} {verb_base}?",
    "{name} said that the {noun} {intransitive} {time}.",
    "The {noun} {verb} the {noun2}, {connective} the {adj} {noun3} {intransitive}.",
    "There were {number} {adj} {plural} {place}.",
    "{name} and {name2} {verb} a {adj} {noun} {time}.",
    "Please bring the {adj} {noun} to the {noun2} before {number} o'clock.",
    "Is it true that the {noun} {verb} {number} {plural} {place}?",
)
VERB_BASE = {"found": "find", "carried": "carry", "painted": "paint", "watched": "watch", "followed": "follow",
             "repaired": "repair", "visited": "visit", "remembered": "remember", "opened": "open",
             "described": "describe", "counted": "count", "gathered": "gather", "polished": "polish",
             "borrowed": "borrow", "noticed": "notice", "ignored": "ignore", "admired": "admire", "packed": "pack"}


class SpeechUnavailableError(ValueError):
    """A synthesiser (espeak-ng or flite) is missing or failed; the message says how to install it."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One built-in utterance: `key` (speech-NNNNNN), `voice` (the speaker id), `speed` (words per minute),
    `pitch` (espeak-ng's 0-99; None for a flite voice, which keeps its own) and `text`."""

    key: str
    voice: str
    speed: int
    pitch: int | None
    text: str


def synthesiser(voice: str) -> str:
    """The program that speaks `voice`: espeak-ng or flite."""
    return FLITE if voice in FLITE_VOICES else ESPEAK


def parse_voices(spec: str | Iterable[str]) -> tuple[str, ...]:
    """Voice names from a comma-separated string or a list of names and groups (espeak, flite, all), in order,
    without repeats. ValueError for an unknown name or an empty list."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    voices = []
    for part in (part.strip() for part in parts):
        if not part:
            continue
        if part not in VOICE_GROUPS and part not in VOICE_GROUPS["all"]:
            raise ValueError(f"unknown {BUILTIN_SPEECH_NAME} voice {part!r}; give groups "
                             f"{', '.join(VOICE_GROUPS)} or voices {', '.join(VOICE_GROUPS['all'])}")
        voices += [voice for voice in VOICE_GROUPS.get(part, (part,)) if voice not in voices]
    if not voices:
        raise ValueError(f"no {BUILTIN_SPEECH_NAME} voice given: name at least one (or a group: "
                         f"{', '.join(VOICE_GROUPS)})")
    return tuple(voices)


def require_synthesisers(voices: Iterable[str] = DEFAULT_VOICES) -> dict[str, str]:
    """{program: path} of the synthesisers the voices need, or SpeechUnavailableError saying how to install
    what is missing."""
    voices = tuple(voices)
    paths, missing = {}, []
    for program in dict.fromkeys(synthesiser(voice) for voice in voices):
        path = shutil.which(program)
        if path is None:
            missing.append(program)
        paths[program] = path
    if missing:
        needing = [voice for voice in voices if synthesiser(voice) in missing]
        installed = [voice for voice in voices if synthesiser(voice) not in missing]
        raise SpeechUnavailableError(
            f"{BUILTIN_SPEECH_NAME} voice(s) {', '.join(needing)} need {' and '.join(missing)}, not installed: "
            f"{'; '.join(INSTALL[program] for program in missing)}"
            + (f" (or keep to installed voices: --voices {','.join(installed)})" if installed else "")
            + " (or use --input_dir DIR with your own audio files)")
    return paths


def utterance(index: int, seed: int = 0, voices: tuple[str, ...] = DEFAULT_VOICES) -> Utterance:
    """Utterance number `index` of the corpus made with `seed` and `voices` (independent of split and count;
    the default voices give the corpus of earlier versions, which had only espeak-ng's)."""
    rng = random.Random(f"{seed}:{index}")
    voice = rng.choice(voices)
    speed = rng.randint(*SPEED_RANGE)
    jitter = rng.randint(-PITCH_JITTER, PITCH_JITTER)
    pitch = min(99, max(0, BASE_PITCH[voice] + jitter)) if synthesiser(voice) == ESPEAK else None
    return Utterance(key=f"speech-{index:06d}", voice=voice, speed=speed, pitch=pitch, text=sentence(rng))


def sentence(rng: random.Random) -> str:
    """A sentence from TEMPLATES filled with words drawn by `rng`."""
    adjectives = rng.sample(ADJECTIVES, 2)
    nouns = rng.sample(NOUNS, 3)
    names = rng.sample(NAMES, 2)
    verb = rng.choice(VERBS_PAST)
    time = rng.choice(TIMES)
    words = {"adj": adjectives[0], "adj2": adjectives[1], "noun": nouns[0], "noun2": nouns[1], "noun3": nouns[2],
             "name": names[0], "name2": names[1], "verb": verb, "verb_base": VERB_BASE[verb],
             "intransitive": rng.choice(VERBS_INTRANSITIVE), "place": rng.choice(PLACES), "time": time,
             "Time": time[0].upper() + time[1:], "plural": rng.choice(PLURALS), "number": str(rng.randint(2, 12)),
             "connective": rng.choice(CONNECTIVES)}
    return rng.choice(TEMPLATES).format(**words)


def hash_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key`: the first 8 bytes of its BLAKE2b hash over 2**64 (also splits
    local folders, see data/audio_sources.py)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_of(key: str, val_fraction: float) -> str:
    """'validation' when hash_fraction(key) < val_fraction, else 'train'."""
    return "validation" if hash_fraction(key) < val_fraction else "train"


def iter_utterances(split: str, num_items: int, val_fraction: float, seed: int = 0,
                    voices: tuple[str, ...] = DEFAULT_VOICES) -> Iterator[Utterance]:
    """The first `num_items` utterances whose key falls in `split` ('train' or 'validation'), spoken by `voices`."""
    if split not in ("train", "validation"):
        raise ValueError(f"{BUILTIN_SPEECH_NAME} has splits train and validation (or val), not {split!r}")
    count, index = 0, 0
    while count < num_items:
        if split_of(f"speech-{index:06d}", val_fraction) == split:
            yield utterance(index, seed, voices)
            count += 1
        index += 1


def synthesize(item: Utterance) -> tuple[np.ndarray, int]:
    """Speak `item` with espeak-ng or flite (by its voice): (waveform float32 (S,), sample_rate).
    SpeechUnavailableError if the synthesiser is missing or fails."""
    program = synthesiser(item.voice)
    path = require_synthesisers((item.voice,))[program]
    with tempfile.TemporaryDirectory(prefix="builtin_speech_") as folder:
        if program == ESPEAK:
            command = [path, "-v", item.voice, "-s", str(item.speed), "-p", str(item.pitch), "--stdout", item.text]
            result = _run(command, espeak_environment(folder))
            audio = result.stdout
        else:
            output = Path(folder) / "speech.wav"
            stretch = f"duration_stretch={FLITE_REFERENCE_SPEED / item.speed:.4f}"
            result = _run([path, "-voice", item.voice, "--setf", stretch, "-t", item.text, "-o", str(output)])
            audio = output.read_bytes() if output.is_file() else b""
    if result.returncode != 0 or not audio:
        message = result.stderr.decode("utf-8", errors="replace").strip()
        raise SpeechUnavailableError(f"{program} failed for voice {item.voice!r} (exit {result.returncode}): "
                                     f"{message or 'no audio'}")
    waveform, sample_rate = soundfile.read(io.BytesIO(audio), dtype="float32")
    return waveform, sample_rate


def espeak_environment(folder: str) -> dict[str, str]:
    """The environment for one espeak-ng call: HOME and XDG_RUNTIME_DIR in the call's own empty `folder`.

    espeak-ng opens a PulseAudio client even when it writes to stdout, and that client consumes C `rand()` values
    (the first call on a machine names a new /tmp/pulse-* directory; later ones find it). The breathy voices
    (variants +f2 and +f3) draw their breath noise from the same `rand()`, so their waveform depended on what
    earlier calls had left behind. Starting every call from the same empty state makes it the same every time."""
    return {**os.environ, "HOME": folder, "XDG_RUNTIME_DIR": folder}


def _run(command: list[str], environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=SYNTHESIS_TIMEOUT_S,
                          env=environment)
