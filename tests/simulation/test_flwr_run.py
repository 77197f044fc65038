"""The plain Flower way of the README: ``flwr run <checkout> local`` as a local simulation, one round.

Flower's own CLI builds the app bundle from the checkout's ``pyproject.toml``, starts its managed local
SuperLink in simulation mode (the ``:local:`` connection of a private ``$FLWR_HOME/config.toml``) and runs
the ServerApp and two virtual ClientApps with a run-config TOML file whose ``site-configs`` holds the
absolute paths of two tiny sites (two bundled sarcoma CT cases each). ``flwr`` leaves that SuperLink
running (detached); the test finds it by its log file, which lies in the private ``FLWR_HOME``, and stops
its process tree by PID. ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` must keep the SuperLink from
installing the app's dependencies (``uv sync`` of torch, MONAI, ... into ``$FLWR_HOME/runtime-envs``).
A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import yaml

from server.checkpoint import RunStore
from server.launch import live, process_tree, signal_processes
from simulation.flower import free_port
from simulation.sites import REPO_ROOT

pytestmark = pytest.mark.slow

DEMO_SARCOMA = REPO_ROOT / "demo_data" / "sarcoma"
SITES = {"site-a": ("STS_001", "STS_002"), "site-b": ("STS_003", "STS_004")}
RUN_TIMEOUT_S = 1200.0
STOP_TIMEOUT_S = 20.0
FLWR_CONFIG = """[superlink]
default = "local"

[superlink.local]
address = ":local:"
"""


def write_site(root: Path, name: str, cases: tuple[str, ...]) -> Path:
    """A tiny site config in ``root`` (absolute paths): ``cases`` of the bundled sarcoma CT data, no
    validation split, CPU, fp32 (spacing and patch size are the federation's plan, set by the server)."""
    root.mkdir(parents=True)
    lines = ["case,image,label"] + [
        f"{c},{DEMO_SARCOMA / c / 'CT_image.nii.gz'},{DEMO_SARCOMA / c / 'CT_mask.nii.gz'}" for c in cases
    ]
    (root / "cases.csv").write_text("\n".join(lines) + "\n")
    body = {
        "site": name, "work_dir": str(root / "work"),
        "datasets": [{"name": "sarcoma", "modality": "CT", "format": "csv", "source": str(root / "cases.csv"),
                      "classes": {1: "tumour"}, "split": {"val": 0.0, "test": 0.0}}],
        "training": {"devices": "cpu", "batch_size": 1, "num_workers": 0, "bf16": False},
    }
    path = root / "site.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def local_superlinks(flwr_home: Path) -> list[int]:
    """The local SuperLink(s) ``flwr`` started for ``flwr_home``: ``flower-superlink ... --log-file
    <FLWR_HOME>/local-superlink/superlink.log`` (Flower 1.42, ``flwr/cli/local_superlink.py``)."""
    marker = f"--log-file {flwr_home / 'local-superlink' / 'superlink.log'}"
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if marker in _cmdline(int(p.name))]


def stop_tree(pid: int) -> list[int]:
    """SIGTERM ``pid`` (a session leader: ``flwr`` detaches it) and everything it started, SIGKILL what is
    left after the timeout; returns the pids that were stopped."""
    tree = process_tree(pid, group=pid)
    signal_processes(tree, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while live(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    signal_processes({p: tree[p] for p in live(tree)}, signal.SIGKILL)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while live(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not live(tree), f"still running: {live(tree)}"
    return sorted(tree)


def test_flwr_run_local_simulation_one_round(tmp_path: Path) -> None:
    if not (DEMO_SARCOMA / "STS_004").is_dir():
        pytest.skip(f"bundled demo data not found at {DEMO_SARCOMA}")
    flwr_home, home, run_dir = tmp_path / "flwr-home", tmp_path / "home", tmp_path / "run"
    flwr_home.mkdir()
    home.mkdir()
    (flwr_home / "config.toml").write_text(FLWR_CONFIG)
    sites = [write_site(tmp_path / name, name, cases) for name, cases in SITES.items()]
    run_config = {
        "site-configs": ",".join(str(p) for p in sites), "run-dir": str(run_dir), "num-server-rounds": 1,
        "min-sites": 2, "local-iterations": 2, "iters-per-epoch": 2, "total-epochs": 1, "warmup-epochs": 0,
        "evaluate-every": 0, "base-channels": 8, "task-slots": 80, "poll-interval-s": 0.5,
        "start-timeout-s": 300.0, "query-timeout-s": 300.0, "round-timeout-s": 900.0,  # a broken site fails it
    }
    run_toml = tmp_path / "hermes-run.toml"
    run_toml.write_text(tomli_w.dumps(run_config))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({
        "HOME": str(home),  # nothing may land in ~/.flwr
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "RAY_ADDRESS": "local",  # a private Ray, even if a cluster started with `ray start` runs here
        # flwr starts `flower-superlink` (and it `flower-superexec`, `flwr-simulation`) by name
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    })
    command = [str(Path(sys.executable).parent / "flwr"), "run", str(REPO_ROOT), "local",
               "--run-config", str(run_toml),
               "--federation-config", "num-supernodes=2 client-resources-num-cpus=1", "--stream"]
    start = time.monotonic()
    log_path = tmp_path / "flwr-run.log"
    try:
        with log_path.open("w") as log:
            done = subprocess.run(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=RUN_TIMEOUT_S, check=False, start_new_session=True)
        seconds = time.monotonic() - start
        output = log_path.read_text(errors="replace")
        superlinks = local_superlinks(flwr_home)
        assert len(superlinks) == 1, f"local SuperLinks for {flwr_home}: {superlinks}\n{output[-3000:]}"
        # the SuperExec the SuperLink started may not install the app's dependencies
        tree = process_tree(superlinks[0], group=superlinks[0])
        assert all("--allow-runtime-dependency-installation" not in _cmdline(p) for p in tree)
        assert done.returncode == 0, output[-5000:]
    finally:
        for pid in local_superlinks(flwr_home):
            stop_tree(pid)
    print(f"flwr run . local, one round of two sites: {seconds:.1f} s")
    latest = RunStore(run_dir).latest_path()
    assert latest is not None and latest.name == "round_0001.pt", (
        f"no round-1 checkpoint in {run_dir}:\n{output[-5000:]}\n"
        + (flwr_home / "local-superlink" / "superlink.log").read_text(errors="replace")[-5000:]
    )
    assert not (flwr_home / "runtime-envs").exists()  # no `uv sync` of the app's dependencies
    assert not (home / ".flwr").exists()
    assert not local_superlinks(flwr_home)
