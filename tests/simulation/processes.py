"""Processes a simulation leaves behind: Flower's and Ray's processes of a run work in its run folder."""

from __future__ import annotations

import time
from pathlib import Path

EXIT_GRACE_S = 60.0  # Ray's workers may outlive the run by some seconds on a loaded machine


def wait_until_gone(folder: Path, timeout_s: float) -> list[int]:
    """The processes still working in ``folder`` after waiting up to ``timeout_s`` for them to exit."""
    deadline = time.monotonic() + timeout_s
    while (left := processes_in(folder)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def processes_in(folder: Path) -> list[int]:
    """PIDs of the processes whose working folder is ``folder`` or below it."""
    out = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if cwd.resolve().is_relative_to(folder.resolve()):
                out.append(int(cwd.parent.name))
        except OSError:
            continue
    return out
