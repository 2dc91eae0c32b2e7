"""`builtin:phrases`: a small-vocabulary text-to-speech corpus synthesised offline, that a CPU recipe can learn.

Every prompt is "<colour> <object> <digit>" ("red box seven"): 8 x 8 x 10 = 640 prompts of 26 words. A prompt's
split is fixed by a hash of its text (data/builtin_speech.py's hash_fraction): prompts below `val_fraction` (10%)
are validation prompts and never occur in train, so generation is judged on prompts the model has not heard.
Utterance k of a split is fixed by (seed, split, k) alone: one of the split's prompts and one of SPEAKERS (the four
flite voices of builtin:speech, the voice name being the speaker id) at the voice's base rate ± RATE_JITTER words per
minute, spoken by data/builtin_speech.py's synthesize (16 kHz). flite's voices are far closer to natural speech than
espeak-ng's: pocketsphinx restricted to the corpus grammar transcribes all four without error (bench/RESULTS.md).

    records = phrase_records("train", num_items=2000)       # AudioRecords (data/audio_sources.py), decoded later
"""

import random
from collections.abc import Iterator

from data.audio_sources import AudioRecord
from data.builtin_speech import Utterance, hash_fraction, require_synthesisers

BUILTIN_PHRASES_NAME = "builtin:phrases"
COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
OBJECTS = ("box", "ball", "cup", "hat", "shoe", "book", "key", "door")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPEAKERS = (("kal16", 150), ("awb", 160), ("rms", 155), ("slt", 165))  # (flite voice, base words per minute)
RATE_JITTER = 10
DEFAULT_ITEMS = {"train": 2000, "validation": 200}
DEFAULT_VAL_FRACTION = 0.1
SPLITS = {"train": "train", "validation": "validation", "val": "validation"}


def all_prompts() -> list[str]:
    return [f"{colour} {thing} {digit}" for colour in COLOURS for thing in OBJECTS for digit in DIGITS]


def prompts_of(split: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> list[str]:
    """The prompts of `split` (train or validation/val), in a fixed order; the two splits share none."""
    if split not in SPLITS:
        raise ValueError(f"{BUILTIN_PHRASES_NAME} has splits train and validation (or val), not {split!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    held_out = SPLITS[split] == "validation"
    return [prompt for prompt in all_prompts() if (hash_fraction(f"phrase:{prompt}") < val_fraction) == held_out]


def phrase_utterances(split: str, num_items: int | None = None, val_fraction: float = DEFAULT_VAL_FRACTION,
                      seed: int = 0) -> Iterator[Utterance]:
    """The first `num_items` (default DEFAULT_ITEMS) utterances of `split`."""
    prompts = prompts_of(split, val_fraction)
    name = SPLITS[split]
    count = DEFAULT_ITEMS[name] if num_items is None else num_items
    if count < 1:
        raise ValueError(f"--num_items must be positive, got {count}")
    for index in range(count):
        rng = random.Random(f"{seed}:{name}:{index}")
        voice, speed = rng.choice(SPEAKERS)
        yield Utterance(key=f"phrase-{name}-{index:06d}", voice=voice,
                        speed=speed + rng.randint(-RATE_JITTER, RATE_JITTER), pitch=None, text=rng.choice(prompts))


def phrase_records(split: str, num_items: int | None = None, val_fraction: float = DEFAULT_VAL_FRACTION,
                   seed: int = 0) -> Iterator[AudioRecord]:
    """AudioRecords of phrase_utterances (synthesised when decoded; flite is checked now)."""
    require_synthesisers(voice for voice, _ in SPEAKERS)
    return (AudioRecord(item.key, speaker=item.voice, text=item.text, utterance=item)
            for item in phrase_utterances(split, num_items, val_fraction, seed))
