"""The `cpsam` command: help lists subcommands, unknown commands fail clearly, the self-check runs."""

from __future__ import annotations

import subprocess
import sys

from cpsam.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"  {name}" in out


def test_no_arguments_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_every_subcommand_module_has_the_interface():
    import argparse
    import importlib

    for name, (module_path, _) in SUBCOMMANDS.items():
        module = importlib.import_module(module_path)
        parser = argparse.ArgumentParser(prog=f"cpsam {name}")
        module.add_arguments(parser)
        assert callable(module.run), name


def test_console_script_self_check_runs_small_models():
    proc = subprocess.run(
        [sys.executable, "-m", "cpsam", "demo", "--self-check", "--models", "cpsam_tiny,cpnet"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "4/4 models ok" in proc.stdout
    assert "cpsam_tiny" in proc.stdout and "nbase=[1, 32]" in proc.stdout
