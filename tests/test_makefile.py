"""The Makefile rebuilds .venv only when the requirements' content changes, never for a newer mtime alone."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(directory: Path, target: str) -> str:
    result = subprocess.run(["make", "-n", target], cwd=directory, capture_output=True, text=True, check=True)
    return result.stdout


def _project_copy(tmp_path: Path) -> tuple[Path, Path]:
    for name in ("Makefile", "requirements.txt", "requirements-deepspeed.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    stamp_name = [line for line in _dry_run(tmp_path, "setup").splitlines() if line.startswith("touch .venv/")]
    assert stamp_name, "a fresh directory builds .venv and writes the stamp"
    (tmp_path / ".venv").mkdir()
    stamp = tmp_path / stamp_name[0].split()[-1]
    stamp.touch()
    return tmp_path, stamp


def test_touching_requirements_does_not_rebuild_venv(tmp_path):
    directory, stamp = _project_copy(tmp_path)
    old = stamp.stat().st_mtime - 3600
    os.utime(stamp, (old, old))  # the stamp is older than the requirement files (a fresh checkout, a worktree)
    for target in ("setup", "test", "demo"):
        assert "rm -rf .venv" not in _dry_run(directory, target), target


def test_changed_requirements_rebuild_venv(tmp_path):
    directory, _ = _project_copy(tmp_path)
    with open(directory / "requirements.txt", "a") as f:
        f.write("\n# changed\n")
    assert "rm -rf .venv" in _dry_run(directory, "setup")
