"""What several test files share: running a script's main and reading its output or error, reading a run's
TensorBoard events and checkpoints, comparing weights, a tiny task and flags for driving the training loop
directly, counting module calls, and a DiT with non-zero outputs.
(The DeepSpeed launcher is tests/two_ranks.py.)"""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

# The files a DeepSpeed checkpoint of a two-rank run holds (GAN runs add discriminator/deepspeed and
# discriminator/model.safetensors)
DEEPSPEED_CHECKPOINT_FILES = ("deepspeed", "rng_state_0.pt", "rng_state_1.pt", "model.safetensors", "config.yaml")
GAN_CHECKPOINT_FILES = ("discriminator/deepspeed", "discriminator/model.safetensors")


# ----- scripts -----

def run_main(main, argv) -> tuple[int, str]:
    """A script's main(argv) (arguments made strings) → (exit code, what it printed)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = main([str(arg) for arg in argv])
    return code, output.getvalue()


def error_of(main, argv, capsys) -> str:
    """The message a script prints on stderr when it stops with exit code 1."""
    capsys.readouterr()
    assert run_main(main, argv)[0] == 1
    return capsys.readouterr().err


# ----- TensorBoard events -----

def events(path: Path) -> EventAccumulator:
    """Everything logged in `path`: one event file, or a run directory (all its event files)."""
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0, "images": 0, "audio": 0})
    accumulator.Reload()
    return accumulator


def event_files(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("events.out.tfevents.*"))


def only_events(run_dir: Path) -> EventAccumulator:
    """The events of a run directory that holds exactly one event file (one uninterrupted run)."""
    files = event_files(run_dir)
    assert len(files) == 1, files
    return events(files[0])


def scalars(accumulator: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


# ----- checkpoints and weights -----

def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(path.name for path in Path(run_dir).iterdir() if "checkpoint-" in path.name)


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


def checkpoint_weights(run_dir: Path, step: int, network: str = "") -> dict[str, torch.Tensor]:
    """The weights of checkpoint-STEP (network: "" for the model, "discriminator" for a GAN's adversary)."""
    return load_file(Path(run_dir) / f"checkpoint-{step}" / network / "model.safetensors")


def differs(a: dict, b: dict) -> bool:
    """Whether two state dicts with the same names differ anywhere."""
    assert a.keys() == b.keys()
    return any(not torch.equal(a[name], b[name]) for name in a)


def assert_same_weights(a: dict, b: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Two state dicts hold the same names and (within rtol/atol; exactly by default) the same tensors."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=rtol, atol=atol, msg=name)


def check_two_rank_gan_checkpoint(run_dir: Path, step: int, accumulation: int) -> dict:
    """What a two-rank bf16 DeepSpeed GAN run saving every step must hold at checkpoint-STEP (the discriminator
    starting at step index 1): both networks' DeepSpeed state and weights, the step, micro-batch and rank counts, bf16
    weights, a model and a discriminator that trained. Returns the trainer state."""
    checkpoint = Path(run_dir) / f"checkpoint-{step}"
    for name in DEEPSPEED_CHECKPOINT_FILES + GAN_CHECKPOINT_FILES:
        assert (checkpoint / name).exists(), name
    state = trainer_state(checkpoint)
    assert (state["step"], state["micro_batches"], state["world_size"]) == (step, step * accumulation, 2)
    weights = checkpoint_weights(run_dir, step)
    assert all(tensor.dtype == torch.bfloat16 for tensor in weights.values())  # DeepSpeed's bf16 weights
    assert differs(checkpoint_weights(run_dir, 1), weights)
    disc = [checkpoint_weights(run_dir, s, "discriminator") for s in range(1, step + 1)]
    assert all(differs(before, after) for before, after in zip(disc, disc[1:]))  # trains from step index 1 on
    return state


def assert_resumed_run_matches(straight_dir: Path, resumed_dir: Path, tags, final_step: int, networks=("",),
                               rel: float = 0.0, atol: float = 0.0) -> None:
    """A run resumed from one of straight_dir's checkpoints logged the straight run's values of `tags` at every step
    it logged them (within `rel`), and its checkpoint-FINAL_STEP holds the same weights of each network (model: "",
    GAN adversary: "discriminator"; within rel and atol). Exact by default."""
    straight, resumed = only_events(straight_dir), only_events(resumed_dir)
    for tag in tags:
        logged, expected = scalars(resumed, tag), scalars(straight, tag)
        assert logged and set(logged) <= set(expected), (tag, sorted(logged))
        steps = sorted(logged)
        assert [logged[s] for s in steps] == pytest.approx([expected[s] for s in steps], rel=rel, abs=0.0), tag
    for network in networks:
        assert_same_weights(checkpoint_weights(straight_dir, final_step, network),
                            checkpoint_weights(resumed_dir, final_step, network), rtol=rel, atol=atol)


# ----- the training loop, driven directly -----

def loop_args(tmp_path: Path, run_name: str, *extra):
    """The shared flags, parsed and checked: a CPU run of 4 steps into tmp_path/run_name, logging every step."""
    from training.arguments import build_parser, check_arguments

    args = build_parser("x").parse_args(["--run_name", run_name, "--runs_dir", str(tmp_path), "--device", "cpu",
                                         "--max_steps", "4", "--logging_steps", "1", "--save_steps", "100",
                                         "--no_progress_bar", *map(str, extra)])
    check_arguments(args)
    return args


def tiny_lm_task(nan_micro_batches=()):
    """A TrainingTask: a 2-layer LM (the same initial weights each time) on random ids (2, 16), whose loss is NaN
    (still attached to the graph) at the micro-batch indices in `nan_micro_batches`."""
    from megatransformer_utils import MegaTransformerConfig
    from model import build_model
    from training.task import TrainingTask

    config = MegaTransformerConfig.from_name("tiny").with_overrides(
        ["vocab_size=64", "hidden_size=32", "n_layers=2", "n_heads=2", "n_query_groups=1", "intermediate_size=64",
         "max_position_embeddings=32"])
    torch.manual_seed(0)
    model = build_model(config)

    def train_batch(i: int) -> dict:
        generator = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 64, (2, 16), generator=generator),
                "poison": torch.tensor(i in nan_micro_batches)}

    def loss(model, batch, step):
        value = model(batch["input_ids"], labels=batch["input_ids"]).loss
        return value * float("nan") if batch["poison"] else value

    return TrainingTask(model=model, config=config, train_batch=train_batch, loss=loss,
                        batch_size=lambda batch: batch["input_ids"].numel())


# ----- models -----

@contextlib.contextmanager
def count_calls(modules):
    """{index in `modules`: calls of that module} while inside the block (`with count_calls(model.blocks) as calls:`).
    Counted by forward pre-hooks: a checkpointed module's recomputation stops as soon as it has what the backward
    pass needs, before its forward (post-)hooks would run."""
    calls = {index: 0 for index in range(len(modules))}

    def hook(index):
        def count(module, inputs):
            calls[index] += 1
        return count

    handles = [module.register_forward_pre_hook(hook(index)) for index, module in enumerate(modules)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def perturbed_dit(config=None, seed: int = 0) -> nn.Module:
    """A DiT of `config` (default: the image registry's tiny_dit) whose zero-initialised layers are given small
    random weights, so that its output is not zero and every path affects it; in eval mode."""
    from model.diffusion import DiT
    from model.image.diffusion import model_config_lookup

    torch.manual_seed(seed)
    model = DiT(config or model_config_lookup["tiny_dit"])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()
