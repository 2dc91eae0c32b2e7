"""The image latent-diffusion pipeline end to end at tiny size, from builtin:shapes to PNG files:
preprocess_image_vae_dataset.py -> pretrain_image_vae.py -> preprocess_image_diffusion_dataset.py (builtin:words)
-> pretrain_image_diffusion.py (tiny_dit) -> generate_image.py; the latent cache against the VAE and text encoder
themselves; exact resume (EMA included); bfloat16 weights; clear errors for bad input."""

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import generate_image
import preprocess_image_diffusion_dataset
import preprocess_image_vae_dataset
import pretrain_image_diffusion
import pretrain_image_vae
from data.latent_cache import collate_latents, open_latent_caches
from data.sharded_cache import ShardedCache
from helpers import events, scalars
from model.image.diffusion import ImageDiffusionConfig, build_image_diffusion
from model.image.pipeline import load_vae_checkpoint
from model.image.vae import ImageVAEConfig, build_image_vae
from model.pretrained import load_weights
from model.text_encoders import BuiltinWordEncoder
from training.ema_state import EMAState
from training.distributed import micro_batch_seed
from training.image_diffusion_task import (build_image_diffusion_task, resolve_diffusion_config,
                                           sample_latents)
from training.loop import RunContext
from training.task import Image as ImageSample

IMAGE_SIZE = 32
# the tiny VAE with two downsamplings: 32x32 images -> 4x8x8 latents, tiny_dit's grid
VAE_FLAGS = ["--config", "tiny", "--set", "block_out_channels=[16,32,32]"]
LEARNING_STEPS, GENERATION_STEPS = 60, 30
PROMPTS = ["a red circle", "a small blue square on a yellow background"]


def run_main(main, argv) -> tuple[int, str]:
    """main(argv) with its stdout captured: (exit code, stdout)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = main([str(arg) for arg in argv])
    return code, output.getvalue()


# ----- pieces -----

def test_latents_are_sampled_from_the_posterior_and_scaled():
    """z = (mean + std * noise) * scale: per-element mean and std match N(mean, exp(logvar)) scaled."""
    means, logvars = torch.tensor([0.5, -2.0]), torch.tensor([2 * math.log(0.25), 0.0])  # std 0.25 and 1
    batch = {"latent_mean": means.view(1, 2, 1, 1).expand(20000, 2, 1, 1),
             "latent_logvar": logvars.view(1, 2, 1, 1).expand(20000, 2, 1, 1)}
    z = sample_latents(batch, 2.0, torch.Generator().manual_seed(0)).flatten(1)
    torch.testing.assert_close(z.mean(0), 2.0 * means, atol=0.03, rtol=0)
    torch.testing.assert_close(z.std(0), 2.0 * torch.tensor([0.25, 1.0]), atol=0.03, rtol=0)
    again = sample_latents(batch, 2.0, torch.Generator().manual_seed(0)).flatten(1)
    assert torch.equal(z, again)
    seeds = {micro_batch_seed(seed, rank, index) for seed in (0, 1) for rank in (0, 1) for index in (0, 1, 2)}
    assert len(seeds) == 12  # every (seed, rank, micro-batch) draws its own numbers


def test_collate_right_pads_the_text():
    items = [{"latent_mean": torch.zeros(4, 2, 2, dtype=torch.float16), "latent_logvar": torch.zeros(4, 2, 2),
              "text_emb": torch.full((length, 3), float(length), dtype=torch.float16)} for length in (2, 3)]
    batch = collate_latents(items)
    assert batch["latent_mean"].shape == (2, 4, 2, 2) and batch["latent_mean"].dtype == torch.float32
    assert batch["text_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["text_emb"].dtype == torch.float32 and batch["text_emb"].shape == (2, 3, 3)
    assert batch["text_emb"][0, :2].eq(2).all() and batch["text_emb"][0, 2].eq(0).all()
    assert batch["text_emb"][1].eq(3).all()


# ----- the pipeline, stage by stage -----

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("image_diffusion")


@pytest.fixture(scope="module")
def image_caches(work) -> tuple[Path, Path]:
    for split, count, name in (("train", 48, "image_train_cached"), ("validation", 16, "image_val_cached")):
        code, _ = run_main(preprocess_image_vae_dataset.main, [
            "--dataset_name", "builtin:shapes", "--split", split, "--image_size", IMAGE_SIZE, "--max_images", count,
            "--output_dir", work / name])
        assert code == 0
    return work / "image_train_cached", work / "image_val_cached"


@pytest.fixture(scope="module")
def vae_checkpoint(work, image_caches) -> Path:
    """A VAE trained for 30 steps at a high learning rate: its posteriors already carry the images' structure."""
    code, _ = run_main(pretrain_image_vae.main, [
        "--run_name", "vae", "--runs_dir", work / "runs", *VAE_FLAGS, "--train_data_dir", image_caches[0],
        "--val_data_dir", image_caches[1], "--max_steps", 30, "--batch_size", 8, "--learning_rate", 2e-3,
        "--eval_batches", 1, "--eval_steps", 30, "--no_progress_bar"])
    assert code == 0
    return work / "runs" / "vae" / "checkpoint-30"


@pytest.fixture(scope="module")
def latent_caches(work, image_caches, vae_checkpoint) -> tuple[Path, Path, str]:
    """(train cache, validation cache, the train run's printed summary). The train run names --vae_config small
    (as the README's command does) although the checkpoint records the tiny config."""
    train, val = work / "image_train_diffusion_latents", work / "image_val_diffusion_latents"
    code, summary = run_main(preprocess_image_diffusion_dataset.main, [
        "--output_dir", train, "--vae_checkpoint", vae_checkpoint, "--vae_config", "small",
        "--image_cache_dir", image_caches[0], "--text_encoder", "builtin:words", "--batch_size", 16])
    assert code == 0
    code, _ = run_main(preprocess_image_diffusion_dataset.main, [
        "--split", "validation", "--output_dir", val, "--vae_checkpoint", vae_checkpoint,
        "--image_cache_dir", image_caches[1], "--text_encoder", "builtin:words"])
    assert code == 0
    return train, val, summary


def diffusion_args(latent_caches, work, run_name: str, *extra) -> list:
    return ["--run_name", run_name, "--runs_dir", work / "runs", "--diffusion_type", "tiny_dit",
            "--train_data_dir", latent_caches[0], "--val_data_dir", latent_caches[1], "--batch_size", 8,
            "--learning_rate", 3e-3, "--eval_batches", 2, "--sample_steps", 4, "--no_progress_bar", *extra]


@pytest.fixture(scope="module")
def learning_run(work, latent_caches) -> Path:
    code, output = run_main(pretrain_image_diffusion.main, diffusion_args(
        latent_caches, work, "learning", "--max_steps", LEARNING_STEPS, "--logging_steps", 1, "--eval_steps", 1,
        "--generation_steps", GENERATION_STEPS, "--save_steps", 1000))
    assert code == 0
    assert "validation loss" in output and "generate_image.py --run_dir" in output
    return work / "runs" / "learning"


# ----- the latent cache -----

def test_latent_cache_holds_the_vae_posteriors_and_text_embeddings(latent_caches, image_caches, vae_checkpoint):
    train = ShardedCache(latent_caches[0])
    meta = train.meta
    assert (meta["latent_shape"], meta["image_size"], meta["storage_dtype"]) == ([4, 8, 8], IMAGE_SIZE, "float16")
    assert meta["text_encoder"] == {"name": "builtin:words", "dim": 256, "max_length": 64}
    assert meta["vae_checkpoint"] == str(vae_checkpoint.resolve())
    assert meta["counts"] == {"images": 48, "skipped": 0}

    # the posterior of the VAE itself (built here from the checkpoint's files) and the encoder's own embeddings
    config = ImageVAEConfig.from_yaml(vae_checkpoint / "config.yaml")
    vae = build_image_vae(config).eval()
    load_weights(vae, vae_checkpoint / "model.safetensors")
    images = ShardedCache(image_caches[0])
    words = BuiltinWordEncoder()
    for index in (0, 17, 47):
        item, image_item = train[index], images[index]
        assert "image" not in item and item["caption"] == image_item["caption"]
        assert (item["shape"], item["color"]) == (image_item["shape"], image_item["color"])
        with torch.no_grad():
            posterior = vae.encode(image_item["image"][None].float() / 127.5 - 1)
        torch.testing.assert_close(item["latent_mean"].float(), posterior.mean[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(item["latent_logvar"].float(), posterior.logvar[0], atol=2e-3, rtol=2e-3)
        embeddings, mask = words.encode([item["caption"]])
        torch.testing.assert_close(item["text_emb"].float(), embeddings[0][mask[0]], atol=2e-3, rtol=2e-3)

    # the scale factor gives posterior samples unit variance (checked by sampling them)
    generator = torch.Generator().manual_seed(0)
    samples = torch.cat([item["latent_mean"].float() + torch.exp(0.5 * item["latent_logvar"].float()) *
                         torch.randn((32, 4, 8, 8), generator=generator) for item in train])
    assert float(samples.std()) * meta["latent_scale_factor"] == pytest.approx(1.0, rel=0.02)


def test_vae_config_mismatch_is_reported_and_the_recorded_config_wins(latent_caches, vae_checkpoint):
    train, val, summary = latent_caches
    recorded = ImageVAEConfig.from_yaml(vae_checkpoint / "config.yaml").to_dict()
    meta = ShardedCache(train).meta
    assert meta["vae_config"] == recorded
    assert any(line.startswith("block_out_channels: checkpoint [16, 32, 32]") for line in meta["vae_config_mismatch"])
    assert "VAE config mismatch: --vae_config small differs" in summary and "block_out_channels" in summary
    assert ShardedCache(val).meta["vae_config_mismatch"] == []  # no --vae_config, nothing to compare


def test_source_flags_encode_the_same_images_as_the_image_cache(work, latent_caches, vae_checkpoint):
    output = work / "from_source"
    code, _ = run_main(preprocess_image_diffusion_dataset.main, [
        "--dataset_name", "builtin:shapes", "--image_size", IMAGE_SIZE, "--max_images", 8, "--output_dir", output,
        "--vae_checkpoint", vae_checkpoint, "--text_encoder", "builtin:words", "--storage_dtype", "float32"])
    assert code == 0
    direct, cached = ShardedCache(output), ShardedCache(latent_caches[0])
    assert direct.meta["source"]["kind"] == "builtin" and len(direct) == 8
    for index in range(8):
        assert direct[index]["source_id"] == cached[index]["source_id"]
        assert direct[index]["latent_mean"].dtype == torch.float32
        torch.testing.assert_close(direct[index]["latent_mean"], cached[index]["latent_mean"].float(), atol=2e-3,
                                   rtol=2e-3)


def test_undecodable_images_are_skipped_and_counted(work, vae_checkpoint):
    folder = work / "folder"
    folder.mkdir()
    for index, color in enumerate(("red", "blue", "green", "white")):
        Image.new("RGB", (40, 48), color).save(folder / f"image_{index}.png")
        (folder / f"image_{index}.txt").write_text(f"a plain {color} picture")
    (folder / "broken.png").write_bytes(b"not an image")
    skipped = 0
    for split in ("train", "validation"):
        output = work / f"folder_{split}"
        code, printed = run_main(preprocess_image_diffusion_dataset.main, [
            "--input_dir", folder, "--split", split, "--image_size", IMAGE_SIZE, "--output_dir", output,
            "--vae_checkpoint", vae_checkpoint, "--text_encoder", "builtin:words"])
        assert code == 0
        meta = ShardedCache(output).meta
        skipped += meta["counts"]["skipped"]
        if meta["counts"]["skipped"]:
            assert meta["skipped"][0]["source_id"] == "broken.png" and "broken.png" in printed
    assert skipped == 1


def test_a_checkpoint_without_config_needs_vae_config(work, vae_checkpoint, image_caches, capsys):
    bare = work / "bare_vae"
    shutil.copytree(vae_checkpoint, bare)
    shutil.move(bare / "config.yaml", work / "bare_vae_config.yaml")
    flags = ["--image_cache_dir", image_caches[1], "--vae_checkpoint", bare, "--text_encoder", "builtin:words"]
    assert preprocess_image_diffusion_dataset.main(["--output_dir", str(work / "bare_a"), *map(str, flags)]) == 1
    assert "has no config.yaml: name its architecture with --vae_config" in capsys.readouterr().err
    code, _ = run_main(preprocess_image_diffusion_dataset.main, [
        "--output_dir", work / "bare_b", *flags, "--vae_config", work / "bare_vae_config.yaml"])
    assert code == 0
    assert ShardedCache(work / "bare_b").meta["vae_config_mismatch"] == []


# ----- training -----

def test_loss_falls_and_tensorboard_has_losses_and_samples(learning_run):
    """Measured (CPU): eval/loss 0.206 at step 1 -> 0.174 at step 60, eval/mse 1.01 -> 0.88 (an untrained DiT
    outputs zeros: mse ~1 for unit-variance latents); the bounds leave about half the drop as margin."""
    accumulator = events(learning_run)
    eval_loss, eval_mse = scalars(accumulator, "eval/loss"), scalars(accumulator, "eval/mse")
    assert sorted(eval_loss) == list(range(1, LEARNING_STEPS + 1))
    assert eval_mse[1] == pytest.approx(1.0, abs=0.1)
    assert eval_loss[LEARNING_STEPS] < 0.92 * eval_loss[1]
    assert eval_mse[LEARNING_STEPS] < 0.92 * eval_mse[1]
    # (train/loss itself is too noisy to compare at this size: each batch draws its own noise levels, whose min-SNR
    # weights differ by orders of magnitude; the evaluation uses fixed levels and noise)
    assert sorted(scalars(accumulator, "train/loss")) == list(range(1, LEARNING_STEPS + 1))
    for tag in ("train/mse", "train/loss_weight", "train/cfg_dropped", "train/images_per_sec", "eval/ema_loss"):
        assert len(scalars(accumulator, tag)) > 0, tag

    grids = accumulator.Images("samples/images")
    assert [grid.step for grid in grids] == [GENERATION_STEPS, LEARNING_STEPS]
    # rows: the 3 default guidance scales; columns: the 4 default prompts
    assert (grids[-1].height, grids[-1].width) == (3 * IMAGE_SIZE, 4 * IMAGE_SIZE)

    config = ImageDiffusionConfig.from_yaml(learning_run / "config.yaml")
    assert (config.latent_channels, config.latent_height, config.latent_width) == (4, 8, 8)
    assert config.text_embed_dim == 256  # builtin:words, although tiny_dit.yaml says 32


def test_checkpoint_holds_ema_weights_and_what_generation_needs(learning_run, latent_caches, vae_checkpoint):
    checkpoint = learning_run / f"checkpoint-{LEARNING_STEPS}"
    raw, ema = load_file(checkpoint / "model.safetensors"), load_file(checkpoint / "ema.safetensors")
    assert raw.keys() == ema.keys()
    assert all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in ema.values())
    assert any(not torch.equal(raw[name], ema[name]) for name in raw)
    with safe_open(str(checkpoint / "ema.safetensors"), framework="pt") as opened:
        assert int(opened.metadata()["num_updates"]) == LEARNING_STEPS
    model = build_image_diffusion(ImageDiffusionConfig.from_yaml(checkpoint / "config.yaml"))
    load_weights(model, checkpoint / "ema.safetensors")  # every parameter, by name and shape

    meta = json.loads((checkpoint / "diffusion_meta.json").read_text())
    cache_meta = ShardedCache(latent_caches[0]).meta
    assert meta["vae_checkpoint"] == str(vae_checkpoint.resolve())
    assert meta["latent_scale_factor"] == cache_meta["latent_scale_factor"]
    assert meta["text_encoder"] == cache_meta["text_encoder"]


def test_generate_image_writes_deterministic_pngs(learning_run, work):
    def generate(output: str, *extra) -> list[Path]:
        code, printed = run_main(generate_image.main, ["--run_dir", learning_run, "--prompt", *PROMPTS,
                                                       "--num_images", 2, "--steps", 4, "--guidance_scale", 3,
                                                       "--output_dir", work / output, *extra])
        assert code == 0 and "4 image(s) from 2 prompt(s)" in printed
        return sorted((work / output).iterdir())

    first, again, other_seed = generate("out_a", "--seed", 0), generate("out_b", "--seed", 0), \
        generate("out_c", "--seed", 1)
    assert [path.name for path in first] == ["a-red-circle-0.png", "a-red-circle-1.png",
                                             "a-small-blue-square-on-a-yellow-background-0.png",
                                             "a-small-blue-square-on-a-yellow-background-1.png"]
    for path in first:
        with Image.open(path) as image:
            assert (image.size, image.mode) == ((IMAGE_SIZE, IMAGE_SIZE), "RGB")
    assert [path.read_bytes() for path in first] == [path.read_bytes() for path in again]
    assert all(a.read_bytes() != c.read_bytes() for a, c in zip(first, other_seed))
    raw = generate("out_raw", "--seed", 0, "--no_ema")
    assert any(a.read_bytes() != r.read_bytes() for a, r in zip(first, raw))


def test_resume_is_exact_including_the_ema(work, latent_caches, monkeypatch):
    flags = ["--max_steps", 6, "--save_steps", 3, "--logging_steps", 1, "--eval_steps", 100, "--generation_steps",
             100, "--set", "ema_decay=0.5"]
    assert run_main(pretrain_image_diffusion.main, diffusion_args(latent_caches, work, "straight", *flags))[0] == 0
    straight = work / "runs" / "straight"
    resume = ["--resume_from_checkpoint", straight / "checkpoint-3"]
    assert run_main(pretrain_image_diffusion.main, diffusion_args(latent_caches, work, "resumed", *flags,
                                                                  *resume))[0] == 0
    resumed = work / "runs" / "resumed"
    straight_loss, resumed_loss = scalars(events(straight), "train/loss"), scalars(events(resumed), "train/loss")
    assert sorted(resumed_loss) == [4, 5, 6]
    assert all(resumed_loss[step] == straight_loss[step] for step in (4, 5, 6))
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(straight / "checkpoint-6" / name), load_file(resumed / "checkpoint-6" / name)
        assert all(torch.equal(a[key], b[key]) for key in a), name

    # the comparison is sensitive: without the EMA state the resumed averages differ
    monkeypatch.setattr(EMAState, "load", lambda self, directory: None)
    assert run_main(pretrain_image_diffusion.main, diffusion_args(latent_caches, work, "no_ema_state", *flags,
                                                                  *resume))[0] == 0
    a, b = (load_file(work / "runs" / run / "checkpoint-6" / "ema.safetensors") for run in ("straight", "no_ema_state"))
    assert any(not torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_bfloat16_weights_train_evaluate_and_sample(work, latent_caches, vae_checkpoint, device):
    """What DeepSpeed's bf16 does: bfloat16 weights and buffers in the module, float32 batches."""
    args = pretrain_image_diffusion.parse_args(["--run_name", "bf16", "--batch_size", "4", "--eval_batches", "1",
                                                "--sample_steps", "2", "--sample_prompts", "a red circle"])
    train_cache, val_cache = open_latent_caches(latent_caches[0], latent_caches[1])
    config = resolve_diffusion_config("tiny_dit", [], train_cache)
    model = build_image_diffusion(config).to(device=device, dtype=torch.bfloat16)
    vae, _ = load_vae_checkpoint(vae_checkpoint, device=device)
    context = RunContext(device=torch.device(device), run_dir=work / "runs" / "bf16", rank=0, world_size=1)
    args.vae_checkpoint = str(vae_checkpoint)
    task = build_image_diffusion_task(model, config, train_cache, val_cache, vae, args, context)
    batch = {key: value.to(device) for key, value in task.train_batch(0).items()}
    terms = task.loss(model, batch, 0)
    assert terms.loss.dtype == torch.float32 and torch.isfinite(terms.loss)
    terms.loss.backward()
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in model.parameters()
               if p.grad is not None)
    task.after_step(model, 1)
    assert all(shadow.dtype == torch.float32 for shadow in task.extra_state.ema.shadow.values())
    metrics = task.evaluate(model)
    assert set(metrics) == {"eval/loss", "eval/mse", "eval/ema_loss"}
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())
    grid = task.samples(model)["samples/images"]
    assert isinstance(grid, ImageSample) and grid.pixels.shape == (3, 3 * IMAGE_SIZE, IMAGE_SIZE)
    assert 0 <= float(grid.pixels.min()) and float(grid.pixels.max()) <= 1


def test_bf16_autocast_run(work, latent_caches):
    flags = ["--bf16", "--max_steps", 2, "--eval_steps", 2, "--generation_steps", 2]
    assert run_main(pretrain_image_diffusion.main, diffusion_args(latent_caches, work, "autocast", *flags))[0] == 0
    losses = scalars(events(work / "runs" / "autocast"), "eval/loss")
    assert list(losses) == [2] and all(torch.isfinite(torch.tensor(value)) for value in losses.values())


# ----- bad input -----

def test_bad_inputs_are_clear_errors(work, latent_caches, vae_checkpoint, image_caches, learning_run, capsys):
    def error_of(main, argv) -> str:
        assert main([str(arg) for arg in argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        return err

    train = lambda *extra: diffusion_args(latent_caches, work, "bad", "--max_steps", 1, *extra)  # noqa: E731
    assert "preprocess_image_diffusion_dataset.py" in error_of(
        pretrain_image_diffusion.main, train("--train_data_dir", work / "missing_cache"))
    assert "--vae_checkpoint" in error_of(pretrain_image_diffusion.main, train("--vae_checkpoint", work / "no_vae"))
    assert "unknown config name 'no_such_dit'" in error_of(pretrain_image_diffusion.main,
                                                           train("--diffusion_type", "no_such_dit"))
    assert "divisible by the patch" in error_of(pretrain_image_diffusion.main, train("--set", "patch_size=3"))
    assert "text_embed_dim=256" in error_of(pretrain_image_diffusion.main, train("--set", "text_embed_dim=32"))
    assert "not a latent cache" in error_of(pretrain_image_diffusion.main, train("--val_data_dir", image_caches[1]))

    preprocess = ["--output_dir", work / "never", "--image_cache_dir", image_caches[1], "--text_encoder",
                  "builtin:words"]
    assert "--vae_checkpoint is required" in error_of(preprocess_image_diffusion_dataset.main, preprocess)
    assert "pretrain_image_vae.py" in error_of(preprocess_image_diffusion_dataset.main,
                                               [*preprocess, "--vae_checkpoint", work / "no_vae"])
    assert "preprocess_image_vae_dataset.py" in error_of(preprocess_image_diffusion_dataset.main, [
        "--output_dir", work / "never", "--image_cache_dir", work / "no_images", "--vae_checkpoint", vae_checkpoint])
    assert "--overwrite" in error_of(preprocess_image_diffusion_dataset.main, [
        "--output_dir", latent_caches[1], "--image_cache_dir", image_caches[1], "--vae_checkpoint", vae_checkpoint])
    assert not (work / "never").exists()

    generate = ["--prompt", "a red circle", "--output_dir", work / "never"]
    assert "pretrain_image_diffusion.py" in error_of(generate_image.main, ["--run_dir", work / "no_run", *generate])
    assert "--vae_checkpoint" in error_of(generate_image.main, ["--run_dir", learning_run, *generate,
                                                                "--vae_checkpoint", work / "no_vae"])
    assert "same file names" in error_of(generate_image.main, ["--run_dir", learning_run, "--prompt", "A red circle",
                                                               "a red circle!", "--output_dir", work / "never"])
