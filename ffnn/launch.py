"""Starting a command: Ctrl-C before the command's own handling takes over (while torch is
imported, while the data loads) ends it quietly with the shell's status for an interrupt, 130,
instead of a KeyboardInterrupt traceback. Standard library only, so that it is in place before
anything slow is imported; the commands' console scripts start here for the same reason."""
from __future__ import annotations

import importlib
import signal

INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C


def _exit_interrupted(signum, frame) -> None:
    raise SystemExit(INTERRUPTED)


def exit_quietly_on_ctrl_c() -> None:
    """Make SIGINT end the process with status 130 and no traceback (for a command's process
    only: a library user keeps Python's KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, _exit_interrupted)


def _run(module: str) -> int:
    exit_quietly_on_ctrl_c()
    return importlib.import_module(module).main()


def train() -> int:
    """The ffnn-train console script."""
    return _run("ffnn.train")


def evaluate() -> int:
    """The ffnn-evaluate console script."""
    return _run("ffnn.evaluate")


def predict() -> int:
    """The ffnn-predict console script."""
    return _run("ffnn.predict")
