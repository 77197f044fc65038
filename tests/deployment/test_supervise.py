"""``hermes-client start`` supervises its SuperNode (``client.launch.SuperNodeSupervisor``).

Fast checks (no Flower process): the classification of ``flower-supernode`` output lines (the texts of
flwr 1.42), the backoff schedule, exit descriptions, the server probe (plain, TLS and closed sockets on
127.0.0.1), and the supervisor's decisions driven by small fake SuperNodes (Python scripts printing Flower's
lines and exiting or killing themselves).

Slow checks (real ``flower-superlink`` / ``flower-supernode`` processes on 127.0.0.1, ``hermes-client start``
as a subprocess; helpers of ``test_loopback``):

- a SuperNode killed with SIGKILL after round 1 is restarted and its site trains in a later round of the
  same run (insecure: the restarted SuperNode gets a new node id at once; the round that was sent to the
  killed one ends when the SuperLink declares it gone, up to 60 s after its last heartbeat);
- with SuperNode authentication: an unregistered key is reported as such and, with ``--max-restarts 1``,
  ``hermes-client`` exits non-zero; ``--insecure`` against the TLS SuperLink gets a TLS hint; a registered
  site killed with SIGKILL is refused while the SuperLink still holds its session (told as such, with the
  retry time) and connects again once the session lapses (30 s heartbeat x 2, fixed in flwr 1.42: no
  option of flower-supernode or flower-superlink shortens it).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from client.cli import build_parser
from client.launch import (
    LineInfo,
    LineKind,
    RestartPolicy,
    SuperNodeHandle,
    SuperNodeSupervisor,
    classify_line,
    describe_exit,
    launch_process,
    probe_superlink,
    shell_status,
)
from server.checkpoint import RunStore
from server.cli import make_site_key, write_keys
from server.launch import STATUS_COMPLETED, SuperLinkHandle, TlsFiles, stage_app, start_superlink
from tests.deployment.test_loopback import (
    _private_home,  # noqa: F401 - autouse fixture: telemetry off, private HOME, nothing in ~/.flwr
    fake_site,
    free_port,
    pid_alive,
    server_config,
    wait_until,
    write_site,
)

# Lines as flwr 1.42's flower-supernode prints them (colour codes included).
G, Y, RED, R = "\x1b[92m", "\x1b[93m", "\x1b[91m", "\x1b[0m"
ACTIVATED = f"{G}INFO {R}:      SuperNode ID: 13831950689501252219"
RETRYING = f"{Y}WARNING {R}:   Connection attempt failed, retrying in 5.65 seconds"
EXIT_BLOCK_2004 = [
    f"{RED}ERROR {R}:     Exit Code: 305",
    "Failed to initialize the connection to the SuperLink.",
    "[code: 2004] Failed to activate SuperNode.",
    "The SuperNode could not establish a connection to the SuperLink.",
    "",
    "For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/305.html>",
]


# ------------------------------------------------------------------------------------------ line classification
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (ACTIVATED, LineInfo(LineKind.ACTIVATED, 13831950689501252219)),
        (RETRYING, LineInfo(LineKind.RETRYING)),
        (f"{G}INFO {R}:      Connection successful after 12.50 seconds and 4 tries.", LineInfo(LineKind.RECONNECTED)),
        (EXIT_BLOCK_2004[0], LineInfo(LineKind.EXIT, 305)),
        (EXIT_BLOCK_2004[2], LineInfo(LineKind.ACTIVATION_REFUSED, 2004)),
        ("[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via the CLI.",
         LineInfo(LineKind.AUTH_REQUIRED, 2001)),
        ("[code: 2003] Invalid heartbeat interval.", LineInfo(LineKind.API_ERROR, 2003)),
        (f"{RED}ERROR {R}:     SSL/TLS handshake error detected.", LineInfo(LineKind.TLS_ERROR)),
        (f"{G}INFO {R}:      Starting Flower SuperNode", None),
        ("INFO:     Uvicorn running on http://127.0.0.1:52661 (Press CTRL+C to quit)", None),
        (EXIT_BLOCK_2004[1], None),
    ],
)
def test_supernode_lines_are_classified(line: str, expected: LineInfo | None) -> None:
    assert classify_line(line) == expected


# ------------------------------------------------------------------------------------------ backoff, exits, probe
def test_backoff_doubles_up_to_its_bound() -> None:
    default = RestartPolicy()
    assert [default.delay_s(k) for k in range(1, 8)] == [5, 10, 20, 40, 60, 60, 60]
    assert default.delay_s(10_000) == 60  # no overflow for a long streak
    custom = RestartPolicy(initial_delay_s=1.5, max_delay_s=4.0)
    assert [custom.delay_s(k) for k in (1, 2, 3, 4)] == [1.5, 3.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="failures counts from 1"):
        default.delay_s(0)
    with pytest.raises(ValueError, match="initial_delay_s <= max_delay_s"):
        RestartPolicy(initial_delay_s=10, max_delay_s=5)
    with pytest.raises(ValueError, match="max_restarts must be >= 0.*window_s must be > 0"):
        RestartPolicy(max_restarts=-1, window_s=0)


def test_exits_are_described() -> None:
    assert describe_exit(-signal.SIGKILL) == "SIGKILL (killed by another process or the out-of-memory killer)"
    assert describe_exit(-signal.SIGSEGV).startswith("SIGSEGV (a crash")
    assert describe_exit(-signal.SIGUSR1) == "SIGUSR1"
    assert describe_exit(1) == "exit status 1"
    assert (shell_status(-signal.SIGKILL), shell_status(1), shell_status(0)) == (137, 1, 0)


def _serve_once(listener: socket.socket, handler: Callable[[socket.socket], None]) -> threading.Thread:
    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            handler(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_probe_tells_tls_plain_and_closed_apart(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys", ["x"])
    assert probe_superlink(f"127.0.0.1:{free_port()}") == "closed"

    def plain(conn: socket.socket) -> None:  # like uvicorn without TLS: HTTP 400 to a TLS ClientHello
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(keys["server.crt"], keys["server.key"])

    def tls(conn: socket.socket) -> None:
        with contextlib.suppress(ssl.SSLError, OSError), context.wrap_socket(conn, server_side=True) as wrapped:
            wrapped.recv(1)

    for handler, expected in ((plain, "plain"), (tls, "tls")):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            thread = _serve_once(listener, handler)
            assert probe_superlink(f"127.0.0.1:{listener.getsockname()[1]}") == expected
            thread.join(5.0)


# ------------------------------------------------------------------------------------------ fake SuperNodes
FAKE_SUPERNODE = textwrap.dedent('''
    """A stand-in for flower-supernode: prints Flower's lines for one scripted behaviour per start."""
    import os, signal, sys, time
    from pathlib import Path

    counter, plan = Path(sys.argv[1]), sys.argv[2].split(",")
    start = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(start + 1))
    step = plan[min(start, len(plan) - 1)]
    G, Y, RED, R = "\\x1b[92m", "\\x1b[93m", "\\x1b[91m", "\\x1b[0m"
    print(f"{G}INFO {R}:      Starting Flower SuperNode", flush=True)

    def exit_block(detail):
        print(f"{RED}ERROR {R}:     Exit Code: 305\\nFailed to initialize the connection to the SuperLink.\\n"
              f"{detail}\\nThe SuperNode could not establish a connection to the SuperLink.\\n\\n"
              "For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/305.html>",
              flush=True)
        sys.exit(1)

    if step in ("crash", "serve"):
        print(f"{G}INFO {R}:      SuperNode ID: 77", flush=True)
        if step == "crash":
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
    elif step == "2004":
        exit_block("[code: 2004] Failed to activate SuperNode.")
    elif step == "2001":
        exit_block("[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via "
                   "the CLI.")
    elif step == "ssl":
        print(f"{RED}ERROR {R}:     SSL/TLS handshake error detected.", flush=True)
        exit_block("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    elif step == "retry":
        while True:
            print(f"{Y}WARNING {R}:   Connection attempt failed, retrying in 0.05 seconds", flush=True)
            time.sleep(0.05)
''')


def fake_supervisor(tmp_path: Path, plan: str, policy: RestartPolicy, **kwargs: Any) -> SuperNodeSupervisor:
    """A supervisor whose SuperNode is the fake above, following ``plan`` (one step per start)."""
    script = tmp_path / "fake_supernode.py"
    script.write_text(FAKE_SUPERNODE)
    args = [sys.executable, str(script), str(tmp_path / "starts"), plan]
    log = kwargs.pop("log_path", None)

    def launch(on_line: Callable[[str], None]) -> SuperNodeHandle:
        return launch_process(args, site="fake", superlink="127.0.0.1:9", port=9, log_path=log, on_line=on_line)

    return SuperNodeSupervisor(launch, site="fake", superlink="127.0.0.1:9", policy=policy, log_path=log,
                               **kwargs)


FAST = dict(initial_delay_s=0.05, max_delay_s=0.2)


def run_in_thread(supervisor: SuperNodeSupervisor) -> tuple[threading.Thread, list[int]]:
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(supervisor.run()), daemon=True)
    thread.start()
    return thread, status


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def test_crash_then_held_session_then_reconnect(tmp_path: Path) -> None:
    """SIGKILL after activation -> restart; the restart is refused (2004) while the session is held -> told
    as such and retried after the hold, not counted; the next start connects again."""
    echo = io.StringIO()
    supervisor = fake_supervisor(tmp_path, "crash,2004,serve", RestartPolicy(max_restarts=1, **FAST),
                                 session_hold_s=0.6, echo=echo, log_path=tmp_path / "node.log")
    thread, status = run_in_thread(supervisor)
    wait_for(lambda: any(n.endswith("again (restart 2)") for n in supervisor.notices), 30.0, "the reconnection")
    supervisor.stop()
    thread.join(30.0)
    assert status == [0] and supervisor.starts == 3 and supervisor.node_ids == [77, 77]
    notices = supervisor.notices
    ended = [n for n in notices if "died after" in n or "exited after" in n]
    assert len(ended) == 2
    assert "(pid " in ended[0] and ") died after " in ended[0]
    assert ended[0].endswith("SIGKILL (killed by another process or the out-of-memory killer)")
    assert ended[1].endswith("exit status 1; Flower exit code 305: [code: 2004] Failed to activate SuperNode.")
    assert ") exited after " in ended[1]
    held = [n for n in notices if "still holds the session" in n]
    assert len(held) == 1 and "retrying in" in held[0]
    assert not [n for n in notices if "not registered" in n or "giving up" in n]  # the refusal was not counted
    assert notices[-2].endswith("as node 77 again (restart 2)") and notices[-1].startswith("stopping")
    assert "SuperNode ID: 77" in echo.getvalue() and "\x1b[" not in echo.getvalue()  # a StringIO is no tty
    log = (tmp_path / "node.log").read_text()
    assert "[code: 2004] Failed to activate SuperNode." in log and "\x1b[" not in log
    assert "hermes-client WARNING: the SuperLink still holds the session" in log


def test_never_accepted_key_is_reported_unregistered(tmp_path: Path) -> None:
    private, public = make_site_key()
    key = tmp_path / "hospital-a"
    key.write_bytes(private)
    supervisor = fake_supervisor(tmp_path, "2004", RestartPolicy(max_restarts=1, **FAST), auth_private_key=key)
    assert supervisor.run() == 1
    assert supervisor.starts == 2  # one restart, then the budget is spent
    unregistered = [n for n in supervisor.notices if "probably not registered" in n]
    assert len(unregistered) == 2
    assert "--site-key hospital-a.pub" in unregistered[0]
    assert "flwr supernode register hospital-a.pub <superlink connection> --name fake" in unregistered[0]
    assert public.decode().strip() in unregistered[0]
    assert supervisor.notices[-1].startswith("giving up: 1 restart(s) within 3600 s already")
    assert not [n for n in supervisor.notices if "still holds" in n]


def test_no_restart_and_configuration_errors_end_supervision(tmp_path: Path) -> None:
    (tmp_path / "off").mkdir()
    off = fake_supervisor(tmp_path / "off", "crash", RestartPolicy(enabled=False, **FAST))
    assert off.run() == 137 and off.starts == 1
    assert off.notices[-1] == "not restarting (--no-restart); hermes-client exits with status 137"

    (tmp_path / "keyless").mkdir()
    keyless = fake_supervisor(tmp_path / "keyless", "2001", RestartPolicy(**FAST))
    assert keyless.run() == 1 and keyless.starts == 1  # restarting cannot help: this site has no key
    assert "pass --auth-key" in keyless.notices[-1] and "not restarting" in keyless.notices[-1]


def test_restarts_back_off_and_are_bounded_per_window(tmp_path: Path) -> None:
    supervisor = fake_supervisor(tmp_path, "crash", RestartPolicy(max_restarts=3, initial_delay_s=0.05,
                                                                  max_delay_s=0.1))
    assert supervisor.run() == 137
    assert supervisor.starts == 4
    restarts = [n for n in supervisor.notices if n.startswith("restarting it in")]
    assert restarts == ["restarting it in 0.05 s (restart 1 of at most 3 within 3600 s)",
                        "restarting it in 0.1 s (restart 2 of at most 3 within 3600 s)",
                        "restarting it in 0.1 s (restart 3 of at most 3 within 3600 s)"]
    assert supervisor.notices[-1].startswith("giving up: 3 restart(s) within 3600 s")


@pytest.mark.parametrize(
    ("insecure", "found", "expected"),
    [
        (True, "tls", "requires TLS but this site connects with --insecure"),
        (False, "plain", "does not use TLS"),
        (True, "closed", "nothing accepts connections at 127.0.0.1:9"),
    ],
)
def test_failing_connection_attempts_get_one_hint(tmp_path: Path, insecure: bool, found: str,
                                                  expected: str) -> None:
    probes: list[str] = []

    def probe(address: str) -> str:
        probes.append(address)
        return found

    supervisor = fake_supervisor(tmp_path, "retry", RestartPolicy(**FAST), insecure=insecure, probe=probe,
                                 retry_hint_after=3)
    thread, status = run_in_thread(supervisor)
    wait_for(lambda: any(expected in n for n in supervisor.notices), 20.0, "the hint")
    time.sleep(0.5)  # more failed attempts: no second probe, no second hint
    supervisor.stop()
    thread.join(20.0)
    assert status == [0] and probes == ["127.0.0.1:9"]
    hints = [n for n in supervisor.notices if expected in n]
    assert len(hints) == 1 and hints[0].startswith("3 connection attempts failed: ")


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        ("plain", "the server at 127.0.0.1:9 does not use TLS (it may run with --insecure)"),
        ("tls", "the TLS handshake with 127.0.0.1:9 failed ([SSL: WRONG_VERSION_NUMBER] wrong version number "
                "(_ssl.c:1006)): the server's certificate is not signed by ca.crt, or does not name '127.0.0.1'"),
    ],
)
def test_tls_handshake_failures_are_explained(tmp_path: Path, found: str, expected: str) -> None:
    supervisor = fake_supervisor(tmp_path, "ssl", RestartPolicy(enabled=False, **FAST),
                                 root_certificates=Path("ca.crt"), probe=lambda address: found)
    assert supervisor.run() == 1
    assert [n for n in supervisor.notices if n.startswith(expected)]
    assert supervisor.notices[-1] == "not restarting (--no-restart); hermes-client exits with status 1"


def test_start_options(tmp_path: Path) -> None:
    parse = build_parser().parse_args
    args = parse(["start", "--site", "s.yaml", "--server", "h:1"])
    assert (args.restart, args.max_restarts, args.restart_window, args.restart_delay, args.max_restart_delay,
            args.log) == (True, 10, 3600.0, 5.0, 60.0, None)
    args = parse(["start", "--site", "s.yaml", "--server", "h:1", "--no-restart", "--max-restarts", "0",
                  "--restart-delay", "0.5", "--log", "n.log"])
    assert (args.restart, args.max_restarts, args.restart_delay, args.log) == (False, 0, 0.5, "n.log")
    for bad in (["--restart-delay", "0"], ["--max-restarts", "-1"], ["--restart-window", "x"]):
        with pytest.raises(SystemExit):
            parse(["start", "--site", "s.yaml", "--server", "h:1", *bad])
    from client.cli import main

    site = fake_site(tmp_path / "site")  # the restart options are checked with the rest: status 2
    assert main(["start", "--site", str(site), "--server", "127.0.0.1:9", "--insecure", "--restart-delay", "9",
                 "--max-restart-delay", "5"]) == 2


# ------------------------------------------------------------------------------------------ real processes
def _client(tmp_path: Path, name: str, site_yaml: Path, server: str, *options: str) -> subprocess.Popen:
    """``hermes-client start`` as a subprocess in its own session; output to ``tmp_path/<name>.out``."""
    out = open(tmp_path / f"{name}.out", "wb")  # noqa: SIM115 - the child holds it; closed with the file object
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "client.cli", "start", "--site", str(site_yaml), "--server", server,
             "--port", str(free_port()), *options],
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    finally:
        out.close()


def _output(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.out").read_text(errors="replace")


def _children(pid: int, name: str) -> list[int]:
    """Live child processes of ``pid`` whose command line contains ``name``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and name in cmdline:
            found.append(int(stat.parent.name))
    return found


def _with_site(site_yaml: Path) -> list[int]:
    """Live processes whose command line names ``site_yaml`` (SuperNodes of that site)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(site_yaml) in text and "flower-supernode" in text and pid_alive(int(cmdline.parent.name)):
            found.append(int(cmdline.parent.name))
    return found


@pytest.fixture
def links() -> Iterator[list[SuperLinkHandle]]:
    started: list[SuperLinkHandle] = []
    yield started
    for link in started:
        link.stop(timeout_s=20.0)
    assert not [link.members() for link in started if link.members()]


def _stop_client(client: subprocess.Popen) -> int:
    client.send_signal(signal.SIGTERM)
    return client.wait(timeout=60)


@pytest.mark.slow
def test_killed_supernode_is_restarted_and_trains_in_a_later_round(
    tmp_path: Path, clients: list[subprocess.Popen], links: list[SuperLinkHandle]
) -> None:
    site_yaml = write_site(tmp_path / "site", "solo", ("STS_011", "STS_012"))  # preprocessed by round 1
    link = start_superlink(tmp_path / "superlink", port=free_port())
    links.append(link)
    client = _client(tmp_path, "client", site_yaml, link.address, "--insecure", "--restart-delay", "1",
                     "--log", str(tmp_path / "supernode.log"))
    clients.append(client)

    run_dir = tmp_path / "run"
    config = server_config(run_dir, num_server_rounds=3, min_sites=1, min_sites_per_round=1,
                           round_timeout_s=300.0)
    run_id = link.submit_run(stage_app(tmp_path / "app", config.to_run_config()))
    store = RunStore(run_dir)
    wait_until(lambda: 1 in store.round_files(), 600.0, "the round-1 checkpoint", link)
    supernodes = _children(client.pid, "flower-supernode")
    assert len(supernodes) == 1, _output(tmp_path, "client")[-3000:]
    os.kill(supernodes[0], signal.SIGKILL)  # as the out-of-memory killer would
    killed_at = time.monotonic()

    info = link.wait_for_run(run_id, 600.0, poll_s=2.0)
    assert info["status"] == STATUS_COMPLETED, info
    assert client.poll() is None  # hermes-client is still supervising
    text = _output(tmp_path, "client")
    assert (f"(pid {supernodes[0]}) died after" in text
            and "SIGKILL (killed by another process or the out-of-memory killer)" in text), text[-3000:]
    assert "restarting it in 1 s (restart 1 of at most 10 within 3600 s)" in text
    assert "again (restart 1)" in text  # the restarted SuperNode was accepted (a new node id: no auth)
    restarted = _children(client.pid, "flower-supernode")
    assert len(restarted) == 1 and restarted[0] != supernodes[0]

    assert sorted(store.round_files()) == [1, 2, 3]
    metrics = store.read_metrics()
    trained = {m["round"] for m in metrics if m["scope"] == "site" and m["phase"] == "train"
               and m["site"] == "solo" and m["status"] == "ok"}
    # round 2 was sent to the killed node (the SuperLink answers it NODE_UNAVAILABLE once its session lapses);
    # round 3 finds the old node gone and the restarted one (a new node id) connected: it trains
    assert trained == {1, 3}, metrics
    aggregate = {m["round"]: m for m in metrics if m["scope"] == "aggregate" and m["phase"] == "train"}
    assert aggregate[2]["valid-replies"] == 0 and aggregate[3]["valid-replies"] == 1
    # the dropped reply is the site's, by name (its error reply came from the SuperLink, not the node)
    dropped = [m for m in metrics if m.get("status") == "dropped"]
    assert [(m["round"], m["site"], m["reason"]) for m in dropped] == [(2, "solo", "error-reply")], dropped
    server_log = link.flwr("log", str(run_id), link.connection, "--show", timeout_s=60.0).stdout
    assert "dropped the train reply of site 'solo'" in server_log and "node-" not in server_log
    log = (tmp_path / "supernode.log").read_text()
    assert log.count("SuperNode ID:") == 2 and "hermes-client WARNING: the SuperNode of site 'solo'" in log

    assert _stop_client(client) == 0  # SIGTERM: the SuperNode is stopped by PID, status 0
    assert not _with_site(site_yaml)
    print(f"kill -> run completed in {time.monotonic() - killed_at:.0f} s")


@pytest.mark.slow
def test_refused_activations_are_told_apart(
    tmp_path: Path, clients: list[subprocess.Popen], links: list[SuperLinkHandle]
) -> None:
    keys = tmp_path / "keys"
    write_keys(keys, ["known", "unknown"])
    link = start_superlink(tmp_path / "superlink", port=free_port(), tls=TlsFiles.from_keys_dir(keys),
                           supernode_auth=True)
    links.append(link)
    link.register_supernode(keys / "sites" / "known.pub", "known")  # "unknown" is never registered
    sites = {}
    for name in ("known", "unknown", "plain"):
        sites[name] = fake_site(tmp_path / name, root_certificates="../keys/ca.crt")
        sites[name].write_text(sites[name].read_text().replace("site: fake", f"site: {name}"))
        assert yaml.safe_load(sites[name].read_text())["site"] == name
    fast = ("--restart-delay", "1")
    known = _client(tmp_path, "known", sites["known"], link.address, *fast, "--auth-key", str(keys / "sites/known"))
    unknown = _client(tmp_path, "unknown", sites["unknown"], link.address, *fast, "--max-restarts", "1",
                      "--auth-key", str(keys / "sites" / "unknown"))
    plain = _client(tmp_path, "plain", sites["plain"], link.address, "--insecure")
    clients.extend([known, unknown, plain])

    # a registered site killed: its key's session is still held (told, with the retry time), then accepted;
    # killed first, so that the other checks run while the SuperLink holds its session
    wait_for(lambda: "is connected to the SuperLink" in _output(tmp_path, "known"), 120.0, "the known site")
    supernodes = _children(known.pid, "flower-supernode")
    assert len(supernodes) == 1
    os.kill(supernodes[0], signal.SIGKILL)
    killed_at = time.monotonic()

    # an unregistered key: named as such, one restart, then a non-zero exit
    assert unknown.wait(timeout=180) == 1, _output(tmp_path, "unknown")[-3000:]
    text = _output(tmp_path, "unknown")
    assert text.count("[code: 2004] Failed to activate SuperNode.") >= 2
    assert "the key is probably not registered at the server" in text and "--site-key unknown.pub" in text
    assert (keys / "sites" / "unknown.pub").read_text().split()[1] in text  # its public key, to send
    assert "giving up: 1 restart(s) within 3600 s already" in text and "still holds" not in text

    # --insecure against TLS: one hint after a few failed attempts
    wait_for(lambda: "requires TLS but this site connects with --insecure" in _output(tmp_path, "plain"), 120.0,
             "the TLS hint")
    assert _stop_client(plain) == 0

    wait_for(lambda: "again (restart" in _output(tmp_path, "known"), 180.0, "the reconnection")
    reconnected_s = time.monotonic() - killed_at
    text = _output(tmp_path, "known")
    assert "SIGKILL (killed by another process or the out-of-memory killer)" in text
    assert "the SuperLink still holds the session of the SuperNode that stopped" in text
    assert "retrying in" in text and "not registered" not in text, text[-3000:]
    assert reconnected_s < 120.0
    assert _stop_client(known) == 0
    assert not [p for name in sites for p in _with_site(sites[name])]
    print(f"kill -> reconnected in {reconnected_s:.0f} s")
