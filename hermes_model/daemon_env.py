"""The environment our launchers give Flower's processes (both roles use it; no Flower import here)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# glibc keeps one malloc arena per thread that allocates (up to 8 per core), and each arena holds on to
# freed message buffers; two arenas cut the median peak memory of the SuperLink by 10 % and of the
# SuperNodes by 18 % in benchmarks/round_overhead.py, at the same round time and training step time
# (README, "Tests and communication benchmark").
MALLOC_ARENAS = "2"


def daemon_env(scripts_dir: str | os.PathLike, flwr_home: str | os.PathLike,
               extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with ``FLWR_HOME`` set, ``scripts_dir`` first on ``PATH`` (the daemons
    start ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name), and telemetry off and
    ``MALLOC_ARENA_MAX`` unless the user set them; ``extra`` last."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(scripts_dir), *(p for p in env.get("PATH", "").split(os.pathsep) if p)])
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("MALLOC_ARENA_MAX", MALLOC_ARENAS)
    env.update(extra or {})
    return env


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes (Flower colours its log levels even into a pipe or a file)."""
    return _ANSI.sub("", text)
