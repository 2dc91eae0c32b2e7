"""Training checkpoints: `runs/RUN_NAME/checkpoint-STEP/`.

    config.yaml, model.safetensors    the model (readable by model.load_pretrained)
    optimizer.pt | deepspeed/         optimizer, scheduler (and scaler) state of the engine
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
from pathlib import Path

import numpy as np
import torch

from model.pretrained import load_weights, write_model_files
from training.distributed import barrier, is_main_process, rank, world_size

logger = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


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


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, engine, trainer_state: dict,
                    keep: int) -> Path:
    """Write checkpoint-STEP atomically (every rank must call this) and keep only the newest `keep`."""
    final = run_dir / f"checkpoint-{step}"
    staging = run_dir / f".checkpoint-{step}.tmp"
    if is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    engine.save_state(staging)
    torch.save(rng_state(), staging / f"rng_state_{rank()}.pt")
    with engine.full_parameters():
        if is_main_process():
            write_model_files(model, staging)
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


def load_checkpoint(path: Path, model: torch.nn.Module, engine, use_deepspeed: bool) -> dict:
    """Restore model, engine state and this rank's RNGs from `path`; return the trainer state."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size", 1) != world_size():
        raise ValueError(f"{path} was written by {state.get('world_size')} ranks, this run has {world_size()}: "
                         "resume with the same number of ranks")
    if not use_deepspeed:  # DeepSpeed restores the module weights from its own state
        load_weights(model, path / "model.safetensors", device=next(model.parameters()).device)
    engine.load_state(path)
    set_rng_state(torch.load(path / f"rng_state_{rank()}.pt", weights_only=False))
    return state
