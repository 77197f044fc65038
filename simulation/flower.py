"""Run the real ServerApp and ClientApp in Flower's simulation engine, the supported way: ``flwr run``.

What :func:`run_flower_simulation` does, all inside the run directory (``<run_dir>/flower``):

1. writes a Flower app folder ``app/pyproject.toml`` whose ``[tool.flwr.app.components]`` are this
   project's ``server.app:app`` and ``client.app:app`` and whose ``[tool.flwr.app.config]`` is the run
   config of this run (every key with its value: ``flwr run`` refuses override keys an app does not
   declare). The app bundle holds only that file; the apps are imported from the installed package.
2. writes a private ``FLWR_HOME`` (``home/config.toml``) with one SuperLink connection ``hermes-sim``
   to a local SuperLink on free loopback ports;
3. starts that SuperLink in simulation mode (``flower-superlink --simulation``) in its own process
   group, and waits until its health endpoint answers;
4. runs ``flwr run app hermes-sim --federation-config 'num-supernodes=N client-resources-num-cpus=C
   client-resources-num-gpus=G' --stream``, which blocks until the run ends; its output goes to
   ``logs/flower.log`` (and to the console with ``echo``);
5. stops the SuperLink and everything it started (SuperExec, the simulation process, Ray) by process id.

The ``:local:`` connection of ``flwr`` would start a detached SuperLink on fixed ports whose process id
the caller never learns; starting the same SuperLink here keeps it owned and stoppable.

Ray: Flower's simulation process calls ``ray.init(**init_args)`` with the ``init-args-*`` of the federation
config (only ``num-cpus``, ``num-gpus``, ``logging-level`` and ``log-to-driver`` exist: no address), so the
address of an existing Ray cluster reaches it through ``RAY_ADDRESS`` in the environment of the processes
started here; without one, ``RAY_ADDRESS=local`` makes Ray start a private instance even when a cluster
started with ``ray start`` runs on this machine (plain ``ray.init()`` would join it). Ray refuses
``num_cpus``/``num_gpus`` when it joins a cluster: :func:`run_flower_simulation` never passes
``init-args-num-cpus`` then, and :func:`ray_cluster_nodes` reads the cluster's nodes so that the caller can
size the sites from them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes_model.daemon_env import strip_ansi
from server.launch import live, process_tree, signal_processes

logger = logging.getLogger(__name__)

CONNECTION = "hermes-sim"
FLOWER_DIR = "flower"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
RAY_QUERY_TIMEOUT_S = 120.0
RAY_ADDRESS_ENV = "RAY_ADDRESS"
LOCAL_RAY = "local"  # RAY_ADDRESS value that makes ray.init start a private instance
_NOISE = "httpx: HTTP Request"  # one line per log push of the ServerApp process: kept in the log file only


class SimulationError(RuntimeError):
    """The Flower simulation could not start or did not complete."""


@dataclass(frozen=True)
class FlowerResult:
    """The end of a ``flwr run``: its exit code, wall time and log file."""

    returncode: int
    seconds: float
    log_path: Path


@dataclass(frozen=True)
class RayNode:
    """CPUs and GPUs that one node of a Ray cluster offers (Ray's ``CPU`` and ``GPU`` resources)."""

    cpus: float
    gpus: float = 0.0


def sites_that_fit(nodes: Sequence[RayNode], cpus_per_site: float, gpus_per_site: float) -> int:
    """How many sites of ``cpus_per_site`` CPUs and ``gpus_per_site`` GPUs the ``nodes`` hold at once: one
    site never spans two nodes, so each node is counted on its own (as Flower sizes its actor pool). A
    resource asked for 0 does not limit; asking for neither fits nothing."""
    total = 0
    for node in nodes:
        limits = [int(have / need + 1e-9) for have, need in ((node.cpus, cpus_per_site), (node.gpus, gpus_per_site))
                  if need > 0]
        total += min(limits, default=0)
    return total


_RAY_QUERY = """
import json, sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, include_dashboard=False)
try:
    nodes = [{"cpus": n["Resources"].get("CPU", 0.0), "gpus": n["Resources"].get("GPU", 0.0)}
             for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
finally:
    ray.shutdown()
print("HERMES-RAY-NODES " + json.dumps(nodes), flush=True)
"""


def ray_cluster_nodes(address: str, timeout_s: float = RAY_QUERY_TIMEOUT_S) -> list[RayNode]:
    """The alive nodes of the Ray cluster at ``address`` with their CPUs and GPUs.

    A short-lived driver in a child process connects (``ray.init(address=...)``), reads ``ray.nodes()`` and
    disconnects: Ray's state API would need the cluster's dashboard, and a driver in this process would
    install Ray's own SIGTERM handler and threads for the rest of the run.

    Raises:
        SimulationError: no cluster answered at ``address`` within ``timeout_s`` seconds, or it has no node.
    """
    host, _, port = address.rpartition(":")
    if host and port.isdigit():  # HOST:PORT: fail at once where nothing listens (Ray would retry for a minute)
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=10.0).close()
        except OSError as exc:
            raise SimulationError(f"no Ray cluster at {address!r}: {exc}") from None
    env = {k: v for k, v in os.environ.items() if k != RAY_ADDRESS_ENV}
    try:
        done = subprocess.run([sys.executable, "-c", _RAY_QUERY, address], env=env, capture_output=True,
                              text=True, encoding="utf-8", errors="replace", timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise SimulationError(f"no Ray cluster answered at {address!r} within {timeout_s:g} s") from None
    found = [line for line in done.stdout.splitlines() if line.startswith("HERMES-RAY-NODES ")]
    if done.returncode != 0 or not found:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise SimulationError(f"could not connect to the Ray cluster at {address!r}: {tail}")
    nodes = [RayNode(float(n["cpus"]), float(n["gpus"])) for n in json.loads(found[-1].split(" ", 1)[1])]
    if not nodes:
        raise SimulationError(f"the Ray cluster at {address!r} has no alive node")
    logger.info("Ray cluster at %s: %d node(s), %g CPUs, %g GPUs", address, len(nodes),
                sum(n.cpus for n in nodes), sum(n.gpus for n in nodes))
    return nodes


def _bin(name: str) -> str:
    """The console script ``name`` of this Python environment (falls back to PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else name


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise ValueError(
        f"run-config values must be bool, int, float or str, got {type(value).__name__} {value!r}"
    )


def app_pyproject(run_config: Mapping[str, Any]) -> str:
    """The ``pyproject.toml`` of the generated Flower app, ``run_config`` as ``[tool.flwr.app.config]``."""
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "hermes-sim"',
        'version = "1.0.0"',
        'description = "Federated Hermes in the Flower simulation engine (generated by hermes-sim)"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "hermes-fl"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "server.app:app"',
        'clientapp = "client.app:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {_toml_value(value)}" for key, value in run_config.items()]
    return "\n".join(lines) + "\n"


def _flwr_home_config(address: str) -> str:
    return (
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{address}"\n'
        "insecure = true\n"
    )


def _healthy(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success
    except httpx.HTTPError:
        return False


def descendants(pid: int) -> list[int]:
    """Process ids of every living descendant of ``pid`` (Linux ``/proc``; empty elsewhere), including
    detached ones (a new session keeps its parent process id)."""
    return sorted(p for p in process_tree(pid) if p != pid)


def stop_process_tree(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop ``process`` and every process it started, by process id: SIGTERM first (the SuperLink then
    stops its own children), SIGKILL for whatever still runs after ``timeout_s`` seconds."""
    tree = process_tree(process.pid, group=process.pid)  # started with start_new_session: it leads a group
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    tree.update(process_tree(process.pid, group=process.pid))
    if not live(tree):
        return
    signal_processes(tree, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and live(tree):
        time.sleep(0.2)
    survivors = live(tree)
    if survivors:
        logger.warning("killing %d process(es) left by the simulation: %s", len(survivors), survivors)
        signal_processes({pid: tree[pid] for pid in survivors}, signal.SIGKILL)


def _federation_config(num_supernodes: int, cpus: int, gpus: float, ray_cpus: int | None) -> str:
    config = (
        f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus} "
        f"client-resources-num-gpus={gpus:g}"
    )
    return config if ray_cpus is None else f"{config} init-args-num-cpus={ray_cpus}"


class _Terminated(SimulationError):
    """hermes-sim itself received SIGTERM (or SIGINT where a background shell ignores it)."""


@contextlib.contextmanager
def _raise_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into an exception while the simulation runs, so the ``finally`` clauses stop every
    process started (only possible in the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated(f"hermes-sim received signal {signum}: stopping the simulation")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _pump(process: subprocess.Popen, log_path: Path, echo: bool) -> None:
    """Copy the run's output to its log (colour codes stripped) and, with ``echo``, to the console (coloured
    only when it is a terminal)."""
    assert process.stdout is not None
    colour = sys.stdout.isatty()
    with log_path.open("a", encoding="utf-8") as log:
        for line in process.stdout:
            plain = strip_ansi(line)
            log.write(plain)
            log.flush()
            if echo and _NOISE not in line:
                sys.stdout.write(line if colour else plain)
                sys.stdout.flush()


def run_flower_simulation(
    run_dir: str | os.PathLike,
    run_config: Mapping[str, Any],
    num_supernodes: int,
    *,
    cpus_per_site: int = 1,
    gpus_per_site: float = 0.0,
    ray_cpus: int | None = None,
    ray_address: str | None = None,
    echo: bool = True,
) -> FlowerResult:
    """Run the ServerApp and ``num_supernodes`` virtual ClientApps with ``run_config`` (see module docstring).

    ``cpus_per_site`` is a whole number (Flower 1.42 sends it as an integer); ``ray_cpus`` tells Ray how
    many CPUs to schedule (None: the machine's), e.g. more than the machine has so that all sites run at
    once and time-share the cores. ``ray_address``: run the virtual sites on the existing Ray cluster there
    (``HOST:PORT`` of its head, as ``ray start --address`` takes it); None: a private Ray on this machine.

    Raises:
        ValueError: bad ``num_supernodes`` / resources, or ``ray_cpus`` together with ``ray_address``.
        SimulationError: the SuperLink did not start.
    """
    if ray_address is not None and ray_cpus is not None:
        raise ValueError("ray_cpus sizes a private Ray instance: Ray refuses num_cpus when it joins the cluster "
                         f"at {ray_address!r}")
    if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int) or num_supernodes < 1:
        raise ValueError(f"num_supernodes must be an int >= 1, got {num_supernodes!r}")
    if isinstance(cpus_per_site, bool) or not isinstance(cpus_per_site, int) or cpus_per_site < 1:
        raise ValueError(f"cpus-per-site must be a whole number >= 1, got {cpus_per_site!r}")
    if gpus_per_site < 0:
        raise ValueError(f"gpus-per-site must be >= 0, got {gpus_per_site!r}")
    root = Path(run_dir).resolve() / FLOWER_DIR
    app_dir, home, logs = root / "app", root / "home", Path(run_dir).resolve() / "logs"
    for folder in (app_dir, home, logs):
        folder.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(app_pyproject(run_config), encoding="utf-8")
    http_port, control_port = free_port(), free_port()
    (home / "config.toml").write_text(_flwr_home_config(f"127.0.0.1:{http_port}"), encoding="utf-8")
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_DEDUP_LOGS": "0",
        RAY_ADDRESS_ENV: ray_address or LOCAL_RAY,  # read by ray.init in Flower's simulation process
        # the SuperLink starts flower-superexec and flwr-simulation by name: this environment's scripts first
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    superlink_cmd = [
        _bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
        "--disable-runtime-dependency-installation",
        "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", str(http_port),
    ]
    log_path = logs / "flower.log"
    superlink_log = (logs / "superlink.log").open("a", encoding="utf-8")
    logger.info("starting the Flower SuperLink (simulation) on 127.0.0.1:%d; Ray: %s", http_port,
                f"the cluster at {ray_address}" if ray_address else "a private instance")
    superlink = subprocess.Popen(
        superlink_cmd, env=env, cwd=str(root), stdout=superlink_log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    start = time.monotonic()
    with _raise_on_sigterm():
        federation = _federation_config(num_supernodes, cpus_per_site, gpus_per_site, ray_cpus)
        code = _run(superlink, http_port, app_dir, env, root, log_path, logs, federation, echo, superlink_log)
    return FlowerResult(code, time.monotonic() - start, log_path)


def _run(superlink: subprocess.Popen, http_port: int, app_dir: Path, env: dict[str, str], root: Path,
         log_path: Path, logs: Path, federation: str, echo: bool, superlink_log: Any) -> int:
    """Wait for the SuperLink, run ``flwr run --stream``; always stop both process trees."""
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(http_port):
            if superlink.poll() is not None:
                raise SimulationError(f"flower-superlink exited with code {superlink.returncode}; see {logs}")
            if time.monotonic() > deadline:
                raise SimulationError(
                    f"flower-superlink did not answer within {STARTUP_TIMEOUT_S:g} s; see {logs}"
                )
            time.sleep(0.2)
        run_cmd = [
            _bin("flwr"), "run", str(app_dir), CONNECTION,
            "--federation-config", federation, "--stream",
        ]
        logger.info("flwr run --federation-config '%s'", federation)
        flwr = subprocess.Popen(
            run_cmd, env=env, cwd=str(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            encoding="utf-8", errors="replace",
            start_new_session=True,
        )
        try:
            _pump(flwr, log_path, echo)
            code = flwr.wait()
        finally:
            if flwr.poll() is None:
                stop_process_tree(flwr)
    finally:
        stop_process_tree(superlink)
        superlink_log.close()
    return code
