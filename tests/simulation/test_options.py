from simulation.cli import _options, build_parser
from simulation.run import server_config, stage_sites


def test_model_choice_reaches_the_server_config(tmp_path):
    args = build_parser().parse_args(["run", "--quick", "--model", "hermes-m", "--run-dir", str(tmp_path / "r")])
    opts = _options(args)
    assert opts.model == "hermes-m"
    config = server_config(opts, stage_sites(opts.sites, tmp_path / "r"), tmp_path / "r")
    assert config.model == "hermes-m"
    assert "base_channels" not in config.model_kwargs()  # Hermes-M has fixed widths
    default = _options(build_parser().parse_args(["run", "--quick", "--run-dir", str(tmp_path / "d")]))
    assert default.model == "hermes-r"
