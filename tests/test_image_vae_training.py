"""pretrain_image_vae.py on the shared loop: PSNR/SSIM against independent references, a short run on builtin:shapes
that lowers the validation error (and logs what it should to TensorBoard), a GAN run whose discriminator trains from
its start step on, exact resume, the users' command and config, a two-rank DeepSpeed ZeRO-2 bf16 GAN run on CPU
that resumes exactly, and clear errors for bad input."""

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from scipy.ndimage import gaussian_filter

import preprocess_image_vae_dataset
import pretrain_image_vae
from data.sharded_cache import ShardedCache, ShardedCacheWriter
from helpers import (assert_resumed_run_matches, assert_same_weights, check_two_rank_gan_checkpoint, checkpoint_weights,
                     differs, only_events, scalars)
from model.image.discriminators import build_discriminator
from model.image.losses import build_image_vae_loss
from model.image.vae import ImageVAEConfig, build_image_vae
from model.pretrained import load_weights
from training.image_metrics import psnr, ssim
from training.image_vae_task import build_image_vae_task
from training.loop import RunContext
from two_ranks import run_two_ranks

REPO = Path(__file__).resolve().parent.parent
SIZE, TRAIN_IMAGES, VAL_IMAGES = 32, 64, 16
GAN = ["--set", "use_discriminator=true", "--set", "disc_channels=8", "--disc_start_step", "2"]


# ----- PSNR and SSIM against independent references -----

def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 for one image (C, H, W) in [0, 1], in float64: Gaussian statistics (sigma 1.5, 11 taps),
    K1 0.01, K2 0.03, the map averaged where the window fits and over the channels."""
    blur = lambda image: gaussian_filter(image, sigma=1.5, truncate=3.5)  # radius int(3.5 * 1.5 + 0.5) = 5
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    maps = []
    for a, b in zip(x.astype(np.float64), y.astype(np.float64)):
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
        covariance = blur(a * b) - mu_a * mu_b
        ssim_map = ((2 * mu_a * mu_b + c1) * (2 * covariance + c2)) / \
            ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
        maps.append(ssim_map[5:-5, 5:-5])
    return float(np.mean(maps))


def reference_psnr(x: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)))


def image_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """(4, 3, 24, 20) references and distortions of several kinds: noise, blur, a shift in brightness, contrast."""
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 6, 5, generator=generator), size=(24, 20),
                                             mode="bilinear", align_corners=False)
    noisy = (smooth + 0.1 * torch.randn(smooth.shape, generator=generator)).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(smooth, 3, stride=1, padding=1, count_include_pad=False)
    distorted = torch.stack([noisy[0], blurred[1], (smooth[2] + 0.2).clamp(0, 1), 0.5 + 0.3 * (smooth[3] - 0.5)])
    return smooth, distorted


def test_ssim_matches_wang_2004():
    reference, distorted = image_pairs()
    ours = ssim(reference, distorted)
    expected = [reference_ssim(a.numpy(), b.numpy()) for a, b in zip(reference, distorted)]
    assert ours.shape == (4,)
    assert ours.tolist() == pytest.approx(expected, abs=1e-5)
    assert len({round(value, 3) for value in expected}) == 4  # the four distortions score differently
    assert ssim(reference, reference).tolist() == pytest.approx([1.0] * 4, abs=1e-6)
    assert ssim(reference.double() * 255, distorted.double() * 255, data_range=255.0).tolist() == \
        pytest.approx(expected, abs=1e-5)


def test_psnr_closed_form():
    reference, distorted = image_pairs()
    assert psnr(reference, distorted).tolist() == \
        pytest.approx([reference_psnr(a.numpy(), b.numpy()) for a, b in zip(reference, distorted)], rel=1e-5)
    offset = reference * 0.5 + 0.25
    assert psnr(offset, offset + 0.1).tolist() == pytest.approx([20.0] * 4, rel=1e-4)  # 10 log10(1 / 0.1^2)
    assert psnr(offset * 255, offset * 255 + 25.5, data_range=255.0).tolist() == pytest.approx([20.0] * 4, rel=1e-4)
    assert torch.isinf(psnr(reference, reference)).all()


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="of one shape"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 12))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ssim(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 10, 16), torch.zeros(1, 3, 10, 16))


# ----- helpers and shared runs -----

def write_shapes_cache(directory: Path, split: str, image_size: int, max_images: int) -> Path:
    assert preprocess_image_vae_dataset.main(["--dataset_name", "builtin:shapes", "--split", split, "--image_size",
                                              str(image_size), "--max_images", str(max_images), "--items_per_shard",
                                              "16", "--output_dir", str(directory)]) == 0
    return directory


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image_caches")
    found = {"train": write_shapes_cache(root / "train", "train", SIZE, TRAIN_IMAGES),
             "val": write_shapes_cache(root / "val", "validation", SIZE, VAL_IMAGES),
             "val24": write_shapes_cache(root / "val24", "validation", 24, 4),
             "not_images": root / "not_images"}
    with ShardedCacheWriter(found["not_images"]) as writer:
        writer.add({"waveform": torch.zeros(16)})
        writer.finish({"made_by": "a test"})
    return found


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def pretrain_args(caches, runs: Path, run_name: str, *extra) -> list[str]:
    return ["--config", "tiny", "--train_data_dir", str(caches["train"]), "--val_data_dir", str(caches["val"]),
            "--runs_dir", str(runs), "--run_name", run_name, "--batch_size", "8", "--eval_batches", "2",
            "--logging_steps", "1", "--no_progress_bar", *map(str, extra)]


def pretrain(caches, runs: Path, run_name: str, *extra) -> int:
    return pretrain_image_vae.main(pretrain_args(caches, runs, run_name, *extra))


def load_run_model(checkpoint: Path):
    model = build_image_vae(ImageVAEConfig.from_yaml(checkpoint / "config.yaml"))
    load_weights(model, checkpoint / "model.safetensors")
    return model.eval()


def val_images(caches) -> torch.Tensor:
    """uint8 (VAL_IMAGES, 3, SIZE, SIZE), in cache order."""
    return torch.stack([item["image"] for item in ShardedCache(caches["val"])])


# ----- learning, evaluation and TensorBoard (plain engine, float32, no GAN) -----

LEARNING_STEPS = 40


@pytest.fixture(scope="module")
def learning_run(caches, runs_dir) -> Path:
    assert pretrain(caches, runs_dir, "learning", "--max_steps", LEARNING_STEPS, "--learning_rate", 2e-3,
                    "--eval_steps", 10, "--save_steps", 1000, "--sample_images", 4) == 0
    return runs_dir / "learning"


def test_validation_error_falls(learning_run):
    """Measured (deterministic on CPU): eval L1 0.69 at step 10 -> 0.54 at step 40, PSNR 9.2 -> 10.7 dB, SSIM
    0.50 -> 0.59; an untrained VAE outputs ~0, an L1 of ~0.71 on these images."""
    accumulator = only_events(learning_run)
    l1, psnr_db, ssim_value = (scalars(accumulator, f"eval/{name}") for name in ("reconstruction", "psnr", "ssim"))
    assert sorted(l1) == [10, 20, 30, 40]
    assert l1[40] < l1[10] - 0.08 and l1[40] < 0.62
    assert psnr_db[40] > psnr_db[10] + 0.8
    assert ssim_value[40] > ssim_value[10] + 0.03
    train = scalars(accumulator, "train/reconstruction")
    assert sum(train[step] for step in range(36, 41)) / 5 < sum(train[step] for step in range(1, 6)) / 5 - 0.1


def test_evaluation_matches_an_independent_computation(learning_run, caches):
    """eval/* at the last step are the L1, PSNR and SSIM (numpy references) of the final checkpoint's
    reconstructions (posterior mean) of the whole validation cache (eval_batches 2 x 8 = its 16 images)."""
    accumulator = only_events(learning_run)
    model = load_run_model(learning_run / f"checkpoint-{LEARNING_STEPS}")
    images = val_images(caches).float() / 127.5 - 1
    with torch.no_grad():
        reconstruction = model(images, sample_posterior=False)[0]
    x, y = ((images + 1) / 2).numpy(), ((reconstruction.clamp(-1, 1) + 1) / 2).numpy()
    expected = {"reconstruction": float((reconstruction - images).abs().mean()),
                "psnr": np.mean([reference_psnr(a, b) for a, b in zip(x, y)]),
                "ssim": np.mean([reference_ssim(a, b) for a, b in zip(x, y)])}
    for name, value in expected.items():
        assert scalars(accumulator, f"eval/{name}")[LEARNING_STEPS] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_tensorboard_scalars_and_reconstruction_grid(learning_run, caches):
    accumulator = only_events(learning_run)
    tags = accumulator.Tags()
    for tag in ("train/loss", "train/reconstruction", "train/kl", "train/lr", "train/grad_norm",
                "train/images_per_sec", "eval/reconstruction", "eval/psnr", "eval/ssim"):
        assert tag in tags["scalars"], tag
        assert all(math.isfinite(value) for value in scalars(accumulator, tag).values()), tag
    assert not [tag for tag in tags["scalars"] if "adversarial" in tag or "discriminator" in tag]
    assert sorted(scalars(accumulator, "train/loss")) == list(range(1, LEARNING_STEPS + 1))
    assert max(scalars(accumulator, "train/lr").values()) == pytest.approx(2e-3)

    grids = accumulator.Images("samples/reconstruction")
    assert [event.step for event in grids] == [10, 20, 30, 40]  # every --eval_steps (the default generation_steps)
    assert (grids[-1].width, grids[-1].height) == (4 * SIZE, 2 * SIZE)
    pixels = torch.from_numpy(np.array(PILImage.open(io.BytesIO(grids[-1].encoded_image_string)).convert("RGB")))
    top_row = pixels[:SIZE].permute(2, 0, 1).int()  # (3, SIZE, 4 * SIZE): the first 4 validation images
    originals = torch.cat(list(val_images(caches)[:4]), dim=-1).int()
    assert (top_row - originals).abs().max() <= 1
    model = load_run_model(learning_run / f"checkpoint-{LEARNING_STEPS}")
    with torch.no_grad():
        reconstruction = model(val_images(caches)[:4].float() / 127.5 - 1, sample_posterior=False)[0]
    expected_bottom = torch.cat(list((reconstruction.clamp(-1, 1) + 1) * 127.5), dim=-1)
    assert (pixels[SIZE:].permute(2, 0, 1).float() - expected_bottom).abs().max() <= 1.01


def test_run_records_its_config(learning_run):
    config = ImageVAEConfig.from_yaml(learning_run / "config.yaml")
    assert config == ImageVAEConfig.from_name("tiny") and not config.use_discriminator
    assert ImageVAEConfig.from_yaml(learning_run / f"checkpoint-{LEARNING_STEPS}" / "config.yaml") == config
    assert not (learning_run / f"checkpoint-{LEARNING_STEPS}" / "discriminator").exists()


# ----- the GAN: the task's losses, the discriminator from its start step on, exact resume -----

def test_task_losses_are_vae_loss_on_the_model_output(caches, tmp_path):
    """The task's generator loss (arranged for DeepSpeed: computed on the last convolution applied again) has the
    value and the gradients of VAELoss.generator_loss on the model's own reconstruction, with the adaptive weight;
    its adversary's loss is VAELoss.discriminator_loss on the images and that reconstruction."""
    args = pretrain_image_vae.parse_args(pretrain_args(caches, tmp_path, "unit", *GAN))
    config = pretrain_image_vae.resolve_config(args)
    torch.manual_seed(0)
    model = build_image_vae(config)
    task = build_image_vae_task(model, config, ShardedCache(caches["train"]), ShardedCache(caches["val"]), args,
                                RunContext(torch.device("cpu"), tmp_path, 0, 1))
    discriminator = build_discriminator(config).requires_grad_(False)
    batch = task.train_batch(0)
    images = batch["image"].float() / 127.5 - 1

    def gradients(loss_of) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(1)  # the same posterior sample
        loss = loss_of()
        loss.backward()
        return float(loss.detach()), [parameter.grad.clone() for parameter in model.parameters()]

    def direct():
        reconstruction, posterior = model(images)
        terms = build_image_vae_loss(config).generator_loss(images, reconstruction, posterior, 2, model.last_layer,
                                                            discriminator)
        assert terms["adaptive_weight"] > 0
        return terms["loss"]

    terms = []

    def through_task():
        terms.append(task.loss(model, batch, 2, discriminator))
        return terms[0].loss

    task_loss, task_grads = gradients(through_task)
    direct_loss, direct_grads = gradients(direct)
    assert task_loss == pytest.approx(direct_loss, rel=1e-6)
    for ours, expected in zip(task_grads, direct_grads):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-8)
    assert terms[0].logs["adaptive_weight"] > 0 and set(terms[0].logs) == {"reconstruction", "kl", "adversarial",
                                                                            "adaptive_weight"}

    adversary = task.adversary
    assert (adversary.start_step, adversary.learning_rate, adversary.name) == (2, args.learning_rate, "discriminator")
    reconstruction = terms[0].outputs["reconstruction"].detach()
    discriminator.requires_grad_(True)
    ours = adversary.loss(discriminator, batch, {"reconstruction": reconstruction})
    expected = build_image_vae_loss(config).discriminator_loss(images, reconstruction, 2, discriminator)
    assert float(ours.loss.detach()) == pytest.approx(float(expected["loss"].detach()), rel=1e-6)
    assert float(ours.loss.detach()) > 0

GAN_STEPS = 4
GAN_FLAGS = [*GAN, "--max_steps", GAN_STEPS, "--learning_rate", 1e-3, "--discriminator_lr", 5e-4, "--save_steps", 1,
             "--save_total_limit", 10, "--eval_steps", 2]


@pytest.fixture(scope="module")
def gan_run(caches, runs_dir) -> Path:
    """GAN_STEPS steps with the discriminator from step index 2 (the third step) on; a checkpoint after each."""
    assert pretrain(caches, runs_dir, "gan", *GAN_FLAGS) == 0
    return runs_dir / "gan"


def test_discriminator_trains_from_its_start_step(gan_run):
    disc = [checkpoint_weights(gan_run, step, "discriminator") for step in range(1, GAN_STEPS + 1)]
    vae = [checkpoint_weights(gan_run, step) for step in range(1, GAN_STEPS + 1)]
    assert not differs(disc[0], disc[1])  # steps 1 and 2: untouched (weights and BatchNorm statistics)
    assert differs(disc[1], disc[2]) and differs(disc[2], disc[3])
    assert all(differs(vae[i], vae[i + 1]) for i in range(GAN_STEPS - 1))

    accumulator = only_events(gan_run)
    adversarial, weight = scalars(accumulator, "train/adversarial"), scalars(accumulator, "train/adaptive_weight")
    assert (adversarial[1], adversarial[2], weight[1], weight[2]) == (0.0, 0.0, 0.0, 0.0)
    assert adversarial[3] != 0 and adversarial[4] != 0 and weight[3] > 0 and weight[4] > 0
    for tag in ("loss", "logits_real", "logits_fake", "lr", "grad_norm"):
        assert sorted(scalars(accumulator, f"train/discriminator/{tag}")) == [3, 4], tag
    assert 0 < max(scalars(accumulator, "train/discriminator/lr").values()) <= 5e-4
    config = ImageVAEConfig.from_yaml(gan_run / "config.yaml")
    assert config.use_discriminator and config.disc_start_step == 2  # --disc_start_step is recorded


@pytest.mark.parametrize("resume_step", [1, 3])
def test_resume_is_exact(gan_run, caches, runs_dir, resume_step):
    """Resuming from checkpoint-1 (before the discriminator starts) or checkpoint-3 (after) repeats the straight
    run exactly: losses of both networks, evaluation, weights and trainer state."""
    name = f"resumed_{resume_step}"
    assert pretrain(caches, runs_dir, name, *GAN_FLAGS,
                    "--resume_from_checkpoint", gan_run / f"checkpoint-{resume_step}") == 0
    resumed, straight = only_events(runs_dir / name), only_events(gan_run)
    steps = list(range(resume_step + 1, GAN_STEPS + 1))
    for tag in ("train/loss", "train/reconstruction", "train/adversarial", "train/lr"):
        assert scalars(resumed, tag) == {step: scalars(straight, tag)[step] for step in steps}, tag
    discriminator_steps = [step for step in steps if step >= 3]
    assert scalars(resumed, "train/discriminator/loss") == \
        {step: scalars(straight, "train/discriminator/loss")[step] for step in discriminator_steps}
    assert scalars(resumed, "eval/psnr")[GAN_STEPS] == scalars(straight, "eval/psnr")[GAN_STEPS]
    for network in ("", "discriminator"):
        assert_same_weights(checkpoint_weights(runs_dir / name, GAN_STEPS, network),
                            checkpoint_weights(gan_run, GAN_STEPS, network))
    final = f"checkpoint-{GAN_STEPS}"
    assert (runs_dir / name / final / "trainer_state.json").read_text() == \
        (gan_run / final / "trainer_state.json").read_text()


def test_resume_without_rng_state_is_not_exact(gan_run, caches, runs_dir, monkeypatch):
    """The exact-resume test is sensitive: the posterior sample draws from the restored RNG."""
    monkeypatch.setattr("training.checkpoints.set_rng_state", lambda state: None)
    assert pretrain(caches, runs_dir, "no_rng", *GAN_FLAGS, "--resume_from_checkpoint", gan_run / "checkpoint-3") == 0
    assert scalars(only_events(runs_dir / "no_rng"), "train/loss")[4] != scalars(only_events(gan_run), "train/loss")[4]


# ----- the users' command and config -----

USERS_COMMAND = ["--run_name", "image_vae_run", "--config", "gan_4_2", "--train_data_dir",
                 "cached_datasets/image_train_cached", "--val_data_dir", "cached_datasets/image_val_cached"]


def test_users_command_defaults(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = pretrain_image_vae.parse_args(USERS_COMMAND)
    config = pretrain_image_vae.resolve_config(args)
    assert config.name == "gan_4_2" and config.use_discriminator and config.downsample_factor == 4
    assert args.learning_rate == pytest.approx(4.5e-6 * 8) and args.discriminator_lr == args.learning_rate
    assert args.max_steps > config.disc_start_step  # the GAN gets to train
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay) == (0.5, 0.9, 0.0)
    assert (args.train_data_dir, args.val_data_dir) == ("cached_datasets/image_train_cached",
                                                        "cached_datasets/image_val_cached")
    pretrain_image_vae.check_image_vae_arguments(args)

    monkeypatch.setenv("WORLD_SIZE", "4")  # LDM's rule: the rate grows with the global batch
    args = pretrain_image_vae.parse_args([*USERS_COMMAND, "--gradient_accumulation_steps", "2", "--disc_start_step",
                                          "100", "--discriminator_lr", "1e-5"])
    assert args.learning_rate == pytest.approx(4.5e-6 * 8 * 2 * 4) and args.discriminator_lr == 1e-5
    assert pretrain_image_vae.resolve_config(args).disc_start_step == 100


def test_users_config_trains(caches, runs_dir):
    """gan_4_2 itself (f4, PatchGAN) runs end to end under bf16 autocast, the GAN on from the second step."""
    assert pretrain(caches, runs_dir, "gan_4_2", "--max_steps", 2, "--batch_size", 4, "--eval_batches", 1,
                    "--disc_start_step", 1, "--bf16", "--config", "gan_4_2") == 0  # the last --config wins
    accumulator = only_events(runs_dir / "gan_4_2")
    assert scalars(accumulator, "train/adaptive_weight")[2] > 0
    assert math.isfinite(scalars(accumulator, "eval/psnr")[2])
    assert (runs_dir / "gan_4_2" / "checkpoint-2" / "discriminator" / "model.safetensors").is_file()


# ----- bad input: one `error:` line, exit code 1 -----

BAD_INPUTS = {
    # name: (extra flags, substrings of the error line); {train}, {val24}, {not_images}, {tmp}: fixture paths
    "missing_train_cache": (["--train_data_dir", "{tmp}/no_such_cache"],
                            ["no cache at", "no_such_cache", "preprocess_image_vae_dataset.py"]),
    "missing_val_cache": (["--val_data_dir", "{tmp}/no_val"],
                          ["no cache at", "no_val", "preprocess_image_vae_dataset.py --split validation"]),
    "unknown_config": (["--config", "no_such_config"], ["unknown config name 'no_such_config'"]),
    "unknown_config_key": (["--set", "block_channels=[8]"], ["unknown config key 'block_channels'"]),
    "size_not_divisible": (["--set", "block_out_channels=[8, 8, 8, 8, 8, 8, 8]", "--set", "norm_num_groups=8"],
                           ["image size 32 is not divisible by the downsampling factor 64", "--image_size 64"]),
    "train_val_sizes_differ": (["--val_data_dir", "{val24}"], ["32x32", "24x24", "the same",
                                                               "preprocess_image_vae_dataset.py --image_size"]),
    "discriminator_too_deep": (["--set", "use_discriminator=true", "--set", "disc_layers=4"],
                               ["disc_layers=4", "at least 48 pixels"]),
    "not_an_image_cache": (["--train_data_dir", "{not_images}"], ["is not an image cache", "no image_size"]),
    "batch_larger_than_cache": (["--batch_size", "100"], ["holds 64 items, fewer than one global batch"]),
    "discriminator_lr": (["--discriminator_lr", "0"], ["--discriminator_lr must be positive"]),
    "disc_start_step": (["--disc_start_step", "-1"], ["--disc_start_step must not be negative"]),
    "sample_images": (["--sample_images", "0"], ["--sample_images must be at least 1"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(case, caches, tmp_path, capsys):
    flags, expected = BAD_INPUTS[case]
    paths = {"{tmp}": str(tmp_path), "{val24}": str(caches["val24"]), "{not_images}": str(caches["not_images"])}
    for placeholder, path in paths.items():
        flags = [flag.replace(placeholder, path) for flag in flags]
    assert pretrain(caches, tmp_path / "runs", "bad", "--max_steps", 1, *flags) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    for fragment in expected:
        assert fragment in errors[0], errors[0]
    assert not list((tmp_path / "runs").glob("bad/checkpoint-*"))


# ----- DeepSpeed ZeRO-2, two CPU ranks, bf16, with the GAN: straight and resumed in one launch -----

@pytest.mark.slow
def test_deepspeed_zero2_two_ranks_bf16_gan(caches, tmp_path):
    """Three steps straight through, then again from checkpoint-2: both networks' DeepSpeed states must come back
    (a resume that restored nothing would log other step-3 losses and end with other weights)."""
    flags = ["--use_deepspeed", "--deepspeed_config", "ds_config_zero-2.json", "--bf16", "--gradient_accumulation_steps",
             2, "--batch_size", 4, "--max_steps", 3, "--save_steps", 1, "--eval_steps", 3, "--learning_rate", 1e-3,
             "--set", "use_discriminator=true", "--set", "disc_channels=8", "--disc_start_step", 1]
    run_dir, resumed_dir = tmp_path / "ds", tmp_path / "ds_resumed"
    output = run_two_ranks("pretrain_image_vae.py", pretrain_args(caches, tmp_path, "ds", *flags),
                           pretrain_args(caches, tmp_path, "ds_resumed", *flags, "--resume_from_checkpoint",
                                         run_dir / "checkpoint-2"))
    assert f"finished {run_dir} at step 3" in output and f"finished {resumed_dir} at step 3" in output

    trainer = check_two_rank_gan_checkpoint(run_dir, 3, accumulation=2)
    assert trainer["tokens"] == 3 * 2 * 2 * 4  # images: steps x accumulation x ranks x batch
    accumulator = only_events(run_dir)
    assert scalars(accumulator, "train/adaptive_weight")[3] > 0
    assert sorted(scalars(accumulator, "train/discriminator/loss")) == [2, 3]
    assert all(math.isfinite(scalars(accumulator, f"eval/{name}")[3]) for name in ("reconstruction", "psnr", "ssim"))

    # the resumed run: the same step-3 numbers (bf16 weights with float32 masters, recomputed in the same order on
    # CPU: equal to the bit here; 1e-6 leaves room for another reduction order) and the same final weights
    assert_resumed_run_matches(run_dir, resumed_dir, ("train/loss", "train/reconstruction", "train/adversarial",
                                                      "train/discriminator/loss", "eval/psnr"),
                               3, networks=("", "discriminator"), rel=1e-6, atol=1e-7)
