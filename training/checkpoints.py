"""Training checkpoints: `runs/RUN_NAME/checkpoint-STEP/`.

    config.yaml, model.safetensors    the model (readable by model.load_pretrained)
    optimizer.pt | deepspeed/         optimizer, scheduler (and scaler) state of the engine
    discriminator/                    a GAN's adversary: model.safetensors and its own engine state
    trainer_state.json                step, micro-batches consumed, skipped steps, tokens seen
    rng_state_RANK.pt                 every RNG of each rank, so a resumed run draws the same numbers

All ranks write into `.checkpoint-STEP.tmp/`, which rank 0 renames into place once everyone is done:
a run killed at any moment leaves the previous checkpoint intact, never a half-written one.
"""

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from safetensors.torch import save_file

from model.pretrained import load_weights, unique_tensors, write_model_files
from training.distributed import barrier, is_main_process, rank, world_size

logger = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Engines:
    """What a checkpoint holds: the model and its engine, a GAN adversary's name and engine (or None), and the
    task's extra state (an object with save(directory) / load(directory), or None)."""

    model: torch.nn.Module
    engine: object
    adversary_name: Optional[str] = None
    adversary_engine: object = None
    extra_state: object = None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = [(int(m.group(1)), path) for path in Path(run_dir).glob("checkpoint-*")
             if (m := CHECKPOINT_PATTERN.match(path.name)) and path.is_dir()]
    return [path for _, path in sorted(found)]


def resolve_checkpoint(spec: str, run_dir: Path) -> Path:
    """'latest' → the newest checkpoint of run_dir; otherwise the given directory, which must exist."""
    if spec == "latest":
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise FileNotFoundError(f"no checkpoint-* directory in {run_dir} to take the latest from")
        return checkpoints[-1]
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{spec} is not a checkpoint directory (it has no trainer_state.json)")
    return path


def add_checkpoint_arguments(parser, trained_by: str) -> None:
    """--run_dir | --checkpoint (one of them required) and --device, for a script that uses a model trained by
    `trained_by` (e.g. pretrain_vocoder.py); checkpoint_from_args reads them."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run_dir", help=f"a {trained_by} run directory: its latest checkpoint is used")
    where.add_argument("--checkpoint", help="a checkpoint directory (config.yaml + model.safetensors)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def checkpoint_from_args(args, trained_by: str) -> Path:
    """The checkpoint a script's --run_dir / --checkpoint name: --checkpoint DIR alone; the newest checkpoint of
    --run_dir; or, given both, --checkpoint as a directory or as a checkpoint's name inside --run_dir.
    FileNotFoundError / ValueError (naming `trained_by`, the script that writes such runs) when there is none."""
    if args.run_dir:
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--run_dir {run_dir} does not exist: train one with {trained_by}")
        if args.checkpoint:
            return Path(args.checkpoint) if Path(args.checkpoint).is_dir() else run_dir / args.checkpoint
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise FileNotFoundError(f"no checkpoint-* directory in {run_dir}: train one with {trained_by} "
                                    "(its --runs_dir/--run_name), or pass --checkpoint DIR")
        return checkpoints[-1]
    if not args.checkpoint:
        raise ValueError("give --run_dir (its newest checkpoint) or --checkpoint")
    return Path(args.checkpoint)


def save_checkpoint(run_dir: Path, step: int, engines: Engines, trainer_state: dict, keep: int) -> Path:
    """Write checkpoint-STEP atomically (every rank must call this) and keep only the newest `keep`."""
    final = run_dir / f"checkpoint-{step}"
    staging = run_dir / f".checkpoint-{step}.tmp"
    adversary_dir = staging / str(engines.adversary_name)
    if is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if engines.adversary_engine:
            adversary_dir.mkdir()
    barrier()
    engines.engine.save_state(staging)
    torch.save(rng_state(), staging / f"rng_state_{rank()}.pt")
    with engines.engine.full_parameters():
        if is_main_process():
            write_model_files(engines.model, staging)
    if engines.adversary_engine:
        engines.adversary_engine.save_state(adversary_dir)
        with engines.adversary_engine.full_parameters():
            if is_main_process():
                save_file(unique_tensors(engines.adversary_engine.module), str(adversary_dir / "model.safetensors"))
    if is_main_process() and engines.extra_state is not None:
        engines.extra_state.save(staging)
    if is_main_process():
        (staging / "trainer_state.json").write_text(json.dumps({**trainer_state, "world_size": world_size()}, indent=2))
    barrier()
    if is_main_process():
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
        logger.info("saved %s", final)
    barrier()
    return final


def load_checkpoint(path: Path, engines: Engines, use_deepspeed: bool) -> dict:
    """Restore the model, the engines' state (and the adversary's) and this rank's RNGs; return the trainer state."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size", 1) != world_size():
        raise ValueError(f"{path} was written by {state.get('world_size')} ranks, this run has {world_size()}: "
                         "resume with the same number of ranks")
    adversary_dir = path / str(engines.adversary_name)
    if engines.adversary_engine and not adversary_dir.is_dir():
        raise ValueError(f"{path} has no {engines.adversary_name}/ folder: it was written by a run without one")
    if not use_deepspeed:  # DeepSpeed restores the module weights from its own state
        load_weights(engines.model, path / "model.safetensors", device=next(engines.model.parameters()).device)
        if engines.adversary_engine:
            module = engines.adversary_engine.module
            load_weights(module, adversary_dir / "model.safetensors", device=next(module.parameters()).device)
    engines.engine.load_state(path)
    if engines.adversary_engine:
        engines.adversary_engine.load_state(adversary_dir)
    if engines.extra_state is not None:
        engines.extra_state.load(path)
    set_rng_state(torch.load(path / f"rng_state_{rank()}.pt", weights_only=False))
    return state
