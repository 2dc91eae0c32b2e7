"""pretrain_vocoder.py on the shared loop: aligned crops that are a pure function of the batch index, the minimum
segment, bfloat16 losses, spectrogram images, a short run on builtin:speech in which eval/mel_l1 falls (with its
TensorBoard terms, audio and images, and a checkpoint that load_pretrained reads back), a GAN run whose discriminator
trains only from its start step, exact resume, a two-rank DeepSpeed ZeRO-2 bf16 GAN run that resumes exactly (slow),
and clear errors for bad input."""

import argparse
import io
import math
import shutil
from pathlib import Path

import matplotlib
import pytest
import soundfile
import torch
from safetensors.torch import load_file

import preprocess_vocoder_dataset
import pretrain_vocoder
from data.sharded_cache import ShardedCache, ShardedCacheWriter
from helpers import (assert_resumed_run_matches, assert_same_weights, check_two_rank_gan_checkpoint, checkpoint_weights,
                     differs, only_events, scalars)
from model.audio.criteria import MultiResolutionSTFTLoss
from model.audio.features import AudioFeatureConfig, log_mel, num_samples
from model.audio.vocoders.vocoders import VocoderWithLoss, build_vocoder, model_config_lookup
from model.pretrained import load_pretrained
from training.audio_samples import SEPARATOR_ROWS, mel_image
from training.loop import RunContext
from training.task import Audio
from training.audio_metrics import reconstruction_metrics
from training.vocoder_task import build_vocoder_task, min_segment_frames
from two_ranks import run_two_ranks

REPO = Path(__file__).resolve().parent.parent
TINY = "tiny_lightheaded_freq_domain_vocoder"
FEATURES = AudioFeatureConfig()
HOP = FEATURES.hop_length
SMALL_DISCRIMINATOR = ["--set", "discriminator_width=0.125"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng): "
                                         "builtin:speech needs it")


# ----- helpers -----

def tone(seconds: float, seed: int, sample_rate: int = 16000) -> torch.Tensor:
    """A random chord with a slow amplitude envelope: (S,) float32 in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    freqs = 100 + 900 * torch.rand(3, 1, generator=generator)
    chord = torch.sin(2 * math.pi * freqs * t).sum(0) / 3
    return (0.5 * chord * (0.6 + 0.4 * torch.sin(2 * math.pi * 1.5 * t))).float()


def write_cache(directory: Path, clips: list, features: AudioFeatureConfig = FEATURES) -> ShardedCache:
    """A vocoder cache (as preprocess_vocoder_dataset.py writes) of the given waveforms (S,)."""
    with ShardedCacheWriter(directory, items_per_shard=4) as writer:
        for index, waveform in enumerate(clips):
            writer.add({"waveform": waveform, "mel": log_mel(waveform, features), "speaker": "tone", "text": "",
                        "source_id": f"tone-{index}#0"})
        writer.finish({"made_by": "preprocess_vocoder_dataset.py", "kind": "vocoder", "features": features.to_dict()})
    return ShardedCache(directory)


def task_args(**overrides) -> argparse.Namespace:
    values = dict(batch_size=2, seed=3, segment_frames=24, eval_batches=2, eval_steps=5, generation_steps=None,
                  sample_clips=1, use_gan=False, gan_start_step=0, discriminator_lr=1e-3)
    return argparse.Namespace(**{**values, **overrides})


# ----- segment length, precision, images (no espeak needed; crops and batches: test_vocoder_cache.py) -----

def test_min_segment_frames_is_what_the_losses_need():
    model = VocoderWithLoss(build_vocoder(model_config_lookup[TINY]))
    frames = min_segment_frames(model, use_gan=False)
    assert frames == math.ceil((2048 // 2 + 1) / HOP) + 1  # the widest loss STFT (n_fft 2048) needs > 1024 samples
    mel = torch.randn(1, 80, frames)
    model(mel, torch.randn(1, num_samples(frames, FEATURES)))
    with pytest.raises(ValueError, match="use longer segments"):
        model(mel[..., :-1], torch.randn(1, num_samples(frames - 1, FEATURES)))
    small_mrd = VocoderWithLoss(build_vocoder(model_config_lookup[TINY].with_overrides(
        ["stft_resolutions=[[512, 128, 512]]", "mrd_fft_sizes=[4096]"])))
    assert min_segment_frames(small_mrd, use_gan=False) == 4  # n_fft 1024: > 512 samples
    assert min_segment_frames(small_mrd, use_gan=True) == math.ceil(2049 / HOP) + 1


def test_losses_are_float32_and_close_with_bfloat16_weights(tmp_path):
    cache = write_cache(tmp_path / "cache", [tone(0.8, seed=k) for k in range(4)])
    config = model_config_lookup[TINY].with_overrides(["discriminator_width=0.125"])
    torch.manual_seed(0)
    model = VocoderWithLoss(build_vocoder(config))
    context = RunContext(torch.device("cpu"), tmp_path / "run", 0, 1)
    task = build_vocoder_task(model, cache, cache, task_args(use_gan=True), context)
    batch, discriminator = task.train_batch(0), task.adversary.module
    reference = task.loss(model, batch, 0, discriminator)
    model.to(torch.bfloat16)  # what DeepSpeed's bf16 does to the weights
    terms = task.loss(model, batch, 0, discriminator.to(torch.bfloat16))
    assert terms.loss.dtype == torch.float32 and terms.outputs["waveform"].dtype == torch.float32
    assert set(terms.logs) == set(reference.logs) >= {"mel_l1", "adversarial", "feature_matching", "reconstruction"}
    for name, value in reference.logs.items():
        assert float(terms.logs[name].detach()) == pytest.approx(float(value.detach()), rel=0.05, abs=0.02), name
    d_terms = task.adversary.loss(discriminator, batch, {"waveform": terms.outputs["waveform"].detach()})
    assert d_terms.loss.dtype == torch.float32 and torch.isfinite(d_terms.loss)
    assert task.batch_size(batch) == pytest.approx(2 * 23 * HOP / 16000)  # audio seconds


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_and_samples_on_each_device_and_dtype(tmp_path, device):
    clips = [tone(0.8, seed=k) for k in range(3)]
    cache = write_cache(tmp_path / "cache", clips)
    torch.manual_seed(0)
    model = VocoderWithLoss(build_vocoder(model_config_lookup[TINY])).to(device)
    context = RunContext(torch.device(device), tmp_path / "run", 0, 1)
    task = build_vocoder_task(model, cache, cache, task_args(eval_batches=3, sample_clips=2), context)
    reference = task.evaluate(model)
    assert set(reference) == {"eval/mel_l1", "eval/mrstft"}
    samples = task.samples(model.to(torch.bfloat16))  # DeepSpeed's bf16 weights
    assert task.evaluate(model) == pytest.approx(reference, rel=0.05)
    assert sorted(samples) == [f"samples/clip{k}/{kind}" for k in range(2) for kind in ("generated", "ground_truth",
                                                                                         "mel")]
    frames = 1 + 12800 // HOP
    for k in range(2):
        assert isinstance(samples[f"samples/clip{k}/generated"], Audio)
        generated, truth = samples[f"samples/clip{k}/generated"].waveform, samples[f"samples/clip{k}/ground_truth"]
        assert generated.dtype == torch.float32 and generated.shape == ((frames - 1) * HOP,)
        spread = clips[k * len(clips) // 2]  # fixed_items: spread evenly over the cache
        torch.testing.assert_close(truth.waveform, spread[:(frames - 1) * HOP], rtol=0, atol=0)
        assert samples[f"samples/clip{k}/mel"].pixels.shape == (3, 2 * 80 + SEPARATOR_ROWS, frames)
    assert model.training  # samples and evaluation leave the mode as they found it


def test_mel_image_puts_low_frequencies_at_the_bottom_on_one_scale():
    floor = math.log(1e-5)
    reference = torch.full((80, 12), floor)
    reference[0] = 2.0  # the lowest band at the maximum
    generated = torch.full((80, 10), 5.0)  # brighter than the reference: clipped to its scale's top
    pixels = mel_image([reference, generated], floor)
    assert pixels.shape == (3, 2 * 80 + SEPARATOR_ROWS, 12)
    colormap = matplotlib.colormaps["magma"]
    top, bottom = torch.tensor(colormap(1.0)[:3]).float(), torch.tensor(colormap(0.0)[:3]).float()
    torch.testing.assert_close(pixels[:, 79, 0], top)  # the lowest band, drawn at the bottom of the first panel
    torch.testing.assert_close(pixels[:, 0, 0], bottom)
    torch.testing.assert_close(pixels[:, 80, 0], torch.ones(3))  # separator
    torch.testing.assert_close(pixels[:, 82 + 40, 5], top)
    torch.testing.assert_close(pixels[:, 82 + 40, 11], bottom)  # the shorter spectrogram padded at the floor
    with pytest.raises(ValueError, match="same n_mels"):
        mel_image([reference, torch.zeros(64, 12)], floor)


# ----- runs on builtin:speech -----

@pytest.fixture(scope="module")
def speech_caches(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): builtin:speech needs it")
    root = tmp_path_factory.mktemp("speech")
    for split, items in (("train", 6), ("validation", 2)):
        assert preprocess_vocoder_dataset.main(["--dataset_name", "builtin:speech", "--split", split, "--num_items",
                                                str(items), "--num_workers", "0", "--output_dir",
                                                str(root / split)]) == 0
    return root / "train", root / "validation"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def pretrain_args(caches, runs: Path, run_name: str, *extra) -> list[str]:
    train, val = caches
    return ["--run_name", run_name, "--runs_dir", str(runs), "--vocoder_type", TINY, "--train_data_dir", str(train),
            "--val_data_dir", str(val), "--batch_size", "4", "--no_progress_bar", *map(str, extra)]


def pretrain(caches, runs: Path, run_name: str, *extra) -> int:
    """pretrain_vocoder.main in this process, on the CPU; its exit code."""
    return pretrain_vocoder.main(pretrain_args(caches, runs, run_name, "--device", "cpu", *extra))


LEARNING_STEPS = 30


@pytest.fixture(scope="module")
def learning_run(speech_caches, runs_dir) -> Path:
    assert pretrain(speech_caches, runs_dir, "learning", "--max_steps", LEARNING_STEPS, "--learning_rate", 2e-3,
                    "--logging_steps", 1, "--eval_steps", 5, "--eval_batches", 2, "--sample_clips", 2,
                    "--generation_steps", 15, "--save_steps", 1000) == 0
    return runs_dir / "learning"


@needs_espeak
def test_mel_l1_falls(learning_run):
    """Measured (deterministic on CPU; the magnitude starts at the mel's least-squares magnitude): eval/mel_l1
    0.544 at step 5 → 0.367 at step 30 (falling at every evaluation), eval/mrstft 1.71 → 1.57."""
    accumulator = only_events(learning_run)
    mel_l1, mrstft = scalars(accumulator, "eval/mel_l1"), scalars(accumulator, "eval/mrstft")
    steps = list(range(5, LEARNING_STEPS + 1, 5))
    assert sorted(mel_l1) == sorted(mrstft) == steps
    assert all(mel_l1[later] < mel_l1[earlier] + 0.01 for earlier, later in zip(steps, steps[1:]))
    assert mel_l1[LEARNING_STEPS] < 0.8 * mel_l1[5]
    assert mrstft[LEARNING_STEPS] < mrstft[5] - 0.1


@needs_espeak
def test_tensorboard_terms_audio_and_images(learning_run, speech_caches):
    accumulator = only_events(learning_run)
    tags = accumulator.Tags()
    for term in ("loss", "reconstruction", "mel_l1", "stft_spectral_convergence", "stft_log_magnitude",
                 "phase_instantaneous", "phase_group_delay", "phase_instantaneous_frequency", "lr", "grad_norm",
                 "audio_seconds_per_sec"):
        assert f"train/{term}" in tags["scalars"], term
    assert {"eval/mel_l1", "eval/mrstft"} <= set(tags["scalars"])
    assert not any("discriminator" in tag or "adversarial" in tag for tag in tags["scalars"])
    val = ShardedCache(speech_caches[1])
    for clip in range(2):
        audio = accumulator.Audio(f"samples/clip{clip}/ground_truth")
        assert [event.step for event in audio] == [15, 30]
        heard, rate = soundfile.read(io.BytesIO(audio[0].encoded_audio_string), dtype="float32")
        assert rate == 16000
        expected = val[clip * len(val) // 2]["waveform"]  # fixed_items: spread evenly over the cache
        expected = expected[:num_samples(1 + expected.shape[-1] // HOP, FEATURES)]
        torch.testing.assert_close(torch.from_numpy(heard), expected, atol=1 / 16384, rtol=0)  # 16-bit wav
        generated = accumulator.Audio(f"samples/clip{clip}/generated")
        assert [event.step for event in generated] == [15, 30]
        images = accumulator.Images(f"samples/clip{clip}/mel")
        assert [event.step for event in images] == [15, 30]
        assert (images[0].height, images[0].width) == (2 * 80 + SEPARATOR_ROWS, 1 + expected.shape[-1] // HOP)


@needs_espeak
def test_checkpoint_holds_the_trained_vocoder(learning_run, speech_caches):
    """load_pretrained reads back the vocoder whose eval/mel_l1 the run logged at its last step."""
    checkpoint = learning_run / f"checkpoint-{LEARNING_STEPS}"
    saved = load_file(checkpoint / "model.safetensors")
    vocoder = load_pretrained(checkpoint, family="vocoder")
    assert saved.keys() == {f"vocoder.{name}" for name in vocoder.state_dict()}  # the vocoder, nothing else
    val = ShardedCache(speech_caches[1])
    config = vocoder.config
    stft_loss = MultiResolutionSTFTLoss(config.stft_resolutions)
    metrics = []
    with torch.no_grad():
        for item in val:
            generated, _ = vocoder(item["mel"][None])
            metrics.append(reconstruction_metrics(generated, item["waveform"][None, :generated.shape[-1]], config,
                                                  stft_loss))
    logged = only_events(learning_run)
    for name in ("mel_l1", "mrstft"):
        mean = sum(float(m[name]) for m in metrics) / len(metrics)
        assert mean == pytest.approx(scalars(logged, f"eval/{name}")[LEARNING_STEPS], rel=1e-5), name


GAN_FLAGS = ["--use_gan", "--gan_start_step", 2, "--max_steps", 5, "--logging_steps", 1, "--save_steps", 1,
             "--save_total_limit", 10, "--eval_steps", 5, "--eval_batches", 1, "--sample_clips", 1,
             "--discriminator_lr", 1e-3, "--segment_frames", 16, *SMALL_DISCRIMINATOR]


@pytest.fixture(scope="module")
def gan_run(speech_caches, runs_dir) -> Path:
    assert pretrain(speech_caches, runs_dir, "gan", *GAN_FLAGS) == 0
    return runs_dir / "gan"


@needs_espeak
def test_gan_trains_the_discriminator_from_its_start_step(gan_run):
    def weights(step, network=""):
        return checkpoint_weights(gan_run, step, network)

    assert not differs(weights(1, "discriminator"), weights(2, "discriminator"))  # steps 1 and 2: before the start
    assert differs(weights(2, "discriminator"), weights(3, "discriminator"))
    assert differs(weights(3, "discriminator"), weights(4, "discriminator"))
    assert differs(weights(1), weights(2))  # the vocoder trains from the first step
    accumulator = only_events(gan_run)
    for tag in ("train/discriminator/loss", "train/discriminator/logits_real", "train/discriminator/logits_fake",
                "train/discriminator/lr", "train/adversarial", "train/feature_matching"):
        assert sorted(scalars(accumulator, tag)) == [3, 4, 5], tag
    assert sorted(scalars(accumulator, "train/mel_l1")) == [1, 2, 3, 4, 5]
    # --discriminator_lr 1e-3 is above the vocoder's default 5e-4, and its schedule starts at the start step
    assert max(scalars(accumulator, "train/discriminator/lr").values()) > max(scalars(accumulator, "train/lr").values())


@needs_espeak
def test_gan_resume_is_exact(gan_run, speech_caches, runs_dir):
    """A run resumed from the straight run's checkpoint-3 logs the same losses and ends with the same weights."""
    stopped = runs_dir / "gan_stopped_at_3"
    shutil.copytree(gan_run / "checkpoint-3", stopped)
    assert pretrain(speech_caches, runs_dir, "gan_resumed", *GAN_FLAGS, "--resume_from_checkpoint", stopped) == 0
    resumed_dir = runs_dir / "gan_resumed"
    resumed, straight = only_events(resumed_dir), only_events(gan_run)
    for tag in ("train/loss", "train/mel_l1", "train/adversarial", "train/discriminator/loss",
                "train/discriminator/logits_fake", "eval/mel_l1"):
        values = scalars(resumed, tag)
        assert sorted(values) == ([5] if tag.startswith("eval") else [4, 5]), tag
        assert values == {step: scalars(straight, tag)[step] for step in values}, tag
    for network in ("", "discriminator"):
        assert_same_weights(checkpoint_weights(gan_run, 5, network), checkpoint_weights(resumed_dir, 5, network))


# ----- DeepSpeed ZeRO-2, two CPU ranks, bf16, with the GAN: straight and resumed in one launch -----

@needs_espeak
@pytest.mark.slow
def test_deepspeed_zero2_two_ranks_bf16_gan(speech_caches, tmp_path):
    """Three steps straight through, then again from checkpoint-2: both networks' DeepSpeed states must come back
    (a resume that restored nothing would log other step-3 losses and end with other weights)."""
    flags = ["--use_deepspeed", "--deepspeed_config", "ds_config_zero-2.json", "--bf16", "--gradient_accumulation_steps",
             2, "--batch_size", 2, "--max_steps", 3, "--save_steps", 1, "--eval_steps", 3, "--eval_batches", 2,
             "--logging_steps", 1, "--sample_clips", 1, "--segment_frames", 16, "--use_gan", "--gan_start_step", 1,
             *SMALL_DISCRIMINATOR]
    run_dir, resumed_dir = tmp_path / "ds", tmp_path / "ds_resumed"
    output = run_two_ranks("pretrain_vocoder.py", pretrain_args(speech_caches, tmp_path, "ds", *flags),
                           pretrain_args(speech_caches, tmp_path, "ds_resumed", *flags, "--resume_from_checkpoint",
                                         run_dir / "checkpoint-2"))
    assert f"finished {run_dir} at step 3" in output and f"finished {resumed_dir} at step 3" in output

    trainer = check_two_rank_gan_checkpoint(run_dir, 3, accumulation=2)
    # audio seconds: steps x accumulation x ranks x batch x 15 hops of 256 samples at 16 kHz
    assert trainer["tokens"] == pytest.approx(3 * 2 * 2 * 2 * 15 * HOP / 16000)
    accumulator = only_events(run_dir)
    assert sorted(scalars(accumulator, "train/discriminator/loss")) == [2, 3]
    assert sorted(scalars(accumulator, "train/adversarial")) == [2, 3]
    assert all(math.isfinite(scalars(accumulator, f"eval/{name}")[3]) for name in ("mel_l1", "mrstft"))
    vocoder = load_pretrained(run_dir / "checkpoint-3", family="vocoder")
    assert all(parameter.dtype == torch.float32 for parameter in vocoder.parameters())
    with torch.no_grad():
        waveform, _ = vocoder(ShardedCache(speech_caches[1])[0]["mel"][None])
    assert torch.isfinite(waveform).all()

    # the resumed run: the same step-3 numbers (bf16 weights with float32 masters, recomputed in the same order on
    # CPU: equal to the bit here; 1e-6 leaves room for another reduction order) and the same final weights
    assert_resumed_run_matches(run_dir, resumed_dir, ("train/loss", "train/mel_l1", "train/adversarial",
                                                      "train/discriminator/loss", "eval/mel_l1"),
                               3, networks=("", "discriminator"), rel=1e-6, atol=1e-7)


# ----- flags and bad input -----

def test_config_alias_and_loss_weight_flags():
    args = pretrain_vocoder.parse_args(["--run_name", "r", "--config", TINY, "--phase_loss_weight", "0",
                                        "--feature_matching_loss_weight", "3.5", "--set", "n_layers=2"])
    assert args.vocoder_type == TINY and args.discriminator_lr == args.learning_rate == 5e-4
    config = pretrain_vocoder.resolve_config(args)
    named = model_config_lookup[TINY]
    assert (config.phase_loss_weight, config.feature_matching_loss_weight, config.n_layers) == (0.0, 3.5, 2)
    assert (config.mel_loss_weight, config.stft_loss_weight, config.adversarial_loss_weight) == \
        (named.mel_loss_weight, named.stft_loss_weight, named.adversarial_loss_weight)
    mel = torch.randn(1, 80, 8)
    terms = VocoderWithLoss(build_vocoder(config))(mel, torch.randn(1, num_samples(8, FEATURES))).losses
    assert not any(name.startswith("phase") for name in terms)  # weight 0: not computed




@needs_espeak
@pytest.mark.parametrize("flags, message", [
    (["--vocoder_type", "no_such_vocoder"], "no_such_vocoder"),
    (["--set", "n_mels=64"], "n_mels=80, but config 'tiny_lightheaded_freq_domain_vocoder' expects n_mels=64"),
    (["--segment_frames", 5], "--segment_frames 5 is too short"),
    (["--use_gan", "--set", "discriminators=[]"], "lists no discriminators"),
    (["--gan_start_step", -1], "--gan_start_step must not be negative"),
])
def test_bad_input_is_a_clear_error(speech_caches, tmp_path, capsys, flags, message):
    assert pretrain(speech_caches, tmp_path, "bad", "--max_steps", 1, *flags) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert not (tmp_path / "bad").exists()


def test_missing_cache_names_the_script(tmp_path, capsys):
    assert pretrain((tmp_path / "nothing", tmp_path / "nothing_val"), tmp_path, "bad", "--max_steps", 1) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: no cache at") and "preprocess_vocoder_dataset.py" in error
