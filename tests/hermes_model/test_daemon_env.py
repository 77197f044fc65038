"""The environment the launchers give Flower's processes."""

from __future__ import annotations

import os

import pytest

from hermes_model.daemon_env import MALLOC_ARENAS, daemon_env


def test_daemon_env_sets_home_path_and_defaults(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin")
    env = daemon_env(tmp_path / "bin", tmp_path / "home", {"EXTRA": "1"})
    assert env["PATH"].split(os.pathsep) == [str(tmp_path / "bin"), "/usr/bin"]
    assert env["FLWR_HOME"] == str(tmp_path / "home") and env["EXTRA"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["MALLOC_ARENA_MAX"] == MALLOC_ARENAS
    assert "MALLOC_ARENA_MAX" not in os.environ  # the caller's environment is not touched


def test_daemon_env_keeps_what_the_user_set(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    env = daemon_env(tmp_path, tmp_path, {"FLWR_TELEMETRY_ENABLED": "0"})
    assert env["MALLOC_ARENA_MAX"] == "8" and env["FLWR_TELEMETRY_ENABLED"] == "0"  # extra wins
