import os

import pytest

from simulation.cli import _options, build_parser
from simulation.flower import _federation_config
from simulation.run import (
    SimOptions,
    auto_cpus_per_site,
    parallel_sites,
    ray_cpus,
    server_config,
    stage_sites,
)


def test_model_choice_reaches_the_server_config(tmp_path):
    args = build_parser().parse_args(["run", "--quick", "--model", "hermes-m", "--run-dir", str(tmp_path / "r")])
    opts = _options(args)
    assert opts.model == "hermes-m"
    config = server_config(opts, stage_sites(opts.sites, tmp_path / "r"), tmp_path / "r")
    assert config.model == "hermes-m"
    assert "base_channels" not in config.model_kwargs()  # Hermes-M has fixed widths
    default = _options(build_parser().parse_args(["run", "--quick", "--run-dir", str(tmp_path / "d")]))
    assert default.model == "hermes-r"


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
