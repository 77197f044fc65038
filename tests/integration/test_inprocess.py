"""The real ServerApp and the real site ClientApp together in one process (no Ray, no processes): an
in-process Grid (``server.local_grid.LocalGrid``) delivers every message, serialised as on the wire, to
``client.app.app`` with a per-node context.

Three sites built from real cases of ``shared/data`` beside the repo (skipped when absent): sarcoma CT,
sarcoma MR-T1 (other patients) and BraTS FLAIR (4 classes). All three datasets are new to the bundled
catalog, so the server registers them from the sites' query replies (incremental learning: new task ids
after the catalog's 71). Two rounds of 2 local iterations, Hermes-R at base 8, 32^3 patches, batch 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from client.app import app as client_app
from hermes_model import build_model, load_checkpoint
from hermes_model.catalog import Catalog
from hermes_model.exchange import StateLayout
from server.app import app as server_app
from server.bank import MODALITY, TASK, PriorBank, SiteDataset
from server.checkpoint import RunStore, load_round_checkpoint
from server.config import ServerConfig
from server.local_grid import LocalGrid
from server.runner import initial_model
from tests.integration.conftest import (
    BRATS_CLASSES,
    BRATS_FLAIR,
    PLAN_SETTINGS,
    STS_CT,
    STS_MR_T1,
    SiteData,
    write_site,
)

SITES = {
    31: ("brats-site", SiteData("brats2013", "MR-T2", BRATS_CLASSES, "brats2013", BRATS_FLAIR,
                                ("brats_2013_pat0001_1", "brats_2013_pat0002_1"), val=("brats_2013_pat0002_1",))),
    32: ("sarcoma-ct", SiteData("sts_ct", "CT", {1: "tumour"}, "ibsi_sts", STS_CT, ("STS_019", "STS_025"),
                                val=("STS_025",))),
    33: ("sarcoma-mr", SiteData("sts_mr", "MR-T1", {1: "tumour"}, "ibsi_sts", STS_MR_T1, ("STS_018", "STS_026"),
                                val=("STS_026",))),
}
MODALITY_ROWS = {"brats-site": (3,), "sarcoma-ct": (0,), "sarcoma-mr": (2,)}  # MR-T2, CT, MR-T1
ROUNDS, ITERATIONS, TASK_SLOTS = 2, 2, 80
BUNDLED_TASKS = 71  # ids 0..70 of the bundled catalog


def _config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(
        num_server_rounds=ROUNDS, min_sites=3, min_sites_per_round=3, start_timeout_s=10, query_timeout_s=60,
        round_timeout_s=600, poll_interval_s=0.01, local_iterations=ITERATIONS, evaluate_every=ROUNDS,
        base_channels=8, task_slots=TASK_SLOTS, modality_slots=6, seed=3, keep_checkpoints=0,
        warmup_epochs=0, total_epochs=4, iters_per_epoch=ITERATIONS, run_dir=str(tmp_path / "run"),
        **PLAN_SETTINGS,
    )


def _metric_lines(config: ServerConfig) -> list[dict]:
    return RunStore(config.run_dir).read_metrics()


def test_two_rounds_of_three_real_sites(tmp_path: Path, shared_data: Path) -> None:
    nodes = {node: {"site-config": str(write_site(tmp_path / name, shared_data, name, data))}
             for node, (name, data) in SITES.items()}
    grid = LocalGrid(client_app, nodes)
    config = _config(tmp_path)
    context = Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=config.to_run_config())
    server_app(grid, context)  # the ServerApp's main, as the Flower runtime calls it
    assert grid.failures == []

    # checkpoints: one per round, each loadable by the model package
    store = RunStore(config.run_dir)
    files = store.round_files()
    assert sorted(files) == [1, 2] and store.latest_path() == files[2]
    models = {r: load_checkpoint(path).model.state_dict() for r, path in files.items()}
    final = load_round_checkpoint(files[2])
    assert final.server_round == 2 and final.model_config["task_slots"] == TASK_SLOTS

    # incremental learning: the bundled ids never moved, the three new datasets got new ids >= 71
    catalog, bundled = final.catalog, Catalog.load()
    assert {k: catalog.task_id(k) for k in bundled.task_map()} == bundled.task_map()
    ids = {name: catalog.dataset(data.dataset).task_ids for name, data in SITES.values()}
    assert len(ids["brats-site"]) == 4 and ids["sarcoma-ct"] != ids["sarcoma-mr"]
    assert sorted(t for v in ids.values() for t in v) == list(range(BUNDLED_TASKS, BUNDLED_TASKS + 6))

    # the bank: each site owns exactly its rows, every owned row was updated in both rounds
    bank = final.bank
    assert sorted(bank.sites) == sorted(name for name, _ in SITES.values())
    for site, own in bank.sites.items():
        assert own.task_ids == ids[site] and own.modality_rows == MODALITY_ROWS[site]
        for kind, rows in ((TASK, own.task_ids), (MODALITY, own.modality_rows)):
            for row in rows:
                assert bank.owners(kind, row) == {site}
                assert (bank.info(kind, row).last_round, bank.info(kind, row).samples) == (2, ITERATIONS)

    # the weights: backbone and owned rows trained, every row nobody owns exactly as initialised
    initial = initial_model(config)
    layout = StateLayout.from_model(initial)
    start, end = initial.state_dict(), models[2]
    owned_tasks = sorted(t for v in ids.values() for t in v)
    owned_mods = sorted(r for v in MODALITY_ROWS.values() for r in v)
    free_tasks = [t for t in range(layout.task_slots) if t not in owned_tasks]
    free_mods = [r for r in range(layout.modality_slots) if r not in owned_mods]
    assert torch.equal(layout.task_rows(end, free_tasks), layout.task_rows(start, free_tasks))
    assert torch.equal(layout.modality_rows(end, free_mods), layout.modality_rows(start, free_mods))
    assert (layout.task_rows(end, owned_tasks) != layout.task_rows(start, owned_tasks)).any(dim=1).all()
    assert (layout.modality_rows(end, owned_mods) != layout.modality_rows(start, owned_mods)).any(dim=1).all()
    assert not torch.equal(layout.backbone(end), layout.backbone(start))
    assert not torch.equal(layout.backbone(models[1]), layout.backbone(end))

    # metrics.jsonl: one train line per site per round, evaluation (last round) with Dice per task
    lines = _metric_lines(config)
    train = [m for m in lines if m["phase"] == "train" and m["scope"] == "site"]
    assert sorted((m["round"], m["site"]) for m in train) == sorted(
        (r, name) for r in (1, 2) for name, _ in SITES.values())
    assert all(m["status"] == "ok" and m["num-examples"] == ITERATIONS and math.isfinite(m["loss"]) for m in train)
    summary = [m for m in lines if m["phase"] == "train" and m["scope"] == "aggregate"]
    assert [(m["round"], m["valid-replies"], m["dropped-replies"]) for m in summary] == [(1, 3, 0), (2, 3, 0)]
    evaluated = [m for m in lines if m["phase"] == "evaluate" and m["scope"] == "site" and "weights" not in m]
    assert sorted((m["round"], m["site"]) for m in evaluated) == [(2, name) for name in sorted(bank.sites)]
    raw = [m for m in lines if m["phase"] == "evaluate" and m["scope"] == "site" and m.get("weights") == "raw"]
    assert sorted((m["round"], m["site"]) for m in raw) == [(2, name) for name in sorted(bank.sites)]  # last round
    (aggregate,) = [m for m in lines if m["phase"] == "evaluate" and m["scope"] == "aggregate" and "weights" not in m]
    dice = {k: v for k, v in aggregate.items() if k.startswith("dice/")}
    assert {"dice/sts_ct/tumour", "dice/sts_mr/tumour"} <= set(dice)
    assert any(k.startswith("dice/brats2013/") for k in dice)
    assert all(0.0 <= v <= 1.0 for v in [*dice.values(), aggregate["dice-mean"]])
    assert aggregate["valid-replies"] == 3 and aggregate["num-examples"] == 3  # one validation case per site


# ------------------------------------------------------------------------------------------------ capacity
def test_new_task_ids_fit_the_model_capacity() -> None:
    """The bank's capacity rule is the network's: with task_slots = 72 (the published 71 tasks + null) a
    new dataset is refused at registration; with 73 it gets id 71, which the network accepts."""
    new = [SiteDataset("sts_ct", ("CT",), {1: "tumour"}, 2)]
    with pytest.raises(ValueError, match=r"need task ids up to 71, i.e. task-slots >= 73, .* task_slots=72"):
        PriorBank(72, 6).register_site("sarcoma-ct", new, Catalog.load())
    own = PriorBank(73, 6).register_site("sarcoma-ct", new, Catalog.load())
    assert own.task_ids == (71,)
    x = torch.zeros(1, 1, 32, 16, 16)
    for slots, accepted in ((72, False), (73, True)):
        model = build_model("hermes-r", base_channels=8, task_slots=slots, modality_slots=6).eval()
        with torch.no_grad():
            if accepted:
                seg, _ = model(x, torch.tensor([[71]]), torch.tensor([[0]]))
                assert seg.shape == (1, 1, 32, 16, 16)
            else:
                with pytest.raises(ValueError, match="task_ids out of range"):
                    model(x, torch.tensor([[71]]), torch.tensor([[0]]))


# ------------------------------------------------------------------------------------------------ the grid
def _echo_app() -> ClientApp:
    """A ClientApp that counts its messages in ``context.state``, doubles the received array, and fails on
    request."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if msg.content["config"]["fail"]:
            raise RuntimeError("asked to fail")
        count = context.state.get("count", MetricRecord({"n": 0}))["n"] + 1
        context.state["count"] = MetricRecord({"n": count})
        values = msg.content["arrays"]["x"].numpy()
        values *= 2  # in place: must not reach the sender's array
        arrays = ArrayRecord({"x": Array(values)})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"n": count})}), reply_to=msg)

    return app


def _train_message(node: int, fail: bool = False) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"x": Array(np.ones(3, np.float32))}),
                          "config": ConfigRecord({"fail": fail})})
    return Message(content, dst_node_id=node, message_type="train", ttl=60.0)


def test_local_grid_delivers_like_the_runtime() -> None:
    grid = LocalGrid(_echo_app(), {5: {"site-config": "a.yaml"}, 6: {}}, {"num-server-rounds": 2})
    assert sorted(grid.get_node_ids()) == [5, 6] and grid.contexts[5].node_config == {"site-config": "a.yaml"}
    sent = [_train_message(5), _train_message(6), _train_message(5)]
    replies = list(grid.send_and_receive(sent))
    assert [r.metadata.src_node_id for r in replies] == [5, 6, 5]
    assert [r.metadata.reply_to_message_id for r in replies] == [m.metadata.message_id for m in sent]
    assert all(r.metadata.dst_node_id == SUPERLINK_NODE_ID and r.metadata.message_id for r in replies)
    assert [r.content["metrics"]["n"] for r in replies] == [1, 1, 2]  # per-node state persists
    assert np.array_equal(replies[0].content["arrays"]["x"].numpy(), [2, 2, 2])
    assert np.array_equal(sent[0].content["arrays"]["x"].numpy(), [1, 1, 1])  # serialised: a copy

    (error,) = grid.send_and_receive([_train_message(6, fail=True)])
    assert error.has_error() and error.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "asked to fail" in error.error.reason and grid.failures[0][:2] == (6, "train")

    grid.disconnect(6)
    assert list(grid.get_node_ids()) == [5]
    assert list(grid.send_and_receive([_train_message(6), _train_message(5)]))[0].metadata.src_node_id == 5
    with pytest.raises(ValueError, match="dst_node_id 9 is not a node"):
        grid.send_and_receive([_train_message(9)])
    with pytest.raises(ValueError, match="not the SuperLink's"):
        LocalGrid(_echo_app(), {SUPERLINK_NODE_ID: {}})
    assert dict(grid.contexts[5].run_config) == {"num-server-rounds": 2}
