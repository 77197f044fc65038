"""ServerConfig: run-config keys, validation messages, resume conflicts."""

from __future__ import annotations

import pytest

from server.config import ServerConfig


def test_dashed_run_config_keys_and_client_keys_ignored():
    cfg = ServerConfig.from_run_config(
        {
            "num-server-rounds": 4,
            "min-sites": 2,
            "min-sites-per-round": 2,
            "round-timeout-s": 7200,
            "strategy": "fedprox",
            "proximal-mu": 0.01,
            "wire-dtype": "float16",
            "reply-codec": "xor-zstd",
            "run-dir": "x",
            "site-configs": "a.yaml,b.yaml",  # a ClientApp key: not the server's business
        }
    )
    assert (cfg.num_server_rounds, cfg.min_sites, cfg.strategy, cfg.wire_dtype) == (
        4,
        2,
        "fedprox",
        "float16",
    )
    assert cfg.round_timeout_s == 7200 and cfg.to_run_config()["proximal-mu"] == 0.01
    assert cfg.reply_codec == "xor-zstd" and ServerConfig().reply_codec == "none"


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"strategy": "fedsgd"}, "strategy.*'fedavg' or 'fedprox'"),
        ({"server-optimizer": "yogi"}, "server-optimizer.*'sgd', 'nesterov', 'adam' or 'lamb'"),
        ({"server-lr": 0}, "server-lr must be 'auto' or a finite number > 0"),
        ({"strategy": "fedprox"}, "needs proximal-mu > 0"),
        ({"proximal-mu": 0.1}, "only used by strategy 'fedprox'"),
        ({"weighting": "cases"}, "weighting"),
        ({"reply-codec": "gzip"}, "reply-codec: Input should be 'none' or 'xor-zstd'"),
        ({"min-sites": 0}, "min-sites"),
        ({"sites-per-round": 1, "min-sites-per-round": 2}, "exceeds sites-per-round"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"local-update": "gradient", "local-iterations": 5}, "gradient.*local-iterations 1 \\(got 5\\)"),
    ],
)
def test_bad_values_name_the_key(values, match):
    with pytest.raises(ValueError, match=match):
        ServerConfig.from_run_config(values)


def test_yaml_rejects_unknown_keys(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("num-server-rounds: 2\nnum-round: 3\n")
    with pytest.raises(ValueError, match="num-round.*allowed keys"):
        ServerConfig.from_yaml(path)
    path.write_text("num-server-rounds: 2\nseed: 5\n")
    assert ServerConfig.from_yaml(path).seed == 5


def test_resume_conflicts_list_changed_fixed_settings():
    saved = ServerConfig(seed=1).model_dump()
    assert ServerConfig(seed=1, num_server_rounds=9).resume_conflicts(saved) == []
    assert ServerConfig(seed=2).resume_conflicts(saved) == ["seed: checkpoint has 1, now 2"]
