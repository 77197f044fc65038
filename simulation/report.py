"""The end-of-run report of a ``hermes-sim`` run directory.

From ``metrics.jsonl`` (the server's metric lines, or the same lines written by the centralized and
local-only modes) it writes into the run directory::

    report.csv        level,name,site,dice,cases: Dice per task and site, per task, per dataset, overall
    report.json       the same numbers as nested objects (the model the run hands over, by default the EMA;
                      the raw weights of the last round beside it), plus the run's summary (timing, settings)
    loss_dice.png     train loss per round per site | mean validation Dice per round per site
    final_dice.png    final Dice per task (bars)

The Dice values are those of the last round with an evaluation. Per task: the mean over the sites that
evaluate it, weighted by their number of validation cases; per dataset: the mean of its tasks; overall:
the mean of all tasks.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hermes_model.fileio import atomic_write_bytes, atomic_write_json
from server.checkpoint import METRICS_FILE, RAW_WEIGHTS, WEIGHTS_FIELD
from server.report import curves_figure, save_png, site_dice_series, train_loss_series

logger = logging.getLogger(__name__)

REPORT_CSV = "report.csv"
REPORT_JSON = "report.json"
CURVES_PNG = "loss_dice.png"
FINAL_DICE_PNG = "final_dice.png"
CSV_COLUMNS = ("level", "name", "site", "dice", "cases")
LEVELS = ("site-task", "task", "dataset", "overall")
_DICE = "dice/"  # whole-scan Dice at each case's native geometry (what a user gets)
PAPER_DICE = "dice-paper/"  # the paper's convention: training grid, cropped around the label (a second column)


@dataclass
class DiceReport:
    """Final Dice of a run.

    Attributes:
        server_round: the round evaluated (None when the run has no evaluation).
        site_tasks: site -> task key (``dataset/class``) -> (Dice, validation cases of the site).
        tasks: task key -> Dice (case-weighted over the sites).
        datasets: dataset -> mean Dice of its tasks.
        overall: mean Dice of all tasks (NaN when there is none).
    """

    server_round: int | None
    site_tasks: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=dict)
    datasets: dict[str, float] = field(default_factory=dict)
    overall: float = math.nan

    def rows(self) -> list[tuple[str, str, str, float, int | None]]:
        """``(level, name, site, dice, cases)`` rows: site-task, task, dataset, overall."""
        out: list[tuple[str, str, str, float, int | None]] = []
        for site, tasks in sorted(self.site_tasks.items()):
            out += [("site-task", key, site, dice, cases) for key, (dice, cases) in sorted(tasks.items())]
        out += [("task", key, "", dice, None) for key, dice in sorted(self.tasks.items())]
        out += [("dataset", name, "", dice, None) for name, dice in sorted(self.datasets.items())]
        out.append(("overall", "all tasks", "", self.overall, None))
        return out

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if not math.isfinite(x) else round(float(x), 6)

        return {
            "round": self.server_round,
            "sites": {
                s: {k: {"dice": num(d), "cases": n} for k, (d, n) in sorted(t.items())}
                for s, t in sorted(self.site_tasks.items())
            },
            "tasks": {k: num(v) for k, v in sorted(self.tasks.items())},
            "datasets": {k: num(v) for k, v in sorted(self.datasets.items())},
            "overall": num(self.overall),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DiceReport:
        def num(x: Any) -> float:
            return math.nan if x is None else float(x)

        return cls(
            server_round=raw.get("round"),
            site_tasks={
                s: {k: (num(v["dice"]), int(v["cases"])) for k, v in t.items()}
                for s, t in (raw.get("sites") or {}).items()
            },
            tasks={k: num(v) for k, v in (raw.get("tasks") or {}).items()},
            datasets={k: num(v) for k, v in (raw.get("datasets") or {}).items()},
            overall=num(raw.get("overall")),
        )


# ----------------------------------------------------------------------------------------------- metrics
def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of ``<run_dir>/metrics.jsonl`` (an empty list when the file is missing); a line that
    is not JSON is skipped with a warning."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s line %d is not JSON: skipped", path, number)
    return out


def _site_evaluations(lines: Iterable[Mapping[str, Any]], raw: bool = False) -> dict[int, list[Mapping[str, Any]]]:
    rounds: dict[int, list[Mapping[str, Any]]] = {}
    for line in lines:
        ok = line.get("status", "ok") == "ok" and isinstance(line.get("site"), str)
        ok = ok and (line.get(WEIGHTS_FIELD) == RAW_WEIGHTS) == raw
        if line.get("phase") == "evaluate" and line.get("scope") == "site" and ok:
            server_round = line.get("round")
            if isinstance(server_round, int):
                rounds.setdefault(server_round, []).append(line)
    return rounds


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def final_dice(lines: Iterable[Mapping[str, Any]], server_round: int | None = None,
               prefix: str = _DICE, raw: bool = False) -> DiceReport:
    """The Dice report of ``server_round`` (default: the last round with a site evaluation line).

    Args:
        lines: metric lines; the ``evaluate`` / ``site`` lines with ``status`` ok are used, each with
            ``site``, ``num-examples`` and ``<prefix><dataset>/<class>`` entries.
        prefix: ``dice/`` (whole scans, native geometry) or :data:`PAPER_DICE`.
        raw: the evaluations of the raw weights beside the EMA (last round), not of the handed-over model.
    """
    rounds = _site_evaluations(lines, raw)
    if not rounds:
        return DiceReport(None)
    if server_round is None:
        server_round = max(rounds)
    elif server_round not in rounds:
        raise ValueError(f"round {server_round!r} has no evaluation; evaluated rounds: {sorted(rounds)}")
    report = DiceReport(server_round)
    sums: dict[str, list[float]] = {}
    for line in rounds[server_round]:
        cases = line.get("num-examples")
        cases = int(cases) if _finite(cases) and cases > 0 else 1
        tasks = report.site_tasks.setdefault(line["site"], {})
        for key, value in line.items():
            if key.startswith(prefix) and _finite(value):
                task = key[len(prefix):]
                tasks[task] = (float(value), cases)
                acc = sums.setdefault(task, [0.0, 0.0])
                acc[0] += float(value) * cases
                acc[1] += cases
    report.tasks = {k: s / n for k, (s, n) in sorted(sums.items())}
    by_dataset: dict[str, list[float]] = {}
    for key, dice in report.tasks.items():
        by_dataset.setdefault(key.split("/", 1)[0], []).append(dice)
    report.datasets = {k: sum(v) / len(v) for k, v in sorted(by_dataset.items())}
    if report.tasks:
        report.overall = sum(report.tasks.values()) / len(report.tasks)
    return report


def dice_by_round(lines: Iterable[Mapping[str, Any]]) -> dict[int, DiceReport]:
    """The whole-scan Dice report of every evaluated round (:func:`final_dice` of each), by round."""
    lines = list(lines)
    return {r: final_dice(lines, r) for r in sorted(_site_evaluations(lines))}


def first_last_loss(lines: Iterable[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """Site -> (train loss of its first round, of its last round)."""
    return {site: (pts[0][1], pts[-1][1]) for site, pts in train_loss_series(lines).items() if pts}


# ----------------------------------------------------------------------------------------------- output
def report_csv(report: DiceReport) -> str:
    """CSV text with the columns of :data:`CSV_COLUMNS` (Dice with 4 decimals, empty when undefined)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for level, name, site, dice, cases in report.rows():
        writer.writerow([level, name, site, f"{dice:.4f}" if math.isfinite(dice) else "", cases or ""])
    return buffer.getvalue()


def format_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A markdown table (columns padded to their widest cell)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = [list(header), ["-" * w for w in widths], *[[str(c) for c in row] for row in body]]
    return "\n".join(
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in lines
    )


def _fmt(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "-"


def format_report(report: DiceReport, paper: DiceReport | None = None) -> str:
    """The report as a markdown table (level, name, site, Dice, validation cases), with the paper's
    convention as a second Dice column when ``paper`` (the same rows from :data:`PAPER_DICE`) is given."""
    if report.server_round is None:
        return "(no evaluation in this run)"
    second = {(lv, name, site): d for lv, name, site, d, _ in paper.rows()} if paper is not None else None
    body = []
    for lv, name, site, d, n in report.rows():
        extra = [_fmt(second.get((lv, name, site), math.nan))] if second is not None else []
        body.append([lv, name, site or "-", _fmt(d), *extra, str(n) if n else ""])
    title = f"Dice after round {report.server_round} (whole scans at their native geometry, as a user gets it)\n"
    header = ["level", "name", "site", "Dice", *(["Dice, paper's convention"] if second is not None else []),
              "val cases"]
    return title + format_table(header, body)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def bar_figure(groups: Sequence[str], series: Mapping[str, Sequence[float]], title: str) -> Figure:
    """Grouped bars: one group per entry of ``groups``, one bar per series (NaN bars left out).

    Args:
        groups: x labels (G).
        series: legend label -> G values in [0, 1].
    """
    fig = _figure(max(5.0, 0.9 * len(groups) * max(1, len(series)) + 2.5), 4.0)
    ax = fig.add_subplot()
    n = max(1, len(series))
    width = 0.8 / n
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if math.isfinite(v) else 0.0 for v in values], width=width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("Dice")
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def write_run_report(
    run_dir: str | os.PathLike, summary: Mapping[str, Any] | None = None
) -> tuple[DiceReport, list[Path]]:
    """Write the report files of ``run_dir`` (module docstring) from its ``metrics.jsonl``.

    Args:
        run_dir: the run directory.
        summary: extra JSON-able facts stored under ``"run"`` in ``report.json`` (mode, timing, settings).

    Returns:
        The Dice report and the files written.
    """
    run_dir = Path(run_dir)
    lines = read_metrics(run_dir)
    report = final_dice(lines)
    files = [atomic_write_bytes(run_dir / REPORT_CSV, report_csv(report).encode())]
    raw = final_dice(lines, raw=True)
    data = {"run": dict(summary or {}), "dice": report.to_dict(),
            "dice_paper_convention": final_dice(lines, report.server_round, PAPER_DICE).to_dict()
            if report.server_round is not None else None,
            "dice_raw_weights": raw.to_dict() if raw.server_round is not None else None,
            "loss": {s: {"first": a, "last": b} for s, (a, b) in first_last_loss(lines).items()}}
    files.append(atomic_write_json(run_dir / REPORT_JSON, data))
    loss, dice = train_loss_series(lines), site_dice_series(lines)
    if loss or dice:
        panels = [(loss, "train loss", "train loss per site"),
                  (dice, "mean Dice", "validation Dice per site")]
        files.append(save_png(curves_figure(panels), run_dir / CURVES_PNG))
    if report.tasks:
        keys = list(report.tasks)
        fig = bar_figure(keys, {"Dice": [report.tasks[k] for k in keys]}, f"final Dice per task (round "
                         f"{report.server_round})")
        files.append(save_png(fig, run_dir / FINAL_DICE_PNG))
    return report, files


def load_report(run_dir: str | os.PathLike) -> tuple[DiceReport, dict[str, Any]]:
    """The Dice report and run summary of a run directory: from ``report.json``, else computed from
    ``metrics.jsonl``.

    Raises:
        ValueError: the folder does not exist or has neither file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} does not exist")
    path = run_dir / REPORT_JSON
    if path.is_file():
        raw = json.loads(path.read_text(encoding="utf-8"))
        return DiceReport.from_dict(raw.get("dice") or {}), dict(raw.get("run") or {})
    if (run_dir / METRICS_FILE).is_file():
        return final_dice(read_metrics(run_dir)), {}
    raise ValueError(f"run directory {str(run_dir)!r} has neither {REPORT_JSON} nor {METRICS_FILE}")
