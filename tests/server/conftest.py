"""Fixtures of the server tests."""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity

from hermes_model import build_model


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages take run/node/task ids from Flower's TaskIdentity, which the Flower runtime
    sets in the ServerApp process; set it for in-process tests (restored afterwards)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="session")
def small_model():
    """Hermes-R at base 8 with 8 task slots: 3.8 M parameters (random, seed 0)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_model("hermes-r", base_channels=8, task_slots=8, modality_slots=6)
