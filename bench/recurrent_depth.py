"""Test-time compute of the recurrent-depth LM: tokens/s and validation loss against the number of thinking
steps for a briefly trained tiny model, and the share of steps each exit criterion saves at equal loss.

    python bench/recurrent_depth.py        # trains recurrent_tiny on builtin:text into runs/bench_recurrent_depth/
                                           # (~5 min on 2 quiet cores; reused by later runs)
    python bench/recurrent_depth.py --run_dir runs/rec --data_dir cached_datasets/text   # an existing run

"Steps saved at equal loss": for a criterion that used m steps on average and reached loss L, r* is the
smallest fixed depth whose loss is within --tolerance of L (linear interpolation on the fixed-depth curve);
saved = 1 - m / r* (negative: the criterion spends more steps than a fixed depth needs), and against the
maximum depth the criterion may run, 1 - m / recurrent_max_thinking_steps. Fixed-depth and adaptive figures
come from the same validation batches.
"""

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.text_cache import TextTokenCache, evaluation_batches  # noqa: E402
from model import load_pretrained  # noqa: E402
from training.checkpoints import list_checkpoints  # noqa: E402

DEPTHS = (1, 2, 4, 8, 16, 32)
# per-criterion tolerance (see model/recurrent_criteria.py for each one's scale)
CRITERIA = {"kl_divergence": 5e-4, "entropy_diff": 1e-3, "latent_diff": 0.03, "argmax_stability": 3.0,
            "cosine": 1e-3}


def run_script(script: str, *flags: str) -> None:
    """Run a top-level script of the repository as its command line does (bench/ imports no script); stops on
    failure."""
    subprocess.run([sys.executable, str(REPO / script), *flags], check=True)


def train_tiny(work: Path, steps: int) -> tuple[Path, Path]:
    """A recurrent_tiny run (mean depth 8) on builtin:text in `work`, trained unless already there."""
    cache, run_dir = work / "cache", work / "rec"
    if list_checkpoints(run_dir):
        return run_dir, cache
    run_script("preprocess_text_dataset.py", "--dataset_name", "builtin:text", "--max_chars", "1000000",
               "--train_tokenizer", "--vocab_size", "2048", "--output_dir", str(cache))
    run_script("pretrain_wm.py",
               "--config", "recurrent_tiny", "--set", "recurrent_mean_thinking_steps=8", "--set",
               "recurrent_backprop_depth=4", "--data_dir", str(cache), "--runs_dir", str(work), "--run_name", "rec",
               "--seq_len", "128", "--batch_size", "8", "--max_steps", str(steps), "--learning_rate", "3e-3",
               "--warmup_steps", "20", "--eval_steps", str(steps), "--eval_batches", "2", "--eval_thinking_steps", "1",
               "--no_progress_bar")
    return run_dir, cache


@torch.no_grad()
def measure(model, batches: list, num_steps=None, criterion: str = "none") -> tuple[float, float, float]:
    """(mean loss, mean thinking steps per token, tokens/s) over `batches`."""
    losses, steps, tokens, seconds = [], [], 0, 0.0
    for ids in batches:
        start = time.perf_counter()
        out = model(ids, labels=ids, num_steps=num_steps, exit_criteria=criterion)
        seconds += time.perf_counter() - start
        losses.append(out.loss.item())
        steps.append(out.thinking_steps.float().mean().item())
        tokens += ids.numel()
    return sum(losses) / len(losses), sum(steps) / len(steps), tokens / seconds


def depth_for_loss(curve: list[tuple[int, float]], loss: float) -> float:
    """The smallest (interpolated) fixed depth of `curve` [(depth, loss)] whose loss is at most `loss`;
    NaN if no depth gets there."""
    if curve[0][1] <= loss:
        return float(curve[0][0])
    for (r0, l0), (r1, l1) in zip(curve, curve[1:]):
        if l1 <= loss < l0:
            return r0 + (l0 - loss) / (l0 - l1) * (r1 - r0)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", help="a pretrain_wm.py run of a recurrent model (default: train one)")
    parser.add_argument("--data_dir", help="its text cache (default: the one made for the trained run)")
    parser.add_argument("--work_dir", default="runs/bench_recurrent_depth", help="where the default run is trained")
    parser.add_argument("--tolerance", type=float, default=0.002, help="losses this close count as equal")
    parser.add_argument("--train_steps", type=int, default=600)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.run_dir:
        run_dir, cache_dir = Path(args.run_dir), Path(args.data_dir)
    else:
        run_dir, cache_dir = train_tiny(Path(args.work_dir), args.train_steps)
    model = load_pretrained(list_checkpoints(run_dir)[-1])
    cache = TextTokenCache(cache_dir)
    batches = evaluation_batches(cache.tokens("val"), args.seq_len, 8, args.batches)

    print(f"{run_dir.name}: {model.num_parameters():,} parameters, {len(batches)} validation batches of "
          f"{tuple(batches[0].shape)}, threads {torch.get_num_threads()}\n")
    print(f"{'depth':>8} {'val loss':>9} {'tokens/s':>10}")
    curve = []
    for r in DEPTHS:
        loss, _, speed = measure(model, batches, num_steps=r)
        curve.append((r, loss))
        print(f"{r:>8} {loss:>9.4f} {speed:>10,.0f}")
    max_steps = model.config.recurrent_max_thinking_steps
    print(f"\n{'criterion':>17} {'threshold':>9} {'val loss':>9} {'mean steps':>10} {'equal-loss depth':>16} "
          f"{'saved':>6} {'vs max ' + str(max_steps):>9} {'tokens/s':>9}")
    for name, threshold in CRITERIA.items():
        model.config = dataclasses.replace(model.config, recurrent_exit_criteria_threshold=threshold)
        loss, steps, speed = measure(model, batches, criterion=name)
        equal = depth_for_loss(curve, loss + args.tolerance)
        print(f"{name:>17} {threshold:>9g} {loss:>9.4f} {steps:>10.2f} {equal:>16.2f} {1 - steps / equal:>6.1%} "
              f"{1 - steps / max_steps:>9.1%} {speed:>9,.0f}")


if __name__ == "__main__":
    main()
