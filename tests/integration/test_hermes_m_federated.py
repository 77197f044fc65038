"""Issue 7: the federation with Hermes-M. The real ServerApp and ClientApp in one process (LocalGrid),
two rounds, one real sarcoma CT site, 32^3 patches: the run-config's model choice reaches the sites,
the backbone/prior split finds Hermes-M's banks, and the round checkpoints load as Hermes-M."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from client.app import app as client_app
from hermes_model import load_checkpoint
from server.app import app as server_app
from server.checkpoint import RunStore
from server.config import ServerConfig
from server.local_grid import LocalGrid
from tests.integration.conftest import PLAN_SETTINGS, STS_CT, SiteData, write_site

SITE = SiteData("sts_ct", "CT", {1: "tumour"}, "ibsi_sts", STS_CT, ("STS_019", "STS_025"), val=("STS_025",))


def test_two_rounds_with_hermes_m(tmp_path: Path, shared_data: Path) -> None:
    grid = LocalGrid(client_app, {7: {"site-config": str(write_site(tmp_path / "site", shared_data, "ct", SITE))}})
    config = ServerConfig(
        model="hermes-m", num_server_rounds=2, min_sites=1, min_sites_per_round=1, start_timeout_s=10,
        query_timeout_s=60, round_timeout_s=600, poll_interval_s=0.01, local_iterations=1, evaluate_every=2,
        task_slots=80, modality_slots=6, seed=1, keep_checkpoints=0, warmup_epochs=0, total_epochs=4,
        iters_per_epoch=1, run_dir=str(tmp_path / "run"), **PLAN_SETTINGS,
    )
    context = Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=config.to_run_config())
    server_app(grid, context)
    assert grid.failures == []
    files = RunStore(config.run_dir).round_files()
    assert sorted(files) == [1, 2]
    first, last = (load_checkpoint(files[r]) for r in (1, 2))
    assert last.config == {"name": "hermes-m", "task_slots": 80, "modality_slots": 6}
    before, after = first.model.state_dict(), last.model.state_dict()
    assert not torch.equal(before["up4.conv_blocks.1.conv2.conv.weight"], after["up4.conv_blocks.1.conv2.conv.weight"])
    lines = RunStore(config.run_dir).read_metrics()
    train = [m for m in lines if m["phase"] == "train" and m["scope"] == "site"]
    assert [(m["round"], m["status"]) for m in train] == [(1, "ok"), (2, "ok")]
    (aggregate,) = [m for m in lines if m["phase"] == "evaluate" and m["scope"] == "aggregate" and "weights" not in m]
    assert 0.0 <= aggregate["dice/sts_ct/tumour"] <= 1.0 and aggregate["valid-replies"] == 1
