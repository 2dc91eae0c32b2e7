"""model/text_encoders.py: a tiny T5 saved locally loads by path and matches transformers' own T5EncoderModel;
padding masks; the offline `builtin:words` encoder is deterministic (also across processes) and follows its
definition; clear errors for encoders that cannot be loaded."""

import math
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from model.text_encoders import (BUILTIN_WORDS, BUILTIN_WORDS_DIM, END_TOKEN, BuiltinWordEncoder, load_text_encoder,
                                 text_encoder_from_description)

REPO = Path(__file__).resolve().parent.parent
WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "blue", "square", "small", "on", "white", "background"]
VOCAB = {word: index for index, word in enumerate(WORDS)}


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    """A random 2-layer T5 encoder and a word-level tokenizer (appends </s>, pads with <pad>), saved together."""
    directory = tmp_path_factory.mktemp("tiny_t5")
    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(directory)
    return directory


def test_t5_by_local_path_matches_transformers(tiny_t5):
    captions = ["a red circle", "a small blue square on a white background", "red"]
    encoder = load_text_encoder(str(tiny_t5), "cpu", max_length=16)
    embeddings, mask = encoder.encode(captions)
    assert encoder.dim == 32 and embeddings.dtype == torch.float32 and mask.dtype == torch.bool

    # the ids the tokenizer must produce: each word's vocabulary index, then </s>, right-padded with <pad>
    ids = [[VOCAB[word] for word in caption.split()] + [VOCAB["</s>"]] for caption in captions]
    length = max(map(len, ids))
    input_ids = torch.tensor([row + [VOCAB["<pad>"]] * (length - len(row)) for row in ids])
    attention = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in ids])
    assert embeddings.shape == (3, length, 32)
    assert torch.equal(mask, attention.bool())

    reference = T5EncoderModel.from_pretrained(tiny_t5).eval()
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention).last_hidden_state
    torch.testing.assert_close(embeddings[mask], expected[attention.bool()])
    assert not embeddings[~mask].any()  # padded positions are zeros

    # padding does not leak: a caption encoded alone gives the same vectors as inside the batch
    alone, alone_mask = encoder.encode([captions[0]])
    assert alone_mask.sum() == 4
    torch.testing.assert_close(alone[0], embeddings[0, :4], atol=1e-5, rtol=1e-5)


def test_t5_truncates_to_max_length_and_round_trips_its_description(tiny_t5):
    encoder = load_text_encoder(str(tiny_t5), "cpu", max_length=3)
    embeddings, mask = encoder.encode(["a small blue square on a white background"])
    assert embeddings.shape == (1, 3, 32) and mask.all()
    description = encoder.describe()
    assert description == {"name": str(tiny_t5.resolve()), "dim": 32, "max_length": 3}
    again = text_encoder_from_description(description)
    assert torch.equal(again.encode(["a red circle"])[0], encoder.encode(["a red circle"])[0])


def test_builtin_words_follow_their_definition():
    encoder = load_text_encoder(BUILTIN_WORDS, "cpu")
    assert encoder.dim == BUILTIN_WORDS_DIM
    captions = ["A red circle", "red", "", "a blue, BLUE square!"]
    embeddings, mask = encoder.encode(captions)
    assert embeddings.shape == (4, 5, BUILTIN_WORDS_DIM) and embeddings.dtype == torch.float32
    assert mask.sum(1).tolist() == [4, 2, 1, 5]  # words + the end token; an empty caption keeps the end token
    assert not embeddings[~mask].any()

    # position p adds Vaswani et al.'s encoding: PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(...)
    def position(p: int) -> torch.Tensor:
        angles = [p / 10000 ** (2 * i / BUILTIN_WORDS_DIM) for i in range(BUILTIN_WORDS_DIM // 2)]
        return torch.tensor([f(angle) for angle in angles for f in (math.sin, math.cos)])

    red_first, red_second = embeddings[1, 0], embeddings[0, 1]  # the word "red" at positions 0 and 1
    torch.testing.assert_close(red_first - position(0), red_second - position(1), atol=1e-5, rtol=0)
    word = red_first - position(0)  # a standard normal vector
    assert abs(float(word.mean())) < 0.25 and 0.8 < float(word.std()) < 1.2
    # case and punctuation do not matter: "blue" and "BLUE" are the same word
    torch.testing.assert_close(embeddings[3, 1] - position(1), embeddings[3, 2] - position(2), atol=1e-5, rtol=0)
    # every caption ends with the same end-token vector
    end = embeddings[2, 0] - position(0)
    torch.testing.assert_close(embeddings[1, 1] - position(1), end, atol=1e-5, rtol=0)
    assert encoder.tokens("A red circle") == ["a", "red", "circle", END_TOKEN]


def test_builtin_words_are_deterministic_and_captions_differ():
    first, second = BuiltinWordEncoder(), BuiltinWordEncoder()
    captions = ["a red circle on a white background", "a blue circle on a white background",
                "a white circle on a red background"]
    a, mask = first.encode(captions)
    b, _ = second.encode(captions)
    assert torch.equal(a, b)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(a[i], a[j])  # even two captions with the same words in another order
    # another process (another PYTHONHASHSEED) gives the same vectors: nothing depends on Python's str hash
    code = ("import sys; from model.text_encoders import BuiltinWordEncoder; "
            "sys.stdout.write(repr(BuiltinWordEncoder().encode(['a red circle'])[0][0, :, :4].tolist()))")
    output = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                            env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert torch.tensor(eval(output)).equal(first.encode(["a red circle"])[0][0, :, :4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_encoders_put_their_outputs_on_the_device(tiny_t5):
    for spec in (BUILTIN_WORDS, str(tiny_t5)):
        embeddings, mask = load_text_encoder(spec, "cuda").encode(["a red circle"])
        assert embeddings.is_cuda and mask.is_cuda and embeddings.dtype == torch.float32


def test_errors_name_the_offline_alternatives(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="builtin:words"):
        load_text_encoder(str(tmp_path / "no_such_encoder"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    # an empty hub cache: in the user's own, a downloaded t5-small would load and nothing would fail
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    with pytest.raises(ValueError, match="builtin:words") as error:
        load_text_encoder("google-t5/t5-small")
    assert "local directory" in str(error.value)
    with pytest.raises(ValueError, match="builtin:words"):
        load_text_encoder("builtin:letters")
    with pytest.raises(ValueError, match="max_length"):
        load_text_encoder(BUILTIN_WORDS, max_length=0)
    with pytest.raises(ValueError, match="recorded"):
        text_encoder_from_description({"name": BUILTIN_WORDS, "dim": 512, "max_length": 64})
    with pytest.raises(ValueError, match="description"):
        text_encoder_from_description({"name": BUILTIN_WORDS})
