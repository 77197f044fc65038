"""The site side of a deployment: one ``flower-supernode`` per site, started and stopped by PID.

:func:`start_supernode` starts ``flower-supernode`` for a site config in its own process group with

- ``--superlink HOST:PORT`` (the server's address);
- ``--node-config 'site-config="<absolute path of the site yaml>"'``, which the ClientApp reads
  (``client.app.site_config_path``);
- TLS with the federation's CA certificate (``--root-certificates``; ``insecure=True`` turns TLS off);
- SuperNode authentication with the site's private key (``--auth-supernode-private-key``) when given:
  the server must have registered the matching public key, else the SuperLink refuses the node;
- its own ``--port`` for the ClientApp runtime API (default 9094; two SuperNodes on one host need two
  ports) and its own ``FLWR_HOME`` under the site's ``work_dir``.

Root certificate and key come from the site config (``root_certificates``, ``auth_private_key``) unless
given as arguments. The returned :class:`SuperNodeHandle` stops the SuperNode and its ClientApp
processes together (:meth:`~SuperNodeHandle.stop`), or kills them at once (:meth:`~SuperNodeHandle.kill`).

:class:`SuperNodeSupervisor` (``hermes-client start``; built by :func:`supervise_supernode`) keeps a site's
SuperNode running: it reads the SuperNode's output (still shown on the console and written to the log file),
says in one line what died and why when the SuperNode exits, restarts it with bounded exponential backoff
(:class:`RestartPolicy`), and explains Flower's terse connection failures (:func:`classify_line`): an
activation refused because the SuperLink still holds the session of the SuperNode that just died versus a
key that is not registered, a server that requires TLS (or does not use it), a server that is not there.

This module deliberately does not import ``server`` (the two sides share only ``hermes_model``), so its
small process helper mirrors the server's.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, TextIO

from client.config import REFUSAL_FILE, SiteConfig, load_site_config
from hermes_model.daemon_env import daemon_env, strip_ansi

logger = logging.getLogger(__name__)

DEFAULT_CLIENTAPP_PORT = 9094
SITE_CONFIG_KEY = "site-config"  # must equal client.app.SITE_CONFIG_KEY (not imported: it pulls in torch)


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name!r} not found beside {sys.executable} nor on PATH; install flwr")
    return found


def _proc_table() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (parent pid, process group, state, start time) of every process (Linux ``/proc``)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
            table[int(entry.parent.name)] = (int(fields[1]), int(fields[2]), fields[0], int(fields[19]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def _descendants(root: int, table: Mapping[int, tuple[int, int, str, int]]) -> set[int]:
    """``root`` (if it exists), the members of its process group and all their descendants."""
    found = {pid for pid, row in table.items() if row[1] == root} | ({root} if root in table else set())
    while True:
        more = {pid for pid, row in table.items() if row[0] in found} - found
        if not more:
            return found
        found |= more


@dataclass
class SuperNodeHandle:
    """A running ``flower-supernode`` (its own session) and what it started (SuperExec, ClientApps)."""

    popen: subprocess.Popen
    site: str
    superlink: str
    port: int
    log_path: Path | None
    _log: IO[bytes] | None = None
    _seen: dict[int, int] = field(default_factory=dict)
    _reader: threading.Thread | None = None  # pumps piped output to the log file and a callback

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` seconds for the SuperNode to exit; its exit status or ``None``."""
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def members(self) -> list[int]:
        """PIDs of the SuperNode and of everything it started that still runs (also seen earlier)."""
        table = _proc_table()
        self._seen.update({pid: table[pid][3] for pid in _descendants(self.pid, table)})
        same = (p for p, t in self._seen.items() if p in table and table[p][3] == t)
        return sorted(p for p in same if table[p][2] != "Z")

    def _signal(self, sig: int) -> None:
        for pid in self.members():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def terminate(self) -> None:
        """SIGTERM to the SuperNode and its helpers without waiting (then :meth:`stop`)."""
        if self.alive():
            self._signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (the SuperNode deregisters cleanly), SIGKILL after ``timeout_s``; then SIGKILL to any
        ClientApp left. Idempotent."""
        if self.alive():
            self._signal(signal.SIGTERM)
            if self.wait(timeout_s) is None:
                logger.warning("SuperNode of site %r ignored SIGTERM for %g s: killing it", self.site,
                               timeout_s)
                self._signal(signal.SIGKILL)
                self.wait(10.0)
        self._reap()
        return self.returncode

    def kill(self) -> int | None:
        """SIGKILL to the SuperNode and its helpers at once (a crashed site)."""
        self._signal(signal.SIGKILL)
        self.wait(10.0)
        self._reap()
        return self.returncode

    def _reap(self) -> None:
        grace, deadline = time.monotonic() + 2.0, time.monotonic() + 10.0
        while self.members() and time.monotonic() < deadline:
            if time.monotonic() > grace:  # helpers get 2 s to exit on their own once the SuperNode is gone
                self._signal(signal.SIGKILL)
            time.sleep(0.2)
        if self._reader is not None:  # the pipe ends once every process holding it is gone
            self._reader.join(timeout=5.0)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> SuperNodeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _key_file(value: str | os.PathLike | None, fallback: Path | None, what: str) -> Path | None:
    path = Path(value).resolve() if value is not None else fallback
    if path is not None and not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    return path


def supernode_command(
    config_path: Path,
    superlink: str,
    *,
    root_certificates: Path | None,
    auth_private_key: Path | None,
    port: int,
    max_retries: int | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line of one site (``root_certificates=None``: ``--insecure``)."""
    args = [_executable("flower-supernode"), "--superlink", superlink, "--port", str(port),
            "--node-config", f'{SITE_CONFIG_KEY}="{config_path}"']
    args += ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    if auth_private_key is not None:
        args += ["--auth-supernode-private-key", str(auth_private_key)]
    if max_retries is not None:
        args += ["--max-retries", str(max_retries)]
    return args


def _check_address(superlink: str) -> None:
    host, sep, port = superlink.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--server must be HOST:PORT (e.g. 10.0.0.5:8000), got {superlink!r}")


def _pump(stream: IO[bytes], log: IO[bytes] | None, on_line: Callable[[str], None]) -> None:
    """Read a child's output line by line until it ends: each line (colour codes stripped) to ``log``, each
    line as printed (colour codes kept, no newline) to ``on_line``."""
    for raw in iter(stream.readline, b""):
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if log is not None:
            with contextlib.suppress(ValueError, OSError):  # closed by the handle after a long wait
                log.write((strip_ansi(text) + "\n").encode("utf-8"))
                log.flush()
        try:
            on_line(text)
        except Exception:  # a faulty callback must not stop the pump (the child would block on a full pipe)
            logger.exception("output callback failed on %r", text)
    stream.close()


def launch_process(
    args: list[str],
    *,
    site: str,
    superlink: str,
    port: int,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    log_path: str | os.PathLike | None = None,
    on_line: Callable[[str], None] | None = None,
) -> SuperNodeHandle:
    """Start ``args`` as a SuperNode in its own session and return its handle.

    Output: with ``on_line`` it is piped through this process (each line to ``on_line`` and, colour codes
    stripped, appended to ``log_path``); without, appended to ``log_path``, or this process's terminal when
    ``log_path`` is ``None``.
    """
    log = Path(log_path).resolve() if log_path is not None else None
    stream: IO[bytes] | None = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        stream = open(log, "ab")  # noqa: SIM115 - closed by the handle
    if on_line is None:
        out: int | IO[bytes] | None = stream
        err: int | None = subprocess.STDOUT if stream is not None else None
    else:
        out, err = subprocess.PIPE, subprocess.STDOUT
        env = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
    popen = subprocess.Popen(args, env=None if env is None else dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=err, start_new_session=True)
    handle = SuperNodeHandle(popen, site, superlink, port, log, stream)
    if on_line is not None:
        assert popen.stdout is not None
        handle._reader = threading.Thread(target=_pump, args=(popen.stdout, stream, on_line),
                                          name=f"supernode-output-{popen.pid}", daemon=True)
        handle._reader.start()
    return handle


@dataclass(frozen=True)
class SuperNodePlan:
    """Everything needed to start one site's SuperNode, checked once (:func:`plan_supernode`)."""

    site: str
    superlink: str
    port: int
    args: list[str]
    env: dict[str, str]
    work_dir: Path
    root_certificates: Path | None  # None: --insecure
    auth_private_key: Path | None


def plan_supernode(
    site_config: str | os.PathLike | SiteConfig,
    superlink: str,
    *,
    insecure: bool = False,
    root_certificates: str | os.PathLike | None = None,
    auth_private_key: str | os.PathLike | None = None,
    port: int = DEFAULT_CLIENTAPP_PORT,
    max_retries: int | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> SuperNodePlan:
    """Check the arguments of :func:`start_supernode` and build the command line and environment.

    Raises:
        ValueError: an invalid site config, address, port or missing key file.
    """
    config = site_config if isinstance(site_config, SiteConfig) else load_site_config(site_config)
    if config.config_path is None:
        raise ValueError("the site config must come from a yaml file (the ClientApp reads that file)")
    _check_address(superlink)
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    root = None if insecure else _key_file(root_certificates, config.root_certificates, "root certificate")
    if root is None and not insecure:
        raise ValueError(
            "TLS needs the federation's CA certificate: set root_certificates in the site config or pass "
            "--root-certificates (or --insecure against an insecure SuperLink)"
        )
    key = _key_file(auth_private_key, config.auth_private_key, "auth private key")
    args = supernode_command(config.config_path, superlink, root_certificates=root, auth_private_key=key,
                             port=port, max_retries=max_retries)
    work = config.work_dir
    env = daemon_env(Path(args[0]).parent, work / "flwr-home", {**thread_env(config), **(extra_env or {})})
    return SuperNodePlan(config.site, superlink, port, args, env, work, root, key)


def thread_env(config: SiteConfig) -> dict[str, str]:
    """``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` of the site's ``training.threads`` (empty when unset), so
    that the ClientApp processes start with the site's share of the cores (two sites on one machine would
    otherwise both use every core and slow each other down several times)."""
    threads = config.training.threads
    return {} if threads is None else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def start_planned(plan: SuperNodePlan, log_path: str | os.PathLike | None = None,
                  on_line: Callable[[str], None] | None = None) -> SuperNodeHandle:
    """Start the SuperNode of ``plan`` (see :func:`launch_process` for ``log_path`` and ``on_line``)."""
    plan.work_dir.mkdir(parents=True, exist_ok=True)
    handle = launch_process(plan.args, site=plan.site, superlink=plan.superlink, port=plan.port, env=plan.env,
                            cwd=plan.work_dir, log_path=log_path, on_line=on_line)
    logger.info("SuperNode of site %r (pid %d) dials %s (%s%s), ClientApp port %d", plan.site, handle.pid,
                plan.superlink, "insecure" if plan.root_certificates is None else "TLS",
                ", authenticated" if plan.auth_private_key else "", plan.port)
    return handle


def start_supernode(
    site_config: str | os.PathLike | SiteConfig,
    superlink: str,
    *,
    insecure: bool = False,
    root_certificates: str | os.PathLike | None = None,
    auth_private_key: str | os.PathLike | None = None,
    port: int = DEFAULT_CLIENTAPP_PORT,
    log_path: str | os.PathLike | None = None,
    max_retries: int | None = None,
    extra_env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> SuperNodeHandle:
    """Start the SuperNode of one site (see the module docstring).

    Args:
        site_config: the site yaml (validated here, every problem at once) or a loaded config.
        superlink: the SuperLink's ``HOST:PORT``.
        insecure: no TLS (the SuperLink must run ``--insecure`` too).
        root_certificates / auth_private_key: override the site config's files.
        port: the ClientApp runtime API port of this SuperNode (distinct per SuperNode on a host).
        log_path: its output (``None``: this process's terminal).
        max_retries: connection attempts before giving up (``None``: Flower's default, no limit).
        on_line: pipe the output through this process, each line to this callback (and to ``log_path``).

    Raises:
        ValueError: an invalid site config, address, port or missing key file.
    """
    plan = plan_supernode(site_config, superlink, insecure=insecure, root_certificates=root_certificates,
                          auth_private_key=auth_private_key, port=port, max_retries=max_retries,
                          extra_env=extra_env)
    return start_planned(plan, log_path, on_line)


def run_supernode(handle: SuperNodeHandle, poll_s: float = 1.0) -> int:
    """Wait for the SuperNode to exit; on Ctrl-C or SIGTERM stop it (and its ClientApps) by PID first.

    Returns its exit status (0 when stopped on request).
    """

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while handle.alive():
            handle.wait(poll_s)
        status = handle.returncode if handle.returncode is not None else 0
        handle.stop()
        return status
    except KeyboardInterrupt:
        logger.info("stopping the SuperNode of site %r", handle.site)
        handle.stop()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)



# ------------------------------------------------------------------------------------------------ supervision
# A SuperNode asks the SuperLink for a session with a heartbeat interval of 30 s, fixed in flwr 1.42
# (``HEARTBEAT_DEFAULT_INTERVAL``, no option of flower-supernode or flower-superlink), and the SuperLink keeps
# the session for HEARTBEAT_PATIENCE (2) intervals after the last heartbeat: a SuperNode that dies without
# deactivating (SIGKILL, OOM, power loss) leaves its key "online" for up to 60 s, during which the SuperLink
# refuses to activate the same key again ("[code: 2004] Failed to activate SuperNode").
SESSION_HOLD_S = 60.0
# Flower exit codes of flower-supernode that a restart cannot fix (the local configuration must change):
# invalid auth key (302), auth without TLS (303), invalid trusted entities (304), SuperExec secret (401),
# invalid address (600), TLS unsupported / incompatible / bad paths (602-605), version mismatch (606).
EXIT_REFUSED = 3  # hermes-client start: the server refused this site (its reason was printed)
FATAL_FLOWER_EXIT_CODES = frozenset({302, 303, 304, 401, 600, 602, 603, 604, 605, 606})
# Flower API error codes in "[code: N]" lines.
CODE_REGISTRATION_DISABLED = 2001  # the SuperLink authenticates SuperNodes and this one has no key
CODE_ACTIVATION_FAILED = 2004  # key unknown to the SuperLink, or its session is still held
SIGNAL_CAUSES = {
    "SIGKILL": "killed by another process or the out-of-memory killer",
    "SIGTERM": "asked to stop by another process",
    "SIGINT": "interrupted",
    "SIGHUP": "its terminal or session closed",
    "SIGSEGV": "a crash: invalid memory access",
    "SIGBUS": "a crash: bus error",
    "SIGABRT": "aborted, usually by a failed check in native code",
    "SIGFPE": "a crash: arithmetic error",
    "SIGILL": "a crash: illegal instruction",
    "SIGPIPE": "wrote to a closed pipe",
    "SIGXCPU": "exceeded its CPU time limit",
}


class LineKind(enum.Enum):
    """What a line of ``flower-supernode`` output tells the supervisor (see :func:`classify_line`)."""

    ACTIVATED = "activated"  # "SuperNode ID: N": the SuperLink accepted the SuperNode (value: node id)
    RETRYING = "retrying"  # "Connection attempt failed, retrying in ...": no answer (refused, TLS mismatch, ...)
    RECONNECTED = "reconnected"  # "Connection successful after ... tries"
    ACTIVATION_REFUSED = "activation-refused"  # "[code: 2004] Failed to activate SuperNode."
    AUTH_REQUIRED = "auth-required"  # "[code: 2001] SuperNode authentication is enabled. ..."
    API_ERROR = "api-error"  # another "[code: N] ..." (value: N)
    TLS_ERROR = "tls-error"  # "SSL/TLS handshake error detected."
    EXIT = "exit"  # "Exit Code: N" (value: N): the SuperNode is exiting; its reason follows


@dataclass(frozen=True)
class LineInfo:
    kind: LineKind
    value: int | None = None


_LINE_PATTERNS: tuple[tuple[re.Pattern[str], LineKind], ...] = (
    (re.compile(r"SuperNode ID: (\d+)"), LineKind.ACTIVATED),
    (re.compile(r"Connection attempt failed, retrying in"), LineKind.RETRYING),
    (re.compile(r"Connection successful after"), LineKind.RECONNECTED),
    (re.compile(r"SSL/TLS handshake error detected"), LineKind.TLS_ERROR),
    (re.compile(r"Exit Code: (\d+)"), LineKind.EXIT),
    (re.compile(r"\[code: (\d+)\]"), LineKind.API_ERROR),
)


def classify_line(line: str) -> LineInfo | None:
    """What a line of ``flower-supernode`` output (colour codes allowed) says, or ``None`` for anything else.

    The texts are those of flwr 1.42 (``flwr/supernode/start_client_internal.py``,
    ``flwr/supernode/fleet_http_connection.py``, ``flwr/supercore/retry/http_retry.py``,
    ``flwr/supercore/error/catalog.py``).
    """
    text = strip_ansi(line)
    for pattern, kind in _LINE_PATTERNS:
        match = pattern.search(text)
        if match is None:
            continue
        value = int(match.group(1)) if match.groups() else None
        if kind is LineKind.API_ERROR and value == CODE_ACTIVATION_FAILED:
            return LineInfo(LineKind.ACTIVATION_REFUSED, value)
        if kind is LineKind.API_ERROR and value == CODE_REGISTRATION_DISABLED:
            return LineInfo(LineKind.AUTH_REQUIRED, value)
        return LineInfo(kind, value)
    return None


def describe_exit(returncode: int) -> str:
    """A process's exit in words: ``"SIGKILL (killed by another process or the out-of-memory killer)"``,
    ``"exit status 1"``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
        cause = SIGNAL_CAUSES.get(name)
        return f"{name} ({cause})" if cause else name
    return f"exit status {returncode}"


def shell_status(returncode: int) -> int:
    """The exit status a shell reports for ``returncode`` (128 + N when killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}".rstrip("0").rstrip(".")


def _split_address(superlink: str) -> tuple[str, int]:
    host, _, port = superlink.rpartition(":")
    return host.strip("[]"), int(port)


ProbeResult = Literal["closed", "tls", "plain", "unknown"]


def probe_superlink(superlink: str, timeout_s: float = 3.0) -> ProbeResult:
    """Whether ``HOST:PORT`` accepts TCP connections and speaks TLS there.

    ``"closed"``: no TCP connection (nothing listens, unreachable, filtered); ``"tls"``: a TLS handshake
    succeeds (certificate not checked); ``"plain"``: it accepts connections but no TLS handshake (a server
    without TLS answers the handshake with plain HTTP); ``"unknown"``: no answer within ``timeout_s``.
    """
    host, port = _split_address(superlink)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except TimeoutError:
        return "unknown"
    except OSError:
        return "closed"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=host or None):
            return "tls"
    except ssl.SSLError:
        return "plain"
    except TimeoutError:
        return "unknown"
    except OSError:  # reset or closed during the handshake: a plain server hanging up on binary input
        return "plain"
    finally:
        sock.close()


@dataclass(frozen=True)
class RestartPolicy:
    """When the supervisor restarts a SuperNode that stopped without being asked to.

    The k-th consecutive failure waits ``min(initial_delay_s * 2**(k-1), max_delay_s)`` before the restart
    (5, 10, 20, 40, 60, 60 ... s by default); an instance that stayed up ``reset_after_s`` ends the streak.
    At most ``max_restarts`` restarts within any ``window_s`` seconds: one more failure ends supervision.
    """

    enabled: bool = True
    max_restarts: int = 10
    window_s: float = 3600.0
    initial_delay_s: float = 5.0
    max_delay_s: float = 60.0
    reset_after_s: float = 300.0

    def __post_init__(self) -> None:
        problems = []
        if self.max_restarts < 0:
            problems.append(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not self.window_s > 0:
            problems.append(f"window_s must be > 0, got {self.window_s}")
        if not 0 < self.initial_delay_s <= self.max_delay_s:
            problems.append(f"need 0 < initial_delay_s <= max_delay_s, got {self.initial_delay_s} and "
                            f"{self.max_delay_s}")
        if problems:
            raise ValueError("; ".join(problems))

    def delay_s(self, failures: int) -> float:
        """Seconds to wait before restarting after the ``failures``-th consecutive failure (1, 2, ...)."""
        if failures < 1:
            raise ValueError(f"failures counts from 1, got {failures}")
        return min(self.initial_delay_s * 2.0 ** min(failures - 1, 60), self.max_delay_s)


@dataclass
class _Instance:
    """One started SuperNode and what its output said."""

    handle: SuperNodeHandle
    started_at: float
    activated_at: float | None = None
    node_id: int | None = None
    retries: int = 0  # consecutive "Connection attempt failed" lines
    refused: bool = False  # [code: 2004]
    auth_required: bool = False  # [code: 2001]
    tls_error: bool = False
    flower_exit: int | None = None
    reason: list[str] = field(default_factory=list)  # the lines after "Exit Code: N"
    in_exit_block: bool = False


_BOILERPLATE = ("Failed to initialize the connection to the SuperLink.",
                "The SuperNode could not establish a connection to the SuperLink.")


class SuperNodeSupervisor:
    """Runs a site's SuperNode, explains its failures and restarts it (see the module docstring).

    Args:
        launch: starts one SuperNode whose output lines go to the callback it receives (e.g.
            ``lambda on_line: start_planned(plan, log_path, on_line)``).
        site / superlink: for messages; ``superlink`` (``HOST:PORT``) is also probed after failed attempts.
        insecure: the SuperNode connects without TLS.
        auth_private_key / root_certificates: the files used (for messages).
        policy: when to restart.
        echo: where the SuperNode's output is shown (``None``: nowhere; colour codes are stripped unless it
            is a terminal).
        log_path: the SuperNode's log file, where the supervisor's notices are appended too.
        retry_hint_after: connection attempts that fail in a row before the supervisor probes the server and
            says why they may fail.
        session_hold_s: how long the SuperLink holds the session of a SuperNode that died.
        probe: the server probe (:func:`probe_superlink`; replaceable in tests).

    :meth:`run` blocks until the SuperNode is stopped on request (Ctrl-C, SIGTERM or :meth:`stop` from
    another thread: exit status 0) or supervision ends (restarts off, a failure a restart cannot fix, or too
    many restarts: the shell-style status of the last SuperNode, non-zero). :attr:`notices` holds every
    message it gave.
    """

    def __init__(
        self,
        launch: Callable[[Callable[[str], None]], SuperNodeHandle],
        *,
        site: str,
        superlink: str,
        insecure: bool = False,
        auth_private_key: Path | None = None,
        root_certificates: Path | None = None,
        policy: RestartPolicy | None = None,
        echo: TextIO | None = None,
        log_path: Path | None = None,
        retry_hint_after: int = 3,
        session_hold_s: float = SESSION_HOLD_S,
        probe: Callable[[str], ProbeResult] = probe_superlink,
    ) -> None:
        self._launch = launch
        self.site, self.superlink, self.insecure = site, superlink, insecure
        self.auth_private_key, self.root_certificates = auth_private_key, root_certificates
        self.policy = policy if policy is not None else RestartPolicy()
        self.echo = echo
        self._echo_raw = bool(echo is not None and hasattr(echo, "isatty") and echo.isatty())
        self.log_path = log_path
        self.retry_hint_after = retry_hint_after
        self.session_hold_s = session_hold_s
        self._probe = probe
        self.notices: list[str] = []
        self.starts = 0
        self.node_ids: list[int] = []  # node id of every activation, in order
        self._current: _Instance | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._restart_times: list[float] = []  # monotonic times of the restarts counted against the budget
        self._streak = 0  # consecutive failures (backoff exponent)
        self._last_session_lost: float | None = None  # when an activated SuperNode last died without deactivating
        self._hints_given: set[str] = set()
        self.refusal_file: Path | None = None  # written by the ClientApp when the server refuses the site
        self.refused_reason: str | None = None
        self._started_at = time.time()

    # -- public ------------------------------------------------------------------------------------
    @property
    def current(self) -> SuperNodeHandle | None:
        """The SuperNode running now (``None`` between restarts)."""
        instance = self._current
        return None if instance is None else instance.handle

    def stop(self) -> None:
        """Ask :meth:`run` (in another thread) to stop the SuperNode and return 0."""
        self._stop.set()

    def run(self) -> int:
        """Supervise until stopped or given up (see the class docstring); the exit status."""
        in_main = threading.current_thread() is threading.main_thread()

        def on_sigterm(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
        try:
            while True:
                ended = self._run_instance()
                if ended is None:
                    return EXIT_REFUSED if self.refused_reason is not None else 0
                instance, returncode = ended
                delay = self._after_exit(instance, returncode)
                if delay is None:
                    return shell_status(returncode) or 1
                if self._stop.wait(delay):
                    return 0
        except KeyboardInterrupt:
            self._notice(logging.INFO, f"stopping the SuperNode of site {self.site!r}")
            return 0
        finally:
            instance, self._current = self._current, None
            if instance is not None:
                instance.handle.stop()
            if in_main:
                signal.signal(signal.SIGTERM, previous)

    # -- one instance ------------------------------------------------------------------------------
    def _run_instance(self) -> tuple[_Instance, int] | None:
        """Start a SuperNode and wait for its exit: it and its return code, or ``None`` when stopped on
        request."""
        with self._lock:  # its first lines wait here until it is the current instance
            handle = self._launch(self._on_line)
            self._current = instance = _Instance(handle, time.monotonic())
            self.starts += 1
        last_scan = 0.0
        while not self._stop.is_set():
            if handle.wait(0.5) is not None:
                break
            if time.monotonic() - last_scan > 2.0:  # remember its helpers: they may outlive it
                handle.members()
                last_scan = time.monotonic()
                self._check_refusal()
        else:
            if self.refused_reason is None:
                self._notice(logging.INFO, f"stopping the SuperNode of site {self.site!r}")
            handle.stop()
            self._current = None
            return None
        returncode = handle.returncode
        assert returncode is not None
        handle.stop(timeout_s=10.0)  # its SuperExec and ClientApps, by PID; then its last lines are read
        self._current = None
        return instance, returncode

    def _check_refusal(self) -> None:
        """Stop when the ClientApp recorded, during this supervision, that the server refused the site."""
        if self.refusal_file is None or not self.refusal_file.is_file():
            return
        try:
            record = json.loads(self.refusal_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if float(record.get("time", 0)) < self._started_at:
            return  # a refusal of an earlier run
        self.refused_reason = str(record.get("reason", "no reason given"))
        self._notice(logging.ERROR, f"the server refused site {self.site!r}: {self.refused_reason}; stopping "
                                    f"(hermes-client exits with status {EXIT_REFUSED})")
        self._stop.set()

    def _on_line(self, line: str) -> None:
        """Echo a SuperNode output line and follow what it says (called by the output pump thread)."""
        if self.echo is not None:
            with contextlib.suppress(OSError, ValueError):
                self.echo.write((line if self._echo_raw else strip_ansi(line)) + "\n")
                self.echo.flush()
        with self._lock:
            instance = self._current
        if instance is None:
            return
        text = strip_ansi(line)
        info = classify_line(line)
        if instance.in_exit_block:
            body = text.strip()
            if not body or body.startswith("For more information"):
                instance.in_exit_block = False
            elif body not in _BOILERPLATE and len(instance.reason) < 6:
                instance.reason.append(body)
        if info is None:
            return
        kind = info.kind
        if kind is LineKind.ACTIVATED:
            instance.activated_at, instance.node_id, instance.retries = time.monotonic(), info.value, 0
            self.node_ids.append(int(info.value or 0))
            again = f" again (restart {self.starts - 1})" if self.starts > 1 else ""
            self._notice(logging.INFO, f"the SuperNode of site {self.site!r} is connected to the SuperLink at "
                                       f"{self.superlink} as node {info.value}{again}")
        elif kind is LineKind.RETRYING:
            instance.retries += 1
            if instance.retries == self.retry_hint_after:
                self._retry_hint(instance)
        elif kind is LineKind.RECONNECTED:
            instance.retries = 0
        elif kind is LineKind.ACTIVATION_REFUSED:
            instance.refused = True
        elif kind is LineKind.AUTH_REQUIRED:
            instance.auth_required = True
        elif kind is LineKind.TLS_ERROR:
            instance.tls_error = True
        elif kind is LineKind.EXIT:
            instance.flower_exit, instance.in_exit_block = info.value, True

    # -- diagnosis ---------------------------------------------------------------------------------
    def _retry_hint(self, instance: _Instance) -> None:
        """Connection attempts keep failing: probe the server once and say what it shows."""
        found = self._probe(self.superlink)
        address = self.superlink
        if found == "closed":
            hint = (f"nothing accepts connections at {address}: the SuperLink is not running (yet), or the "
                    "address or port is wrong, or a firewall blocks it; the SuperNode keeps retrying")
        elif found == "tls" and self.insecure:
            hint = (f"the server at {address} requires TLS but this site connects with --insecure: start "
                    "without --insecure, with the federation's CA certificate (root_certificates in the site "
                    "yaml, or --root-certificates CA.crt)")
        elif found == "plain" and not self.insecure:
            hint = (f"the server at {address} does not use TLS (it may run with --insecure): ask its "
                    "operator to enable TLS, or start this site with --insecure on a trusted network only")
        elif found == "unknown":
            hint = (f"the server at {address} does not answer (a firewall dropping packets, or an overloaded "
                    "host); the SuperNode keeps retrying")
        else:
            tls = "TLS" if found == "tls" else "no TLS"
            hint = (f"the server at {address} accepts connections ({tls}, as this site expects) but the "
                    "SuperNode's requests fail: is it the SuperLink's port, a Flower 1.42 SuperLink, with no "
                    "proxy in between? The SuperNode keeps retrying")
        if hint not in self._hints_given:
            self._hints_given.add(hint)
            self._notice(logging.WARNING, f"{instance.retries} connection attempts failed: {hint}")

    def _tls_diagnosis(self, instance: _Instance) -> str:
        detail = " ".join(instance.reason) or "no detail"
        found = self._probe(self.superlink)
        if found == "plain":
            return (f"the server at {self.superlink} does not use TLS (it may run with --insecure): ask its "
                    "operator to enable TLS, or start this site with --insecure on a trusted network only")
        ca = self.root_certificates or "the CA certificate"
        host = _split_address(self.superlink)[0]
        return (f"the TLS handshake with {self.superlink} failed ({detail}): the server's certificate is not "
                f"signed by {ca}, or does not name {host!r} (the address must be one of the certificate's "
                "names, e.g. a --host given to 'hermes-server keys')")

    def _public_key_line(self) -> str | None:
        if self.auth_private_key is None:
            return None
        try:
            from cryptography.hazmat.primitives import serialization

            key = serialization.load_ssh_private_key(self.auth_private_key.read_bytes(), None)
            public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH)
        except (OSError, ValueError, TypeError):
            return None
        return public.decode("ascii")

    def _unregistered_diagnosis(self) -> str:
        key = self.auth_private_key
        pub = f"{key}.pub" if key is not None else "SITE.pub"
        text = (f"the SuperLink refused to activate this site's key ([code: 2004]) and never accepted it since "
                f"hermes-client started: the key is probably not registered at the server. The server operator "
                f"registers its public key {Path(pub).name} with 'hermes-server start ... "
                f"--enable-supernode-auth --site-key {Path(pub).name}' (or by placing it in KEYS/sites/), or "
                f"with 'flwr supernode register {Path(pub).name} <superlink connection> --name {self.site}'")
        public = self._public_key_line()
        if public is not None:
            text += f"; this site's public key is: {public}"
        return text + (f". (A SuperNode with this key that stopped less than {self.session_hold_s:g} s ago "
                       "causes the same refusal, which then clears by itself.)")

    def _after_exit(self, instance: _Instance, returncode: int) -> float | None:
        """Say what died and why; the delay before the restart, or ``None`` to end supervision."""
        now = time.monotonic()
        uptime = now - instance.started_at
        reason = f"Flower exit code {instance.flower_exit}" if instance.flower_exit is not None else ""
        if instance.reason:
            reason += (": " if reason else "") + " ".join(instance.reason)
        ended = "died" if returncode < 0 else "exited"
        self._notice(logging.WARNING, f"the SuperNode of site {self.site!r} (pid {instance.handle.pid}) {ended} "
                                      f"after {_duration(uptime)}: {describe_exit(returncode)}"
                                      + (f"; {reason}" if reason else ""))
        if instance.activated_at is not None:  # a live session that was not deactivated: held by the SuperLink
            if returncode != 0:
                self._last_session_lost = now
            if now - instance.activated_at >= self.policy.reset_after_s:
                self._streak = 0

        fatal = None
        counted = True
        delay: float | None = None
        if instance.auth_required:
            fatal = ("the SuperLink admits only registered SuperNodes (SuperNode authentication) and this site "
                     "connects without a key: set auth_private_key in the site yaml or pass --auth-key with the "
                     f"site's private key (sites/{self.site} of 'hermes-server keys'), whose .pub the server "
                     "registers")
        elif instance.flower_exit in FATAL_FLOWER_EXIT_CODES:
            fatal = f"Flower exit code {instance.flower_exit} is a configuration error that a restart cannot fix"
        elif instance.refused and instance.activated_at is None:
            lost = self._last_session_lost
            if lost is not None and now - lost < self.session_hold_s + 10.0:
                # this key had a session that ended without deactivation: the SuperLink still holds it
                delay = max(lost + self.session_hold_s + 2.0 - now, self.policy.initial_delay_s)
                counted = False
                self._notice(logging.WARNING, (
                    f"the SuperLink still holds the session of the SuperNode that stopped {_duration(now - lost)} "
                    f"ago with this key (it lets a session go at most {self.session_hold_s:g} s after the last "
                    f"heartbeat): retrying in {_seconds(delay)} s"))
            elif lost is not None:
                self._notice(logging.WARNING, (
                    f"the SuperLink still refuses this site's key {_duration(now - lost)} after its last "
                    f"session ended, longer than its {self.session_hold_s:g} s hold: another SuperNode may be "
                    "connected with the same key (one running SuperNode per key), or the key was unregistered "
                    "(or the SuperLink restarted without its --database)"))
            else:
                self._notice(logging.ERROR, self._unregistered_diagnosis())
        elif instance.tls_error:
            self._notice(logging.ERROR, self._tls_diagnosis(instance))

        status = shell_status(returncode) or 1
        if fatal is not None:
            self._notice(logging.ERROR, f"{fatal}; not restarting (hermes-client exits with status {status})")
            return None
        if not self.policy.enabled:
            self._notice(logging.ERROR, f"not restarting (--no-restart); hermes-client exits with status {status}")
            return None
        if not counted:
            assert delay is not None
            return delay
        window = self.policy.window_s
        self._restart_times = [t for t in self._restart_times if now - t < window]
        if len(self._restart_times) >= self.policy.max_restarts:
            self._notice(logging.ERROR, (
                f"giving up: {len(self._restart_times)} restart(s) within {window:g} s already (--max-restarts "
                f"{self.policy.max_restarts}, --restart-window {window:g}); hermes-client exits with status "
                f"{status}"))
            return None
        self._streak += 1
        delay = self.policy.delay_s(self._streak)
        self._restart_times.append(now + delay)
        self._notice(logging.WARNING, (
            f"restarting it in {delay:g} s (restart {len(self._restart_times)} of at most "
            f"{self.policy.max_restarts} within {window:g} s)"))
        return delay

    def _notice(self, level: int, text: str) -> None:
        self.notices.append(text)
        logger.log(level, "%s", text)
        if self.log_path is not None:
            with contextlib.suppress(OSError), open(self.log_path, "a", encoding="utf-8") as log:
                log.write(f"hermes-client {logging.getLevelName(level)}: {text}\n")


def supervise_supernode(
    site_config: str | os.PathLike | SiteConfig,
    superlink: str,
    *,
    insecure: bool = False,
    root_certificates: str | os.PathLike | None = None,
    auth_private_key: str | os.PathLike | None = None,
    port: int = DEFAULT_CLIENTAPP_PORT,
    log_path: str | os.PathLike | None = None,
    policy: RestartPolicy | None = None,
    echo: TextIO | None = sys.stdout,
    extra_env: Mapping[str, str] | None = None,
) -> SuperNodeSupervisor:
    """A :class:`SuperNodeSupervisor` of one site's SuperNode (arguments as :func:`start_supernode`);
    nothing starts before :meth:`~SuperNodeSupervisor.run`.

    Raises:
        ValueError: an invalid site config, address, port or missing key file (checked here, once).
    """
    plan = plan_supernode(site_config, superlink, insecure=insecure, root_certificates=root_certificates,
                          auth_private_key=auth_private_key, port=port, extra_env=extra_env)
    log = Path(log_path).resolve() if log_path is not None else None
    supervisor = SuperNodeSupervisor(
        lambda on_line: start_planned(plan, log, on_line),
        site=plan.site, superlink=superlink, insecure=insecure, auth_private_key=plan.auth_private_key,
        root_certificates=plan.root_certificates, policy=policy, echo=echo, log_path=log,
    )
    supervisor.refusal_file = plan.work_dir / REFUSAL_FILE
    return supervisor
