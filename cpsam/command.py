"""One mechanism for every `cpsam` sub-command: a declarative tree of commands, one parser per command and
one error policy.

A command is a row `Command(words, target, help)` of a table (`cpsam.cli.COMMANDS`):

- `words`: what selects it after `cpsam`, e.g. "distill cache"; a command's sub-commands are the rows whose
  words extend its own by one word.
- `target`: where its code lives, imported only when it runs. "pkg.module" provides
  `add_arguments(parser) -> None` and `run(args) -> int` (the exit code); "pkg.module:NAME" provides
  `add_NAME_arguments(parser)` and `run_NAME(args)` (one module holding several small commands). None: a group
  that only holds sub-commands (`cpsam prep`).
- `help`: one line, listed by the parent's `--help`.
- `intermixed`: key=value positionals may stand before and after the options (`parse_intermixed_args`).

When the next word names none of a command's sub-commands, the command itself runs: its default action
(`cpsam distill --teacher ...` trains, `cpsam train CONFIG` trains); a group without a target lists its
sub-commands instead.

Error policy (`dispatch`): a usage error (a bad option, `UsageError`, an unusable output path) exits 2; a data or
IO error (`DataError`, `cpsam.io.InputFileError`, OSError) exits 1; any other exception exits 1 too. Each is
ONE line `cpsam WORDS: message` on stderr, without a traceback unless `cpsam --debug ...` or CPSAM_DEBUG=1.
An interruption exits 128 + the signal number (Ctrl-C 130; SIGTERM 143 inside `interruptible`, which commands
that clean up on SIGTERM use). Commands may also report an error themselves and return its exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

HELP_WORDS = ("-h", "--help")
USAGE, DATA = 2, 1  # exit codes of a usage error and of a data / IO error


@dataclass(frozen=True)
class Command:
    """One row of the command table (module docstring)."""

    words: str
    target: str | None
    help: str
    intermixed: bool = False

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.words.split())

    def entry_points(self) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
        """(add_arguments, run) of the target; imports its module."""
        if self.target is None:
            raise ValueError(f"cpsam {self.words} is a group of commands, it has no entry points")
        module_path, _, name = self.target.partition(":")
        module = importlib.import_module(module_path)
        if name:
            return getattr(module, f"add_{name}_arguments"), getattr(module, f"run_{name}")
        return module.add_arguments, module.run


class CommandError(Exception):
    """An error that ends a command: reported as one line `cpsam WORDS: message`, exit code `code`."""

    code = DATA

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class UsageError(CommandError):
    """The request cannot be carried out as given (options, files named, config): exit 2."""

    code = USAGE


class DataError(CommandError):
    """The input data or the file system failed the command: exit 1."""

    code = DATA


def describe(exc: BaseException) -> str:
    """The one-line text of an exception: an OSError's path and problem, a KeyError's key, else str(exc)."""
    if isinstance(exc, OSError):
        from cpsam.io import describe_os_error  # here: cpsam.io loads numpy, and `cpsam --help` should not

        return describe_os_error(exc)
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


@contextlib.contextmanager
def exit_codes(*rules: tuple[type[BaseException] | tuple[type[BaseException], ...], int]) -> Iterator[None]:
    """Within the block, an exception matching the first rule (types, exit code) that names its type becomes a
    CommandError with that code (UsageError for 2, DataError for 1): one line, no traceback (module docstring)."""
    try:
        yield
    except CommandError:
        raise
    except Exception as exc:
        for types, code in rules:
            if isinstance(exc, types):
                kind = {USAGE: UsageError, DATA: DataError}.get(code, CommandError)
                raise kind(describe(exc), code) from exc
        raise


@contextlib.contextmanager
def interruptible(hint: str) -> Iterator[None]:
    """Within the block SIGTERM / SIGHUP interrupt like Ctrl-C (`cpsam.io.terminate_as_interrupt`); an
    interruption ends the command with one line `interrupted by SIGNAL; hint` and exit code 128 + N."""
    from cpsam import io  # here: cpsam.io loads numpy, and `cpsam --help` should not

    with io.terminate_as_interrupt():
        try:
            yield
        except KeyboardInterrupt as exc:
            raise CommandError(f"interrupted by {io.interrupt_name(exc)}; {hint}", io.interrupt_exit_code(exc)) \
                from exc


# --------------------------------------------------------------------------- help


def children(commands: Sequence[Command], path: tuple[str, ...]) -> list[Command]:
    """The sub-commands of the command at `path` (() for the top level), in table order."""
    return [c for c in commands if len(c.path) == len(path) + 1 and c.path[: len(path)] == path]


def command_rows(commands: Sequence[Command], indent: str = "  ") -> str:
    """One aligned line per command: its last word and its help."""
    width = max(len(c.path[-1]) for c in commands)
    return "\n".join(f"{indent}{c.path[-1].ljust(width)}  {c.help}" for c in commands)


def top_level_help(commands: Sequence[Command], description: str) -> str:
    """`cpsam --help`: every command with its sub-commands (indented under it)."""
    width = max(len(c.words) for c in commands)
    lines = [f"  {c.words.ljust(width)}  {c.help}" for c in _tree_order(commands)]
    return (
        "usage: cpsam [--debug] <command> [options]\n\n"
        f"{description}\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "Run `cpsam <command> --help` for the options of one command. --debug (or CPSAM_DEBUG=1): show the\n"
        "traceback of an error instead of one line."
    )


def _tree_order(commands: Sequence[Command], path: tuple[str, ...] = ()) -> list[Command]:
    ordered = []
    for command in children(commands, path):
        ordered.append(command)
        ordered.extend(_tree_order(commands, command.path))
    return ordered


def _sub_commands_text(commands: Sequence[Command], command: Command) -> str:
    return (f"commands (cpsam {command.words} COMMAND --help for its options):\n"
            f"{command_rows(children(commands, command.path))}")


def _group_help(commands: Sequence[Command], group: Command) -> str:
    return (f"usage: cpsam {group.words} <command> [options]\n\n{group.help}\n\n"
            f"{_sub_commands_text(commands, group)}")


def build_parser(commands: Sequence[Command], command: Command
                 ) -> tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], int]]:
    """The parser of one command (its options, then its sub-commands in the epilog) and its run function."""
    add_arguments, run = command.entry_points()
    parser = argparse.ArgumentParser(prog=f"cpsam {command.words}", description=command.help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    if children(commands, command.path):
        subs = _sub_commands_text(commands, command)
        parser.epilog = f"{subs}\n\n{parser.epilog}" if parser.epilog else subs
    return parser, run


# --------------------------------------------------------------------------- dispatch


def debug_requested() -> bool:
    """CPSAM_DEBUG set to anything but '' or '0'."""
    return os.environ.get("CPSAM_DEBUG", "") not in ("", "0")


def dispatch(commands: Sequence[Command], argv: Sequence[str], description: str) -> int:
    """Find the command `argv` names, parse its options, run it under the error policy; returns the exit code.

    Modules are imported only here, for the one command that runs: `cpsam --help` stays instant, and `cpsam`
    (the lowest layer) never imports the packages above it (data_prep, train, distill, eval) by itself.
    """
    args = list(argv)
    debug = debug_requested()
    if args[:1] == ["--debug"]:
        debug, args = True, args[1:]
    by_path = {c.path: c for c in commands}
    path: tuple[str, ...] = ()
    while args and (*path, args[0]) in by_path:
        path = (*path, args.pop(0))
    if not path:
        if not args or args[0] in (*HELP_WORDS, "help"):
            print(top_level_help(commands, description))
            return 0 if args else USAGE
        print(f"cpsam: unknown command {args[0]!r}\n\n{top_level_help(commands, description)}", file=sys.stderr)
        return USAGE
    command = by_path[path]
    if command.target is None:  # a group: it only lists its sub-commands
        if args and args[0] in HELP_WORDS:
            print(_group_help(commands, command))
            return 0
        problem = f"unknown command {args[0]!r}" if args else "give a command"
        print(f"cpsam {command.words}: {problem}\n\n{_group_help(commands, command)}", file=sys.stderr)
        return USAGE
    parser, run = build_parser(commands, command)
    # key=value overrides may stand before and after options (`... a=1 --opt X b=2`) where a command asks
    parse = parser.parse_intermixed_args if command.intermixed else parser.parse_args
    try:
        parsed = parse(args)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else USAGE
    return run_reported(command, run, parsed, debug)


def run_reported(command: Command, run: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                 debug: bool = False) -> int:
    """Run one command under the error policy (module docstring); returns its exit code."""
    prefix = f"cpsam {command.words}:"
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt as exc:  # one line, not a traceback (commands that clean up catch it first)
        from cpsam import io

        print(f"{prefix} interrupted by {io.interrupt_name(exc)}", file=sys.stderr)
        return io.interrupt_exit_code(exc)
    except Exception as exc:
        if debug:
            raise
        code, message = _classify(exc)
        print(f"{prefix} {message}", file=sys.stderr)
        return code


def _classify(exc: Exception) -> tuple[int, str]:
    """(exit code, one-line message) of an exception no command reported itself."""
    if isinstance(exc, CommandError):
        return exc.code, exc.message
    from cpsam import io  # here: cpsam.io loads numpy, and `cpsam --help` should not

    if isinstance(exc, io.OutputPathError):
        return USAGE, describe(exc)
    if isinstance(exc, (io.InputFileError, OSError)):
        return DATA, describe(exc)
    return DATA, (f"unexpected error: {type(exc).__name__}: {describe(exc)} (`cpsam --debug ...` or CPSAM_DEBUG=1 "
                  "shows the traceback)")
