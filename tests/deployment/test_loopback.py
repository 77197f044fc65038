"""Deployment with real Flower processes on loopback (127.0.0.1 only).

A SuperLink with TLS and SuperNode authentication, three registered SuperNodes for three tiny real sites
(two sarcoma CT cases each, copied from ``shared/data/ibsi_sts`` beside the repository; skipped when
absent), our ServerApp and ClientApp for 2 rounds with ``min-sites-per-round`` 2. Checked: an unregistered
SuperNode is refused, a SuperNode killed after round 1 does not stop the run (round 2 aggregates the two
others and its checkpoint is written), and every process started is gone afterwards. A second test runs
the console scripts (``hermes-server start`` / ``hermes-client start``) without TLS for one round.

Each test has a private ``FLWR_HOME`` per process under ``tmp_path``, free ports picked at run time and
``FLWR_TELEMETRY_ENABLED=0``. About 2 min on 2 cores (round 2 of the first test waits 30-60 s for the
SuperLink to notice the killed SuperNode); several times that when the machine is busy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import SimpleITK as sitk
import yaml

from client.launch import SuperNodeHandle, start_supernode
from hermes_model.daemon_env import MALLOC_ARENAS
from hermes_model.plans import Plans
from server.checkpoint import RunStore
from server.cli import write_keys
from server.config import ServerConfig
from server.launch import STATUS_COMPLETED, SuperLinkHandle, TlsFiles, stage_app, start_superlink

IBSI_STS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ibsi_sts"
SITES = {"site-a": ("STS_002", "STS_003"), "site-b": ("STS_004", "STS_006"), "site-c": ("STS_007", "STS_008")}
ROGUE = "rogue"
# Round 2 ends when the SuperLink notices the killed site is gone (no heartbeat for 2 x 30 s: it answers
# its message with a NODE_UNAVAILABLE error), not at this timeout, which only has to exceed a healthy
# round on a busy 2-core machine.
ROUND_TIMEOUT_S = 600.0
RUN_TIMEOUT_S = 900.0
PLAN = Plans(target_spacing=4.0, patch_size=32, train_margin=2)  # the server_config's plan settings


@pytest.fixture(autouse=True)
def _private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Telemetry off and a private HOME: every Flower process must use the FLWR_HOME given to it, so
    nothing may appear in ``~/.flwr``."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLWR_HOME", raising=False)
    yield
    assert not (tmp_path / "home" / ".flwr").exists()


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_site(root: Path, name: str, cases: tuple[str, ...], ct_offset: float = 0.0, **extra: Any) -> Path:
    """A tiny site in ``root``: copies of ``cases`` (sarcoma CT, ``ct_offset`` added to every voxel), one local
    iteration (the plan of these tests, :data:`PLAN`, is the server's: 4 mm, 32^3 patches)."""
    if not IBSI_STS.is_dir():
        pytest.skip(f"sarcoma data not found at {IBSI_STS} (the 'shared' folder beside the repo)")
    lines = ["case,image,label"]
    for case in cases:
        folder = root / "raw" / case
        folder.mkdir(parents=True)
        shutil.copy(IBSI_STS / case / "CT_mask.nii.gz", folder / "CT_mask.nii.gz")
        if ct_offset:
            image = sitk.ReadImage(str(IBSI_STS / case / "CT_image.nii.gz"))
            sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32) + ct_offset, str(folder / "CT_image.nii.gz"))
        else:
            shutil.copy(IBSI_STS / case / "CT_image.nii.gz", folder / "CT_image.nii.gz")
        lines.append(f"{case},raw/{case}/CT_image.nii.gz,raw/{case}/CT_mask.nii.gz")
    (root / "cases.csv").write_text("\n".join(lines) + "\n")
    body = {
        "site": name, "work_dir": "work", **extra,
        "datasets": [{"name": f"sts_{name.replace('-', '_')}", "modality": "CT", "format": "csv",
                      "source": "cases.csv", "classes": {1: "tumour"}, "split": {"val": 0.0, "test": 0.0}}],
        "training": {"devices": "cpu", "batch_size": 1, "local_iterations": 1,
                     "num_workers": 0, "bf16": False},
    }
    path = root / "site.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def preprocess(site_yaml: Path) -> None:
    """Preprocess a site here, so that round 1 does not pay for it inside the round timeout."""
    from client.config import load_site_config
    from client.preprocess import preprocess_site

    assert preprocess_site(load_site_config(site_yaml), PLAN, progress=False).ok


def server_config(run_dir: Path, **overrides: Any) -> ServerConfig:
    values: dict[str, Any] = dict(
        num_server_rounds=2, min_sites=3, min_sites_per_round=2, local_iterations=1, evaluate_every=0,
        base_channels=8, task_slots=80, start_timeout_s=300.0, query_timeout_s=300.0,
        round_timeout_s=ROUND_TIMEOUT_S, poll_interval_s=0.5, warmup_epochs=0, total_epochs=10,
        iters_per_epoch=2, run_dir=str(run_dir), keep_checkpoints=0, target_spacing=4.0, patch_size=32,
        train_margin=2,
    )
    values.update(overrides)
    return ServerConfig(**values)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, link: SuperLinkHandle) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if not link.alive():
            pytest.fail(f"the SuperLink died while waiting for {what}:\n{link.process.log_text()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.5)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def processes() -> Iterator[list[SuperLinkHandle | SuperNodeHandle]]:
    """Everything a test starts; stopped by PID (whole process groups) at teardown, then checked gone."""
    started: list[SuperLinkHandle | SuperNodeHandle] = []
    yield started
    for handle in started:  # SIGTERM to every group first: they shut down in parallel
        handle.terminate()
    for handle in reversed(started):
        handle.stop(timeout_s=20.0)
    left = {h.pid: h.members() for h in started if h.members()}
    assert not left, f"processes left running (launched pid -> pids): {left}"


def _logs(link: SuperLinkHandle, run_id: int) -> str:
    return link.flwr("log", str(run_id), link.connection, "--show", timeout_s=60.0).stdout[-6000:]


# ------------------------------------------------------------------------------------------------ TLS + auth
def test_tls_authenticated_federation_survives_a_killed_site(
    tmp_path: Path, processes: list[SuperLinkHandle | SuperNodeHandle]
) -> None:
    keys = tmp_path / "keys"
    write_keys(keys, [*SITES, ROGUE])
    yamls = {}
    for name, cases in SITES.items():  # the TLS root and the auth key come from the site config
        yamls[name] = write_site(tmp_path / name, name, cases, root_certificates="../keys/ca.crt",
                                 auth_private_key=f"../keys/sites/{name}")
        preprocess(yamls[name])
    rogue_yaml = write_site(tmp_path / ROGUE, ROGUE, ("STS_009", "STS_010"),
                            root_certificates="../keys/ca.crt")

    link = start_superlink(tmp_path / "superlink", port=free_port(), tls=TlsFiles.from_keys_dir(keys),
                           supernode_auth=True)
    processes.append(link)
    assert (tmp_path / "superlink" / "flwr-home" / "config.toml").is_file()
    node_ids = {name: link.register_supernode(keys / "sites" / f"{name}.pub", name) for name in SITES}
    assert all(isinstance(n, int) for n in node_ids.values())
    assert link.register_supernode(keys / "sites" / "site-a.pub", "site-a") is None  # already registered
    assert {int(n["node-id"]) for n in link.list_supernodes()} == set(node_ids.values())

    nodes = {}
    for name, path in yamls.items():
        nodes[name] = start_supernode(path, link.address, port=free_port(),
                                      log_path=tmp_path / f"{name}.supernode.log")
        processes.append(nodes[name])
    assert len({n.port for n in nodes.values()}) == 3
    rogue = start_supernode(rogue_yaml, link.address, auth_private_key=keys / "sites" / ROGUE,
                            port=free_port(), log_path=tmp_path / "rogue.supernode.log")
    processes.append(rogue)

    run_dir = tmp_path / "run"
    app = stage_app(tmp_path / "app", server_config(run_dir).to_run_config())
    run_id = link.submit_run(app)
    store = RunStore(run_dir)

    # the unregistered node is refused and gives up
    assert rogue.wait(60.0) not in (None, 0), rogue.log_text()[-2000:]
    assert "Failed to activate SuperNode" in rogue.log_text()
    assert "No SuperNode found with the given public key" in link.process.log_text()

    # kill site-c (its SuperNode and any ClientApp) as soon as round 1 is checkpointed: round 2 runs
    wait_until(lambda: 1 in store.round_files(), 600.0, "the round-1 checkpoint", link)
    killed = nodes["site-c"]
    started_by_c = killed.members()
    assert len(started_by_c) >= 2  # the SuperNode and its SuperExec at least
    for pid in (link.pid, killed.pid):  # the launchers' environment (a Flower daemon's children inherit it)
        assert _environment(pid)["MALLOC_ARENA_MAX"] == MALLOC_ARENAS
    killed.kill()
    assert not killed.members() and not [p for p in started_by_c if pid_alive(p)]

    info = link.wait_for_run(run_id, RUN_TIMEOUT_S, poll_s=3.0)
    assert info["status"] == STATUS_COMPLETED, f"{info}\n{_logs(link, run_id)}"
    assert sorted(store.round_files()) == [1, 2]
    latest = store.load_latest()
    assert latest is not None and latest.server_round == 2
    bank = latest.bank  # site-c's task row keeps its round-1 value; the others were updated in round 2
    assert set(bank.sites) == set(SITES)
    last = {name: {bank.info("task", t).last_round for t in bank.ownership(name).task_ids} for name in SITES}
    assert last == {"site-a": {2}, "site-b": {2}, "site-c": {1}}

    metrics = store.read_metrics()
    aggregate = {m["round"]: m for m in metrics if m["scope"] == "aggregate" and m["phase"] == "train"}
    assert aggregate[1]["valid-replies"] == 3 and aggregate[1]["skipped"] == 0
    assert aggregate[2]["valid-replies"] == 2 and aggregate[2]["skipped"] == 0
    assert aggregate[2].get("dropped/error-reply", 0) <= 1  # site-c's NODE_UNAVAILABLE, if before the timeout
    ok = {r: {m["site"] for m in metrics if m["scope"] == "site" and m["round"] == r and m["status"] == "ok"}
          for r in (1, 2)}
    assert ok == {1: set(SITES), 2: {"site-a", "site-b"}}
    assert ROGUE not in json.dumps(metrics)
    assert all(n.alive() for name, n in nodes.items() if name != "site-c")


# -------------------------------------------------------------------------------------------- console scripts
def test_console_scripts_run_one_round_without_tls(tmp_path: Path) -> None:
    """``hermes-client start`` (a subprocess, stopped with SIGTERM) and ``hermes-server start`` (here); the
    site codes its reply with the opt-in reply codec, which real Flower processes carry."""
    from server.cli import main as server_main

    site_yaml = write_site(tmp_path / "site", "solo", ("STS_011", "STS_012"))
    preprocess(site_yaml)
    port = free_port()
    server_yaml = tmp_path / "server.yaml"
    config = server_config(Path("run"), num_server_rounds=1, min_sites=1, min_sites_per_round=1,
                           round_timeout_s=120.0, reply_codec="xor-zstd").model_dump()
    server_yaml.write_text(yaml.safe_dump({k.replace("_", "-"): v for k, v in config.items()}))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    client_log = open(tmp_path / "client.log", "wb")  # noqa: SIM115 - closed below
    client = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "start", "--site", str(site_yaml), "--server",
         f"127.0.0.1:{port}", "--insecure", "--port", str(free_port())],
        env=env, stdout=client_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        status = server_main(["start", "--config", str(server_yaml), "--insecure", "--port", str(port),
                              "--no-stream"])
        log_text = (tmp_path / "run" / "superlink" / "superlink.log").read_text()
        assert status == 0, log_text[-3000:]
        assert sorted(RunStore(tmp_path / "run").round_files()) == [1]  # run-dir relative to the yaml
        aggregate = [m for m in RunStore(tmp_path / "run").read_metrics() if m["scope"] == "aggregate"]
        assert aggregate[0]["valid-replies"] == 1 and aggregate[0]["skipped"] == 0
        assert (tmp_path / "run" / "superlink" / "flwr-home" / "config.toml").is_file()
        assert client.poll() is None  # the SuperNode keeps serving until stopped
        client.send_signal(signal.SIGTERM)
        assert client.wait(timeout=30) == 0
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(10)
        for pid, _ in [p for p in _flower_processes() if str(site_yaml) in p[1]]:  # an orphaned SuperNode
            os.kill(pid, signal.SIGKILL)
        client_log.close()
    client_text = (tmp_path / "client.log").read_text()
    assert "SuperNode of site 'solo'" in client_text
    supernodes = [p for p in _flower_processes() if str(site_yaml) in p[1]]
    assert not supernodes, f"SuperNode left running: {supernodes}"


def _flower_processes() -> list[tuple[int, str]]:
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-" in text or "flwr-" in text:
            out.append((int(cmdline.parent.name), text))
    return out


# ------------------------------------------------------------------------------------------------ fast checks
def fake_site(root: Path, **extra: Any) -> Path:
    """A valid site yaml whose one case is a placeholder file (enough for the launcher's checks)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "p1.nii.gz").write_bytes(b"x")
    (root / "cases.csv").write_text("case,image,label\np1,p1.nii.gz,\n")
    body = {"site": "fake", "work_dir": "work", **extra,
            "datasets": [{"name": "fake_ct", "modality": "CT", "format": "csv", "source": "cases.csv",
                          "classes": {1: "tumour"}}]}
    (root / "site.yaml").write_text(yaml.safe_dump(body))
    return root / "site.yaml"


def test_staged_app_is_a_flower_app_holding_the_run_config(tmp_path: Path) -> None:
    import io
    import tomllib
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    config = server_config(tmp_path / "run")
    fab = build_fab_from_disk(stage_app(tmp_path / "app", config.to_run_config()))
    assert len(fab) < 10 * 2**20  # Flower's cap
    bundle = zipfile.ZipFile(io.BytesIO(fab))
    names = set(bundle.namelist())
    sources = {"server/app.py", "client/app.py", "hermes_model/exchange.py"}
    assert sources | {"hermes_model/data/hermes_catalog.yaml"} <= names
    assert not [n for n in names if n.endswith((".pt", ".npy", ".nii.gz", ".pyc"))]
    app = tomllib.loads(bundle.read("pyproject.toml").decode())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert ServerConfig.from_run_config(app["config"]) == config


def test_launchers_check_their_input(tmp_path: Path) -> None:
    from client.cli import main as client_main
    from client.launch import supernode_command
    from server.launch import superlink_command

    with pytest.raises(ValueError, match="SuperNode authentication needs TLS"):
        start_superlink(tmp_path, supernode_auth=True)
    with pytest.raises(ValueError, match="lacks .*ca.crt"):
        TlsFiles.from_keys_dir(tmp_path)
    site = fake_site(tmp_path / "site", root_certificates="missing-ca.crt")
    with pytest.raises(ValueError, match="--server must be HOST:PORT"):
        start_supernode(site, "localhost")
    with pytest.raises(ValueError, match="root certificate .*missing-ca.crt' does not exist"):
        start_supernode(site, "127.0.0.1:8000")
    with pytest.raises(ValueError, match="auth private key .*nokey' does not exist"):
        start_supernode(site, "127.0.0.1:8000", insecure=True, auth_private_key=tmp_path / "nokey")
    assert client_main(["start", "--site", str(tmp_path / "none.yaml"), "--server", "127.0.0.1:8000"]) == 2

    tls = TlsFiles(tmp_path / "ca.crt", tmp_path / "s.crt", tmp_path / "s.key")
    link = superlink_command("127.0.0.1", 9000, tls, True, tmp_path / "state.db")
    assert link[-1] == "--disable-runtime-dependency-installation" and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-ca-certfile") + 1] == str(tmp_path / "ca.crt") and "--insecure" not in link
    assert "--insecure" in superlink_command("127.0.0.1", 9000, None, False, None)
    node = supernode_command(site, "10.0.0.5:9000", root_certificates=None, auth_private_key=None, port=9195)
    assert node[node.index("--node-config") + 1] == f'site-config="{site}"'
    assert node[node.index("--port") + 1] == "9195" and "--insecure" in node
