"""Staging of site configs into a run directory, the generated Flower app and process cleanup."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from client.config import load_site_config
from server.config import ServerConfig
from simulation.flower import app_pyproject, descendants, stop_process_tree
from simulation.run import SimOptions, server_config
from simulation.sites import QUICK_SITES, demo_site_paths, stage_sites


def test_the_app_declares_every_server_setting_with_its_default() -> None:
    """``flwr run --run-config`` accepts only declared keys: the pyproject must list every server key."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    defaults = ServerConfig().to_run_config()
    assert {k: v for k, v in declared.items() if k != "site-configs"} == defaults


def test_demo_federation_has_disjoint_patients() -> None:
    paths = demo_site_paths()
    assert {p.stem for p in paths} >= {"sarcoma-ct", "sarcoma-mr", "sarcoma-pet", "brats-flair", "brats-t1c"}
    cases: dict[str, set[str]] = {}
    for path in paths:
        config = load_site_config(path)
        for ds in config.datasets:
            ids = {c.case_id for c in ds.cases()}
            for other, seen in cases.items():
                assert not ids & seen, f"{path.stem} and {other} share patients {ids & seen}"
            cases[path.stem] = ids
    assert [p.stem for p in demo_site_paths(quick=True)] == sorted(QUICK_SITES)


def test_stage_sites_rewrites_work_dir_and_links_preprocessed(tmp_path: Path) -> None:
    staged = stage_sites(demo_site_paths(quick=True), tmp_path / "run")
    assert [s.name for s in staged] == sorted(QUICK_SITES)
    for site in staged:
        raw = yaml.safe_load(site.path.read_text())
        assert Path(raw["work_dir"]) == (tmp_path / "run" / "sites" / site.name).resolve()
        assert all(Path(d["source"]).is_absolute() and Path(d["source"]).is_file() for d in raw["datasets"])
        original = load_site_config(site.source)
        link = site.config.work_dir / "preprocessed"
        assert link.is_symlink() and link.resolve() == original.preprocessed_dir.resolve()
    # staging the same run again is fine (the link is reused)
    assert len(stage_sites(demo_site_paths(quick=True), tmp_path / "run")) == 2


def test_stage_sites_rejects_duplicates_and_missing_files(tmp_path: Path) -> None:
    path = demo_site_paths(quick=True)[0]
    with pytest.raises(ValueError, match="unique"):
        stage_sites([path, path], tmp_path / "run")
    with pytest.raises(ValueError, match="does not exist"):
        stage_sites([tmp_path / "nope.yaml"], tmp_path / "run")
    with pytest.raises(ValueError, match="at least one"):
        stage_sites([], tmp_path / "run")


def test_server_config_uses_the_servers_defaults_and_the_demo_plan(tmp_path: Path) -> None:
    opts = SimOptions(quick=True, run_dir=tmp_path)
    staged = stage_sites(opts.sites, tmp_path)
    config = server_config(opts, staged, tmp_path)
    assert config.task_slots == 0  # sized by the server from the sites, as in a deployment
    assert config.min_sites == 2 and config.num_server_rounds == 2
    assert config.schedule() == {"warmup_epochs": 0, "total_epochs": 2, "iters_per_epoch": config.local_iterations}
    plans = config.plans()
    assert plans.target_spacing == (3.0, 3.0, 3.0) and plans.patch_size == (32, 32, 32)
    assert opts.evaluate_every == 2  # default: the last round only
    with pytest.raises(ValueError, match="rounds"):
        SimOptions(rounds=0)
    with pytest.raises(ValueError, match="gpus-per-site"):
        SimOptions(gpus_per_site=1.5)


def test_app_pyproject_is_valid_toml_with_the_run_config() -> None:
    text = app_pyproject(
        {"num-server-rounds": 3, "run-dir": 'a "quoted" \\ path', "lr": 0.002, "resume": False}
    )
    data = tomllib.loads(text)
    assert data["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app",
                                                          "clientapp": "client.app:app"}
    assert data["tool"]["flwr"]["app"]["config"] == {
        "num-server-rounds": 3, "run-dir": 'a "quoted" \\ path', "lr": 0.002, "resume": False}
    with pytest.raises(ValueError, match="run-config values"):
        app_pyproject({"bad": [1, 2]})


@pytest.mark.skipif(sys.platform != "linux", reason="process tree walk uses /proc")
def test_stop_process_tree_stops_detached_grandchildren() -> None:
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "start_new_session=True); "
            "time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 10
    while not descendants(parent.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    children = descendants(parent.pid)
    assert children, "the grandchild did not start"
    stop_process_tree(parent, timeout_s=5)
    assert parent.poll() is not None
    for pid in children:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
