"""checkpoint_from_args: what --run_dir / --checkpoint name in every script that uses a trained model."""

import argparse

import pytest

from training.checkpoints import checkpoint_from_args


def args(run_dir=None, checkpoint=None):
    return argparse.Namespace(run_dir=run_dir and str(run_dir), checkpoint=checkpoint and str(checkpoint))


def test_run_dir_gives_its_newest_checkpoint_or_the_named_one(tmp_path):
    for step in (5, 40, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-200.tmp").mkdir()  # unfinished: never chosen
    assert checkpoint_from_args(args(tmp_path), "pretrain_x.py") == tmp_path / "checkpoint-100"
    assert checkpoint_from_args(args(tmp_path, "checkpoint-40"), "pretrain_x.py") == tmp_path / "checkpoint-40"
    elsewhere = tmp_path / "checkpoint-5"
    assert checkpoint_from_args(args(tmp_path, elsewhere), "pretrain_x.py") == elsewhere
    assert checkpoint_from_args(args(None, elsewhere), "pretrain_x.py") == elsewhere


def test_missing_runs_and_checkpoints_name_the_training_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: train one with pretrain_x.py"):
        checkpoint_from_args(args(tmp_path / "missing"), "pretrain_x.py")
    with pytest.raises(FileNotFoundError, match="no checkpoint-\\* directory .* pretrain_x.py"):
        checkpoint_from_args(args(tmp_path), "pretrain_x.py")
    with pytest.raises(ValueError, match="give --run_dir"):
        checkpoint_from_args(args(), "pretrain_x.py")
