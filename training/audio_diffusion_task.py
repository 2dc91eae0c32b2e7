"""The audio-diffusion task for the shared loop: an AudioDiT denoising whole utterances (log-mel frames, or
audio-VAE latents) conditioned on their cached text embeddings and speaker embeddings.

    train_cache, val_cache = open_utterance_caches(train_dir, val_dir)
    codec = FrameCodec("mel", train_cache.meta["mel_mean"], train_cache.meta["mel_std"])   # or with a VAE
    task = build_audio_diffusion_task(model, config, train_cache, val_cache, codec, vocoder, args, context)

Over latents, the task encodes every train utterance and the fixed validation ones once, when it is built (each
alone, its mel padded with silence to a multiple of patch_size * r: data/audio_diffusion_batches.py's
encode_utterances), sets the codec's latent_scale to make the train latents unit-variance, and batches those
latents: no step runs the VAE encoder. Over mels, batches hold the log-mels, normalised at each step.
Micro-batch i pads its utterances to the longest (a multiple of the patch; frame_mask marks the real frames) and
draws its noise, levels and condition dropout from a generator seeded by (seed, rank, i): a resumed run draws the
same numbers. The loss is model/audio/diffusion.py's audio_diffusion_loss (masked, min-SNR weighted).
EMA weights update after every optimizer step; each checkpoint gets ema.safetensors and diffusion_meta.json (what
generate_audio.py needs: representation, normalisation, VAE, encoders, frames per text token).
Evaluation: eval/loss, eval/mse (raw weights) and eval/ema_loss on fixed validation utterances with fixed noise.
Samples: for --sample_clips validation utterances (held-out prompts), the real mel above the one generated with EMA
weights for its text and speaker at its length, and with a vocoder both as audio.
"""

import logging
import math
import time
from pathlib import Path

import torch

from data.audio_diffusion_batches import encode_utterances, pad_latent_utterances, pad_utterances
from data.cached_batches import CachedBatches, fixed_items
from data.sharded_cache import ShardedCache
from model.audio.diffusion import AudioDiffusionConfig, FrameCodec, audio_diffusion_loss, generate_mel
from model.diffusion import EMA
from model.pretrained import DIFFUSION_META
from training.audio_samples import mel_image
from training.distributed import micro_batch_seed
from training.ema_state import EMAState
from training.engines import ForwardWithConfig
from training.task import Audio, Image, LossTerms, TrainingTask

logger = logging.getLogger(__name__)

EVAL_SEED, SAMPLE_SEED = 1234, 0


def frames_per_text_token(cache: ShardedCache) -> float:
    """Mel frames per text token over the cache (total frames / total tokens): the length rule of generation."""
    return cache.meta["seconds"] * cache.meta["features"]["sample_rate"] / cache.meta["features"]["hop_length"] / \
        (cache.meta["mean_text_tokens"] * cache.meta["num_items"])


def build_audio_diffusion_task(model, config: AudioDiffusionConfig, train_cache: ShardedCache,
                               val_cache: ShardedCache, codec: FrameCodec, vocoder, args,
                               context) -> TrainingTask:
    """The TrainingTask. args: batch_size, seed, eval_batches, eval_steps, generation_steps (default eval_steps),
    sample_clips, sample_steps (default config.sampling_steps), vae_checkpoint (for diffusion_meta.json). With a
    VAE in the codec (on context.device) it encodes the utterances and sets codec.latent_scale (module docstring)."""
    device = context.device
    pad = math.log(train_cache.meta["features"]["log_floor"])
    val_items = fixed_items(val_cache, args.eval_batches * args.batch_size)
    if codec.vae is None:
        def collate(items: list[dict]) -> dict:
            return pad_utterances(items, config.patch_size, pad)

        train_item = train_cache.__getitem__
    else:
        train_latents, val_latents = encode_latents(train_cache, val_items, codec, config.patch_size, pad,
                                                    args.batch_size)

        def collate(items: list[dict]) -> dict:
            return pad_latent_utterances(items, config.patch_size, codec.frames_per_step)

        def train_item(index: int) -> dict:
            return {**train_cache[index], "latents": train_latents[index]}

        val_items = [{**item, "latents": latents} for item, latents in zip(val_items, val_latents)]

    def as_frames(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 (B, C, T') and frame_mask (B, T') of a collated batch: its latents, or its mels normalised."""
        return (batch["latents"] if codec.vae is not None else codec.encode(batch["mel"])), batch["frame_mask"]

    train = CachedBatches(train_cache, args.batch_size, args.seed, context.rank, context.world_size, collate)
    val = [{**collate(val_items[start:start + args.batch_size]), "index": torch.tensor(start)}
           for start in range(0, len(val_items), args.batch_size)]
    sample_items = val_items[:args.sample_clips]
    state = EMAState(EMA(model, decay=config.ema_decay).to(device), describe_run(args, train_cache, codec),
                     DIFFUSION_META)

    def train_batch(i: int) -> dict:
        return {**collate([train_item(index) for index in train.indices(i)]), "index": torch.tensor(i)}

    def loss(forward, batch: dict, step: int) -> LossTerms:
        generator = torch.Generator(device=device).manual_seed(micro_batch_seed(args.seed, context.rank,
                                                                                int(batch["index"])))
        x0, frame_mask = as_frames(batch)
        value, logs = audio_diffusion_loss(ForwardWithConfig(forward, config), x0, batch["text_emb"], batch["text_mask"],
                                           batch["speaker_embedding"] if config.speaker_embedding_dim else None,
                                           frame_mask, generator=generator)
        return LossTerms(value, logs=logs)

    def measure(eval_model, batch: dict) -> dict:
        generator = torch.Generator(device=device).manual_seed(EVAL_SEED + int(batch["index"]))
        x0, frame_mask = as_frames(batch)
        value, logs = audio_diffusion_loss(eval_model, x0, batch["text_emb"], batch["text_mask"],
                                           batch["speaker_embedding"] if config.speaker_embedding_dim else None,
                                           frame_mask, generator=generator, cfg_dropout=0.0, speaker_dropout=0.0)
        return {"loss": value, "mse": logs["mse"]}

    def evaluate(eval_model) -> dict:
        return state.evaluate(eval_model, val, measure, device)

    @torch.no_grad()
    def samples(eval_model) -> dict:
        logged, rate = {}, train_cache.meta["features"]["sample_rate"]
        with state.sampling(eval_model):
            for index, item in enumerate(sample_items):
                mel = generate_mel(eval_model, codec, item["text_emb"][None].float().to(device),
                                   item["speaker_embedding"][None].float().to(device), item["mel"].shape[-1],
                                   args.sample_steps, SAMPLE_SEED + index)[0].cpu()
                prefix = f"samples/clip{index}"
                logged[f"{prefix}/text"] = item["text"]
                logged[f"{prefix}/mel"] = Image(mel_image([item["mel"].float(), mel], pad))
                if vocoder is not None:
                    logged[f"{prefix}/generated"] = Audio(vocoder(mel[None].to(device))[0][0].float().cpu(), rate)
                    logged[f"{prefix}/real"] = Audio(vocoder(item["mel"].float()[None].to(device))[0][0].float().cpu(),
                                                     rate)
        return logged

    logger.info("audio diffusion: %d train utterances (%d batches per epoch per rank), %d validation, %s frames "
                "of %d channels", len(train_cache), train.batches_per_epoch, len(val_items), codec.representation,
                config.latent_channels)
    seconds_per_frame = train_cache.meta["features"]["hop_length"] / train_cache.meta["features"]["sample_rate"]
    return TrainingTask(model=model, config=config, train_batch=train_batch, loss=loss,
                        batch_size=lambda batch: float(batch["mel_frames"].sum()) * seconds_per_frame,
                        throughput_unit="audio_seconds", evaluate=evaluate, samples=samples,
                        generation_steps=args.generation_steps or args.eval_steps, after_step=state.after_step,
                        extra_state=state)


def describe_run(args, train_cache: ShardedCache, codec: FrameCodec) -> dict:
    """diffusion_meta.json: what generate_audio.py needs besides the DiT."""
    return {"made_by": "pretrain_audio_diffusion.py", "representation": codec.representation,
            "mel_mean": codec.mel_mean, "mel_std": codec.mel_std, "latent_scale": codec.latent_scale,
            "vae_checkpoint": str(Path(args.vae_checkpoint).resolve()) if args.vae_checkpoint else None,
            "features": train_cache.meta["features"], "text_encoder": train_cache.meta["text_encoder"],
            "speaker_encoder": train_cache.meta["speaker_encoder"],
            "frames_per_text_token": frames_per_text_token(train_cache),
            "train_data_dir": str(Path(train_cache.directory).resolve())}


def encode_latents(train_cache: ShardedCache, val_items: list[dict], codec: FrameCodec, patch_size: int,
                   pad_value: float, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The latents (channels, W_k) of every train utterance and of val_items, each encoded alone with its mel padded
    to a multiple of patch_size * r frames, scaled to unit variance over the train latents' real frames: sets
    codec.latent_scale accordingly (multiplying the scale it had). Logs how long the encoding took."""
    started = time.perf_counter()
    multiple = patch_size * codec.frames_per_step
    train, mel_frames = encode_utterances(codec, train_cache, multiple, pad_value, batch_size)
    val, _ = encode_utterances(codec, val_items, multiple, pad_value, batch_size)
    scale = latent_scale_factor(train, codec.sequence_frames(torch.tensor(mel_frames)).tolist())
    codec.latent_scale *= scale
    for latents in train + val:
        latents.mul_(scale)
    logger.info("encoded %d train and %d validation utterances with the audio VAE in %.1f s (latent scale %.4f)",
                len(train), len(val), time.perf_counter() - started, codec.latent_scale)
    return train, val


def latent_scale_factor(latents: list[torch.Tensor], real_frames: list[int]) -> float:
    """1 / the standard deviation of latent frames (channels, W_k) over their first real_frames[k] frames (those
    that hold audio), as Stable Diffusion scales its latents to unit variance."""
    values = torch.cat([frames[:, :count].flatten() for frames, count in zip(latents, real_frames)])
    return 1.0 / float(values.std().clamp(min=1e-6))
