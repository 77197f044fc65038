import os

import pytest

from simulation.cli import _options, build_parser
from simulation.flower import _federation_config
from simulation.run import (
    SimOptions,
    auto_cpus_per_site,
    busy_seconds,
    parallel_sites,
    ray_cpus,
    run_mode,
    server_config,
    stage_sites,
)


def test_model_choice_reaches_the_server_config(tmp_path):
    args = build_parser().parse_args(["run", "--quick", "--model", "hermes-m", "--run-dir", str(tmp_path / "r")])
    opts = _options(args)
    assert opts.model == "hermes-m"
    config = server_config(opts, stage_sites(opts.sites, tmp_path / "r"), tmp_path / "r")
    assert config.model == "hermes-m"
    assert "base_channels" not in config.model_kwargs(task_slots=80)  # Hermes-M has fixed widths
    default = _options(build_parser().parse_args(["run", "--quick", "--run-dir", str(tmp_path / "d")]))
    assert default.model == "hermes-r" and default.spacing == (3.0, 3.0, 3.0) and default.patch_size == (32, 32, 32)
    plan = _options(build_parser().parse_args(["run", "--spacing", "2,2,3", "--patch-size", "48"]))
    assert plan.spacing == (2.0, 2.0, 3.0) and plan.patch_size == (48, 48, 48)


def test_cpu_share_lets_every_site_run_at_once(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert auto_cpus_per_site(5) == 1
    assert ray_cpus(5, 1, 0.0) == 5                  # Ray schedules all five sites on the two cores
    assert parallel_sites(5, 1, 0.0, ray_cpus(5, 1, 0.0)) == 5
    assert parallel_sites(5, 1, 0.0) == 2            # Ray's own count: three waves of sites per round
    assert ray_cpus(2, 1, 0.0) is None               # enough cores: Ray's own count
    assert ray_cpus(5, 1, 0.2) is None               # GPU runs are never oversubscribed
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert auto_cpus_per_site(5) == 3
    assert ray_cpus(5, 3, 0.0) is None and parallel_sites(5, 3, 0.0, None) == 5
    assert _federation_config(5, 1, 0.0, 5).endswith("init-args-num-cpus=5")
    assert "init-args" not in _federation_config(5, 3, 0.0, None)
    assert _options(build_parser().parse_args(["run", "--quick"])).cpus_per_site is None  # automatic
    for bad in (0, 0.5, True):
        with pytest.raises(ValueError, match="cpus-per-site must be a whole number"):
            SimOptions(cpus_per_site=bad)


def _line(phase, round_, site, seconds, status="ok"):
    key = "train-time-s" if phase == "train" else "eval-time-s"
    return {"phase": phase, "scope": "site", "round": round_, "site": site, key: seconds, "status": status}


def test_busy_time_counts_a_round_once_when_its_sites_run_side_by_side():
    lines = [_line("train", 1, "a", 10.0), _line("train", 1, "b", 12.0), _line("train", 1, "c", 11.0),
             _line("train", 2, "a", 9.0), _line("train", 2, "b", 8.0), _line("train", 2, "c", 5.0, "failed"),
             _line("evaluate", 2, "a", 3.0), _line("evaluate", 2, "b", 4.0),
             {"phase": "train", "scope": "aggregate", "round": 1, "train-time-s": 99.0}]
    assert busy_seconds(lines, parallel=3) == pytest.approx(12.0 + 9.0 + 4.0)   # slowest site per phase
    assert busy_seconds(lines, parallel=1) == pytest.approx(33.0 + 17.0 + 7.0)  # one at a time: the sum
    assert busy_seconds(lines, parallel=2) == pytest.approx(16.5 + 9.0 + 4.0)   # waves: total / parallel


def test_strategy_options_reach_the_server_config(tmp_path):
    def config(*flags):
        run_dir = tmp_path / str(len(list(tmp_path.iterdir())))
        opts = _options(build_parser().parse_args(["run", "--quick", "--run-dir", str(run_dir), *flags]))
        return server_config(opts, stage_sites(opts.sites, run_dir), run_dir)

    assert config().strategy == "fedavg"
    prox = config("--strategy", "fedprox", "--proximal-mu", "0.01")
    assert (prox.strategy, prox.proximal_mu) == ("fedprox", 0.01)
    adam = config("--server-optimizer", "adam", "--server-lr", "0.05")
    assert (adam.strategy, adam.server_optimizer, adam.server_lr) == ("fedavg", "adam", 0.05)
    assert adam.outer_settings().lr == 0.05 and config("--server-optimizer", "nesterov").outer_settings().lr == 0.7
    with pytest.raises(ValueError, match="needs proximal-mu > 0"):
        config("--strategy", "fedprox")
    with pytest.raises(ValueError, match="federated runs only, not local-only"):
        run_mode("local-only", SimOptions(quick=True, server_optimizer="adam", run_dir=tmp_path / "local"))
    assert not (tmp_path / "local").exists()  # refused before anything is written
