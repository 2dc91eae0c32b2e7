"""Tokenizers for text caches: train a byte-level BPE on a corpus, or load one by name or local path.

    tokenizer = train_bpe_tokenizer(source.documents(), vocab_size=8192)   # streamed, never all in memory
    tokenizer = load_tokenizer("path/to/saved_tokenizer")                  # AutoTokenizer; offline with a path
    encode = DocumentEncoder(tokenizer)
    ids = encode(["first document", "second"])                             # list of lists of token ids

A trained tokenizer is byte-level (any text round-trips exactly through encode and decode) and has two
special tokens: `<|endoftext|>` (EOS, also used as BOS) and `<|pad|>`.
"""

import logging
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with at most `vocab_size` tokens (fewer if the corpus is small) on `documents`."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"--vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                         f"special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((text for text in documents if text.strip()), trainer=trainer)
    logger.info("trained a byte-level BPE with %d tokens", tokenizer.get_vocab_size())
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer by hub name or local directory (written by `save_pretrained`)."""
    from transformers import AutoTokenizer  # imports torch (~3 s), which training a tokenizer does not need

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        message = " ".join(str(error).split())
        raise ValueError(f"could not load tokenizer {name_or_path!r} ({message}); with no hub access pass a local "
                         "directory written by a tokenizer's save_pretrained, or use --train_tokenizer") from error


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """`eos_token_id`, `bos_token_id` and `pad_token_id`; a missing BOS or PAD falls back to EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token, which separates documents in "
                         "the cache; use a tokenizer with one, or --train_tokenizer")
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id
    return {"eos_token_id": eos, "bos_token_id": eos if bos is None else bos, "pad_token_id": eos if pad is None else pad}


class DocumentEncoder:
    """Encodes batches of documents to token ids without adding special tokens.

    Text that spells a special token (say a document quoting `<|endoftext|>`) is encoded as ordinary text,
    so the only EOS ids in a cache are the separators the writer puts between documents.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = None
        if backend is not None:
            self.backend = Tokenizer.from_str(backend.to_str())  # a copy: the settings below stay local
            self.backend.encode_special_tokens = True
            self.backend.no_truncation()
            self.backend.no_padding()

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        encoded = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
        return encoded["input_ids"]
