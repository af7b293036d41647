"""The `cpsam` command: one table of commands (cpsam.command), help at every level, unknown commands fail
clearly, the error policy (exit codes, one line, --debug), the self-check runs."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from cpsam import command
from cpsam.cli import COMMANDS, main
from cpsam.command import Command, DataError, UsageError


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert f"  {cmd.words}" in out and cmd.help[:40] in out


def test_no_arguments_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["prep", "frobnicate"]) == 2
    assert "cpsam prep: unknown command 'frobnicate'" in capsys.readouterr().err


def test_table_is_a_tree_of_unique_commands():
    paths = [c.path for c in COMMANDS]
    assert len(set(paths)) == len(paths)
    for cmd in COMMANDS:
        assert cmd.path[:-1] in {(), *paths}, f"{cmd.words}: its parent is not in the table"
        assert cmd.target is not None or command.children(COMMANDS, cmd.path), f"{cmd.words}: empty group"
    top = {c.words for c in command.children(COMMANDS, ())}
    assert top == {"segment", "train", "finetune", "distill", "eval", "prep", "binary", "demo"}


def test_every_command_module_has_the_interface():
    for cmd in COMMANDS:
        if cmd.target is None:
            continue
        add_arguments, run = cmd.entry_points()
        parser = argparse.ArgumentParser(prog=f"cpsam {cmd.words}")
        add_arguments(parser)
        assert callable(run), cmd.words


@pytest.mark.parametrize(("argv", "listed"), [
    (["prep", "--help"], ["list", "download", "convert", "flows", "synth", "timelapse", "subimages", "info",
                          "export"]),
    (["binary", "--help"], ["train", "predict", "distill", "compare", "explore"]),
    (["distill", "--help"], ["cache", "eval", "export", "--teacher"]),
    (["eval", "--help"], ["paper", "invariance", "--pred"]),
    (["train", "--help"], ["preview", "lr-find", "config keys"]),
])
def test_command_help_lists_its_sub_commands(capsys, argv, listed):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for word in listed:
        assert word in out, word


def test_nested_command_help(capsys):
    for argv, option in ((["distill", "cache", "--help"], "--views"), (["eval", "paper", "--help"], "--model"),
                         (["binary", "train", "--help"], "--loading-code"), (["train", "preview", "--help"], "--n"),
                         (["prep", "convert", "--help"], "--raw")):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert f"usage: cpsam {' '.join(argv[:2])}" in out and option in out, argv


def test_a_group_without_a_command_is_a_usage_error(capsys):
    assert main(["prep"]) == 2
    err = capsys.readouterr().err
    assert "cpsam prep: give a command" in err and "convert" in err


def test_usage_error_of_argparse_is_exit_2(capsys):
    assert main(["prep", "convert", "folder", "--raw", "x", "--out", "y", "--limit", "0"]) == 2
    assert "argument --limit: 0 must be at least 1" in capsys.readouterr().err


def _fake(tmp_path, monkeypatch, body: str) -> tuple[Command, ...]:
    (tmp_path / "fake_cmd.py").write_text(
        "def add_arguments(parser):\n    parser.add_argument('--x', default='a')\n\n"
        f"def run(args):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fake_cmd", None)
    return (Command("fake", "fake_cmd", "a test command"),)


@pytest.mark.parametrize(("body", "code", "line"), [
    ("raise __import__('cpsam.command').command.UsageError('--x is wrong')", 2, "cpsam fake: --x is wrong"),
    ("raise __import__('cpsam.command').command.DataError('data.tif: unreadable')", 1,
     "cpsam fake: data.tif: unreadable"),
    ("raise FileNotFoundError(2, 'No such file or directory', 'gone.tif')", 1,
     "cpsam fake: gone.tif: no such file or directory"),
    ("raise __import__('cpsam.io').io.OutputPathError('out', 'exists and is not a folder')", 2,
     "cpsam fake: out: exists and is not a folder"),
    ("raise TypeError('a bug')", 1,
     "cpsam fake: unexpected error: TypeError: a bug (`cpsam --debug ...` or CPSAM_DEBUG=1 shows the traceback)"),
    ("raise KeyboardInterrupt", 130, "cpsam fake: interrupted by Ctrl-C"),
    ("return 3", 3, None),
])
def test_error_policy_one_line_and_exit_code(tmp_path, monkeypatch, capsys, body, code, line):
    monkeypatch.delenv("CPSAM_DEBUG", raising=False)
    commands = _fake(tmp_path, monkeypatch, body)
    assert command.dispatch(commands, ["fake"], "test") == code
    err = capsys.readouterr().err
    if line is None:
        assert err == ""
    else:
        assert err.strip() == line and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    commands = _fake(tmp_path, monkeypatch, "raise __import__('cpsam.command').command.UsageError('--x is wrong')")
    monkeypatch.delenv("CPSAM_DEBUG", raising=False)
    with pytest.raises(UsageError):
        command.dispatch(commands, ["--debug", "fake"], "test")
    monkeypatch.setenv("CPSAM_DEBUG", "1")
    with pytest.raises(UsageError):
        command.dispatch(commands, ["fake"], "test")


def test_exit_codes_maps_the_first_matching_rule():
    with pytest.raises(DataError) as info, command.exit_codes((KeyError, 1), (LookupError, 2)):
        raise KeyError("nosuchset")
    assert info.value.code == 1 and info.value.message == "nosuchset"
    with pytest.raises(command.CommandError) as info, command.exit_codes((KeyError, 1), (LookupError, 2)):
        raise IndexError("out of range")
    assert info.value.code == 2
    with pytest.raises(ZeroDivisionError), command.exit_codes((KeyError, 1)):
        raise ZeroDivisionError


def test_help_does_not_import_the_upper_layers():
    code = ("import sys; from cpsam.cli import main; main(['--help']); main(['prep', '--help']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('data_prep', 'train', 'distill', 'eval')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_console_script_self_check_runs_small_models():
    proc = subprocess.run(
        [sys.executable, "-m", "cpsam", "demo", "--self-check", "--models", "cpsam_tiny,cpnet"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "4/4 models ok" in proc.stdout
    assert "cpsam_tiny" in proc.stdout and "nbase=[1, 32]" in proc.stdout
