"""The bookkeeping of ``benchmarks/federated_vs_centralized.py`` (no training): every arm gets the demo's
samples per site and the same evaluation points, a stopped grid goes on from the runs it finished, and the
seed means are the means of the rows; a score-only call trains nothing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from simulation.run import DEFAULT_LOCAL_ITERATIONS, DEFAULT_ROUNDS

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "federated_vs_centralized.py"


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("federated_vs_centralized", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("mode", ["fedavg", "nesterov-k5", "gradient-k1", "centralized", "local-only"])
def test_every_arm_draws_the_demo_samples_and_is_evaluated_at_the_same_points(grid, mode, tmp_path) -> None:
    opts = grid._sim_options(grid.MODES[mode], 1, tmp_path, quick=False, rounds=None)
    assert opts.rounds * opts.local_iterations == DEFAULT_ROUNDS * DEFAULT_LOCAL_ITERATIONS
    assert opts.evaluate_every * grid.EVALUATIONS == opts.rounds  # at a third, two thirds and the end
    assert opts.seed == 1 and not opts.evaluate_raw


def test_a_finished_run_is_reused_and_a_different_one_is_not(grid, tmp_path) -> None:
    opts = grid._sim_options(grid.MODES["fedavg"], 0, tmp_path / "fedavg-seed0", quick=False, rounds=None)
    assert grid._finished_run(opts) is None  # nothing there yet
    opts.run_dir.mkdir()
    summary = {"mode": "federated", "rounds": opts.rounds, "local_iterations": opts.local_iterations,
               "wall_time_s": 12.5}
    dice = {"round": opts.rounds, "tasks": {"sarcoma/tumour": 0.5}, "datasets": {"sarcoma": 0.5}, "overall": 0.5,
            "sites": {"sarcoma-ct": {"sarcoma/tumour": {"dice": 0.5, "cases": 3}}}}
    (opts.run_dir / "report.json").write_text(json.dumps({"run": summary, "dice": dice}))
    report, held = grid._finished_run(opts)
    assert held["wall_time_s"] == 12.5 and report.datasets == {"sarcoma": 0.5}
    assert grid._val_row(report)["per_site"] == {"sarcoma-ct": 0.5}
    other = grid._sim_options(grid.MODES["nesterov-k5"], 0, opts.run_dir, quick=False, rounds=None)
    assert grid._finished_run(other) is None  # another schedule in that folder: not this arm's run


def test_seed_means(grid) -> None:
    rows = [{"mode": "fedavg", "split": "test", "seed": s, "sarcoma": v, "brats": None, "all": v, "wall_s": w}
            for s, v, w in ((0, 0.2, 100.0), (1, 0.4, 300.0))]
    (mean,) = grid.seed_means(rows)
    assert mean == {"mode": "fedavg", "split": "test", "seeds": [0, 1], "sarcoma": pytest.approx(0.3),
                    "brats": None, "all": pytest.approx(0.3), "wall_s": 200.0}


def test_score_only_leaves_an_unfinished_arm_out_without_training_it(grid, tmp_path, capsys) -> None:
    rows = grid.run_arm("fedavg", 0, tmp_path, quick=True, rounds=None, patients=grid.QUICK_TEST_PATIENTS,
                        score_only=True)
    assert rows == [] and not (tmp_path / "fedavg-seed0").exists()
    assert "fedavg seed 0: not finished" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grid.main(["--score-only"])  # nowhere to find finished arms


def test_the_baselines_draw_the_default_modes_patches_and_their_k20_twins_fedavgs(grid, tmp_path) -> None:
    def schedule(mode: str) -> tuple[int, int]:
        opts = grid._sim_options(grid.MODES[mode], 0, tmp_path, quick=False, rounds=None)
        return opts.rounds, opts.local_iterations

    assert schedule("centralized") == schedule("local-only") == schedule(grid.DEFAULT_MODE) == (
        DEFAULT_ROUNDS, DEFAULT_LOCAL_ITERATIONS)
    assert schedule("centralized-k20") == schedule("local-only-k20") == schedule("fedavg") == schedule("adam")
