"""The multimodal world model end to end at tiny size, from builtin:shapes to a caption and a PNG:
preprocess_multimodal_dataset.py (an untrained tiny image VAE, a BPE trained on the captions) -> pretrain_wm.py
(multimodal/tiny) -> generate_wm.py; the interleaved batches; clear errors for caches, VAEs and configs that do not
fit together."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import generate_wm
import preprocess_multimodal_dataset
import pretrain_wm
from bench import wm_shapes_eval
from data.builtin_shapes import draw_shape, shape_spec
from data.multimodal_batches import SequenceLayout, build_sequence, collate_multimodal
from data.sharded_cache import ShardedCache, ShardedCacheWriter
from helpers import error_of, run_main
from model.image.vae import ImageVAEConfig, build_image_vae
from model.pretrained import save_pretrained
from training.multimodal_task import resolve_config

IMAGE_SIZE = 32
TRAIN_FLAGS = ["--config", "multimodal/tiny", "--set", "n_layers=2", "--max_steps", 6, "--batch_size", 4,
               "--eval_steps", 6, "--eval_batches", 1, "--save_steps", 6, "--sample_steps", 2, "--sample_captions", 1,
               "--sample_guidance_scales", 1, 2, "--no_progress_bar", "--learning_rate", 1e-3]


def save_vae(directory: Path, seed: int) -> Path:
    """An untrained tiny VAE (32x32 images -> 4x8x8 latents) saved as pretrain_image_vae.py would."""
    torch.manual_seed(seed)
    config = ImageVAEConfig.from_name("tiny").with_overrides(["block_out_channels=[16,32,32]"])
    return save_pretrained(build_image_vae(config), directory)


def preprocess(work: Path, split: str, images: int, vae: Path, output: str, tokenizer=None) -> Path:
    tokenizer_flags = ["--tokenizer", tokenizer] if tokenizer else ["--train_tokenizer", "--vocab_size", 300]
    code, _ = run_main(preprocess_multimodal_dataset.main, [
        "--split", split, "--dataset_name", "builtin:shapes", "--image_size", IMAGE_SIZE, "--max_images", images,
        "--vae_checkpoint", vae, *tokenizer_flags, "--output_dir", work / output, "--items_per_shard", 16])
    assert code == 0
    return work / output


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wm")
    vae = save_vae(work / "vae", 0)
    preprocess(work, "train", 24, vae, "train")
    preprocess(work, "validation", 4, vae, "val", tokenizer=work / "train" / "tokenizer")
    return work


def test_the_cache_holds_both_orders_and_records_its_encoders(work):
    cache = ShardedCache(work / "train")
    assert len(cache) == 48 and cache.meta["counts"]["images"] == 24
    assert [cache[i]["order"] for i in range(2)] == ["caption_first", "image_first"]
    assert cache[0]["caption"] == cache[1]["caption"] and torch.equal(cache[0]["image_latent_mean"],
                                                                      cache[1]["image_latent_mean"])
    assert cache[0]["image_latent_mean"].shape == (4, 8, 8)
    meta = cache.meta
    assert meta["vae_checkpoint"] == str((work / "vae").resolve()) and len(meta["vae_fingerprint"]) == 16
    assert meta["tokenizer"]["vocab_size"] <= 300 and (work / "train" / "tokenizer").is_dir()
    assert meta["media"]["image"]["latent_shape"] == [4, 8, 8]


def test_sequences_bracket_the_image_and_drop_captions():
    layout = SequenceLayout(bos=0, eos=0, pad=1, begin={"image": 10}, end={"image": 11}, span_length={"image": 2})
    item = {"caption_ids": torch.tensor([5, 6]), "image_latent_mean": torch.zeros(1, 1, 2),
            "image_latent_logvar": torch.zeros(1, 1, 2)}
    assert build_sequence({**item, "order": "caption_first"}, layout, False) == (
        [0, 5, 6, 10, 1, 1, 11, 0], [0, 5, 6, 10, -100, -100, 11, 0], 4)
    assert build_sequence({**item, "order": "image_first"}, layout, False) == (
        [0, 10, 1, 1, 11, 5, 6, 0], [0, 10, -100, -100, 11, 5, 6, 0], 2)
    assert build_sequence({**item, "order": "caption_first"}, layout, True) == (
        [0, 10, 1, 1, 11], [0, 10, -100, -100, -100], 2)
    text = {"text_ids": torch.tensor([7, 8, 9])}
    batch = collate_multimodal([{**item, "order": "image_first"}, text], layout, {"image": 2.0}, 0.0, 0.5,
                               torch.Generator().manual_seed(0))
    assert batch["input_ids"].tolist() == [[0, 10, 1, 1, 11, 5, 6, 0], [7, 8, 9, 1, 1, 1, 1, 1]]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [7, 8, 9] + [-100] * 5
    assert batch["image_rows"].tolist() == [0] and batch["image_starts"].tolist() == [2]
    assert batch["image_noise_cap"].tolist() == [0.5]  # the image comes before its caption
    # the latents are posterior samples (here std 1 around 0) times the scale factor
    assert batch["image_latents"].shape == (1, 1, 1, 2) and float(batch["image_latents"].abs().max()) > 0


def test_train_then_caption_and_draw(work, capsys):
    runs = work / "runs"
    code, report = run_main(pretrain_wm.main, ["--run_name", "wm", "--runs_dir", runs, "--train_data_dir",
                                               work / "train", "--val_data_dir", work / "val", *TRAIN_FLAGS])
    assert code == 0, capsys.readouterr().err
    assert "validation: image_loss" in report and "captions of validation images" in report
    checkpoint = runs / "wm" / "checkpoint-6"
    assert (checkpoint / "wm_meta.json").is_file() and (checkpoint / "tokenizer").is_dir()
    events = EventAccumulator(str(runs / "wm"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/text_loss", "train/image_loss", "eval/text_loss", "eval/image_loss"} <= tags
    assert "samples/images" in events.Tags()["images"]

    code, printed = run_main(generate_wm.main, ["--run_dir", runs / "wm", "--prompt", "a red circle", "--steps", 2,
                                                "--max_new_tokens", 4, "--output_dir", work / "out"])
    assert code == 0
    with Image.open(work / "out" / "0-0.png") as image:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    draw_shape(shape_spec(3), IMAGE_SIZE).save(work / "in.png")
    code, printed = run_main(generate_wm.main, ["--run_dir", runs / "wm", "--image", work / "in.png",
                                                "--max_new_tokens", 5])
    assert code == 0 and printed.strip() != ""  # a caption (of an untrained model: any text)

    # bench/wm_shapes_eval.py: captions of validation images, and images of validation captions judged by colour
    code, printed = run_main(wm_shapes_eval.main, ["--run_dir", runs / "wm", "--captions", 3, "--specs_per_color", 1,
                                                   "--num_images", 1, "--guidance_scales", 1, "--steps", 2,
                                                   "--device", "cpu", "--output_dir", work / "wm_eval"])
    assert code == 0 and "text to image: 11 captions x 1 images" in printed
    report = json.loads((work / "wm_eval" / "wm_eval.json").read_text())
    assert report["captions"]["results"]["world model"]["images"] == 3
    rows = report["text_to_image"]["results"]
    assert rows["real validation images"]["shape_color"] == 1.0 and rows["generated, guidance 1"]["images"] == 11
    assert len(list((work / "wm_eval" / "guidance_1").glob("*.png"))) == 11

    # the VAE has moved: --vae_checkpoint finds it; another VAE's weights are refused
    other = save_vae(work / "other_vae", 1)
    assert "is not the one" in error_of(generate_wm.main, ["--run_dir", runs / "wm", "--image", work / "in.png",
                                                           "--vae_checkpoint", other], capsys)


def test_caches_vaes_and_configs_that_do_not_fit_are_refused(work, capsys):
    base = ["--run_name", "bad", "--runs_dir", work / "runs", *TRAIN_FLAGS]
    other_vae = save_vae(work / "vae_b", 2)
    other = preprocess(work, "validation", 4, other_vae, "val_other_vae", tokenizer=work / "train" / "tokenizer")
    message = error_of(pretrain_wm.main, [*base, "--train_data_dir", work / "train", "--val_data_dir", other], capsys)
    assert "made with another VAE" in message
    text_only = work / "text_only.yaml"
    text_only.write_text("model_family: multimodal\nhidden_size: 64\nn_layers: 1\nn_heads: 4\nmedia: {}\n")
    flags = [*base, "--train_data_dir", work / "train", "--val_data_dir", work / "val"]
    flags[flags.index("multimodal/tiny")] = text_only
    assert "holds 'image' spans but config" in error_of(pretrain_wm.main, flags, capsys)
    with ShardedCacheWriter(work / "image_cache") as writer:
        writer.add({"image": torch.zeros(3, 2, 2, dtype=torch.uint8), "caption": ""})
        writer.finish({"made_by": "preprocess_image_vae_dataset.py", "image_size": 2})
    assert "is not an interleaved cache" in error_of(
        pretrain_wm.main, [*base, "--train_data_dir", work / "train", "--val_data_dir", work / "image_cache"], capsys)
    assert "is not the one" in error_of(pretrain_wm.main, [*base, "--train_data_dir", work / "train",
                                                           "--val_data_dir", work / "val", "--vae_checkpoint",
                                                           other_vae], capsys)
    shutil.rmtree(other)


def test_config_takes_the_cache_grid_and_partial_media_overrides(work):
    cache = ShardedCache(work / "train")
    config = resolve_config("multimodal/tiny", ["media={image: {attention: causal}}", "n_layers=1"], cache)
    assert config.media["image"] == {"latent_channels": 4, "latent_height": 8, "latent_width": 8, "patch_size": 2,
                                     "attention": "causal"}
    assert config.n_layers == 1 and config.vocab_size == cache.meta["tokenizer"]["vocab_size"]
    assert config.media_kinds == ["image"]  # the config's audio entry is left out: the cache holds no clips
    with pytest.raises(ValueError, match="must map each kind"):
        resolve_config("multimodal/tiny", ["media=3"], cache)
