"""Speed of our DiT (model/diffusion/dit.py) against diffusers' PixArtTransformer2DModel of the same size.

    python bench/dit_speed.py                                  # CPU: tiny-ish small_dit, float32
    python bench/dit_speed.py --device cuda --dtype bfloat16 --config small_dit --depth 12 --latent-size 32 \
        --batch-size 32 --steps 20

PixArt-alpha is the closest reference: a DiT with adaLN (one shared modulation plus per-block tables instead of
DiT's per-block linear), cross-attention to text with a padding mask, the same MLP and sin-cos positions. Both
models get the same widths (hidden, heads, depth, patch, text width), random weights and the same inputs (text
with padding in half of the rows), and are timed in one process, alternating per repeat (after warmup):

1. a training step: forward, mean squared error against a random target, backward → latents/s;
2. a sampling step: one forward without gradients on a batch of --sample-batch-size (classifier-free guidance
   runs 2B rows per step) → latents/s.

Ratios are ours/diffusers (> 1: ours is faster): the ratio of the medians, and "paired", the median of the
per-repeat ratios, steadier on a shared machine. A benchmark, not a test.
"""

import argparse
import copy
import datetime
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import diffusers  # noqa: E402
import torch  # noqa: E402
from diffusers import PixArtTransformer2DModel  # noqa: E402

from bench.common import DTYPES, add_speed_arguments, interleaved_times, start_speed_run  # noqa: E402
from model.diffusion import DiT  # noqa: E402
from model.image.diffusion import ImageDiffusionConfig  # noqa: E402

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="small_dit", help="an image_diffusion config name or YAML file")
    p.add_argument("--depth", type=int, default=4, help="blocks (overrides the config's)")
    p.add_argument("--latent-size", type=int, default=16, help="latent height and width")
    p.add_argument("--batch-size", type=int, default=4, help="training batch size")
    p.add_argument("--sample-batch-size", type=int, default=8, help="rows per sampling forward")
    p.add_argument("--text-length", type=int, default=32)
    add_speed_arguments(p, steps=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def build_models(config: ImageDiffusionConfig, args) -> dict[str, torch.nn.Module]:
    """Our DiT and a PixArt transformer of the same widths, zero-initialised layers given random weights."""
    torch.manual_seed(args.seed)
    pixart = PixArtTransformer2DModel(
        num_attention_heads=config.n_heads, attention_head_dim=config.hidden_size // config.n_heads,
        in_channels=config.latent_channels, out_channels=config.latent_channels, num_layers=config.depth,
        cross_attention_dim=config.hidden_size, caption_channels=config.text_embed_dim,
        sample_size=args.latent_size, patch_size=config.patch_size, norm_type="ada_norm_single",
        use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6)
    models = {"diffusers": pixart, "ours": DiT(config)}
    dtype = DTYPES[args.dtype]
    with torch.no_grad():
        for model in models.values():
            for parameter in model.parameters():
                parameter.add_(0.02 * torch.randn_like(parameter))
    return {name: model.to(args.device, dtype) for name, model in models.items()}


def inputs(config: ImageDiffusionConfig, batch: int, args) -> dict[str, torch.Tensor]:
    """Latents (B, C, S, S), timesteps (B,), text (B, L, D_text) and its mask (B, L), every other row padded."""
    dtype, device, L = DTYPES[args.dtype], args.device, args.text_length
    text_mask = torch.ones(batch, L, dtype=torch.bool, device=device)
    text_mask[::2, L // 2:] = False
    return {"latents": torch.randn(batch, config.latent_channels, args.latent_size, args.latent_size,
                                   device=device, dtype=dtype),
            "timesteps": torch.randint(0, 1000, (batch,), device=device),
            "text_emb": torch.randn(batch, L, config.text_embed_dim, device=device, dtype=dtype),
            "text_mask": text_mask}


def forward(name: str, model: torch.nn.Module, x: dict) -> torch.Tensor:
    if name == "ours":
        return model(x["latents"], x["timesteps"], x["text_emb"], x["text_mask"])
    return model(x["latents"], encoder_hidden_states=x["text_emb"], timestep=x["timesteps"],
                 encoder_attention_mask=x["text_mask"].long(),
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def train_step_fn(name: str, model: torch.nn.Module, x: dict):
    model = copy.deepcopy(model).train()
    target = torch.randn_like(x["latents"])

    def step():
        loss = (forward(name, model, x).float() - target.float()).square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def sample_step_fn(name: str, model: torch.nn.Module, x: dict):
    model = model.eval()

    def step():
        with torch.no_grad():
            forward(name, model, x)
    return step


def summarize(work: float, times: dict) -> dict:
    result = {name: work / statistics.median(t) for name, t in times.items()}
    result["ratio"] = result["ours"] / result["diffusers"]
    result["paired"] = statistics.median(theirs / ours for theirs, ours in zip(times["diffusers"], times["ours"]))
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    device_name = start_speed_run(args)
    config = ImageDiffusionConfig.from_name(args.config).with_overrides([f"depth={args.depth}"])
    print(f"date {datetime.datetime.now():%Y-%m-%d %H:%M}  torch {torch.__version__}  "
          f"diffusers {diffusers.__version__}  threads {torch.get_num_threads()}")
    print(f"device {args.device}: {device_name}")
    models = build_models(config, args)
    counts = {name: sum(p.numel() for p in model.parameters()) / 1e6 for name, model in models.items()}
    print(f"model: {args.config} with depth {config.depth}: hidden {config.hidden_size}, heads {config.n_heads}, "
          f"patch {config.patch_size}, text {config.text_embed_dim}; {args.dtype}; parameters ours "
          f"{counts['ours']:.1f} M, PixArt {counts['diffusers']:.1f} M")
    tokens = (args.latent_size // config.patch_size) ** 2
    print(f"latents {config.latent_channels}x{args.latent_size}x{args.latent_size} ({tokens} tokens), text "
          f"{args.text_length} tokens; train batch {args.batch_size}, sample batch {args.sample_batch_size}; "
          f"{args.warmup} warmup + {args.steps} timed repeats")

    train_inputs = inputs(config, args.batch_size, args)
    train = summarize(args.batch_size, interleaved_times(
        {name: train_step_fn(name, model, train_inputs) for name, model in models.items()},
        args.warmup, args.steps, args.device))
    sample_inputs = inputs(config, args.sample_batch_size, args)
    sampling = summarize(args.sample_batch_size, interleaved_times(
        {name: sample_step_fn(name, model, sample_inputs) for name, model in models.items()},
        args.warmup, args.steps, args.device))

    print(f"\n{'median of ' + str(args.steps) + ' repeats':<32}{'PixArt':>10}{'ours':>10}{'ours/PixArt':>13}"
          f"{'paired':>9}")
    for label, r in (("train step (fwd+bwd), latents/s", train), ("sampling forward, latents/s", sampling)):
        print(f"{label:<32}{r['diffusers']:>10.2f}{r['ours']:>10.2f}{r['ratio']:>13.3f}{r['paired']:>9.3f}")
    flops = models["ours"].forward_flops(args.latent_size, args.latent_size, args.text_length)
    print(f"\nforward FLOPs per latent (matmuls, our count; both models do the same per-token work): "
          f"{flops / 1e9:.2f} G; ours achieves {3 * flops * train['ours'] / 1e9:.1f} GFLOP/s in training")


if __name__ == "__main__":
    main()
