"""Fixtures shared by the deployment tests (real Flower processes on loopback)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest


@pytest.fixture
def clients() -> Iterator[list[subprocess.Popen]]:
    """``hermes-client`` processes a test starts: SIGTERM, then SIGKILL to their session, at teardown."""
    started: list[subprocess.Popen] = []
    yield started
    for client in started:
        if client.poll() is None:
            client.send_signal(signal.SIGTERM)
    for client in started:
        try:
            client.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(10)
