"""``hermes-evaluate``: Dice, HD95 and surface Dice of predictions against reference labels (native spacing).

Usage::

    hermes-evaluate --pred DIR_OR_FILE --ref DIR_OR_FILE --output CSV [--labels JSON] [--tolerance-mm 2]

Pairing: two files are one case (named after the reference); two folders are paired by file name without
its ending (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``), so ``pred/case1.nii.gz`` goes
with ``ref/case1.nrrd``. Files of ``--pred`` without a reference (e.g. ``hermes-predict``'s
``*_prob_*`` maps) are ignored; a reference without a prediction is reported and makes the exit status 1.

Geometry: metrics are computed on the REFERENCE grid at its native spacing. ``hermes-predict`` writes its
label maps on the grid of the scan they segment, so a prediction whose grid (size, spacing, origin or
direction) differs from its reference's is most often paired with the wrong reference: such a case fails,
naming both geometries. ``--resample-pred`` instead resamples the prediction onto the reference grid in
physical space with nearest neighbour (a prediction that does not overlap the reference still fails).

Classes (``--labels``): a JSON object ``{"<class name>": spec}``, where ``spec`` is a label value used in
both files, a list of values (merged into one class), or ``{"pred": values, "ref": values}`` when the two
files number the class differently, e.g.
``{"liver": {"pred": 6, "ref": 1}, "tumour": 2, "kidney": [3, 4]}``. Without it, every non-zero value
found in a case's reference or prediction is a class named after its value.

Metrics per case and class (:mod:`hermes_model.metrics`; NaN, written as an empty CSV cell, where a metric
is undefined for the case, e.g. a class absent from the reference):

- ``dice``, ``hd95_mm`` (95th-percentile symmetric surface distance, mm) and ``surface_dice``
  (area-weighted normalised surface Dice at ``--tolerance-mm``, as DeepMind's ``surface-distance``), at the
  reference's native spacing;
- ``dice_paper``: the convention of the published Hermes code's validation, for comparison with the
  paper: both the prediction and the reference resampled to the model's training spacing (nearest
  neighbour, identity direction, the reference's centre), cropped to the reference's foreground box plus
  the training crop margin, so false positives far from the labelled region do not count. The spacing and
  margin are the model's plan (``--model``, else the ``plans`` of the prediction's ``*_labels.json`` written
  by ``hermes-predict``), else the paper's 1.5 mm and 20 voxels. It is NOT what a user gets: ``dice`` is.

The CSV has one row per case and class; the summary printed at the end is the mean per class over the
cases where the metric is defined (the reference's convention: cases where the class is present).

Exit status: 0 every case evaluated; 1 some case failed or had no prediction; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from client.formats import IMAGE_SUFFIXES
from client.preprocess import CaseError, describe_grid, foreground_box, physical_extent, read_image, target_grid
from hermes_model.fileio import atomic_write_bytes
from hermes_model.metrics import dice_per_task, hd95_per_task, summarise, surface_dice_per_task
from hermes_model.plans import Plans
from hermes_model.trained import PLANS_KEY

__all__ = [
    "METRICS",
    "ClassSpec",
    "Evaluation",
    "evaluate",
    "evaluate_case",
    "main",
    "pair_cases",
    "parse_labels",
]

logger = logging.getLogger(__name__)

METRICS = ("dice", "hd95_mm", "surface_dice", "dice_paper")
CSV_COLUMNS = ("case", "class", "ref_values", "pred_values", *METRICS, "ref_voxels", "pred_voxels")
PAPER_PLANS = Plans()  # the recipe: 1.5 mm, crop margin 20
SPACING_RTOL, ORIGIN_ATOL_VOXELS, DIRECTION_ATOL = 1e-4, 1e-3, 1e-4
EXIT_OK, EXIT_CASES_FAILED, EXIT_USAGE = 0, 1, 2
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------ classes
@dataclass(frozen=True)
class ClassSpec:
    """One evaluated class: its name and the label values that make it in each file."""

    name: str
    pred_values: tuple[int, ...]
    ref_values: tuple[int, ...]


def _values(raw: Any, where: str) -> tuple[int, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in items):
        raise ValueError(f"--labels {where}: values must be a positive int or a list of them, got {raw!r}")
    return tuple(sorted(set(items)))


def parse_labels(raw: Any) -> list[ClassSpec]:
    """Classes from the ``--labels`` JSON object (see the module docstring).

    Raises:
        ValueError: not an object, an empty one, or a malformed entry (named in the message).
    """
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"--labels must be a non-empty JSON object {{class name: values}}, got {raw!r}")
    classes = []
    for name, spec in raw.items():
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - {"pred", "ref"})
            if unknown or not {"pred", "ref"} <= set(spec):
                raise ValueError(
                    f"--labels {name!r}: an object needs exactly the keys ['pred', 'ref'], got {sorted(spec)}"
                )
            pred, ref = _values(spec["pred"], f"{name!r}.pred"), _values(spec["ref"], f"{name!r}.ref")
        else:
            pred = ref = _values(spec, repr(name))
        classes.append(ClassSpec(str(name), pred, ref))
    return classes


def _load_labels(labels: str | os.PathLike | Mapping[str, Any] | None) -> list[ClassSpec] | None:
    if labels is None or isinstance(labels, Mapping):
        return None if labels is None else parse_labels(labels)
    path = Path(labels)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--labels {path}: not a readable JSON file ({exc})") from None
    return parse_labels(raw)


def _default_classes(pred: np.ndarray, ref: np.ndarray) -> list[ClassSpec]:
    values = sorted(int(v) for v in np.union1d(np.unique(pred), np.unique(ref)) if v != 0)
    return [ClassSpec(str(v), (v,), (v,)) for v in values]


# ------------------------------------------------------------------------------------------------ pairing
def _stem(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _images(folder: Path) -> dict[str, Path]:
    return {
        _stem(p.name): p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES)
    }


def pair_cases(
    pred: str | os.PathLike, ref: str | os.PathLike
) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """``([(case, pred_file, ref_file), ...], [cases of the reference without a prediction])``.

    Raises:
        ValueError: a path does not exist, a file is paired with a folder, or no case pairs up.
    """
    pred, ref = Path(pred), Path(ref)
    for flag, path in (("--pred", pred), ("--ref", ref)):
        if not path.exists():
            raise ValueError(f"{flag} {path}: no such file or folder")
    if pred.is_file() and ref.is_file():
        return [(_stem(ref.name), pred, ref)], []
    if pred.is_file() != ref.is_file():
        raise ValueError(f"--pred {pred} and --ref {ref} must both be files or both be folders")
    preds, refs = _images(pred), _images(ref)
    pairs = [(case, preds[case], refs[case]) for case in refs if case in preds]
    missing = [case for case in refs if case not in preds]
    if not pairs:
        raise ValueError(
            f"--pred {pred} and --ref {ref}: no file names in common (references: {sorted(refs)[:5]}, "
            f"predictions: {sorted(preds)[:5]})"
        )
    extra = len(preds) - len(pairs)
    if extra:
        logger.info("%d prediction file(s) without a reference are ignored", extra)
    return pairs, missing


# ------------------------------------------------------------------------------------------------ geometry
def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    if a.GetSize() != b.GetSize():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    shift = np.abs(np.subtract(a.GetOrigin(), b.GetOrigin()))
    return bool(
        np.allclose(sa, sb, rtol=SPACING_RTOL, atol=0)
        and np.all(shift <= ORIGIN_ATOL_VOXELS * np.minimum(sa, sb))
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=DIRECTION_ATOL)
    )


def _as_int_labels(image: sitk.Image, name: str) -> sitk.Image:
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        values = np.unique(sitk.GetArrayViewFromImage(image))
        if not np.all(np.isfinite(values) & (values == np.round(values))):
            raise CaseError(f"{name}: a label image must hold integer values, got e.g. {values[:5].tolist()}")
    return sitk.Cast(image, sitk.sitkInt32)


def _onto_reference(pred: sitk.Image, ref: sitk.Image, name: str, resample: bool = False) -> sitk.Image:
    """``pred`` on the reference grid: as is when the grids agree; resampled (exactly) when it holds the same
    voxels in another storage order; else, with ``resample``, nearest-neighbour resampled, and without it a
    :class:`CaseError` naming both geometries."""
    if _same_grid(pred, ref):
        out = sitk.Image(pred)
        out.CopyInformation(ref)
        return out
    same_voxels = _same_grid(sitk.DICOMOrient(pred, "LPS"), sitk.DICOMOrient(ref, "LPS"))
    if not (resample or same_voxels):
        raise CaseError(
            f"{name}: the prediction's grid differs from the reference's (prediction: {describe_grid(pred)}; "
            f"reference: {describe_grid(ref)}): is it paired with the right reference? Pass --resample-pred to "
            "resample it onto the reference grid"
        )
    box_p, box_r = physical_extent(pred), physical_extent(ref)
    overlap = np.minimum(box_p[:, 1], box_r[:, 1]) - np.maximum(box_p[:, 0], box_r[:, 0])
    if np.any(overlap <= 0):
        raise CaseError(
            f"{name}: the prediction does not overlap the reference in space: prediction spans "
            f"{np.round(box_p, 1).tolist()} mm, reference {np.round(box_r, 1).tolist()} mm (x, y, z)"
        )
    logger.info("%s: prediction grid differs from the reference: resampled onto it (nearest)", name)
    return sitk.Resample(pred, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, pred.GetPixelID())


def _paper_grid_arrays(pred: sitk.Image, ref: sitk.Image, plans: Plans) -> tuple[np.ndarray, np.ndarray]:
    """Both label images on the plan's identity-direction grid around the reference, cropped as training
    preprocessing does (reference foreground box + the plan's margin); arrays (Z, Y, X)."""
    spacing = plans.target_spacing
    size, origin = target_grid(ref, spacing)
    grid = sitk.Image([int(s) for s in size], sitk.sitkInt32)
    grid.SetSpacing(spacing)
    grid.SetOrigin([float(o) for o in origin])
    grid.SetDirection(_IDENTITY)
    r = sitk.GetArrayFromImage(sitk.Resample(ref, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    p = sitk.GetArrayFromImage(sitk.Resample(pred, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    box = foreground_box(r, plans.train_margin)
    if box is None:
        return p, r
    crop = tuple(slice(a, b) for a, b in box)
    return p[crop], r[crop]


# ------------------------------------------------------------------------------------------------ metrics
def evaluate_case(
    pred: sitk.Image, ref: sitk.Image, classes: Sequence[ClassSpec] | None = None, tolerance_mm: float = 2.0,
    name: str = "case", *, plans: Plans | None = None, metrics: Sequence[str] = METRICS,
    resample_pred: bool = False,
) -> list[dict[str, Any]]:
    """Metrics of one case, one row per class (see the module docstring).

    Args:
        pred: predicted label image (on the reference's grid, unless ``resample_pred``).
        ref: reference label image; its grid and native spacing are the ones used.
        classes: classes to evaluate; None = every non-zero value of either image.
        tolerance_mm: surface Dice tolerance.
        name: case name (messages and the ``case`` column).
        plans: the model's plan, for ``dice_paper`` (None: the paper's 1.5 mm and margin 20).
        metrics: the metrics to compute (a subset of :data:`METRICS`); the others are NaN. HD95 and
            surface Dice cost the most.
        resample_pred: resample a prediction on another grid onto the reference's instead of failing.

    Returns:
        Rows ``{"case", "class", "ref_values", "pred_values", "dice", "hd95_mm", "surface_dice",
        "dice_paper", "ref_voxels", "pred_voxels"}`` (metrics as floats, NaN where undefined).
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; allowed: {list(METRICS)}")
    ref = _as_int_labels(ref, name)
    pred_native = _as_int_labels(pred, name)
    pred = _onto_reference(pred_native, ref, name, resample_pred)
    p, r = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ref)
    spacing_zyx = tuple(reversed(ref.GetSpacing()))
    classes = list(classes) if classes is not None else _default_classes(p, r)
    paper = _paper_grid_arrays(pred_native, ref, plans or PAPER_PLANS) if "dice_paper" in metrics else None
    rows = []
    for cls in classes:
        pm, rm = np.isin(p, cls.pred_values)[None], np.isin(r, cls.ref_values)[None]
        rows.append({
            "case": name,
            "class": cls.name,
            "ref_values": " ".join(map(str, cls.ref_values)),
            "pred_values": " ".join(map(str, cls.pred_values)),
            **_class_metrics(pm, rm, cls, paper, spacing_zyx, tolerance_mm, metrics),
            "ref_voxels": int(rm.sum()),
            "pred_voxels": int(pm.sum()),
        })
    return rows


def _class_metrics(pm: np.ndarray, rm: np.ndarray, cls: ClassSpec, paper: tuple[np.ndarray, np.ndarray] | None,
                   spacing_zyx: Sequence[float], tolerance_mm: float, metrics: Sequence[str]) -> dict[str, float]:
    """The requested metrics of one class (masks (1, Z, Y, X) on the reference grid); NaN for the others."""
    out = dict.fromkeys(METRICS, math.nan)
    if "dice" in metrics:
        out["dice"] = float(dice_per_task(pm, rm)[0])
    if "hd95_mm" in metrics:
        out["hd95_mm"] = float(hd95_per_task(pm, rm, spacing_zyx)[0])
    if "surface_dice" in metrics:
        out["surface_dice"] = float(surface_dice_per_task(pm, rm, tolerance_mm, spacing_zyx)[0])
    if paper is not None:
        pred, ref = (np.isin(a, v)[None] for a, v in zip(paper, (cls.pred_values, cls.ref_values), strict=True))
        out["dice_paper"] = float(dice_per_task(pred, ref)[0])
    return out


@dataclass
class Evaluation:
    """Rows per case and class, the per-class summary, and the cases that could not be evaluated."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.missing


def summarise_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean of each metric per class over the cases where it is defined, in first-seen class order,
    plus ``cases``: the number of cases where the class is present in the reference."""
    names = list(dict.fromkeys(r["class"] for r in rows))
    out = []
    for name in names:
        mine = [r for r in rows if r["class"] == name]
        means = summarise([np.array([r[m] for m in METRICS], dtype=np.float64) for r in mine])
        entry = {"class": name, "cases": sum(1 for r in mine if r["ref_voxels"] > 0)}
        entry.update({m: float(v) for m, v in zip(METRICS, means, strict=True)})
        out.append(entry)
    return out


def _cell(value: Any) -> Any:
    return "" if isinstance(value, float) and math.isnan(value) else value


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row[k]) for k in CSV_COLUMNS})
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def evaluate(
    pred: str | os.PathLike,
    ref: str | os.PathLike,
    output: str | os.PathLike,
    labels: str | os.PathLike | Mapping[str, Any] | None = None,
    tolerance_mm: float = 2.0,
    progress: bool = True,
    *,
    model: str | os.PathLike | None = None,
    resample_pred: bool = False,
) -> Evaluation:
    """Evaluate predictions against references and write the CSV (the ``hermes-evaluate`` command).

    Args:
        pred: a predicted label file or a folder of them.
        ref: a reference label file or a folder of them (paired by name, see the module docstring).
        output: the CSV file to write.
        labels: the ``--labels`` JSON file or its parsed object; None = every value found.
        tolerance_mm: surface Dice tolerance in mm.
        progress: progress bar over the cases.
        model: a checkpoint whose plan sets ``dice_paper``'s grid (None: each prediction's ``*_labels.json``,
            else the paper's).
        resample_pred: resample predictions whose grid differs from their reference's (else they fail).

    Returns:
        The :class:`Evaluation`; a case that fails (unreadable, no spatial overlap) does not stop the others.

    Raises:
        ValueError: bad arguments (paths, pairing, labels JSON, tolerance).
    """
    if not (isinstance(tolerance_mm, int | float) and math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"--tolerance-mm must be a finite number >= 0, got {tolerance_mm!r}")
    classes = _load_labels(labels)
    model_plans = _model_plans(model) if model is not None else None
    pairs, missing = pair_cases(pred, ref)
    result = Evaluation(missing=[f"{case}: no prediction for reference {case!r}" for case in missing])
    for case, pred_path, ref_path in tqdm(pairs, desc="hermes-evaluate", unit="case", disable=not progress):
        try:
            pred_img, ref_img = read_image(pred_path), read_image(ref_path)
            plans = model_plans or prediction_plans(pred_path)
            result.rows += evaluate_case(pred_img, ref_img, classes, tolerance_mm, case, plans=plans,
                                         resample_pred=resample_pred)
        except CaseError as exc:
            result.failed.append(f"{case}: {exc}")
            logger.error("%s: %s", case, exc)
    result.summary = summarise_rows(result.rows)
    _write_csv(Path(output), result.rows)
    return result


def _model_plans(model: str | os.PathLike) -> Plans:
    from hermes_model.factory import load_checkpoint

    path = Path(model)
    if not path.is_file():
        raise ValueError(f"--model {path}: no such checkpoint file")
    extra = load_checkpoint(path).extra
    if PLANS_KEY not in extra:
        raise ValueError(f"--model {path}: the checkpoint carries no plans record")
    return Plans.from_dict(extra[PLANS_KEY])


def prediction_plans(pred_path: Path) -> Plans | None:
    """The plan recorded by ``hermes-predict`` beside a prediction (``<stem>_labels.json``), or None."""
    info = pred_path.with_name(f"{_stem(pred_path.name)}_labels.json")
    try:
        return Plans.from_dict(json.loads(info.read_text(encoding="utf-8"))["plans"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------------------ CLI
def _format(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _summary_line(name: str, cases: str, values: Sequence[float], width: int) -> str:
    cells = [_format(v, 2 if m == "hd95_mm" else 4) for m, v in zip(METRICS, values, strict=True)]
    return f"{name:<{width}}  {cases:>5}" + "".join(f"  {c:>12}" for c in cells)


def format_summary(summary: Sequence[Mapping[str, Any]], tolerance_mm: float) -> str:
    """The printed table: one line per class (mean over cases), then the mean over classes."""
    width = max([len("class"), len("mean over classes"), *(len(s["class"]) for s in summary)])
    titles = ["dice", "hd95_mm", f"nsd@{tolerance_mm:g}mm", "dice(paper)"]
    lines = [f"{'class':<{width}}  {'cases':>5}" + "".join(f"  {t:>12}" for t in titles)]
    lines += [_summary_line(s["class"], str(s["cases"]), [s[m] for m in METRICS], width) for s in summary]
    if summary:
        means = summarise([np.array([s[m] for m in METRICS], dtype=np.float64) for s in summary])
        lines.append(_summary_line("mean over classes", "", means.tolist(), width))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``hermes-evaluate`` argument parser."""
    p = argparse.ArgumentParser(
        prog="hermes-evaluate",
        description="Dice, HD95 and surface Dice per case and class at native spacing, and the paper's "
                    "Dice convention (training grid, cropped around the reference).",
    )
    p.add_argument("--pred", required=True, help="predicted label file or folder")
    p.add_argument("--ref", required=True, help="reference label file or folder (original geometry)")
    p.add_argument("--output", required=True, help="CSV file to write (one row per case and class)")
    p.add_argument("--labels", default=None,
                   help='JSON file {"class": value | [values] | {"pred": v, "ref": v}}; default: every value')
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="surface Dice tolerance (default 2 mm)")
    p.add_argument("--model", default=None,
                   help="checkpoint whose plan sets the grid of the paper's Dice column (default: the plan in "
                        "each prediction's *_labels.json, else 1.5 mm)")
    p.add_argument("--resample-pred", action="store_true",
                   help="resample a prediction whose grid differs from its reference's (default: such a case "
                        "fails: it is usually paired with the wrong reference)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hermes-evaluate``; returns the exit status (0 ok, 1 some case failed, 2 usage)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            result = evaluate(args.pred, args.ref, args.output, args.labels, args.tolerance_mm,
                              progress=not args.no_progress, model=args.model, resample_pred=args.resample_pred)
    except ValueError as exc:
        print(f"hermes-evaluate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for line in result.missing + result.failed:
        print(f"FAILED {line}", file=sys.stderr)
    cases = len({r["case"] for r in result.rows})
    print(f"hermes-evaluate: {cases} case(s) evaluated, {len(result.failed)} failed, "
          f"{len(result.missing)} without a prediction; per-case metrics: {args.output}")
    print(format_summary(result.summary, args.tolerance_mm))
    return EXIT_OK if result.ok else EXIT_CASES_FAILED


if __name__ == "__main__":
    sys.exit(main())
