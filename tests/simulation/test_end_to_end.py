"""``hermes-sim run --quick`` end to end: the real ServerApp and ClientApp as two virtual sites of the Flower
simulation engine (Ray), two rounds, on the bundled demo data. Takes one to two minutes on 2 CPU cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.predict import main as predict_main
from hermes_model.factory import load_checkpoint
from simulation.cli import main
from simulation.report import CURVES_PNG, FINAL_DICE_PNG, REPORT_CSV, REPORT_JSON, read_metrics
from simulation.sites import REPO_ROOT
from tests.simulation.processes import EXIT_GRACE_S, wait_until_gone

pytestmark = pytest.mark.slow


def test_quick_federated_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "fed"
    assert main(["run", "--quick", "--run-dir", str(run_dir), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "sarcoma/tumour" in printed and "simulation overhead" in printed
    assert "raw weights (not the EMA), round 2: sarcoma" in printed

    for name in (REPORT_CSV, REPORT_JSON, CURVES_PNG, FINAL_DICE_PNG, "final_model.pt", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round_*.pt")) == ["round_0001.pt",
                                                                                   "round_0002.pt"]
    report = json.loads((run_dir / REPORT_JSON).read_text())
    assert report["run"]["mode"] == "federated" and report["run"]["sites"] == ["sarcoma-ct", "sarcoma-mr"]
    assert report["run"]["server_optimizer"] == "nesterov" and report["run"]["keep_local_state"]  # the defaults
    dice = report["dice"]["tasks"]["sarcoma/tumour"]
    assert 0.0 <= dice <= 1.0
    assert set(report["dice"]["sites"]) == {"sarcoma-ct", "sarcoma-mr"}
    raw = report["dice_raw_weights"]  # the last round also scored the raw weights, beside the EMA
    assert raw["round"] == 2 and set(raw["sites"]) == {"sarcoma-ct", "sarcoma-mr"}

    lines = read_metrics(run_dir)
    train = [x for x in lines if x["phase"] == "train" and x["scope"] == "site"]
    assert sorted((x["round"], x["site"]) for x in train) == [
        (1, "sarcoma-ct"), (1, "sarcoma-mr"), (2, "sarcoma-ct"), (2, "sarcoma-mr")]
    first = sum(x["loss"] for x in train if x["round"] == 1)
    last = sum(x["loss"] for x in train if x["round"] == 2)
    assert last < first, f"the training loss did not go down: round 1 {first / 2:.4f}, round 2 {last / 2:.4f}"

    loaded = load_checkpoint(run_dir / "final_model.pt")
    assert loaded.source == "hermes-fl" and loaded.config["base_channels"] == 8
    assert "sarcoma" in loaded.extra["catalog"]["datasets"]
    assert loaded.extra["plans"]["target_spacing"] == [3.0] * 3 and loaded.extra["plans"]["patch_size"] == [32] * 3
    (sarcoma,) = loaded.extra["trained_tasks"].values()  # the one task the two sites trained
    assert sarcoma["modalities"] == ["CT", "MR-T1"] and sarcoma["samples"] == 2 * 2 * 10 * 2
    # the model's users need nothing but the required flags: the plan and the trained tasks are its own
    scan = REPO_ROOT / "demo_data" / "sarcoma" / "STS_002" / "CT_image.nii.gz"
    out = tmp_path / "seg.nii.gz"
    assert predict_main(["--model", str(run_dir / "final_model.pt"), "--input", str(scan), "--modality", "CT",
                         "--output", str(out), "--no-progress"]) == 0
    info = json.loads((tmp_path / "seg_labels.json").read_text())
    assert info["labels"] == {"1": "sarcoma/tumour"}
    assert info["inference"]["roi"] == [32, 32, 32] and info["preprocessing"]["target_spacing_xyz"] == [3.0] * 3
    # nothing of the simulation is left running (its processes start in <run_dir>/flower)
    assert wait_until_gone(run_dir, EXIT_GRACE_S) == []
