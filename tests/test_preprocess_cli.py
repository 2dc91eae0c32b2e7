"""data/cli.py: the one main() contract of every preprocess_*.py (exit codes, one-line errors, the summary)."""

import argparse

import pytest

import preprocess_audio_diffusion_dataset
import preprocess_image_diffusion_dataset
import preprocess_image_vae_dataset
import preprocess_multimodal_dataset
import preprocess_text_dataset
import preprocess_vocoder_dataset
from data.cli import run_preprocessing


def parser() -> argparse.ArgumentParser:
    built = argparse.ArgumentParser(prog="preprocess_x.py")
    built.add_argument("--count", type=int, default=1)
    return built


def run(argv, write, summaries: list) -> int:
    return run_preprocessing(argv, parser(), write, lambda result, args, seconds: summaries.append((result, seconds)))


def test_success_prints_the_summary_of_what_write_returned():
    summaries = []
    assert run(["--count", "3"], lambda args: {"items": args.count}, summaries) == 0
    (result, seconds), = summaries
    assert result == {"items": 3} and seconds >= 0


def test_usage_errors_and_help_return_argparse_codes(capsys):
    summaries = []
    assert run(["--count", "many"], lambda args: None, summaries) == 2
    assert "invalid int value" in capsys.readouterr().err
    assert run(["--help"], lambda args: None, summaries) == 0
    assert "--count" in capsys.readouterr().out and not summaries


@pytest.mark.parametrize("error", [ValueError("bad\n   value"), FileNotFoundError("no such   folder")])
def test_a_user_mistake_is_one_error_line_and_exit_code_1(error, capsys):
    def write(args):
        raise error

    summaries = []
    assert run([], write, summaries) == 1
    err = capsys.readouterr().err
    assert err == f"error: {' '.join(str(error).split())}\n" and "Traceback" not in err and not summaries


def test_ctrl_c_says_nothing_was_written_and_returns_130(capsys):
    def write(args):
        raise KeyboardInterrupt

    assert run([], write, []) == 130
    assert capsys.readouterr().err == "interrupted: no cache was written\n"


def test_a_bug_is_not_hidden():
    def write(args):
        raise TypeError("a programming error")

    with pytest.raises(TypeError):
        run([], write, [])


@pytest.mark.parametrize("script", [preprocess_text_dataset, preprocess_vocoder_dataset, preprocess_image_vae_dataset,
                                    preprocess_image_diffusion_dataset, preprocess_multimodal_dataset,
                                    preprocess_audio_diffusion_dataset])
def test_every_preprocess_script_runs_through_the_shared_entry(script, monkeypatch):
    calls = []
    monkeypatch.setattr(script, "run_preprocessing", lambda *arguments: calls.append(arguments) or 7)
    assert script.main(["--flag"]) == 7
    (argv, built, write, summary), = calls
    assert argv == ["--flag"] and isinstance(built, argparse.ArgumentParser)
    assert write is script.write and summary is script.print_summary
