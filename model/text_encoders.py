"""Frozen text encoders for text-conditioned diffusion: a Hugging Face T5 encoder, or `builtin:words` offline.

    encoder = load_text_encoder("google-t5/t5-small", device)     # or a local directory, or "builtin:words"
    embeddings, mask = encoder.encode(["a red circle", "a small blue star at the top"])
    # embeddings: (B, L, encoder.dim) float32, mask: (B, L) bool (True = a real token), L = the longest caption
    description = encoder.describe()                              # JSON-able; recorded in caches and runs
    same = text_encoder_from_description(description, device)     # what later steps load

A T5 spec is a hub name or a directory written by `save_pretrained` holding both the encoder (loaded as
transformers' T5EncoderModel, any T5-family encoder works) and its tokenizer (AutoTokenizer). Captions are
tokenized with the tokenizer's own end-of-sequence token, truncated to `max_length` tokens and right-padded.

`builtin:words` needs no download and no weights: each lower-cased word (runs of letters and digits) becomes a
fixed random vector (unit variance per element) seeded by the SHA-256 of the word, plus the sinusoidal position
encoding of its index (Vaswani et al. 2017), and every caption ends with an end token, so an empty caption
still has one. The same word always gives the same vector, on every machine.
"""

import hashlib
import logging
import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "google-t5/t5-small"
BUILTIN_WORDS = "builtin:words"
BUILTIN_WORDS_DIM = 256
DEFAULT_MAX_LENGTH = 64
END_TOKEN = "</s>"
WORD_PATTERN = re.compile(r"[a-z0-9]+")
OFFLINE_HELP = (f"with no hub access pass a local directory holding a T5 encoder and its tokenizer (both written "
                f"by save_pretrained), or use --text_encoder {BUILTIN_WORDS} (no download)")


def _check_max_length(max_length: int) -> None:
    if max_length < 1:
        raise ValueError(f"the text encoder's max_length must be at least 1, got {max_length}")


@lru_cache(maxsize=65536)
def _word_vector(word: str, dim: int) -> torch.Tensor:
    """The fixed vector of `word`: (dim,) float32, standard normal entries (NumPy's RandomState stream, which
    NumPy keeps unchanged across versions) seeded by the word's SHA-256."""
    seed = np.frombuffer(hashlib.sha256(word.encode("utf-8")).digest()[:16], dtype=np.uint32)
    return torch.from_numpy(np.random.RandomState(seed).standard_normal(dim).astype(np.float32))


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Vaswani et al.'s position encoding for an even dim: (length, dim) float32, PE[p, 2i] = sin(p / 10000^(2i/dim)),
    PE[p, 2i+1] = cos(p / 10000^(2i/dim))."""
    positions = torch.arange(length, dtype=torch.float64)[:, None]
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(positions * frequencies)
    table[:, 1::2] = torch.cos(positions * frequencies)
    return table.float()


class BuiltinWordEncoder:
    """`builtin:words`: hashed word vectors plus sinusoidal positions (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu", max_length: int = DEFAULT_MAX_LENGTH,
                 dim: int = BUILTIN_WORDS_DIM):
        _check_max_length(max_length)
        if dim < 2 or dim % 2:
            raise ValueError(f"{BUILTIN_WORDS} needs an even dim of at least 2, got {dim}")
        self.device, self.max_length, self.dim = torch.device(device), max_length, dim

    def tokens(self, caption: str) -> list[str]:
        """The caption's lower-cased words (at most max_length - 1) and the end token."""
        return WORD_PATTERN.findall(caption.lower())[: self.max_length - 1] + [END_TOKEN]

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions → (embeddings (B, L, dim) float32, mask (B, L) bool), zeros where masked."""
        tokens = [self.tokens(caption) for caption in captions]
        length = max(map(len, tokens), default=1)
        positions = sinusoidal_positions(length, self.dim)
        embeddings = torch.zeros(len(captions), length, self.dim)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for row, words in enumerate(tokens):
            embeddings[row, : len(words)] = torch.stack([_word_vector(word, self.dim) for word in words])
            embeddings[row, : len(words)] += positions[: len(words)]
            mask[row, : len(words)] = True
        return embeddings.to(self.device), mask.to(self.device)

    def describe(self) -> dict:
        return {"name": BUILTIN_WORDS, "dim": self.dim, "max_length": self.max_length}


class T5TextEncoder:
    """A frozen transformers T5EncoderModel (float32, eval mode) and its tokenizer."""

    def __init__(self, name_or_path: str, device: torch.device | str = "cpu", max_length: int = DEFAULT_MAX_LENGTH):
        from transformers import AutoTokenizer, T5EncoderModel

        _check_max_length(max_length)
        local = Path(name_or_path).expanduser()
        if local.is_dir():
            name_or_path = str(local.resolve())
        elif name_or_path.startswith((".", "/", "~")) or local.exists():
            raise FileNotFoundError(f"text encoder {name_or_path}: no such directory; {OFFLINE_HELP}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = T5EncoderModel.from_pretrained(name_or_path, dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise ValueError(f"could not load the text encoder {name_or_path!r} "
                             f"({' '.join(str(error).split())[:300]}); {OFFLINE_HELP}") from error
        self.name, self.device, self.max_length = name_or_path, torch.device(device), max_length
        self.model.to(self.device).eval().requires_grad_(False)
        self.dim = self.model.config.d_model

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions → (embeddings (B, L, dim) float32, mask (B, L) bool), the encoder's last hidden state."""
        tokens = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        mask = tokens["attention_mask"].bool()
        empty = (~mask.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"captions {empty} encode to no tokens with {self.name}: use a tokenizer that appends "
                             "an end-of-sequence token (as T5's does)")
        hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return hidden.float() * mask[..., None], mask

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "max_length": self.max_length}


def load_text_encoder(spec: str = DEFAULT_TEXT_ENCODER, device: torch.device | str = "cpu",
                      max_length: int = DEFAULT_MAX_LENGTH) -> "BuiltinWordEncoder | T5TextEncoder":
    """`builtin:words`, or a T5 encoder by hub name or local directory (ValueError / FileNotFoundError naming the
    offline alternatives when it cannot be loaded)."""
    if spec == BUILTIN_WORDS:
        return BuiltinWordEncoder(device, max_length)
    if spec.startswith("builtin:"):
        raise ValueError(f"unknown built-in text encoder {spec!r}: the built-in one is {BUILTIN_WORDS}")
    encoder = T5TextEncoder(spec, device, max_length)
    logger.info("loaded text encoder %s (dim %d)", encoder.name, encoder.dim)
    return encoder


def text_encoder_from_description(description: dict, device: torch.device | str = "cpu"):
    """The encoder a `describe()` dict names (as recorded in a cache or run), checked to have the same width."""
    try:
        name, dim, max_length = description["name"], description["dim"], description["max_length"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"not a text encoder description (needs name, dim, max_length): {description!r}") from error
    encoder = load_text_encoder(name, device, max_length)
    if encoder.dim != dim:
        raise ValueError(f"text encoder {name} now gives {encoder.dim}-dim embeddings but {dim} were recorded: "
                         "point it at the encoder the cache was written with")
    return encoder
