"""SIGTERM and SIGHUP as exceptions (like Ctrl-C's KeyboardInterrupt), so every atomic write in progress is
cleaned up; and how an interruption is reported (its name, the shell's exit code)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP turned into an exception (see `terminate_as_interrupt`)."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(signum).name)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (Slurm time limit, `docker stop`, `kill`) and SIGHUP raise `Terminated`
    in the main thread, like Ctrl-C raises KeyboardInterrupt, so that every `atomic_path` and output
    set being written is cleaned up. Only the first signal raises; a signal that was ignored (nohup)
    stays ignored. Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, _frame: object) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated(signum)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def interrupt_exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's exit code for an interruption: 128 + the signal number (130 for Ctrl-C)."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else int(signal.SIGINT))


def interrupt_name(exc: KeyboardInterrupt) -> str:
    """'SIGTERM', 'SIGHUP' or 'Ctrl-C' for an interruption."""
    return signal.Signals(exc.signum).name if isinstance(exc, Terminated) else "Ctrl-C"
