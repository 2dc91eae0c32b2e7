"""Text data pipeline: sources, preprocessing into a token cache, reading it back, batching, and bad input."""

import json

import numpy as np
import pytest
import torch

import preprocess_text_dataset
from data.builtin_text import iter_builtin_documents
from data.text_cache import PackedBatches, ShardedTokens, TextTokenCache, evaluation_batches
from data.text_cache_writer import write_text_cache
from data.text_sources import TextSource
from data.tokenizer import train_bpe_tokenizer

TXT_DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.\nA second line.",
    "Café, naïve, déjà vu — and an emoji: 🦊. Tabs\tand  double  spaces.",
    "A document that quotes the separator <|endoftext|> in its text must survive intact.",
]
JSONL_DOCUMENTS = [f"JSON line document number {i}: " + "lorem ipsum dolor sit amet " * (i % 5 + 1)
                   for i in range(30)]
ALL_DOCUMENTS = TXT_DOCUMENTS + JSONL_DOCUMENTS  # reading order: a.txt, b.txt, c.txt, d.jsonl


def preprocess(*args) -> int:
    return preprocess_text_dataset.main([str(arg) for arg in args])


def split_documents(cache: TextTokenCache, split: str) -> list[str]:
    """Decode a split's tokens and cut them at EOS: the documents, in cache order."""
    tokenizer = cache.load_tokenizer()
    tokens = np.asarray(cache.tokens(split)[0:cache.num_tokens(split)]).tolist()
    assert tokens and tokens[-1] == cache.eos_token_id
    documents, start = [], 0
    for position, token in enumerate(tokens):
        if token == cache.eos_token_id:
            documents.append(tokenizer.decode(tokens[start:position], skip_special_tokens=False))
            start = position + 1
    return documents


@pytest.fixture
def corpus_dir(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "nested").mkdir(parents=True)
    for name, text in zip(("a.txt", "b.txt", "nested/c.txt"), TXT_DOCUMENTS):
        (corpus / name).write_text(text, encoding="utf-8")
    rows = [{"text": text, "id": i} for i, text in enumerate(JSONL_DOCUMENTS)] + [{"text": "  ", "id": -1}]
    (corpus / "nested" / "d.jsonl").write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    return corpus


@pytest.fixture
def local_cache(tmp_path, corpus_dir):
    out = tmp_path / "cache"
    assert preprocess("--input_dir", corpus_dir, "--train_tokenizer", "--vocab_size", 512, "--val_fraction", 0.2,
                      "--shard_tokens", 300, "--output_dir", out) == 0
    return TextTokenCache(out)


# ----- preprocessing round trips -----

def test_local_files_round_trip(local_cache):
    train, val = split_documents(local_cache, "train"), split_documents(local_cache, "val")
    assert sorted(train + val) == sorted(ALL_DOCUMENTS)
    assert not set(train) & set(val) and len(val) >= 2
    for split in (train, val):  # each split keeps the reading order
        assert split == [document for document in ALL_DOCUMENTS if document in split]
    meta = local_cache.meta
    assert meta["skipped_documents"] == 1 and meta["chars"] == sum(map(len, ALL_DOCUMENTS))
    assert meta["splits"]["train"]["documents"] == len(train) and meta["dtype"] == "uint16"
    assert local_cache.vocab_size == len(local_cache.load_tokenizer()) <= 512
    assert local_cache.eos_token_id == local_cache.bos_token_id != local_cache.pad_token_id


def test_shards_read_as_one_array(local_cache):
    shards = local_cache.meta["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(shard["tokens"] == 300 for shard in shards[:-1])
    tokens = local_cache.tokens("train")
    assert isinstance(tokens, ShardedTokens) and len(tokens) == local_cache.num_tokens("train")
    whole = np.concatenate([np.fromfile(local_cache.cache_dir / shard["file"], dtype="<u2") for shard in shards])
    rng = np.random.default_rng(0)
    for start, stop in [(0, len(whole)), (295, 305), (299, 901), (600, 600), (len(whole) - 3, len(whole) + 10)]:
        np.testing.assert_array_equal(tokens[start:stop], whole[start:stop])
    for index in rng.integers(-len(whole), len(whole), size=20):
        assert tokens[index] == whole[index]


@pytest.mark.parametrize("as_dict", [False, True], ids=["dataset", "dataset_dict"])
def test_from_disk(tmp_path, as_dict):
    import datasets

    texts = [f"Saved dataset row {i}. " * 3 for i in range(12)] + [None]
    dataset = datasets.Dataset.from_dict({"content": texts, "label": list(range(13))})
    if as_dict:
        dataset = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["unused"] * 4}),
                                        "validation": dataset})
    dataset.save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "cache"
    assert preprocess("--from_disk", tmp_path / "saved", "--split", "val", "--text_column", "content",
                      "--train_tokenizer", "--vocab_size", 300, "--output_dir", out) == 0
    cache = TextTokenCache(out)
    assert sorted(split_documents(cache, "train") + split_documents(cache, "val")) == sorted(texts[:-1])
    assert cache.meta["skipped_documents"] == 1 and cache.meta["source"]["kind"] == "from_disk"


def test_given_tokenizer_and_parquet_files(tmp_path):
    import pyarrow
    import pyarrow.parquet

    tokenizer = train_bpe_tokenizer(ALL_DOCUMENTS * 3, vocab_size=400)
    tokenizer.save_pretrained(tmp_path / "my_tokenizer")
    texts = [f"Parquet row {i} says hello." for i in range(8)]
    pyarrow.parquet.write_table(pyarrow.table({"body": texts[:4]}), tmp_path / "part-0.parquet")
    pyarrow.parquet.write_table(pyarrow.table({"body": texts[4:]}), tmp_path / "part-1.parquet")
    out = tmp_path / "cache"
    assert preprocess("--input_files", tmp_path / "*.parquet", "--text_column", "body",
                      "--tokenizer", tmp_path / "my_tokenizer", "--output_dir", out) == 0
    cache = TextTokenCache(out)
    assert cache.meta["tokenizer_source"] == {"name_or_path": str(tmp_path / "my_tokenizer")}
    assert cache.load_tokenizer().get_vocab() == tokenizer.get_vocab()
    assert sorted(split_documents(cache, "train") + split_documents(cache, "val")) == sorted(texts)


def test_caps():
    source = TextSource(dataset_name="builtin:text", max_documents=5)
    assert len(list(source.documents())) == 5
    documents = list(TextSource(dataset_name="builtin:text", max_chars=10_000).documents())
    assert sum(map(len, documents)) == 10_000


# ----- built-in corpus -----

def test_builtin_corpus_is_large_and_deterministic():
    first_pass = []
    chars = 0
    for document in iter_builtin_documents():
        chars += len(document)
        if len(first_pass) < 500:
            first_pass.append(document)
    assert chars >= 3_000_000
    second_pass = [document for _, document in zip(range(500), iter_builtin_documents())]
    assert second_pass == first_pass


def test_builtin_preprocess(tmp_path):
    out = tmp_path / "cache"
    assert preprocess("--dataset_name", "builtin:text", "--max_chars", 200_000, "--vocab_size", 512,
                      "--output_dir", out) == 0
    cache = TextTokenCache(out)
    corpus = "\0".join(TextSource(dataset_name="builtin:text", max_chars=200_000).documents())
    train = split_documents(cache, "train")
    assert len(train) > 10 and all(document in corpus for document in train)
    assert cache.meta["chars"] == 200_000 and cache.meta["tokenizer_source"]["trained"] == "byte-level BPE"


# ----- batches -----

def window_starts(batch: torch.Tensor, seq_len: int) -> list[int]:
    """Each row of a batch cut from tokens = arange(N) is a window; its first token says which."""
    for row in batch:
        assert row[0] % seq_len == 0 and torch.equal(row, torch.arange(row[0], row[0] + seq_len))
    return [int(row[0]) // seq_len for row in batch]


def test_packed_batches():
    tokens, seq_len = np.arange(1000, dtype=np.uint16), 16  # 62 windows
    batches = PackedBatches(tokens, seq_len, batch_size=3, seed=7, rank=0, world_size=2)
    assert batches.batches_per_epoch == 10
    batch = batches.batch(20)
    assert batch.shape == (3, 16) and batch.dtype == torch.long
    assert torch.equal(batches.batch(5), PackedBatches(tokens, seq_len, 3, seed=7, world_size=2).batch(5))
    ranks = [PackedBatches(tokens, seq_len, 3, seed=7, rank=rank, world_size=2) for rank in range(2)]
    epochs = []
    for epoch in range(2):
        seen = []
        for i in range(epoch * 10, (epoch + 1) * 10):
            step = [window_starts(ranks[rank].batch(i), seq_len) for rank in range(2)]
            assert not set(step[0]) & set(step[1])
            seen += step[0] + step[1]
        assert len(seen) == len(set(seen)) == 60
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    with pytest.raises(ValueError, match="at least 112 tokens"):
        PackedBatches(np.arange(100), seq_len, batch_size=7)


def test_evaluation_batches():
    tokens = np.arange(100)
    batches = evaluation_batches(tokens, seq_len=8, batch_size=5, max_batches=None)  # 12 windows
    assert [tuple(batch.shape) for batch in batches] == [(5, 8), (5, 8), (2, 8)]
    assert torch.equal(torch.cat(batches).flatten(), torch.arange(96))
    assert len(evaluation_batches(tokens, 8, 5, max_batches=1)) == 1
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluation_batches(tokens, seq_len=128, batch_size=1, max_batches=1)


# ----- bad input -----

def test_reader_errors(tmp_path, local_cache):
    with pytest.raises(FileNotFoundError, match="preprocess_text_dataset.py --dataset_name builtin:text"):
        TextTokenCache(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown split 'test'.*train, val"):
        local_cache.tokens("test")
    shard = local_cache.cache_dir / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match="train-00001.bin.*re-run"):
        TextTokenCache(local_cache.cache_dir)
    (local_cache.cache_dir / "meta.json").unlink()
    with pytest.raises(ValueError, match="meta.json is missing"):
        TextTokenCache(local_cache.cache_dir)


def assert_one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0]


def test_cli_errors(tmp_path, corpus_dir, capsys):
    assert preprocess("--input_dir", tmp_path / "nowhere", "--train_tokenizer", "--output_dir", tmp_path / "c") != 0
    assert_one_line_error(capsys, "nowhere")
    assert preprocess("--input_dir", corpus_dir, "--output_dir", tmp_path / "c") != 0
    assert_one_line_error(capsys, "--tokenizer", "--train_tokenizer")
    args = ["--input_dir", corpus_dir, "--train_tokenizer", "--vocab_size", 300, "--output_dir", tmp_path / "c"]
    assert preprocess(*args) == 0
    capsys.readouterr()
    assert preprocess(*args) != 0
    assert_one_line_error(capsys, "--overwrite")
    assert preprocess(*args, "--overwrite") == 0
    assert TextTokenCache(tmp_path / "c").meta["source"]["input_dir"] == str(corpus_dir)
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no partial or old dirs


def test_interrupted_write_leaves_no_cache(tmp_path, local_cache):
    def documents():
        yield from ALL_DOCUMENTS
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_text_cache(documents(), local_cache.load_tokenizer(), tmp_path / "out", source={},
                         tokenizer_source={}, shard_tokens=100)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "corpus"]


def test_hub_dataset_offline(tmp_path, local_cache, capsys, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    tokenizer = local_cache.cache_dir / "tokenizer"
    assert preprocess("--dataset_name", "no-such-user/no-such-dataset", "--tokenizer", tokenizer,
                      "--output_dir", tmp_path / "hub") != 0
    assert_one_line_error(capsys, "no-such-user/no-such-dataset", "--from_disk", "--input_dir", "builtin:text")
    assert not (tmp_path / "hub").exists()
