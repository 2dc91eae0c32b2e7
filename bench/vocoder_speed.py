"""Parameters and real-time factor of each vocoder config against the `vocos` package's model of the same size.

    python bench/vocoder_speed.py                                  # every config, CPU, float32, 5 s of audio
    python bench/vocoder_speed.py --configs small_freq_domain_vocoder --device cuda --seconds 30
    python bench/vocoder_speed.py --threads 1                     # steadier on a shared machine

For each config in configs/vocoder/, builds our vocoder and, in the same process, Vocos at the same size
(random init): `VocosBackbone(n_mels, dim, intermediate_dim, n_layers)` + `ISTFTHead(dim, n_fft, hop,
padding="center")` (the head that inverts with torch.istft, as ours does), with
`MelSpectrogramFeatures(padding="center")` for the features. The light-headed and split-band configs
have no Vocos counterpart: they are compared with Vocos' standard full-width head at the same backbone
size, which is the point of their smaller heads.

Timed, alternating the two models in each repeat after warmup, median over repeats:
1. features: waveform → log-mel (ours: features.log_mel; Vocos: MelSpectrogramFeatures);
2. synthesis: log-mel → waveform in eval mode under no_grad (the vocoder alone);
3. a training step of the generator: synthesis with autograd, a mean-square loss on the waveform, backward.
RTF = seconds of compute / seconds of audio (< 1: faster than real time). "ours/Vocos" is the ratio of
median times (< 1: ours is faster); "paired" is the median of the per-repeat ratios, steadier on a shared
machine. A benchmark, not a test: nothing here is asserted by the test suite.
"""

import argparse
import datetime
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from vocos.feature_extractors import MelSpectrogramFeatures  # noqa: E402
from vocos.heads import ISTFTHead  # noqa: E402
from vocos.models import VocosBackbone  # noqa: E402

from bench.common import cpu_model, interleaved_times  # noqa: E402
from model.audio.features import log_mel  # noqa: E402
from model.audio.vocoders import build_vocoder, model_config_lookup  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", nargs="*", default=sorted(model_config_lookup), help="vocoder config names")
    p.add_argument("--seconds", type=float, default=5.0, help="audio length per call (batch 1)")
    p.add_argument("--train-seconds", type=float, default=1.0, help="audio length of the training step (batch 1)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class VocosGenerator(torch.nn.Module):
    """Vocos' backbone and ISTFT head: mel (B, n_mels, T) → waveform (B, (T - 1) * hop)."""

    def __init__(self, config):
        super().__init__()
        self.backbone = VocosBackbone(config.n_mels, config.dim, config.intermediate_dim, config.n_layers)
        self.head = ISTFTHead(config.dim, config.n_fft, config.hop_length, padding="center")

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(mel))


def summarize(times: dict, audio_seconds: float) -> dict:
    return {"ours": statistics.median(times["ours"]) / audio_seconds,
            "Vocos": statistics.median(times["Vocos"]) / audio_seconds,
            "ratio": statistics.median(times["ours"]) / statistics.median(times["Vocos"]),
            "paired": statistics.median(o / v for o, v in zip(times["ours"], times["Vocos"]))}


def train_step(model, mel: torch.Tensor):
    def step():
        model.zero_grad(set_to_none=True)
        output = model(mel)
        waveform = output[0] if isinstance(output, tuple) else output
        waveform.square().mean().backward()
    return step


def bench_config(name: str, args) -> dict:
    config = model_config_lookup[name]
    torch.manual_seed(args.seed)
    ours, vocos = build_vocoder(config).to(args.device), VocosGenerator(config).to(args.device)
    vocos_features = MelSpectrogramFeatures(config.sample_rate, config.n_fft, config.hop_length, config.n_mels,
                                            padding="center").to(args.device)
    features = config.features
    waveform = 0.1 * torch.randn(1, int(args.seconds * config.sample_rate), device=args.device)
    train_waveform = waveform[:, :int(args.train_seconds * config.sample_rate)]
    mel, train_mel = log_mel(waveform, features), log_mel(train_waveform, features)
    with torch.no_grad():
        assert ours(mel)[0].shape == vocos(mel).shape, "both models should give (T - 1) * hop samples"

    def synthesize(model):
        def run():
            with torch.no_grad():
                model(mel)
        return run

    result = {"params_ours": sum(p.numel() for p in ours.parameters()),
              "params_vocos": sum(p.numel() for p in vocos.parameters())}
    result["features"] = summarize(interleaved_times(
        {"ours": lambda: log_mel(waveform, features), "Vocos": lambda: vocos_features(waveform)},
        args.warmup, args.repeats, args.device), args.seconds)
    ours.eval(), vocos.eval()
    result["synthesis"] = summarize(interleaved_times(
        {"ours": synthesize(ours), "Vocos": synthesize(vocos)}, args.warmup, args.repeats, args.device), args.seconds)
    ours.train(), vocos.train()
    result["train step"] = summarize(interleaved_times(
        {"ours": train_step(ours, train_mel), "Vocos": train_step(vocos, train_mel)},
        args.warmup, args.repeats, args.device), args.train_seconds)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    print(f"date {datetime.datetime.now():%Y-%m-%d %H:%M}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  device {args.device}: {device_name}")
    print(f"synthesis/features: batch 1 x {args.seconds} s; train step: batch 1 x {args.train_seconds} s; "
          f"{args.warmup} warmup + {args.repeats} timed repeats (median); RTF = compute s / audio s")
    for name in args.configs:
        r = bench_config(name, args)
        print(f"\n{name}: parameters ours {r['params_ours'] / 1e6:.2f} M, Vocos {r['params_vocos'] / 1e6:.2f} M "
              f"(ratio {r['params_ours'] / r['params_vocos']:.3f})")
        print(f"  {'RTF':<12}{'ours':>10}{'Vocos':>10}{'ours/Vocos':>12}{'paired':>9}")
        for stage in ("features", "synthesis", "train step"):
            s = r[stage]
            print(f"  {stage:<12}{s['ours']:>10.4f}{s['Vocos']:>10.4f}{s['ratio']:>12.3f}{s['paired']:>9.3f}")


if __name__ == "__main__":
    main()
