"""Prior-bank report of a run directory (``hermes-server report RUN_DIR``).

From a round checkpoint (the latest, or a chosen round) and ``metrics.jsonl`` of a run directory::

    <out>/task_priors_cosine.png          cosine similarity of the learned task priors
    <out>/modality_priors_cosine.png      cosine similarity of the modality priors
    <out>/task_priors_cosine_<layer>.png  the same per fusion layer (``per_layer=True``)
    <out>/modality_priors_cosine_<layer>.png
    <out>/ownership.csv                   which sites own each prior row, its last update round and samples
    <out>/train_loss.png                  train loss per site per round
    <out>/dice.png                        Dice per task (aggregate) and mean Dice per site, per round

A task prior vector is row ``t`` of every fusion layer's ``task_prior`` concatenated
(:meth:`hermes_model.exchange.StateLayout.task_rows`); a modality prior vector is row ``r`` of every
``modality_prior`` flattened and concatenated. By default only the *trained* rows are shown: rows some
site owns or that an aggregation updated. Figures are drawn with matplotlib's Agg canvas (no display,
no pyplot global state) and written atomically.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hermes_model.catalog import modality_name
from hermes_model.exchange import StateLayout
from hermes_model.fileio import atomic_write_bytes
from server.bank import MODALITY, ROW_KINDS, TASK
from server.checkpoint import RAW_WEIGHTS, WEIGHTS_FIELD, RoundCheckpoint, RunStore, load_round_checkpoint

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
OWNERSHIP_CSV = "ownership.csv"
TRAIN_LOSS_PNG = "train_loss.png"
DICE_PNG = "dice.png"
OWNERSHIP_COLUMNS = ("kind", "row", "name", "owners", "last_round", "samples")
_DICE_PREFIX = "dice/"
_CELL_INCH = 0.32  # heatmap cell size: the figure grows with the number of rows
_ANNOTATE_MAX = 16  # write the cosine value into the cells up to this many rows


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class PriorSimilarity:
    """Cosine similarity between prior rows.

    Attributes:
        kind: ``"task"`` or ``"modality"``.
        bank: the state key of one fusion layer's bank, or None for all layers concatenated.
        rows: the prior row ids, in matrix order.
        labels: one label per row (``"dataset/class [id]"`` or the modality name).
        matrix: (N, N) float64 cosine similarities; NaN for a row whose vector is all zeros.
    """

    kind: str
    bank: str | None
    rows: tuple[int, ...]
    labels: tuple[str, ...]
    matrix: np.ndarray


@dataclass(frozen=True)
class OwnershipRow:
    """One row of the global prior bank's ownership table."""

    kind: str
    row: int
    name: str
    owners: tuple[str, ...]
    last_round: int | None
    samples: float


@dataclass
class ReportFiles:
    """What :func:`write_report` wrote.

    Attributes:
        run_dir: the run directory read.
        out_dir: the folder written.
        server_round: the round of the checkpoint used.
        heatmaps: cosine-similarity PNGs (task and modality, then per layer).
        ownership_csv: the ownership table as CSV.
        curves: metric-curve PNGs (empty when ``metrics.jsonl`` has no usable line).
        ownership: the ownership table's rows (for printing).
    """

    run_dir: Path
    out_dir: Path
    server_round: int
    heatmaps: list[Path] = field(default_factory=list)
    ownership_csv: Path | None = None
    curves: list[Path] = field(default_factory=list)
    ownership: list[OwnershipRow] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """Every file written, in a stable order."""
        csv_file = [self.ownership_csv] if self.ownership_csv is not None else []
        return [*self.heatmaps, *csv_file, *self.curves]


# ----------------------------------------------------------------------------------------------- checkpoint
def load_report_checkpoint(run_dir: str | os.PathLike, server_round: int | None = None) -> RoundCheckpoint:
    """The latest round checkpoint of ``run_dir``, or that of ``server_round``.

    Raises:
        ValueError: the folder does not exist, holds no round checkpoint, or not the requested round.
    """
    store = RunStore(run_dir)
    if not store.run_dir.is_dir():
        raise ValueError(f"run directory {str(store.run_dir)!r} does not exist")
    files = store.round_files()
    if not files:
        raise ValueError(
            f"run directory {str(store.run_dir)!r} has no round checkpoint "
            f"({store.checkpoint_dir.name}/round_XXXX.pt); is it the run-dir of a server run that "
            "finished at least one round?"
        )
    if server_round is None:
        return load_round_checkpoint(store.latest_path() or files[max(files)])
    if server_round not in files:
        raise ValueError(
            f"--round {server_round!r}: no checkpoint of that round in {str(store.checkpoint_dir)!r}; "
            f"available rounds: {list(files)}"
        )
    return load_round_checkpoint(files[server_round])


# ----------------------------------------------------------------------------------------------- similarity
def cosine_similarity(vectors: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pairwise cosine similarity of row vectors.

    Args:
        vectors: (N, D) array.

    Returns:
        (N, N) float64 matrix, symmetric, 1 on the diagonal; rows and columns of an all-zero vector are
        NaN (the cosine is undefined).
    """
    x = vectors.detach().cpu().double().numpy() if isinstance(vectors, torch.Tensor) else vectors
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"vectors must be a 2-D (N, D) array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = x / norms[:, None]
    unit[norms == 0] = np.nan
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    sim = (sim + sim.T) / 2
    nonzero = np.flatnonzero(norms > 0)
    sim[nonzero, nonzero] = 1.0
    return sim


def _check_kind(kind: str) -> None:
    if kind not in ROW_KINDS:
        raise ValueError(f"kind must be one of {list(ROW_KINDS)}, got {kind!r}")


def trained_rows(ckpt: RoundCheckpoint, kind: str) -> list[int]:
    """Rows of ``kind`` that some site owns or that an aggregation updated, sorted."""
    _check_kind(kind)
    table = ckpt.bank.rows[kind]
    return sorted(r for r, info in table.items() if info.owners or info.last_round is not None)


def report_rows(ckpt: RoundCheckpoint, kind: str, all_rows: bool = False) -> list[int]:
    """The rows a report shows: every row with ``all_rows``, else the trained rows (every row, with a
    warning, when none is trained)."""
    _check_kind(kind)
    layout = StateLayout.from_model(ckpt.model)
    every = list(range(layout.task_slots if kind == TASK else layout.modality_slots))
    if all_rows:
        return every
    rows = trained_rows(ckpt, kind)
    if not rows:
        logger.warning("no %s prior row is owned or trained in round %d: showing all", kind, ckpt.server_round)
        return every
    return rows


def row_label(ckpt: RoundCheckpoint, kind: str, row: int) -> str:
    """``"dataset/class [id]"`` for a task row (``+N`` when N other datasets share the id), the modality
    name for a modality row, ``"(unassigned) [id]"`` for a row no catalog entry uses."""
    _check_kind(kind)
    if kind == MODALITY:
        slots = ckpt.bank.modality_slots
        try:
            return modality_name(-1 if row == slots - 1 else row)
        except ValueError:
            return f"(unassigned) [{row}]"
    keys = [k for k, t in ckpt.catalog.task_map().items() if t == row]
    if not keys:
        return f"(unassigned) [{row}]"
    more = f" +{len(keys) - 1}" if len(keys) > 1 else ""
    return f"{keys[0]}{more} [{row}]"


def prior_vectors(ckpt: RoundCheckpoint, kind: str, rows: Sequence[int], bank: str | None = None) -> np.ndarray:
    """Prior vectors of ``rows``.

    Args:
        ckpt: a round checkpoint.
        kind: ``"task"`` or ``"modality"``.
        rows: row ids.
        bank: a state key (one fusion layer's ``*.task_prior`` / ``*.modality_prior``), or None for the
            rows of all layers concatenated (the exchange layout).

    Returns:
        (len(rows), D) float32 array.
    """
    _check_kind(kind)
    state = ckpt.model.state_dict()
    layout = StateLayout.from_state_dict(state)
    if bank is None:
        rows_of = layout.task_rows if kind == TASK else layout.modality_rows
        return rows_of(state, rows).numpy()
    banks = layout.task_banks if kind == TASK else layout.modality_banks
    if bank not in banks:
        raise ValueError(f"bank must be one of the {kind} banks {list(banks)}, got {bank!r}")
    limit = layout.task_slots if kind == TASK else layout.modality_slots
    bad = [r for r in rows if not 0 <= int(r) < limit]
    if bad:
        raise ValueError(f"{kind} rows must be in [0, {limit}), got {bad[:5]}")
    return state[bank].detach().float()[[int(r) for r in rows]].flatten(1).numpy()


def prior_similarity(
    ckpt: RoundCheckpoint, kind: str, *, all_rows: bool = False, bank: str | None = None
) -> PriorSimilarity:
    """Cosine similarity of the task or modality priors of a round checkpoint (see :func:`prior_vectors`
    for ``bank``; rows as :func:`report_rows`)."""
    rows = report_rows(ckpt, kind, all_rows)
    matrix = cosine_similarity(prior_vectors(ckpt, kind, rows, bank))
    labels = tuple(row_label(ckpt, kind, r) for r in rows)
    return PriorSimilarity(kind, bank, tuple(rows), labels, matrix)


def layer_banks(ckpt: RoundCheckpoint, kind: str) -> tuple[str, ...]:
    """The state keys of the ``kind`` banks, one per fusion layer, in state-dict order."""
    _check_kind(kind)
    layout = StateLayout.from_model(ckpt.model)
    return layout.task_banks if kind == TASK else layout.modality_banks


# ----------------------------------------------------------------------------------------------- ownership
def ownership_rows(ckpt: RoundCheckpoint, all_rows: bool = False) -> list[OwnershipRow]:
    """The ownership table of the global prior bank: task rows, then modality rows (rows of
    :func:`report_rows`)."""
    out = []
    for kind in ROW_KINDS:
        for row in report_rows(ckpt, kind, all_rows):
            info = ckpt.bank.info(kind, row)
            owners = tuple(sorted(info.owners)) if info else ()
            last, samples = (info.last_round, info.samples) if info else (None, 0.0)
            out.append(OwnershipRow(kind, row, row_label(ckpt, kind, row), owners, last, samples))
    return out


def _cells(row: OwnershipRow) -> list[str]:
    last = "" if row.last_round is None else str(row.last_round)
    return [row.kind, str(row.row), row.name, ";".join(row.owners), last, f"{row.samples:g}"]


def ownership_csv(rows: Iterable[OwnershipRow]) -> str:
    """CSV text with columns ``kind,row,name,owners,last_round,samples`` (owners joined by ``;``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(OWNERSHIP_COLUMNS)
    writer.writerows(_cells(r) for r in rows)
    return buffer.getvalue()


def format_ownership(rows: Sequence[OwnershipRow]) -> str:
    """A markdown table of the ownership rows (owners joined by ``, ``)."""
    header = ["kind", "row", "name", "owners", "last round", "samples"]
    body = [[*c[:3], c[3].replace(";", ", ") or "-", c[4] or "-", c[5]] for c in map(_cells, rows)]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=False)]
    lines = [header, ["-" * w for w in widths], *body]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
                     for line in lines)


# ----------------------------------------------------------------------------------------------- metrics
Series = dict[str, list[tuple[int, float]]]


def _add(series: Series, name: str, server_round: int, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return
    series.setdefault(name, []).append((server_round, float(value)))


def _phase_lines(lines: Iterable[Mapping[str, Any]], phase: str, scope: str, last_round: int | None):
    for line in lines:
        server_round = line.get("round")
        if line.get("phase") != phase or line.get("scope") != scope or not isinstance(server_round, int):
            continue
        if scope == "site" and (line.get("status", "ok") != "ok" or not isinstance(line.get("site"), str)):
            continue
        if line.get(WEIGHTS_FIELD) == RAW_WEIGHTS:  # the curves follow the model the run hands over
            continue
        if last_round is None or server_round <= last_round:
            yield server_round, line


def train_loss_series(lines: Iterable[Mapping[str, Any]], last_round: int | None = None) -> Series:
    """Site name -> [(round, train loss)] from the ``train`` site lines (dropped replies left out)."""
    series: Series = {}
    for server_round, line in _phase_lines(lines, "train", "site", last_round):
        _add(series, line["site"], server_round, line.get("loss"))
    return {k: sorted(v) for k, v in sorted(series.items())}


def dice_series(lines: Iterable[Mapping[str, Any]], last_round: int | None = None) -> Series:
    """Task key -> [(round, Dice)] from the ``evaluate`` aggregate lines (``dice/<dataset>/<class>``,
    the sample-weighted mean over the sites that evaluate the task)."""
    series: Series = {}
    for server_round, line in _phase_lines(lines, "evaluate", "aggregate", last_round):
        for key, value in line.items():
            if key.startswith(_DICE_PREFIX):
                _add(series, key[len(_DICE_PREFIX):], server_round, value)
    return {k: sorted(v) for k, v in sorted(series.items())}


def site_dice_series(lines: Iterable[Mapping[str, Any]], last_round: int | None = None) -> Series:
    """Site name -> [(round, mean Dice over its tasks)] from the ``evaluate`` site lines."""
    series: Series = {}
    for server_round, line in _phase_lines(lines, "evaluate", "site", last_round):
        _add(series, line["site"], server_round, line.get("dice-mean"))
    return {k: sorted(v) for k, v in sorted(series.items())}


# ----------------------------------------------------------------------------------------------- figures
def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg, whatever backend pyplot would pick
    return fig


def similarity_figure(sim: PriorSimilarity, title: str) -> Figure:
    """A heatmap of ``sim.matrix`` (colour scale -1..1) labelled with ``sim.labels``; its size grows with
    the number of rows so that the labels keep a fixed font size."""
    n = len(sim.rows)
    side = max(4.0, 1.5 + _CELL_INCH * n)
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(sim.matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(n), sim.labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), sim.labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    if n <= _ANNOTATE_MAX:
        for i in range(n):
            for j in range(n):
                value = sim.matrix[i, j]
                text = "n/a" if not np.isfinite(value) else f"{value:.2f}"
                color = "white" if np.isfinite(value) and abs(value) > 0.6 else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, fraction=min(0.046, 0.35 / side), pad=0.02, label="cosine similarity")
    return fig


def _plot_series(ax: Any, series: Series, ylabel: str, title: str, ylim: tuple[float, float] | None,
                 xlabel: str) -> None:
    for name, points in series.items():
        rounds, values = zip(*points, strict=True)
        ax.plot(rounds, values, marker="o", markersize=4, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if not series:  # e.g. a run without evaluation: an empty panel, no legend
        return
    ncol = max(1, math.ceil(len(series) / 25))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, ncol=ncol, frameon=False)


def curves_figure(panels: Sequence[tuple[Series, str, str]], ylim: tuple[float, float] | None = None,
                  xlabel: str = "round") -> Figure:
    """One row of line plots, one per ``(series, ylabel, title)`` panel, legends to the right."""
    legend_cols = max(max(1, math.ceil(len(s) / 25)) for s, _, _ in panels)
    fig = _new_figure((6.0 + 2.2 * legend_cols) * len(panels), 4.5)
    for i, (series, ylabel, title) in enumerate(panels, start=1):
        _plot_series(fig.add_subplot(1, len(panels), i), series, ylabel, title, ylim, xlabel)
    return fig


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Render ``fig`` as PNG and write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------- report
def _layer_name(bank: str) -> str:
    return bank.rsplit(".", 1)[0].replace(".", "_")


def _write_heatmaps(ckpt: RoundCheckpoint, out: Path, all_rows: bool, per_layer: bool) -> list[Path]:
    written = []
    which = "all rows" if all_rows else "trained rows"
    for kind in (TASK, MODALITY):
        sim = prior_similarity(ckpt, kind, all_rows=all_rows)
        title = f"{kind} priors, all fusion layers: cosine similarity (round {ckpt.server_round}, {which})"
        written.append(save_png(similarity_figure(sim, title), out / f"{kind}_priors_cosine.png"))
        if not per_layer:
            continue
        for bank in layer_banks(ckpt, kind):
            sim = prior_similarity(ckpt, kind, all_rows=all_rows, bank=bank)
            title = f"{bank}: cosine similarity (round {ckpt.server_round}, {which})"
            path = out / f"{kind}_priors_cosine_{_layer_name(bank)}.png"
            written.append(save_png(similarity_figure(sim, title), path))
    return written


def _write_curves(lines: list[dict[str, Any]], out: Path, last_round: int) -> list[Path]:
    written = []
    loss = train_loss_series(lines, last_round)
    if loss:
        fig = curves_figure([(loss, "train loss", "train loss per site")])
        written.append(save_png(fig, out / TRAIN_LOSS_PNG))
    else:
        logger.warning("metrics.jsonl has no train loss of a site: %s not written", TRAIN_LOSS_PNG)
    panels = [(s, "Dice", t) for s, t in ((dice_series(lines, last_round), "Dice per task (all sites)"),
                                          (site_dice_series(lines, last_round), "mean Dice per site")) if s]
    if panels:
        written.append(save_png(curves_figure(panels, ylim=(0.0, 1.02)), out / DICE_PNG))
    else:
        logger.warning("metrics.jsonl has no evaluate line with Dice: %s not written", DICE_PNG)
    return written


def write_report(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    server_round: int | None = None,
    all_rows: bool = False,
    per_layer: bool = False,
) -> ReportFiles:
    """Write the prior-bank report of a run directory (see the module docstring for the files).

    Args:
        run_dir: a server run directory (``checkpoints/`` and ``metrics.jsonl``).
        out_dir: output folder; default ``<run_dir>/report``.
        server_round: the round checkpoint to read; default the latest.
        all_rows: show every prior row, not only the trained ones.
        per_layer: also one heatmap per fusion layer.

    Raises:
        ValueError: no checkpoint (or not that round) in ``run_dir``.
    """
    ckpt = load_report_checkpoint(run_dir, server_round)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(Path(run_dir), out, ckpt.server_round)
    files.heatmaps = _write_heatmaps(ckpt, out, all_rows, per_layer)
    files.ownership = ownership_rows(ckpt, all_rows)
    files.ownership_csv = atomic_write_bytes(out / OWNERSHIP_CSV, ownership_csv(files.ownership).encode())
    files.curves = _write_curves(RunStore(run_dir).read_metrics(), out, ckpt.server_round)
    logger.info("report of round %d: %d files in %s", ckpt.server_round, len(files.files), out)
    return files
