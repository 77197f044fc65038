"""Side-by-side Dice of several runs (``hermes-sim compare RUN_A RUN_B ...``).

Each run directory gives its final Dice (``report.json``, else ``metrics.jsonl``); the table has one row
per dataset (then per task and the overall mean) and one column per run; the bar plot shows Dice per
dataset, one bar per run; the curves show the validation Dice of every evaluated round (all tasks, then
each dataset), one line per run, against the optimiser steps per site so that runs with other rounds or
local steps line up (e.g. federated, centralized and local-only runs of the same schedule).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.report import Series, curves_figure
from simulation.report import DiceReport, bar_figure, dice_by_round, format_table, load_report, read_metrics, save_png

logger = logging.getLogger(__name__)

COMPARE_PNG = "compare_dice.png"
COMPARE_CURVES_PNG = "compare_curves.png"
ALL_TASKS = "all tasks"


@dataclass(frozen=True)
class RunColumn:
    """One compared run: its label (mode and folder name) and Dice report."""

    label: str
    run_dir: Path
    report: DiceReport
    steps_per_round: int | None = None  # the run's local iterations (None: unknown)


def load_runs(run_dirs: Sequence[str | os.PathLike]) -> list[RunColumn]:
    """The Dice reports of ``run_dirs``, labelled ``<mode>:<folder name>`` (the folder name alone when
    the mode is unknown).

    Raises:
        ValueError: fewer than one run, or a folder without report/metrics.
    """
    if not run_dirs:
        raise ValueError("compare: give at least one run directory")
    out = []
    for raw in run_dirs:
        path = Path(raw)
        report, summary = load_report(path)
        mode = summary.get("mode")
        label = f"{mode}:{path.name}" if mode and mode not in path.name else path.name
        steps = summary.get("local_iterations")
        out.append(RunColumn(label, path, report, steps if isinstance(steps, int) and steps > 0 else None))
    return out


def _cell(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def comparison_rows(runs: Sequence[RunColumn]) -> list[list[str]]:
    """Rows ``[level, name, dice of run 1, ...]``: datasets, tasks, each site's tasks (``site: task``,
    on the site's own validation split), then ``overall``."""
    datasets = sorted({k for r in runs for k in r.report.datasets})
    tasks = sorted({k for r in runs for k in r.report.tasks})
    site_tasks = sorted({(s, k) for r in runs for s, t in r.report.site_tasks.items() for k in t})
    rows = [["dataset", d, *[_cell(r.report.datasets.get(d)) for r in runs]] for d in datasets]
    rows += [["task", t, *[_cell(r.report.tasks.get(t)) for r in runs]] for t in tasks]
    rows += [["site-task", f"{s}: {k}", *[_cell(r.report.site_tasks.get(s, {}).get(k, (None,))[0])
                                           for r in runs]] for s, k in site_tasks]
    rows.append(["overall", "all tasks", *[_cell(r.report.overall) for r in runs]])
    return rows


def format_comparison(runs: Sequence[RunColumn]) -> str:
    """The comparison as a markdown table."""
    return format_table(["level", "name", *[r.label for r in runs]], comparison_rows(runs))


def write_comparison(runs: Sequence[RunColumn], out: str | os.PathLike) -> Path:
    """The bar plot of Dice per dataset (one bar per run) as ``out`` (a PNG path)."""
    datasets = sorted({k for r in runs for k in r.report.datasets})
    series = {r.label: [r.report.datasets.get(d, math.nan) for d in datasets] for r in runs}
    return save_png(bar_figure(datasets, series, "final Dice per dataset"), out)


def dice_curves(runs: Sequence[RunColumn]) -> tuple[dict[str, Series], str]:
    """Panel name (``all tasks``, then each dataset) -> run label -> [(x, Dice)] of every evaluated round,
    and the x axis's name: optimiser steps per site when every run knows its local iterations, else rounds."""
    by_steps = all(r.steps_per_round for r in runs)
    panels: dict[str, Series] = {ALL_TASKS: {}}
    for run in runs:
        scale = run.steps_per_round if by_steps else 1
        for server_round, report in dice_by_round(read_metrics(run.run_dir)).items():
            x = server_round * (scale or 1)
            if report.overall is not None and math.isfinite(report.overall):
                panels[ALL_TASKS].setdefault(run.label, []).append((x, report.overall))
            for dataset, dice in report.datasets.items():
                panels.setdefault(dataset, {}).setdefault(run.label, []).append((x, dice))
    return panels, "optimiser steps per site" if by_steps else "round"


def write_curves(runs: Sequence[RunColumn], out: str | os.PathLike) -> Path:
    """The validation Dice curves of :func:`dice_curves` as ``out`` (a PNG path), one panel per entry."""
    panels, xlabel = dice_curves(runs)
    figure = curves_figure([(series, "validation Dice", name) for name, series in panels.items()],
                           ylim=(0.0, 1.0), xlabel=xlabel)
    return save_png(figure, out)
