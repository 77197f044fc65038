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

This module deliberately does not import ``server`` (the two sides share only ``hermes_model``), so its
small process helper mirrors the server's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from client.config import SiteConfig, load_site_config
from hermes_model.daemon_env import daemon_env

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
    work.mkdir(parents=True, exist_ok=True)
    env = daemon_env(Path(args[0]).parent, work / "flwr-home", extra_env)
    log = Path(log_path).resolve() if log_path is not None else None
    stream: IO[bytes] | None = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        stream = open(log, "ab")  # noqa: SIM115 - closed by the handle
    popen = subprocess.Popen(args, env=env, cwd=work, stdin=subprocess.DEVNULL, stdout=stream,
                             stderr=subprocess.STDOUT if stream is not None else None, start_new_session=True)
    logger.info("SuperNode of site %r (pid %d) dials %s (%s%s), ClientApp port %d", config.site, popen.pid,
                superlink, "insecure" if root is None else "TLS", ", authenticated" if key else "", port)
    return SuperNodeHandle(popen, config.site, superlink, port, log, stream)


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

