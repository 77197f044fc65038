"""Before round 1 on an in-process fake grid: the plan, the data check, the bank's size, the schedule, and
what the operator reads (sites named, round summaries, one clear line when the run cannot go on)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict

from hermes_model import load_checkpoint
from hermes_model.fingerprint import fingerprints_to_json
from server.app import RUN_STATUS_FILE, app
from server.config import ServerConfig
from server.runner import FederationFailed, run_federation
from tests.server.fakes import FakeGrid, FakeSite, dataset_json, fingerprint_of, small_catalog

ALPHA = ("alpha", "CT", {1: "liver", 2: "tumour"})
BETA = ("beta", "MR-T2", {1: "prostate"})
DELTA = ("delta", "PET", {1: "lesion"})  # new to the catalog


def _config(tmp_path: Path, **overrides) -> ServerConfig:
    catalog = tmp_path / "catalog.yaml"
    if not catalog.exists():
        small_catalog().save(catalog)
    values = dict(num_server_rounds=2, min_sites=2, start_timeout_s=30, query_timeout_s=5, round_timeout_s=30,
                  poll_interval_s=0.01, local_iterations=3, base_channels=8, modality_slots=6,
                  catalog=str(catalog), run_dir=str(tmp_path / "run"), evaluate_every=2)
    values.update(overrides)
    return ServerConfig(**values)


def _sites() -> dict[int, FakeSite]:
    return {11: FakeSite("site-a", dataset_json(ALPHA), 8, {"dice/alpha/liver": 0.7}),
            12: FakeSite("site-b", dataset_json(BETA, DELTA), 4, {"dice/beta/prostate": 0.5})}


def test_the_bank_is_sized_from_the_sites_and_the_run_folder_keeps_plan_and_fingerprint(tmp_path: Path,
                                                                                      caplog) -> None:
    config = _config(tmp_path)
    assert config.task_slots == 0  # the default: sized at the start
    with caplog.at_level(logging.INFO, logger="server"):
        result = run_federation(FakeGrid(_sites()), config)
    # 3 tasks in the catalog + delta's 1 = 4 tasks (ids 0..3), one slot for the null token, 8 spare
    assert result.catalog.num_tasks == 4 and result.bank.task_slots == 4 + 1 + 8
    assert "prior bank: 13 task rows (4 tasks in the catalog, 8 spare for sites that join later)" in caplog.text
    run = Path(config.run_dir)
    plans = json.loads((run / "plans.json").read_text())
    assert plans["target_spacing"] == [1.5] * 3 and plans["patch_size"] == [128] * 3
    assert plans["model"] == {"name": "hermes-r", "base_channels": 8, "task_slots": 13, "modality_slots": 6}
    fingerprint = json.loads((run / "fingerprint.json").read_text())
    assert sorted(fingerprint["modalities"]) == ["CT", "MR-T2", "PET"] and sorted(fingerprint["sites"]) == [
        "site-a", "site-b"]
    assert fingerprint["modalities"]["CT"]["cases"] == 3
    # the model a run hands over: weights, plan, and which tasks were trained with which modality
    final = load_checkpoint(run / "final_model.pt")
    assert final.extra["mode"] == "federated" and final.extra["server_round"] == 2
    assert final.extra["plans"] == plans
    trained = final.extra["trained_tasks"]
    assert sorted(trained) == ["0", "1", "2", "3"]
    assert trained["0"]["modalities"] == ["CT"] and trained["3"]["modalities"] == ["PET"]
    assert trained["0"]["samples"] == 2 * 8 and trained["2"]["samples"] == 2 * 4  # 2 rounds


def test_messages_carry_the_plan_the_run_key_and_a_fitted_schedule(tmp_path: Path, caplog) -> None:
    grid = FakeGrid(_sites())
    config = _config(tmp_path, num_server_rounds=3, local_iterations=4)
    with caplog.at_level(logging.INFO, logger="server"):
        run_federation(grid, config)
    trains = [m.content["config"] for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains) == 6
    assert {json.loads(c["plans"])["patch_size"][0] for c in trains} == {128}
    assert len({c["run-key"] for c in trains}) == 1 and next(iter(trains))["run-key"].startswith("run-")
    engine = json.loads(trains[0]["engine"])
    assert (engine["warmup_epochs"], engine["total_epochs"], engine["iters_per_epoch"]) == (0, 3, 4)
    assert [c["schedule-iteration"] for c in trains[::2]] == [0, 4, 8]
    assert ("schedule: learning rate 0.002 (lamb): warm-up 0 steps, then poly decay to 0 at step 12; the run "
            "takes 12 steps per site (3 rounds x 4) [fitted to the run]") in caplog.text
    # a round summary names every site, with samples, loss, time and Dice
    assert "round 3/3 summary:" in caplog.text
    assert "site 'site-a': 8 samples, loss 1.0000" in caplog.text and "Dice 0.700" in caplog.text


def test_an_explicit_schedule_is_checked_against_the_run() -> None:
    with pytest.raises(ValueError, match=r"its 30 steps .* end inside the warm-up of 2000 steps"):
        ServerConfig(num_server_rounds=3, local_iterations=10, warmup_epochs=5, total_epochs=200, iters_per_epoch=400)
    long = ServerConfig(num_server_rounds=3, local_iterations=10, total_epochs=200, iters_per_epoch=400,
                        warmup_epochs=0)
    assert "ends at step 30 of a 80000-step schedule" in long.schedule_problems()["warning"]
    assert ServerConfig(num_server_rounds=400).schedule() == {"warmup_epochs": 10, "total_epochs": 400,
                                                              "iters_per_epoch": 400}


@pytest.mark.parametrize("leaves", [False, True], ids=["stays-connected", "disconnects-when-refused"])
def test_a_site_whose_ct_is_not_in_hu_is_refused_told_why_and_the_run_ends_at_once(tmp_path: Path, caplog,
                                                                                   leaves: bool) -> None:
    offset = fingerprint_of("alpha", "CT", intensity={"0.5": 24.0, "50": 1024.0, "99.5": 1524.0})
    sites = _sites()
    sites[11].fingerprint = fingerprints_to_json([offset])
    sites[11].leaves_when_refused = leaves
    grid = FakeGrid(sites)
    config = _config(tmp_path)
    start = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="server"), pytest.raises(FederationFailed) as info:
        run_federation(grid, config)
    assert time.monotonic() - start < 10  # not the start timeout
    message = str(info.value)
    assert message.startswith("min-sites=2 cannot be met: 2 site(s) came, 1 refused (site-a: ")
    (reason,) = sites[11].refusals  # the site was told, once
    assert "site 'site-a', dataset 'alpha' (CT): CT is not in Hounsfield units" in reason
    assert "0.5th percentile of its voxels is 24" in reason and "-1024" in reason
    assert not sites[12].refusals
    assert caplog.text.count("refused: site 'site-a'") == 1
    # the ServerApp ends it with one line and a status file, no traceback
    grid = FakeGrid({11: FakeSite("site-a", dataset_json(ALPHA), fingerprint=fingerprints_to_json([offset])),
                     12: FakeSite("site-b", dataset_json(BETA))})
    status_config = _config(tmp_path, run_dir=str(tmp_path / "app-run"))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=status_config.to_run_config())
    app(grid, context)
    status = json.loads((tmp_path / "app-run" / RUN_STATUS_FILE).read_text())
    assert status["status"] == "failed" and "cannot be met" in status["reason"]


def test_spacing_far_from_the_plan_pet_not_in_suv_and_another_release_are_refused(tmp_path: Path) -> None:
    sites = {
        11: FakeSite("site-a", dataset_json(ALPHA)),
        12: FakeSite("site-b", dataset_json(DELTA),
                     fingerprint=fingerprints_to_json([fingerprint_of("delta", "PET", foreground={"99.5": 9000.0})])),
        13: FakeSite("site-c", dataset_json(BETA),
                     fingerprint=fingerprints_to_json([fingerprint_of("beta", "MR-T2", spacing=5.0)])),
        14: FakeSite("site-d", dataset_json(ALPHA), protocol=1),  # an older release
    }
    result = run_federation(FakeGrid(sites), _config(tmp_path, min_sites=1, num_server_rounds=1))
    assert sorted(result.bank.sites) == ["site-a"]
    assert sites[14].refusals == ["site 'site-d' speaks protocol version 1, this server 2: install the server's "
                                  "hermes-fl release at the site"]
    assert "PET is not in SUV" in sites[12].refusals[0] and "99.5th percentile" in sites[12].refusals[0]
    assert "typical spacing along x is 5 mm, 3.3x the plan's 1.5 mm" in sites[13].refusals[0]


def test_a_dropped_reply_names_its_site_even_when_the_superlink_sent_it(tmp_path: Path, caplog) -> None:
    def dies(site: FakeSite, msg: Message) -> Message:
        if msg.metadata.message_type != "train":
            return site.evaluate(msg)
        reply = Message(Error(code=0, reason="node unavailable"), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = 1  # as in a deployment: the SuperLink answers for a dead node
        return reply

    sites = _sites()
    sites[12].reply = dies
    config = _config(tmp_path, num_server_rounds=1, min_sites_per_round=1, evaluate_every=0)
    with caplog.at_level(logging.WARNING, logger="server"):
        run_federation(FakeGrid(sites), config)
    dropped = [json.loads(line) for line in (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()]
    dropped = [m for m in dropped if m.get("status") == "dropped"]
    assert [(m["site"], m["reason"]) for m in dropped] == [("site-b", "error-reply")]
    assert "dropped the train reply of site 'site-b'" in caplog.text and "node-" not in caplog.text
