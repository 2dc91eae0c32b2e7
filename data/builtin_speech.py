"""`builtin:speech`: English speech synthesised offline with espeak-ng, so audio pipelines need no download.

Utterance k (k = 0, 1, 2, ...) is fixed by `seed` and k alone: a sentence made from the word lists and
templates below by `random.Random(f"{seed}:{k}")`, one of SPEAKERS (an espeak-ng voice with its own base
pitch; the voice name is the speaker id), a speaking rate of 140-185 words per minute and a pitch within
±6 of the speaker's. Its key `speech-{k:06d}` decides its split: a hash of the key below `val_fraction`
puts it in validation, else in train. A split's items are the first `num_items` utterances that fall in
it, so train and validation are disjoint and every run gives the same items: the same keys, texts, voices
and lengths bit for bit, and waveforms equal to float32 rounding (after resampling, whose float32 sums may run in
another order on another CPU, thread count or worker count).

Synthesis runs `espeak-ng -v VOICE -s SPEED -p PITCH --stdout TEXT` (about 10 ms per sentence) and reads
its WAV output (22050 Hz mono) with soundfile. Sentences last about 2 to 5 seconds.
"""

import dataclasses
import hashlib
import io
import random
import shutil
import subprocess
from collections.abc import Iterator

import numpy as np
import soundfile

BUILTIN_SPEECH_NAME = "builtin:speech"
ESPEAK = "espeak-ng"
ESPEAK_TIMEOUT_S = 60
SPEAKERS = (  # (espeak-ng voice, base pitch 0-99); each gives a distinct voice with espeak-ng 1.51
    ("en-us", 45), ("en-gb", 40), ("en-gb-scotland", 50), ("en-gb-x-rp", 35), ("en-029", 55), ("en-us-nyc", 45),
    ("en-us+f3", 60), ("en+f2", 65), ("en-gb-x-rp+f4", 70), ("en-gb-scotland+f3", 60), ("en-us+m3", 30),
    ("en-029+f1", 62),
)
SPEED_RANGE = (140, 185)
PITCH_JITTER = 6

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
    """espeak-ng is missing or failed; the message says how to install it."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One built-in utterance: `key` (speech-NNNNNN), `voice` (the speaker id), `speed` (words per minute),
    `pitch` (0-99) and `text`."""

    key: str
    voice: str
    speed: int
    pitch: int
    text: str


def require_espeak() -> str:
    """The path of espeak-ng, or SpeechUnavailableError saying how to install it."""
    path = shutil.which(ESPEAK)
    if path is None:
        raise SpeechUnavailableError(f"{BUILTIN_SPEECH_NAME} synthesises speech with espeak-ng, which is not "
                                     "installed: apt-get install espeak-ng (or use --input_dir DIR with your own "
                                     "audio files)")
    return path


def utterance(index: int, seed: int = 0) -> Utterance:
    """Utterance number `index` of the corpus made with `seed` (independent of split and count)."""
    rng = random.Random(f"{seed}:{index}")
    voice, base_pitch = rng.choice(SPEAKERS)
    speed = rng.randint(*SPEED_RANGE)
    pitch = min(99, max(0, base_pitch + rng.randint(-PITCH_JITTER, PITCH_JITTER)))
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


def iter_utterances(split: str, num_items: int, val_fraction: float, seed: int = 0) -> Iterator[Utterance]:
    """The first `num_items` utterances whose key falls in `split` ('train' or 'validation')."""
    if split not in ("train", "validation"):
        raise ValueError(f"{BUILTIN_SPEECH_NAME} has splits train and validation (or val), not {split!r}")
    count, index = 0, 0
    while count < num_items:
        if split_of(f"speech-{index:06d}", val_fraction) == split:
            yield utterance(index, seed)
            count += 1
        index += 1


def synthesize(item: Utterance) -> tuple[np.ndarray, int]:
    """Speak `item` with espeak-ng: (waveform float32 (S,), sample_rate). SpeechUnavailableError if espeak-ng
    is missing or fails."""
    command = [require_espeak(), "-v", item.voice, "-s", str(item.speed), "-p", str(item.pitch), "--stdout",
               item.text]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=ESPEAK_TIMEOUT_S)
    if result.returncode != 0 or not result.stdout:
        message = result.stderr.decode("utf-8", errors="replace").strip()
        raise SpeechUnavailableError(f"espeak-ng failed for voice {item.voice!r} (exit {result.returncode}): "
                                     f"{message or 'no audio'}")
    waveform, sample_rate = soundfile.read(io.BytesIO(result.stdout), dtype="float32")
    return waveform, sample_rate
