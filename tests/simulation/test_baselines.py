"""The two baselines without Flower, tiny: centralized (pooled) and local-only on one demo site each,
2 rounds of 3 steps; the federated helpers that build the sites' requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client.dataset import round_sampling_seed
from hermes_model.exchange import StateLayout
from hermes_model.factory import load_checkpoint
from simulation.cli import main
from simulation.local import build_federation, union_data
from simulation.report import REPORT_JSON, read_metrics
from simulation.run import SimOptions, server_config
from simulation.sites import DEMO_SITES_DIR, stage_sites

pytestmark = pytest.mark.slow

CT = DEMO_SITES_DIR / "sarcoma-ct.yaml"
MR = DEMO_SITES_DIR / "sarcoma-mr.yaml"
TINY = ["--rounds", "2", "--local-iterations", "3", "--quiet"]


def test_requests_carry_exactly_the_owned_rows(tmp_path: Path) -> None:
    opts = SimOptions(sites=[CT, MR], rounds=2, local_iterations=3)
    staged = stage_sites(opts.sites, tmp_path)
    fed = build_federation(server_config(opts, staged, tmp_path), [s.path for s in staged])
    ct, mr = fed.ownership["sarcoma-ct"], fed.ownership["sarcoma-mr"]
    assert ct.task_ids == mr.task_ids and len(ct.task_ids) == 1  # one task across modalities
    assert ct.modality_rows != mr.modality_rows
    request = fed.request("sarcoma-mr", fed.model, server_round=2)
    layout = StateLayout.from_model(fed.model)
    assert request.schedule_iteration == 3 and request.local_iterations == 3
    assert torch.equal(request.task_rows, layout.task_rows(fed.model.state_dict(), mr.task_ids))
    # the centralized batches: every site's batch of the round, drawn as its ClientApp draws it
    union = union_data(fed, server_round=2)
    seeds = [round_sampling_seed(fed.config.seed, 2, name, fed.sites[name].config.training.seed)
             for name in ("sarcoma-ct", "sarcoma-mr")]
    assert [p.seed for p in union.parts] == seeds and seeds[0] != seeds[1]
    (batch,) = list(union.loader(1))
    (own,) = list(union.parts[1].loader(1))
    assert batch["image"].shape[0] == sum(p.batch_size for p in union.parts) == 4
    assert torch.equal(batch["image"][2:], own["image"])  # the MR site's patches, as it draws them


def test_centralized_quick(tmp_path: Path) -> None:
    run_dir = tmp_path / "central"
    assert main(["centralized", "--sites", str(CT), str(MR), "--run-dir", str(run_dir), *TINY]) == 0
    lines = read_metrics(run_dir)
    train = [x for x in lines if x["phase"] == "train"]
    assert [(x["round"], x["site"]) for x in train] == [(1, "centralized"), (2, "centralized")]
    assert all(x["num-examples"] == 3 * 4 for x in train)  # both sites' batches together
    evaluated = sorted((x["site"], x.get("weights", "ema")) for x in lines if x["phase"] == "evaluate")
    assert evaluated == [("sarcoma-ct", "ema"), ("sarcoma-ct", "raw"), ("sarcoma-mr", "ema"), ("sarcoma-mr", "raw")]
    report = json.loads((run_dir / REPORT_JSON).read_text())
    assert report["dice_raw_weights"]["round"] == 2 and set(report["dice_raw_weights"]["sites"]) == set(
        report["dice"]["sites"])
    assert report["run"]["mode"] == "centralized" and report["run"]["batch_size"] == 4
    assert 0.0 <= report["dice"]["tasks"]["sarcoma/tumour"] <= 1.0
    loaded = load_checkpoint(run_dir / "final_model.pt")
    assert loaded.config["base_channels"] == 8 and loaded.extra["mode"] == "centralized"
    assert loaded.extra["plans"]["patch_size"] == [32, 32, 32]
    (sarcoma,) = loaded.extra["trained_tasks"].values()  # counted per sample: every one holds the task
    assert sarcoma["samples"] == 2 * 3 * 4 and sarcoma["modalities"] == ["CT", "MR-T1"]


def test_local_only_quick(tmp_path: Path) -> None:
    run_dir = tmp_path / "local"
    assert main(["run", "--local-only", "--sites", str(MR), "--run-dir", str(run_dir), *TINY]) == 0
    lines = read_metrics(run_dir)
    # the last round evaluates the EMA (the model the run hands over) and the raw weights
    assert [(x["round"], x["phase"], x.get("weights")) for x in lines] == [
        (1, "train", None), (2, "train", None), (2, "evaluate", None), (2, "evaluate", "raw")]
    assert all(x["site"] == "sarcoma-mr" and x["num-examples"] > 0 for x in lines)
    report = json.loads((run_dir / REPORT_JSON).read_text())
    assert report["dice_raw_weights"]["sites"]["sarcoma-mr"]["sarcoma/tumour"]["dice"] == pytest.approx(
        lines[3]["dice/sarcoma/tumour"], abs=1e-6)
    assert report["dice"]["sites"]["sarcoma-mr"]["sarcoma/tumour"]["dice"] == pytest.approx(
        lines[2]["dice/sarcoma/tumour"], abs=1e-6)
    assert (run_dir / "models" / "sarcoma-mr.pt").is_file()
    # the site's own optimiser state carried over between rounds
    (state,) = (run_dir / "sites" / "sarcoma-mr" / "client_state").iterdir()  # one folder: this run's
    assert len((state / "history.jsonl").read_text().splitlines()) == 4  # 2 trainings, 2 evaluations
    model = load_checkpoint(run_dir / "models" / "sarcoma-mr.pt")
    assert model.extra["mode"] == "local-only" and model.extra["plans"]["target_spacing"] == [3.0] * 3
    (sarcoma,) = model.extra["trained_tasks"].values()
    assert sarcoma["modalities"] == ["MR-T1"] and sarcoma["samples"] == 2 * 3 * 2
    # a second run into the same folder is refused
    assert main(["run", "--local-only", "--sites", str(MR), "--run-dir", str(run_dir), *TINY]) == 2
