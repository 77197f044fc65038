"""Settings of the whole test session: Ray's temporary files go to a private folder that is removed at the end,
and every test leaves the process's locale as the session found it.

Ray keeps each instance's sockets, logs and spilled objects under ``$RAY_TMPDIR/ray/session_*`` (default
``/tmp/ray``) and never removes them. Every test that starts Ray (the Flower simulation engine) runs its
processes with this session's environment, so pointing ``RAY_TMPDIR`` at a folder of this session keeps
them out of the system's temporary folder. The folder name stays short: Ray's socket paths below it must
fit in 107 bytes (AF_UNIX).

ITK's DICOM writer (SimpleITK with GDCM, used by tests that write DICOM series) sets the C locale of the
process to ``C`` and leaves it so; every later ``subprocess`` call with ``text=True`` would then decode the
output of Flower's commands as ASCII and fail on its first non-ASCII character.

The two pytest-xdist workers (and the Flower processes the tests start) share the cores. OpenMP threads that
spin while they wait for work then take the cores from the other process: a training step of the demo model
took 24 s instead of 1 s on 2 cores beside one other training process. Passive waiting (set before torch is
imported, inherited by the workers and every process they start) gives it back; a user's own setting wins.
"""

from __future__ import annotations

import locale
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RAY_TMPDIR_ENV = "RAY_TMPDIR"
SESSION_LOCALE = locale.setlocale(locale.LC_ALL)  # the locale the session started with (all categories)


@pytest.fixture(scope="session", autouse=True)
def private_ray_tmpdir() -> Iterator[Path]:
    """``RAY_TMPDIR`` of every Ray instance started during the session; removed after the session."""
    folder = Path(tempfile.mkdtemp(prefix="hermes-ray-"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(RAY_TMPDIR_ENV, str(folder))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def session_locale() -> Iterator[None]:
    """After each test (and the module or session fixtures it set up), the locale the session started with."""
    yield
    if locale.setlocale(locale.LC_ALL) != SESSION_LOCALE:
        locale.setlocale(locale.LC_ALL, SESSION_LOCALE)
