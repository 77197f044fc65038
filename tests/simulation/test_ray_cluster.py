"""``hermes-sim run --ray-address``: the federated simulation on an existing Ray cluster.

The fast tests check the sizing from a cluster's nodes and what reaches Flower (no ``num_cpus`` for Ray,
``RAY_ADDRESS`` in the environment of the processes started). The slow test starts a real two-node Ray
cluster on this machine (a head and a second node, each with its own temp dir and one CPU, each a
``ray start --block`` process owned by the test and stopped by PID, never ``ray stop``), runs the quick
demo (one round of two local steps) on it and asserts from Ray's own actor table, and from each node's
log folder, that ClientApp actors ran on both nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import simulation.flower as flower
import simulation.run as run
from server.checkpoint import RunStore
from server.launch import live, proc_table, process_tree, signal_processes
from simulation.cli import _options, build_parser, main
from simulation.flower import RayNode, SimulationError, free_port, ray_cluster_nodes, sites_that_fit
from simulation.report import read_metrics
from simulation.run import (
    SimOptions,
    auto_cpus_per_site,
    auto_gpus_per_site,
    parallel_sites,
    ray_cpus,
    run_mode,
)
from tests.simulation.processes import EXIT_GRACE_S, wait_until_gone

RAY = Path(sys.executable).parent / "ray"
NODE_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0


# ------------------------------------------------------------------------------------------ sizing (fast)
def test_sites_are_sized_from_the_cluster_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # this machine must not matter
    two = [RayNode(1.0), RayNode(1.0)]
    assert auto_cpus_per_site(2, two) == 1 and parallel_sites(2, 1, 0.0, None, two) == 2
    assert auto_cpus_per_site(5, two) == 1 and parallel_sites(5, 1, 0.0, None, two) == 2  # three wait
    uneven = [RayNode(8.0), RayNode(4.0)]
    assert auto_cpus_per_site(3, uneven) == 4      # 2 sites on the 8-core node, 1 on the other
    assert auto_cpus_per_site(2, uneven) == 4      # 6 would fit only once
    assert parallel_sites(3, 4, 0.0, None, uneven) == 3
    assert sites_that_fit(uneven, 5, 0.0) == 1 and sites_that_fit(uneven, 9, 0.0) == 0
    gpu = [RayNode(16.0, 2.0), RayNode(16.0, 1.0)]
    assert auto_gpus_per_site(5, gpu) == 0.5       # 4 + 2 places; 2/3 of a GPU would give only 3
    assert auto_gpus_per_site(2, gpu) == 1.0 and auto_gpus_per_site(3, gpu) == 1.0
    assert parallel_sites(5, 3, 0.5, None, gpu) == 5
    assert auto_gpus_per_site(4, [RayNode(8.0)]) == 0.0
    # Ray refuses num_cpus when it joins a cluster: never oversubscribe one
    assert ray_cpus(5, 1, 0.0) == 5 and ray_cpus(5, 1, 0.0, cluster=True) is None


def test_ray_address_reaches_the_options() -> None:
    args = build_parser().parse_args(["run", "--quick", "--ray-address", "10.0.0.5:6379"])
    assert _options(args).ray_address == "10.0.0.5:6379"
    assert _options(build_parser().parse_args(["run", "--quick"])).ray_address is None
    with pytest.raises(ValueError, match="ray-address"):
        SimOptions(quick=True, ray_address=" ")


def test_local_only_refuses_a_ray_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--quick", "--local-only", "--ray-address", "h:1", "--run-dir", str(tmp_path / "r")]) == 2
    assert "--ray-address" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


class _Stop(Exception):
    pass


def _capture_simulation(monkeypatch: pytest.MonkeyPatch, nodes: list[RayNode]) -> dict[str, Any]:
    """Replace the cluster query and the simulation by recorders; the run stops where Flower would start."""
    seen: dict[str, Any] = {"queried": []}

    def fake_nodes(address: str) -> list[RayNode]:
        seen["queried"].append(address)
        return nodes

    def fake_simulation(run_dir: Path, run_config: dict[str, Any], num_supernodes: int, **kwargs: Any) -> None:
        seen.update(kwargs, num_supernodes=num_supernodes)
        raise _Stop

    monkeypatch.setattr(run, "ray_cluster_nodes", fake_nodes)
    monkeypatch.setattr(run, "run_flower_simulation", fake_simulation)
    return seen


def test_default_demo_on_a_cluster_passes_no_cpu_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash of the issue: the five-site demo on a 2-core machine asked Ray for 5 CPUs while joining a
    cluster ("num_cpus and num_gpus must not be provided")."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seen = _capture_simulation(monkeypatch, [RayNode(4.0), RayNode(4.0), RayNode(2.0)])
    with pytest.raises(_Stop):
        run_mode("federated", SimOptions(ray_address="head:6379", run_dir=tmp_path / "a", echo=False))
    assert seen["queried"] == ["head:6379"] and seen["num_supernodes"] == 5
    assert seen["ray_address"] == "head:6379" and seen["ray_cpus"] is None
    assert seen["cpus_per_site"] == 2        # 2 + 2 + 1 sites fit with 2 cores each; with 3 only 1 + 1
    assert seen["gpus_per_site"] == 0.0

    # the RAY_ADDRESS of the environment counts as --ray-address; "local" forces the private Ray
    monkeypatch.setenv("RAY_ADDRESS", "other:6379")
    seen = _capture_simulation(monkeypatch, [RayNode(3.0)])
    with pytest.raises(_Stop):
        run_mode("federated", SimOptions(quick=True, run_dir=tmp_path / "b", echo=False))
    assert seen["queried"] == ["other:6379"] and seen["ray_address"] == "other:6379"
    seen = _capture_simulation(monkeypatch, [])
    with pytest.raises(_Stop):
        run_mode("federated", SimOptions(ray_address="local", run_dir=tmp_path / "c", echo=False))
    assert seen["queried"] == [] and seen["ray_address"] is None and seen["ray_cpus"] == 5

    # an explicit size that no node holds is refused before Flower starts
    seen = _capture_simulation(monkeypatch, [RayNode(2.0), RayNode(2.0)])
    with pytest.raises(ValueError, match="no node of the Ray cluster"):
        run_mode("federated", SimOptions(quick=True, ray_address="h:1", cpus_per_site=3, run_dir=tmp_path / "d"))


def test_the_ray_address_reaches_flowers_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``RAY_ADDRESS`` in the SuperLink's environment (which its SuperExec and Flower's simulation process,
    where ``ray.init`` runs, inherit): the cluster's address, else ``local``."""
    real_popen = subprocess.Popen
    envs: list[dict[str, str]] = []

    def recording_popen(args: list[str], **kwargs: Any) -> subprocess.Popen:
        envs.append(dict(kwargs["env"]))
        # a stand-in SuperLink that exits at once: run_flower_simulation reports it and stops
        return real_popen([sys.executable, "-c", "raise SystemExit(3)"], **kwargs)

    monkeypatch.setattr(flower.subprocess, "Popen", recording_popen)
    for address, expected in (("10.1.2.3:6379", "10.1.2.3:6379"), (None, "local")):
        with pytest.raises(SimulationError, match="exited with code 3"):
            flower.run_flower_simulation(tmp_path / str(expected).replace(":", "-"), {"x": 1}, 2,
                                         ray_address=address, echo=False)
        assert envs[-1]["RAY_ADDRESS"] == expected
    with pytest.raises(ValueError, match="refuses num_cpus"):
        flower.run_flower_simulation(tmp_path / "z", {}, 2, ray_cpus=4, ray_address="h:1", echo=False)


def test_no_cluster_at_the_address_is_an_error() -> None:
    start = time.monotonic()
    with pytest.raises(SimulationError, match="no Ray cluster at '127.0.0.1:"):
        ray_cluster_nodes(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 15.0  # refused at once, not after Ray's own retries


# ------------------------------------------------------------------------------------- real cluster (slow)
@dataclass
class RayCluster:
    """A head and a second node, each a ``ray start --block`` child of the test with its own temp dir."""

    address: str
    head_dir: Path
    worker_dir: Path


_ACTORS = """
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, include_dashboard=False)
try:
    actors = [{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "pid": a["Pid"], "state": a["State"]}
              for a in state.actors().values()]
    nodes = {n["NodeID"]: n["RayletSocketName"] for n in ray.nodes()}
finally:
    ray.shutdown()
print("ACTORS " + json.dumps({"actors": actors, "nodes": nodes}), flush=True)
"""


def _cluster_actors(address: str) -> dict[str, Any]:
    """Ray's actor table (alive and dead actors, from the head's GCS) and each node's raylet socket."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", _ACTORS, address], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    line = [x for x in done.stdout.splitlines() if x.startswith("ACTORS ")]
    assert done.returncode == 0 and line, done.stderr[-3000:]
    return json.loads(line[-1].split(" ", 1)[1])


def _in_folder(folder: Path) -> dict[int, int]:
    """Processes whose command line names ``folder`` (Ray's daemons name their node's temp dir)."""
    table, found = proc_table(), {}
    for pid in table:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmdline:
            found[pid] = table[pid][3]
    return found


def _start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen([str(RAY), "start", *args, "--num-cpus", "1", "--num-gpus", "0",
                                 "--object-store-memory", str(300 * 1024 * 1024), "--block"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_nodes(address: str, count: int, nodes: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + NODE_TIMEOUT_S
    while True:
        for process, log in zip(nodes, logs, strict=True):
            if process.poll() is not None:
                pytest.fail(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if len(ray_cluster_nodes(address, timeout_s=60.0)) >= count:
                return
        except SimulationError:
            pass
        assert time.monotonic() < deadline, f"the Ray cluster did not reach {count} node(s) in {NODE_TIMEOUT_S} s"
        time.sleep(1.0)


def _stop(process: subprocess.Popen, folder: Path) -> None:
    """SIGTERM the ``ray start --block`` process (it then stops the daemons it started: Ray's SIGTERM
    handler), SIGKILL whatever of its tree is left after the timeout."""
    tree = {**process_tree(process.pid, group=process.pid), **_in_folder(folder)}
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while live(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    signal_processes({pid: tree[pid] for pid in live(tree)}, signal.SIGKILL)


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[RayCluster]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Ray's socket paths under a temp dir must fit in 107 bytes (AF_UNIX): short folders under /tmp
    short = Path(tempfile.mkdtemp(prefix="hray-", dir="/tmp"))
    cluster = RayCluster(address, short / "head", short / "node2")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    logs = [tmp_path / "ray-head.log", tmp_path / "ray-node2.log"]
    started: list[tuple[subprocess.Popen, Path]] = []
    try:
        head = _start_node(["--head", "--port", str(port), "--include-dashboard", "false",
                            "--temp-dir", str(cluster.head_dir)], logs[0], env)
        started.append((head, cluster.head_dir))
        _wait_for_nodes(address, 1, [head], logs[:1])
        second = _start_node(["--address", address, "--temp-dir", str(cluster.worker_dir)], logs[1], env)
        started.append((second, cluster.worker_dir))
        _wait_for_nodes(address, 2, [head, second], logs)
        yield cluster
    finally:
        for process, folder in reversed(started):
            _stop(process, folder)
        leftover = {str(folder): sorted(_in_folder(folder)) for _process, folder in started if _in_folder(folder)}
        shutil.rmtree(short, ignore_errors=True)
    assert not leftover, f"Ray processes still run: {leftover}"


def _actor_log_pids(folder: Path) -> set[int]:
    """Process ids of the ClientApp actors whose Ray worker logs lie in this node's temp dir."""
    pids = set()
    for log in folder.glob("session_*/logs/worker-*.out"):
        if ":actor_name:ClientAppActor" in log.read_text(errors="replace"):
            pids.add(int(log.stem.rsplit("-", 1)[1]))
    return pids


@pytest.mark.slow
def test_quick_demo_runs_on_two_ray_nodes(ray_cluster: RayCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "fed"
    start = time.monotonic()
    opts = SimOptions(quick=True, rounds=1, local_iterations=2, run_dir=run_dir, echo=False,
                      ray_address=ray_cluster.address)
    result = run_mode("federated", opts)
    seconds = time.monotonic() - start
    print(f"federated quick demo on the 2-node Ray cluster: {seconds:.1f} s")

    assert result.summary["ray_address"] == ray_cluster.address and result.summary["ray_nodes"] == 2
    assert result.summary["cpus_per_site"] == 1 and result.summary["parallel_sites"] == 2
    assert [p.name for p in (run_dir / "checkpoints").glob("round_*.pt")] == ["round_0001.pt"]
    assert RunStore(run_dir).latest_path() is not None
    train = [x for x in read_metrics(run_dir) if x["phase"] == "train" and x["scope"] == "site"]
    assert sorted((x["round"], x["site"]) for x in train) == [(1, "sarcoma-ct"), (1, "sarcoma-mr")]

    table = _cluster_actors(ray_cluster.address)
    node_dir = {}
    for node_id, socket_name in table["nodes"].items():
        for folder in (ray_cluster.head_dir, ray_cluster.worker_dir):
            if socket_name.startswith(str(folder)):
                node_dir[node_id] = folder
    assert set(node_dir.values()) == {ray_cluster.head_dir, ray_cluster.worker_dir}, table["nodes"]
    actors = [a for a in table["actors"] if a["class"] == "ClientAppActor"]
    on = {folder: {a["pid"] for a in actors if node_dir.get(a["node"]) == folder}
          for folder in (ray_cluster.head_dir, ray_cluster.worker_dir)}
    print("ClientApp actor pids per Ray node:", {folder.name: sorted(pids) for folder, pids in on.items()})
    assert all(on.values()), f"ClientApp actors per node: {on}"
    # the same actors, seen from the nodes: their worker logs lie in the temp dir of the node they ran on
    for folder, pids in on.items():
        assert pids & _actor_log_pids(folder), f"no log of the actors {pids} in {folder}"
    # nothing of the simulation is left (its processes start in <run_dir>/flower); on a loaded machine the
    # last of them may take some seconds to exit after the run
    left = wait_until_gone(run_dir, EXIT_GRACE_S)
    assert not left, f"processes still working in {run_dir}: {left}"
