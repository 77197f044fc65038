"""The server side of a deployment with Flower's own engine: ``flower-superlink`` as a child process,
SuperNode registration, and submission of our run with ``flwr run``.

Everything runs through Flower's console scripts (``flower-superlink``, ``flwr``), never through the
deprecated ``start_server``. The pieces are typed functions that tests call directly:

- :func:`start_superlink` starts the SuperLink in its own process group (TLS with the files of
  ``hermes-server keys`` unless ``tls=None``; optional SuperNode authentication; optional ``--database``;
  always ``--disable-runtime-dependency-installation``) and writes the connection into a private
  ``FLWR_HOME/config.toml`` (never the user's ``~/.flwr``). It returns a :class:`SuperLinkHandle` whose
  :meth:`~SuperLinkHandle.stop` ends the whole process group by PID.
- :meth:`SuperLinkHandle.register_supernode` runs ``flwr supernode register KEY.pub <connection> --name``.
- :func:`stage_app` writes the Flower App that ``flwr run`` ships: the ``hermes_model``, ``server`` and
  ``client`` sources plus a ``pyproject.toml`` whose ``[tool.flwr.app.config]`` holds the full run
  config (the SuperLink refuses ``--run-config`` keys the app's pyproject does not declare, and an
  installed package has no pyproject at all). :meth:`SuperLinkHandle.submit_run` then runs
  ``flwr run <app dir> <connection>``.
- :func:`launch` is ``hermes-server start``: all of the above, the run's logs streamed with
  ``flwr log --stream``, and the SuperLink stopped when the run ends, on Ctrl-C or on SIGTERM.

Layout under the server's run directory::

    <run_dir>/superlink/flwr-home/config.toml   the connection (FLWR_HOME of the SuperLink and the CLI)
    <run_dir>/superlink/app/                    the staged Flower App (rewritten at every start)
    <run_dir>/superlink/superlink.log           the SuperLink's output
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

import tomli_w

from hermes_model.daemon_env import daemon_env, strip_ansi
from server.config import ServerConfig

logger = logging.getLogger(__name__)

CONNECTION = "hermes"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
APP_PACKAGES = ("hermes_model", "server", "client")
APP_SUFFIXES = (".py", ".yaml", ".yml", ".json")
SERVERAPP, CLIENTAPP = "server.app:app", "client.app:app"
PUBLISHER = "hermes-fl"
STATUS_COMPLETED = "finished:completed"
LAUNCH_DIR = "superlink"


class LaunchError(RuntimeError):
    """A Flower process or command failed (the message names it and points to its log)."""


# ------------------------------------------------------------------------------------------ processes
def flower_executable(name: str) -> str:
    """The path of a Flower console script: beside the running Python first, then on ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise LaunchError(f"{name!r} not found beside {sys.executable} nor on PATH; install flwr")
    return found


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process started from this Python environment (see ``daemon_env``)."""
    return daemon_env(Path(flower_executable("flwr")).parent, flwr_home, extra)


def proc_table() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (parent pid, process group, state, start time) of every process (Linux ``/proc``)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
            table[int(entry.parent.name)] = (int(fields[1]), int(fields[2]), fields[0], int(fields[19]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def process_tree(root: int, group: int | None = None,
                 table: Mapping[int, tuple[int, int, str, int]] | None = None) -> dict[int, int]:
    """Live (not zombie) processes descending from ``root`` (itself included) or in process group
    ``group``: pid -> start time. Flower's SuperLink starts its SuperExec in a NEW session, so a process
    group alone does not hold everything a daemon started. ``table``: a :func:`proc_table` to reuse."""
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    if group is not None:
        found |= {pid for pid, (_pp, pgid, _st, _t) in table.items() if pgid == group}
    return {pid: table[pid][3] for pid in found if table[pid][2] != "Z"}


def signal_processes(processes: Mapping[int, int], sig: int) -> None:
    """Send ``sig`` to each pid of ``processes`` (pid -> start time) that is still that same process."""
    table = proc_table()
    for pid, started in processes.items():
        if pid in table and table[pid][3] == started and table[pid][2] != "Z":
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def live(processes: Mapping[int, int]) -> list[int]:
    """The pids of ``processes`` (pid -> start time) still running as the same process."""
    table = proc_table()
    return sorted(p for p, t in processes.items() if p in table and table[p][3] == t and table[p][2] != "Z")


class ManagedProcess:
    """A child process in its own session, stopped by PID together with everything it started.

    Flower's daemons start helpers (SuperExec, ServerApp and ClientApp processes), some in sessions of
    their own: :meth:`stop` and :meth:`kill` signal the process group and every descendant recorded
    before the signal, and wait until none is left.
    """

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        cwd: Path | None = None,
        log_path: Path | None = None,
        plain_to: TextIO | None = None,
    ) -> None:
        """``log_path``: the output's file; else ``plain_to``: a stream that gets the output without colour
        codes (Flower colours its log levels even into a pipe); else this process's terminal."""
        self.args = list(args)
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        out = self._log if self._log is not None else (subprocess.PIPE if plain_to is not None else None)
        self.popen = subprocess.Popen(
            self.args,
            env=dict(env),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        if self._log is None and plain_to is not None:
            threading.Thread(target=_copy_plain, args=(self.popen.stdout, plain_to), daemon=True).start()
        self.pid = self.popen.pid
        self.pgid = self.pid  # start_new_session: the child leads its own group
        self._seen: dict[int, int] = {}

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` seconds for the process to exit; its exit status or ``None``."""
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        """The process's output so far (empty when it writes to the terminal)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def members(self) -> list[int]:
        """PIDs of this process and of everything it started that still runs (also seen earlier)."""
        self._seen.update(process_tree(self.pid, self.pgid))
        return live(self._seen)

    def _signal_all(self, sig: int) -> None:
        self.members()
        signal_processes(self._seen, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def terminate(self) -> None:
        """SIGTERM to the process and everything it started, without waiting (:meth:`stop` waits)."""
        if self.alive():
            self._signal_all(signal.SIGTERM)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM to all, SIGKILL after ``timeout_s``; then SIGKILL to anything left. Idempotent."""
        if self.alive():
            self._signal_all(signal.SIGTERM)
            if self.wait(timeout_s) is None:
                logger.warning("%s (pid %d) ignored SIGTERM for %g s: killing it", self.args[0], self.pid,
                               timeout_s)
                self._signal_all(signal.SIGKILL)
                self.wait(10.0)
        self._reap()
        return self.returncode

    def kill(self) -> int | None:
        """SIGKILL to the process and everything it started at once (a crash, as tests simulate one)."""
        self._signal_all(signal.SIGKILL)
        self.wait(10.0)
        self._reap()
        return self.returncode

    def _reap(self) -> None:
        grace, deadline = time.monotonic() + 2.0, time.monotonic() + 10.0
        while self.members() and time.monotonic() < deadline:
            if time.monotonic() > grace:  # helpers get 2 s to exit on their own once their parent is gone
                self._signal_all(signal.SIGKILL)
            time.sleep(0.2)
        left = self.members()
        if left:
            logger.error("processes of %s still running after SIGKILL: %s", Path(self.args[0]).name, left)
        if self._log is not None:
            self._log.close()
            self._log = None


def _copy_plain(source: IO[bytes], sink: TextIO) -> None:
    """Copy a child's output lines to ``sink`` without colour codes until it ends."""
    for raw in source:
        with contextlib.suppress(OSError, ValueError):
            sink.write(strip_ansi(raw.decode("utf-8", errors="replace")))
            sink.flush()


def wait_for_port(host: str, port: int, process: ManagedProcess, timeout_s: float) -> None:
    """Wait until ``host:port`` accepts TCP connections while ``process`` runs.

    Raises:
        LaunchError: the process exited, or the port stayed closed for ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():
            raise LaunchError(
                f"{Path(process.args[0]).name} exited with status {process.returncode} before listening on "
                f"{host}:{port}; see {process.log_path}:\n{process.log_text()[-2000:]}"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        time.sleep(0.2)
    raise LaunchError(f"nothing listens on {host}:{port} after {timeout_s:g} s; see {process.log_path}")


# ------------------------------------------------------------------------------------------ TLS files
@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's certificate files, as ``hermes-server keys`` writes them."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def from_keys_dir(cls, keys_dir: str | os.PathLike) -> TlsFiles:
        """``ca.crt``, ``server.crt`` and ``server.key`` of ``keys_dir`` (absolute paths).

        Raises:
            ValueError: a file is missing.
        """
        root = Path(keys_dir).resolve()
        files = cls(root / "ca.crt", root / "server.crt", root / "server.key")
        missing = [str(p) for p in (files.ca_cert, files.server_cert, files.server_key) if not p.is_file()]
        if missing:
            raise ValueError(
                f"--keys {str(root)!r} lacks {missing}; make them with 'hermes-server keys --out {root} "
                "--site SITE ...' or pass --insecure"
            )
        return files


# ------------------------------------------------------------------------------------------ the SuperLink
def write_connection(
    flwr_home: Path, address: str, root_certificates: Path | None, name: str = CONNECTION
) -> Path:
    """Write ``flwr_home/config.toml`` with one SuperLink connection (the default one) and return it.

    ``root_certificates=None`` makes an insecure (plain HTTP) connection.
    """
    connection: dict[str, Any] = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": name, name: connection}}), encoding="utf-8")
    return path


@dataclass
class SuperLinkHandle:
    """A running ``flower-superlink`` and the private ``FLWR_HOME`` of the ``flwr`` commands for it."""

    process: ManagedProcess
    host: str
    port: int
    flwr_home: Path
    tls: bool
    connection: str = CONNECTION
    registered: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """``host:port`` that SuperNodes and the CLI dial on this machine."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{host}:{self.port}"

    def __enter__(self) -> SuperLinkHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """Stop the SuperLink and everything it started (ServerApp, SuperExec) by process group."""
        return self.process.stop(timeout_s)

    def alive(self) -> bool:
        return self.process.alive()

    @property
    def pid(self) -> int:
        return self.process.pid

    def members(self) -> list[int]:
        """PIDs of the SuperLink and of everything it started that still runs (SuperExec, ServerApp)."""
        return self.process.members()

    def terminate(self) -> None:
        """SIGTERM to the SuperLink's process group without waiting (then :meth:`stop`)."""
        self.process.terminate()

    # -- the flwr CLI ------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS...`` against this SuperLink's ``FLWR_HOME`` (output captured)."""
        return subprocess.run(
            [flower_executable("flwr"), *args],
            env=flower_env(self.flwr_home),
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def flwr_json(self, *args: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Run ``flwr ARGS... --format json``; its JSON answer.

        Raises:
            LaunchError: the command failed or did not answer ``"success": true``.
        """
        done = self.flwr(*args, "--format", "json", timeout_s=timeout_s)
        try:
            answer = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            answer = {}
        if done.returncode != 0 or not answer.get("success"):
            message = answer.get("error-message") or (done.stderr or done.stdout)[-1500:]
            raise LaunchError(f"'flwr {' '.join(args)}' failed (status {done.returncode}): {message}")
        return answer

    def register_supernode(self, public_key: str | os.PathLike, name: str) -> int | None:
        """Register a site's public key (``flwr supernode register KEY.pub <connection> --name NAME``).

        Returns the node id the SuperLink assigned, or ``None`` when the key was registered before (a
        SuperLink restarted on its ``--database``).
        """
        key = Path(public_key).resolve()
        if not key.is_file():
            raise ValueError(f"site public key {str(key)!r} does not exist")
        try:
            answer = self.flwr_json("supernode", "register", str(key), self.connection, "--name", name)
        except LaunchError as exc:
            if "already in use" not in str(exc):
                raise
            logger.info("site %r: public key %s was registered before", name, key.name)
            return None
        node_id = int(answer["node-id"])
        self.registered[name] = node_id
        logger.info("registered site %r (public key %s) as SuperNode %d", name, key.name, node_id)
        return node_id

    def list_supernodes(self) -> list[dict[str, Any]]:
        """``flwr supernode ls``: one dict per registered SuperNode (``node-id``, ``status``, ...)."""
        return list(self.flwr_json("supernode", "ls", self.connection).get("nodes", []))

    def submit_run(self, app_dir: str | os.PathLike, run_config: Mapping[str, Any] | None = None) -> int:
        """``flwr run APP_DIR <connection> [--run-config ...]``; the run id.

        ``run_config`` values override the app's ``[tool.flwr.app.config]`` (which must declare each key).
        """
        args = ["run", str(Path(app_dir).resolve()), self.connection]
        if run_config:
            args += ["--run-config", format_run_config(run_config)]
        return int(self.flwr_json(*args)["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        """``flwr ls --run-id RUN_ID``: the run's ``status``, ``status-details``, ``network-traffic``..."""
        runs = self.flwr_json("ls", self.connection, "--run-id", str(run_id)).get("runs", [])
        if not runs:
            raise LaunchError(f"the SuperLink knows no run {run_id}")
        return dict(runs[0])

    def stop_run(self, run_id: int) -> None:
        """``flwr stop RUN_ID`` (errors are logged: the run may already be over)."""
        done = self.flwr("stop", str(run_id), self.connection, timeout_s=30.0)
        if done.returncode != 0:
            logger.warning("flwr stop %d: %s", run_id, (done.stderr or done.stdout).strip()[-300:])

    def wait_for_run(self, run_id: int, timeout_s: float, poll_s: float = 2.0) -> dict[str, Any]:
        """Poll until the run's status starts with ``finished``; its last :meth:`run_info`.

        Raises:
            LaunchError: the SuperLink died, or the run did not finish within ``timeout_s`` seconds.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise LaunchError(
                    f"the SuperLink exited (status {self.process.returncode}) during run {run_id}; "
                    f"see {self.process.log_path}"
                )
            info = self.run_info(run_id)
            if str(info.get("status", "")).startswith("finished"):
                return info
            if time.monotonic() >= deadline:
                raise LaunchError(f"run {run_id} still {info.get('status')!r} after {timeout_s:g} s")
            time.sleep(poll_s)

    def stream_logs(self, run_id: int) -> ManagedProcess:
        """``flwr log RUN_ID <connection> --stream`` writing to this process's standard output (colour codes
        only when it is a terminal)."""
        args = [flower_executable("flwr"), "log", str(run_id), self.connection, "--stream"]
        plain = None if sys.stdout.isatty() else sys.stdout
        return ManagedProcess(args, env=flower_env(self.flwr_home), plain_to=plain)


def superlink_command(
    host: str, port: int, tls: TlsFiles | None, supernode_auth: bool, database: Path | None
) -> list[str]:
    """The ``flower-superlink`` command line (runtime dependency installation always disabled)."""
    args = [flower_executable("flower-superlink"), "--host", host, "--port", str(port)]
    if tls is None:
        args.append("--insecure")
    else:
        args += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                 "--ssl-keyfile", str(tls.server_key)]
    if supernode_auth:
        args.append("--enable-supernode-auth")
    if database is not None:
        args += ["--database", str(Path(database).resolve())]
    args.append("--disable-runtime-dependency-installation")
    return args


def start_superlink(
    work_dir: str | os.PathLike,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    tls: TlsFiles | None = None,
    supernode_auth: bool = False,
    database: str | os.PathLike | None = None,
    ready_timeout_s: float = 60.0,
    log_path: str | os.PathLike | None = None,
) -> SuperLinkHandle:
    """Start ``flower-superlink`` in its own process group and wait until it listens.

    Args:
        work_dir: its working directory; ``FLWR_HOME`` (apps, ``config.toml``) is ``work_dir/flwr-home``.
        host, port: the address it serves everything on (Fleet, Control, Runtime: one HTTP(S) port).
        tls: certificate files; ``None`` runs without TLS (``--insecure``).
        supernode_auth: only SuperNodes whose public key was registered may connect (needs TLS).
        database: SQLite file of its state (``None``: in memory).
        log_path: its output (default ``work_dir/superlink.log``).

    Raises:
        ValueError: SuperNode authentication without TLS, or a bad port.
        LaunchError: it exited or did not listen within ``ready_timeout_s``.
    """
    if supernode_auth and tls is None:
        raise ValueError("SuperNode authentication needs TLS: drop --insecure or --enable-supernode-auth")
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    work = Path(work_dir).resolve()
    flwr_home = work / "flwr-home"
    log = Path(log_path).resolve() if log_path is not None else work / "superlink.log"
    args = superlink_command(host, port, tls, supernode_auth, Path(database) if database else None)
    process = ManagedProcess(args, env=flower_env(flwr_home), cwd=work, log_path=log)
    handle = SuperLinkHandle(process, host, port, flwr_home, tls=tls is not None)
    try:
        write_connection(flwr_home, handle.address, tls.ca_cert if tls else None)
        wait_for_port(handle.address.rsplit(":", 1)[0], port, process, ready_timeout_s)
    except BaseException:
        handle.stop()
        raise
    logger.info("SuperLink (pid %d) listening on %s (%s)", process.pid, handle.address,
                "TLS" + (" + SuperNode auth" if supernode_auth else "") if tls else "insecure")
    return handle


# ------------------------------------------------------------------------------------------ the app
def format_run_config(run_config: Mapping[str, Any]) -> str:
    """``key=value`` pairs as ``--run-config`` wants them (TOML values, strings quoted)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError(f"package {name!r} is not importable; is hermes-fl installed?")
    return Path(list(spec.submodule_search_locations)[0])


def _project_table() -> dict[str, Any]:
    try:
        meta = importlib.metadata.metadata("hermes-fl")
        version, summary = meta["Version"], meta["Summary"] or "Federated Hermes"
    except importlib.metadata.PackageNotFoundError:
        version, summary = "0.1.0", "Federated Hermes"
    return {"name": "hermes-fl", "version": version, "description": summary, "license": "Apache-2.0"}


def stage_app(
    dest: str | os.PathLike,
    run_config: Mapping[str, Any],
    *,
    serverapp: str = SERVERAPP,
    clientapp: str = CLIENTAPP,
    packages: Sequence[str] = APP_PACKAGES,
    extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """Write the Flower App that ``flwr run`` ships to ``dest`` (replaced if present); returns ``dest``.

    It holds the sources (``.py``/``.yaml``/``.json``) of ``packages`` as installed, ``extra_files``
    (relative name -> file) and a ``pyproject.toml`` with ``[tool.flwr.app]``: the components and
    ``run_config`` as ``[tool.flwr.app.config]``. Data and weights never go in (Flower caps an app at
    10 MB).
    """
    root = Path(dest).resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for name in packages:
        source = _package_dir(name)
        for path in sorted(source.rglob("*")):
            if path.is_file() and path.suffix in APP_SUFFIXES and "__pycache__" not in path.parts:
                target = root / name / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    for rel, path in (extra_files or {}).items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    pyproject = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": _project_table(),
        "tool": {"flwr": {"app": {
            "publisher": PUBLISHER,
            "components": {"serverapp": serverapp, "clientapp": clientapp},
            "config": dict(run_config),
        }}},
    }
    (root / "pyproject.toml").write_text(tomli_w.dumps(pyproject), encoding="utf-8")
    return root


def resolve_config_paths(config: ServerConfig, base_dir: str | os.PathLike) -> ServerConfig:
    """``run-dir``, ``initial-weights`` and ``catalog`` made absolute (relative ones are relative to
    ``base_dir``, the server yaml's folder): the ServerApp runs in another process and directory."""
    base = Path(base_dir).resolve()
    updates: dict[str, Any] = {"run_dir": str((base / config.run_dir).resolve())}
    for key in ("initial_weights", "catalog"):
        value = getattr(config, key)
        if value:
            updates[key] = str((base / value).resolve())
    return config.model_copy(update=updates)


# ----------------------------------------------------------------------------------- hermes-server start
@dataclass(frozen=True)
class LaunchOptions:
    """What ``hermes-server start`` needs besides the server config."""

    keys_dir: Path | None = None  # None: insecure
    supernode_auth: bool = False
    site_keys: tuple[Path, ...] = ()  # public keys to register; default: <keys>/sites/*.pub
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    database: Path | None = None
    stream_logs: bool = True
    run_timeout_s: float = 30 * 24 * 3600.0
    poll_s: float = 10.0  # run status checks (each one is a short `flwr ls` process)


def site_public_keys(options: LaunchOptions) -> list[Path]:
    """The public keys to register: ``options.site_keys``, else every ``<keys>/sites/*.pub``."""
    if options.site_keys:
        return [Path(p) for p in options.site_keys]
    if options.keys_dir is None:
        return []
    return sorted((Path(options.keys_dir) / "sites").glob("*.pub"))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while launching, so the children are stopped either way."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch(config: ServerConfig, options: LaunchOptions) -> dict[str, Any]:
    """Start the SuperLink, register the sites' keys, submit the run, follow it, stop the SuperLink.

    ``config`` must hold absolute paths (:func:`resolve_config_paths`). Returns the run's final
    :meth:`SuperLinkHandle.run_info` (``status`` ``finished:completed`` on success).
    """
    tls = TlsFiles.from_keys_dir(options.keys_dir) if options.keys_dir is not None else None
    keys = site_public_keys(options) if options.supernode_auth else []
    if options.supernode_auth and not keys:
        raise ValueError("--enable-supernode-auth needs site public keys (--site-key or <keys>/sites/*.pub)")
    work = Path(config.run_dir) / LAUNCH_DIR
    app_dir = stage_app(work / "app", config.to_run_config())
    with _sigterm_as_interrupt():
        link = start_superlink(work, host=options.host, port=options.port, tls=tls,
                               supernode_auth=options.supernode_auth, database=options.database)
        streamer: ManagedProcess | None = None
        run_id: int | None = None
        try:
            for key in keys:
                link.register_supernode(key, key.stem)
            run_id = link.submit_run(app_dir)
            logger.info("run %d submitted; sites connect with: hermes-client start --site SITE.yaml "
                        "--server %s:%d", run_id, "<this host>", options.port)
            streamer = link.stream_logs(run_id) if options.stream_logs else None
            info = link.wait_for_run(run_id, options.run_timeout_s, options.poll_s)
            time.sleep(1.0 if streamer is not None else 0.0)  # let the log stream print its tail
            return info
        except KeyboardInterrupt:
            if run_id is not None and link.alive():
                link.stop_run(run_id)
            raise
        finally:
            if streamer is not None:
                streamer.stop(5.0)
            link.stop()
