"""Report and compare code of hermes-sim on small fabricated metric lines (no training)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from simulation.cli import main as hermes_sim
from simulation.compare import ALL_TASKS, comparison_rows, dice_curves, format_comparison, load_runs, write_comparison
from simulation.report import (
    CURVES_PNG,
    FINAL_DICE_PNG,
    REPORT_CSV,
    REPORT_JSON,
    final_dice,
    first_last_loss,
    format_report,
    load_report,
    read_metrics,
    report_csv,
    write_run_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(scale: float = 1.0) -> list[dict]:
    """Two rounds, three sites: two share task sarcoma/tumour (3 and 1 validation cases)."""
    out = []
    for rnd, loss in ((1, 1.4), (2, 0.9)):
        for site in ("ct", "mr", "brain"):
            out.append({"round": rnd, "phase": "train", "scope": "site", "site": site, "status": "ok",
                        "loss": loss + (0.1 if site == "mr" else 0.0), "train-time-s": 2.0})
        out.append({"round": rnd, "phase": "train", "scope": "aggregate", "loss": loss})
    out += [
        {"round": 2, "phase": "evaluate", "scope": "site", "site": "ct", "status": "ok", "num-examples": 3,
         "dice/sarcoma/tumour": 0.8 * scale, "dice-mean": 0.8 * scale},
        {"round": 2, "phase": "evaluate", "scope": "site", "site": "mr", "status": "ok", "num-examples": 1,
         "dice/sarcoma/tumour": 0.4 * scale, "dice-mean": 0.4 * scale},
        {"round": 2, "phase": "evaluate", "scope": "site", "site": "brain", "status": "ok", "num-examples": 1,
         "dice/brats/oedema": 0.6 * scale, "dice/brats/necrosis": 0.2 * scale, "dice-mean": 0.4 * scale},
        # a dropped reply and an aggregate line must not count
        {"round": 2, "phase": "evaluate", "scope": "site", "site": "pet", "status": "dropped", "reason": "x"},
        {"round": 2, "phase": "evaluate", "scope": "aggregate", "dice/sarcoma/tumour": 0.0},
    ]
    return out


def _write(run_dir: Path, lines: list[dict], mode: str | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if mode is not None:
        write_run_report(run_dir, {"mode": mode})
    return run_dir


def test_final_dice_weights_tasks_by_cases_and_averages_datasets() -> None:
    report = final_dice(_lines())
    assert report.server_round == 2
    assert report.tasks["sarcoma/tumour"] == pytest.approx((0.8 * 3 + 0.4 * 1) / 4)
    assert report.tasks["brats/oedema"] == pytest.approx(0.6)
    assert report.datasets["brats"] == pytest.approx(0.4)
    assert report.datasets["sarcoma"] == pytest.approx(0.7)
    assert report.overall == pytest.approx((0.7 + 0.6 + 0.2) / 3)
    assert set(report.site_tasks) == {"ct", "mr", "brain"}  # the dropped site is left out
    assert report.site_tasks["ct"]["sarcoma/tumour"] == (pytest.approx(0.8), 3)


def test_final_dice_of_a_round_without_evaluation_is_an_error() -> None:
    with pytest.raises(ValueError, match="round 1 has no evaluation"):
        final_dice(_lines(), server_round=1)
    empty = final_dice([x for x in _lines() if x["phase"] == "train"])
    assert empty.server_round is None and math.isnan(empty.overall)
    assert "no evaluation" in format_report(empty)


def test_report_csv_has_every_level() -> None:
    rows = list(csv.DictReader(io.StringIO(report_csv(final_dice(_lines())))))
    levels = [r["level"] for r in rows]
    assert levels.count("site-task") == 4 and levels.count("task") == 3
    assert levels.count("dataset") == 2 and levels[-1] == "overall"
    sarcoma = next(r for r in rows if r["level"] == "task" and r["name"] == "sarcoma/tumour")
    assert float(sarcoma["dice"]) == pytest.approx(0.7, abs=1e-4)


def test_first_last_loss_per_site() -> None:
    loss = first_last_loss(_lines())
    assert loss["mr"] == (pytest.approx(1.5), pytest.approx(1.0))
    assert all(last < first for first, last in loss.values())


def test_write_run_report_files_and_round_trip(tmp_path: Path) -> None:
    run = _write(tmp_path / "run", _lines())
    with (run / "metrics.jsonl").open("a") as f:
        f.write("not json\n")
    assert len(read_metrics(run)) == len(_lines())
    report, files = write_run_report(run, {"mode": "federated", "wall_time_s": 3.0})
    names = {p.name for p in files}
    assert names == {REPORT_CSV, REPORT_JSON, CURVES_PNG, FINAL_DICE_PNG}
    for name in (CURVES_PNG, FINAL_DICE_PNG):
        assert (run / name).read_bytes().startswith(PNG_MAGIC)
    loaded, summary = load_report(run)
    assert summary["mode"] == "federated"
    assert loaded.tasks == pytest.approx(report.tasks)
    assert loaded.site_tasks["brain"]["brats/oedema"][1] == 1
    with pytest.raises(ValueError, match="does not exist"):
        load_report(tmp_path / "missing")


def test_compare_runs_side_by_side(tmp_path: Path) -> None:
    fed = _write(tmp_path / "fed", _lines(1.0), mode="federated")
    local = _write(tmp_path / "loc", _lines(0.5), mode="local-only")
    runs = load_runs([fed, local])
    assert [r.label for r in runs] == ["federated:fed", "local-only:loc"]
    rows = comparison_rows(runs)
    sarcoma = next(r for r in rows if r[:2] == ["dataset", "sarcoma"])
    assert sarcoma[2:] == ["0.700", "0.350"]
    assert rows[-1][0] == "overall"
    assert ["site-task", "mr: sarcoma/tumour", "0.400", "0.200"] in rows
    table = format_comparison(runs)
    assert "federated:fed" in table and "local-only:loc" in table
    out = write_comparison(runs, tmp_path / "cmp.png")
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="neither"):
        load_runs([tmp_path])  # a folder without report or metrics


def _evaluated_twice(scale: float) -> list[dict]:
    """:func:`_lines` with a first evaluation in round 1 at half the Dice of round 2."""
    lines = _lines(scale)
    first = [{**x, "round": 1, **{k: v / 2 for k, v in x.items() if k.startswith("dice")}}
             for x in lines if x["phase"] == "evaluate" and x.get("status") == "ok"]
    return lines + first


def test_compare_curves_line_up_runs_by_steps_per_site(tmp_path: Path) -> None:
    fed = _write(tmp_path / "fed", _evaluated_twice(1.0))
    write_run_report(fed, {"mode": "federated", "local_iterations": 20})
    central = _write(tmp_path / "central", _evaluated_twice(0.5))
    write_run_report(central, {"mode": "centralized", "local_iterations": 10})
    panels, xlabel = dice_curves(load_runs([fed, central]))
    assert xlabel == "optimiser steps per site"
    assert list(panels) == [ALL_TASKS, "brats", "sarcoma"]
    assert panels["sarcoma"]["federated:fed"] == [(20, pytest.approx(0.35)), (40, pytest.approx(0.7))]
    assert panels["sarcoma"]["centralized:central"] == [(10, pytest.approx(0.175)), (20, pytest.approx(0.35))]
    # overall = mean of the three tasks (0.7, 0.6, 0.2 at scale 1)
    assert panels[ALL_TASKS]["federated:fed"][-1] == (40, pytest.approx(0.5))

    unknown = _write(tmp_path / "old", _evaluated_twice(1.0))  # metrics only: its steps are unknown
    panels, xlabel = dice_curves(load_runs([fed, unknown]))
    assert xlabel == "round"
    assert [x for x, _ in panels["sarcoma"]["federated:fed"]] == [1, 2]


def test_hermes_sim_compare_writes_table_bars_and_curves(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fed = _write(tmp_path / "fed", _evaluated_twice(1.0), mode="federated")
    local = _write(tmp_path / "loc", _evaluated_twice(0.5), mode="local-only")
    assert hermes_sim(["compare", str(fed), str(local), "--out", str(tmp_path / "bars.png")]) == 0
    printed = capsys.readouterr().out
    assert "federated:fed" in printed and "local-only:loc" in printed
    for name in ("bars.png", "compare_curves.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
