"""``hermes-predict``: segment new scans with a trained Hermes model, written in each scan's own geometry.

Usage::

    hermes-predict --model CHECKPOINT --input SCAN --modality CT --output OUT
                   [--tasks DATASET[/CLASS],...] [--overlap 0.5] [--blend constant|gaussian]
                   [--probabilities] [--device auto|cpu|cuda] [--roi 128] [--spacing 1.5]
                   [--sw-batch-size 1] [--catalog CATALOG.yaml] [--no-progress] [-v]

``CHECKPOINT`` is one of ours (a server round checkpoint or an export made by
:func:`hermes_model.model_checkpoint`, which embed the task catalog they were trained with) or the
released Hermes-R file (the bundled catalog is used; ``--catalog`` overrides either).

``SCAN`` is an image file (NIfTI, NRRD, MHA), a folder holding one DICOM series, or a folder of such
(batch mode: every image file and every sub-folder, with a progress bar over the scans).

Per scan, the pipeline is the training preprocessing (:func:`client.preprocess.preprocess_image`, the very
code of training on the whole image: re-orient to LPS, resample to ``--spacing`` mm, clip and z-score by
modality, pad every axis to at least ``--roi``), then sliding-window inference
(:func:`hermes_model.inference.predict_volume`: windows of ``--roi`` voxels, ``--overlap``, ``--blend``;
bf16 autocast on a GPU; the whole-volume probabilities are accumulated on the GPU only when they fit in
half of its free memory, else on the CPU), then every task's probability map is put back on the input's
grid (:func:`client.preprocess.restore_to_original`, linear) and the label map is made there: a voxel
gets the value of the task with the highest probability among those ``>= 0.5`` (ties: the first task),
0 when none reaches 0.5.

Outputs, in the input's original geometry (size, spacing, origin, direction):

- ``OUT`` itself when the input is one scan and ``OUT`` ends in ``.nii.gz``, ``.nii``, ``.nrrd`` or
  ``.mha``; otherwise ``OUT`` is a folder and each scan gives ``OUT/<scan name>.nii.gz`` (NIfTI, also for
  DICOM input);
- ``<output stem>_labels.json`` beside it: the label values (task ``i`` of the selection, in the order
  given by ``--tasks``, gets value ``i``, from 1; see :class:`TaskSelection`), task keys and ids, modality,
  inference and preprocessing settings;
- with ``--probabilities``: ``<output stem>_prob_<value>.<suffix>``, float32 probability of each task.

``--tasks`` is a comma-separated list (the option may be repeated) of dataset names (all their classes)
and ``"<dataset>/<class>"`` keys of the catalog; the default is every task of the model's bank that the
catalog names (tasks sharing a task id are computed once). Only the selected task ids are computed.

Exit status: 0 every scan segmented; 1 some scan failed (one line each, naming the file and the problem;
the other scans were still written); 2 bad arguments, an unusable model, a task not in the model's bank or
a modality it has no prior for (nothing was run).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn
from tqdm.auto import tqdm

from client.formats import IMAGE_SUFFIXES
from client.preprocess import CaseError, PreprocessSettings, preprocess_image, restore_to_original
from hermes_model.catalog import (
    MODALITY_NAMES,
    Catalog,
    canonical_modality,
    modality_id,
    modality_name,
    modality_row,
)
from hermes_model.factory import load_checkpoint
from hermes_model.fileio import atomic_write_json
from hermes_model.inference import MODES, ROI_DIVISOR, predict_volume

__all__ = [
    "DEFAULT_SPACING",
    "LEVEL",
    "MIN_EXTENT",
    "InferenceOptions",
    "LoadedModel",
    "ScanError",
    "ScanResult",
    "TaskSelection",
    "find_scans",
    "load_model",
    "main",
    "predict",
    "predict_scan",
    "resolve_modality",
    "resolve_tasks",
]

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
DEFAULT_OUTPUT_SUFFIX = ".nii.gz"
DEFAULT_SPACING = 1.5
LEVEL = 0.5
MIN_EXTENT = ROI_DIVISOR  # voxels per axis at the target spacing: one cell of the network's coarsest level
DEVICES = ("auto", "cpu", "cuda")
PREDICTION_FORMAT = "hermes-fl/prediction-v1"
GPU_ACCUMULATION_FRACTION = 0.5
EXIT_OK, EXIT_SCANS_FAILED, EXIT_USAGE = 0, 1, 2


class ScanError(Exception):
    """One scan cannot be segmented; the message is one line naming the file and the problem."""


# ------------------------------------------------------------------------------------------------ model
@dataclass
class LoadedModel:
    """A model ready for inference and what is known about its prior bank.

    Attributes:
        model: the network (eval mode, on ``device``).
        catalog: the task catalog it was trained with.
        path: the checkpoint file.
        source: ``"hermes-fl"`` (ours) or ``"published"``.
        task_slots: the model's ``task_slots`` (task ids ``0..task_slots-2`` fit), None when unknown.
        modality_slots: rows of its modality prior bank.
        trained_tasks: task ids some site trained (from a server checkpoint's bank table), None = all.
        trained_modality_rows: modality rows some site trained, None = all.
        device: where the windows run.
    """

    model: nn.Module
    catalog: Catalog
    path: Path
    source: str
    task_slots: int | None
    modality_slots: int
    trained_tasks: frozenset[int] | None = None
    trained_modality_rows: frozenset[int] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _trained_rows(extra: Mapping[str, Any], kind: str) -> frozenset[int] | None:
    """Rows of ``kind`` (``task``/``modality``) that some site owns, from a server round checkpoint's
    bank table (``extra["server"]["bank"]["rows"][kind]``: row -> ``{"owners": [...]}``); None if absent."""
    try:
        rows = extra["server"]["bank"]["rows"][kind]
        return frozenset(int(r) for r, info in rows.items() if info.get("owners"))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _catalog_for(extra: Mapping[str, Any], catalog: str | os.PathLike | None, path: Path) -> Catalog:
    if catalog is not None:
        return Catalog.load(catalog)
    if "catalog" in extra:
        try:
            return Catalog.from_dict(extra["catalog"])
        except ValueError as exc:
            raise ValueError(f"--model {path}: invalid embedded task catalog: {_first_line(exc)}") from exc
    logger.info("%s embeds no task catalog: using the bundled one", path.name)
    return Catalog.load()


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu`` or ``cuda``."""
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {list(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; allowed here: ['auto', 'cpu']")
    return torch.device(name)


def load_model(
    checkpoint: str | os.PathLike,
    device: torch.device | str = "cpu",
    catalog: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a checkpoint through :func:`hermes_model.load_checkpoint` with the catalog it names.

    Raises:
        ValueError: the file is missing or not a usable checkpoint (one line naming the file).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"--model {path}: no such checkpoint file")
    try:
        loaded = load_checkpoint(path, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch/pickle/shape errors: all mean "not a usable checkpoint"
        raise ValueError(f"--model {path}: cannot load the checkpoint: {_first_line(exc)}") from exc
    config = loaded.config
    task_slots = getattr(loaded.model, "task_slots", config.get("task_slots"))
    modality_slots = getattr(loaded.model, "modality_slots", config.get("modality_slots", 6))
    model = loaded.model.to(torch.device(device)).eval()
    return LoadedModel(
        model=model,
        catalog=_catalog_for(loaded.extra, catalog, path),
        path=path,
        source=loaded.source,
        task_slots=int(task_slots) if task_slots is not None else None,
        modality_slots=int(modality_slots),
        trained_tasks=_trained_rows(loaded.extra, "task"),
        trained_modality_rows=_trained_rows(loaded.extra, "modality"),
        device=torch.device(device),
    )


# ------------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class TaskSelection:
    """The tasks to segment and their label values: task ``i`` (0-based) gets value ``i + 1``.

    Attributes:
        keys: ``"<dataset>/<class>"`` of each task.
        task_ids: global task id of each task (distinct).
    """

    keys: tuple[str, ...]
    task_ids: tuple[int, ...]

    @property
    def values(self) -> tuple[int, ...]:
        """Label value of each task: 1, 2, ..., n."""
        return tuple(range(1, len(self.keys) + 1))

    def to_dict(self) -> dict[str, Any]:
        """``{"background": 0, "labels": {"1": key, ...}, "tasks": [{"value", "task", "task_id"}, ...]}``."""
        return {
            "background": 0,
            "labels": {str(v): k for v, k in zip(self.values, self.keys, strict=True)},
            "tasks": [
                {"value": v, "task": k, "task_id": t}
                for v, k, t in zip(self.values, self.keys, self.task_ids, strict=True)
            ],
        }


def _in_bank(task_id: int, loaded: LoadedModel) -> str | None:
    """Why ``task_id`` is not in the model's bank, or None when it is."""
    if loaded.task_slots is not None and task_id > loaded.task_slots - 2:
        return f"the model has task_slots={loaded.task_slots}, i.e. task ids 0..{loaded.task_slots - 2}"
    if loaded.trained_tasks is not None and task_id not in loaded.trained_tasks:
        return "no site trained this task's prior"
    return None


def _expand(entry: str, catalog: Catalog) -> list[str]:
    """Task keys of one ``--tasks`` entry: a dataset name (all its classes) or a ``dataset/class`` key."""
    if entry in catalog:
        return list(catalog.dataset(entry).task_keys())
    if "/" not in entry:
        catalog.dataset(entry)  # raises: unknown dataset, with close matches
    catalog.task_id(entry)  # raises: unknown task key, with close matches and the dataset's classes
    return [entry]


def resolve_tasks(tasks: str | Sequence[str] | None, loaded: LoadedModel) -> TaskSelection:
    """The tasks named by ``--tasks`` (see the module docstring), or every task of the model's bank.

    Raises:
        ValueError: an unknown dataset or task (close matches listed), or a task not in the model's bank.
    """
    catalog = loaded.catalog
    table = catalog.task_map()
    if tasks is None:
        keys = [k for k, t in table.items() if _in_bank(t, loaded) is None]
        if not keys:
            raise ValueError(f"--model {loaded.path}: no task of its catalog is in the model's bank")
    else:
        entries = [tasks] if isinstance(tasks, str) else list(tasks)
        parts = [p.strip() for e in entries for p in str(e).split(",") if p.strip()]
        if not parts:
            raise ValueError(f"--tasks must name at least one dataset or '<dataset>/<class>', got {tasks!r}")
        keys = []
        for part in parts:
            try:
                keys += _expand(part, catalog)
            except ValueError as exc:
                raise ValueError(f"--tasks {part!r}: {_first_line(exc)}") from None
        for key in keys:
            reason = _in_bank(table[key], loaded)
            if reason is not None:
                in_bank = sorted({k.split('/')[0] for k, t in table.items() if _in_bank(t, loaded) is None})
                raise ValueError(
                    f"--model {loaded.path}: task {key!r} (id {table[key]}) is not in the model's bank: "
                    f"{reason}; datasets with tasks in the bank: {in_bank}"
                )
    chosen: dict[int, str] = {}
    for key in keys:
        chosen.setdefault(table[key], key)  # a shared task id is computed once, under its first key
    return TaskSelection(tuple(chosen.values()), tuple(chosen))


def resolve_modality(name: str, loaded: LoadedModel) -> int:
    """The modality id of ``name``, checked against the model's modality prior bank.

    Raises:
        ValueError: unknown modality name (allowed names listed), or one the model has no prior for.
    """
    mid = modality_id(name)
    canonical = canonical_modality(name)
    try:
        row = modality_row(mid, loaded.modality_slots)
    except ValueError:
        fits = [m for m, i in MODALITY_NAMES.items() if i == -1 or 0 <= i < loaded.modality_slots - 1]
        raise ValueError(
            f"--model {loaded.path}: the model has no prior for modality {canonical!r}: its modality bank "
            f"has {loaded.modality_slots} rows (modalities it has: {fits})"
        ) from None
    trained = loaded.trained_modality_rows
    if trained is not None and row not in trained:
        names = sorted(modality_name(i) for i in MODALITY_NAMES.values()
                       if modality_row(i, loaded.modality_slots) in trained)
        raise ValueError(
            f"--model {loaded.path}: the model has no prior for modality {canonical!r}: no site trained "
            f"its row {row}; trained modalities: {names}"
        )
    return mid


# ------------------------------------------------------------------------------------------------ scans
def _split_suffix(name: str) -> tuple[str, str]:
    """``("scan", ".nii.gz")`` for ``scan.nii.gz``; unknown endings keep everything after the last dot."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    path = Path(name)
    return path.stem, path.suffix


def _is_dicom_folder(folder: Path) -> bool:
    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def find_scans(path: str | os.PathLike) -> tuple[list[Path], bool]:
    """The scans of ``--input`` and whether it is a batch.

    A file or a folder holding DICOM files is one scan; any other folder is a batch: its image files
    (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) and its sub-folders (DICOM series),
    sorted by name; hidden entries are skipped.

    Raises:
        ValueError: ``path`` does not exist, or a batch folder holds no scan.
    """
    path = Path(path)
    if path.is_file():
        return [path], False
    if not path.is_dir():
        raise ValueError(f"--input {path}: no such file or folder")
    if _is_dicom_folder(path):
        return [path], False
    scans = sorted(
        p for p in path.iterdir()
        if not p.name.startswith(".") and (p.is_dir() or p.name.lower().endswith(IMAGE_SUFFIXES))
    )
    if not scans:
        raise ValueError(
            f"--input {path}: no scan found (image files ending in {list(IMAGE_SUFFIXES)}, "
            "DICOM series folders)"
        )
    return scans, True


def _output_paths(scans: Sequence[Path], batch: bool, output: Path) -> list[Path]:
    """Where each scan's label map goes (see the module docstring)."""
    if not batch and output.name.lower().endswith(OUTPUT_SUFFIXES):
        return [output]
    if output.name.lower().endswith(OUTPUT_SUFFIXES):
        raise ValueError(f"--output {output}: a batch of scans needs an output folder, not an image file")
    names = [(p.name if p.is_dir() else _split_suffix(p.name)[0]) + DEFAULT_OUTPUT_SUFFIX for p in scans]
    return [output / n for n in names]


def _output_stem(path: Path) -> tuple[str, str]:
    return _split_suffix(path.name)


# ------------------------------------------------------------------------------------------------ inference
@dataclass(frozen=True)
class InferenceOptions:
    """How each scan is segmented.

    Attributes:
        roi: window edge in voxels (a positive multiple of 16); every axis is padded to at least this.
        overlap: window overlap fraction in [0, 1).
        blend: ``"constant"`` (plain average, as the reference) or ``"gaussian"``.
        spacing: (x, y, z) mm the image is resampled to (the training ``target_spacing``).
        sw_batch_size: windows per forward pass.
        probabilities: also write each task's probability map.
        progress: show progress bars.
    """

    roi: int = 128
    overlap: float = 0.5
    blend: str = "constant"
    spacing: tuple[float, float, float] = (DEFAULT_SPACING,) * 3
    sw_batch_size: int = 1
    probabilities: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not _positive_int(self.roi) or self.roi % ROI_DIVISOR:
            raise ValueError(f"--roi must be a positive multiple of {ROI_DIVISOR}, got {self.roi!r}")
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ValueError(f"--overlap must be in [0, 1), got {self.overlap!r}")
        if self.blend not in MODES:
            raise ValueError(f"--blend must be one of {list(MODES)}, got {self.blend!r}")
        if len(self.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(f"--spacing must be 1 or 3 positive numbers (mm), got {self.spacing!r}")
        if not _positive_int(self.sw_batch_size):
            raise ValueError(f"--sw-batch-size must be an int >= 1, got {self.sw_batch_size!r}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _precision(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def _accumulation_device(device: torch.device, n_tasks: int, shape_zyx: Sequence[int]) -> torch.device:
    """The GPU when the stitched probabilities (and MONAI's count map) fit in a fraction of its free memory,
    else the CPU: the windows still run on ``device``, only the whole-volume sums live on the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    need = (n_tasks + 2) * int(np.prod(shape_zyx)) * 4
    free, _ = torch.cuda.mem_get_info(device)
    if need < GPU_ACCUMULATION_FRACTION * free:
        return device
    logger.info("probabilities of %d tasks (%.1f GiB) accumulate on the CPU", n_tasks, need / 2**30)
    return torch.device("cpu")


def _check_extent(scan: Path, meta: Mapping[str, Any]) -> None:
    size = meta["resampled"]["size_xyz"]
    if min(size) < MIN_EXTENT:
        spacing = meta["resampled"]["spacing_xyz"]
        raise ScanError(
            f"{scan}: image too small for one window: {size} voxels (x, y, z) at {spacing} mm; every axis "
            f"needs at least {MIN_EXTENT} voxels (the network's downsampling factor)"
        )


def _write_image(image: sitk.Image, path: Path) -> None:
    """Write with SimpleITK to a temporary name beside ``path`` (same ending), then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        sitk.WriteImage(image, str(tmp), True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _original_image(array_zyx: np.ndarray, meta: Mapping[str, Any]) -> sitk.Image:
    orig = meta["original"]
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing([float(s) for s in orig["spacing_xyz"]])
    image.SetOrigin([float(o) for o in orig["origin_xyz"]])
    image.SetDirection([float(d) for d in orig["direction"]])
    return image


def _to_original(
    probs: torch.Tensor, meta: Mapping[str, Any], values: Sequence[int], prob_paths: Sequence[Path] | None
) -> sitk.Image:
    """The label map on the original grid from (n, Z, Y, X) preprocessed-space probabilities.

    Each task's probabilities are restored (linear) one at a time, keeping a running maximum, so memory
    holds two original-size volumes whatever the number of tasks. Tasks whose maximum is below
    :data:`LEVEL` cannot win and are skipped unless their probability map is written.
    """
    shape = tuple(int(s) for s in reversed(meta["original"]["size_xyz"]))
    labels = np.zeros(shape, np.uint8 if max(values) <= 255 else np.uint16)
    best = np.full(shape, -1.0, np.float32)
    for i, value in enumerate(values):
        channel = probs[i].numpy()
        if prob_paths is None and float(channel.max()) < LEVEL:
            continue
        restored = restore_to_original(channel, meta, is_label=False)
        if prob_paths is not None:
            _write_image(restored, prob_paths[i])
        p = sitk.GetArrayViewFromImage(restored)
        wins = (p >= LEVEL) & (p > best)
        labels[wins] = value
        best[wins] = p[wins]
    return _original_image(labels, meta)


def predict_scan(
    loaded: LoadedModel,
    scan: str | os.PathLike,
    output: str | os.PathLike,
    tasks: TaskSelection,
    modality: str,
    options: InferenceOptions | None = None,
) -> Path:
    """Segment one scan and write its label map (plus the JSON and optional probability maps).

    Args:
        loaded: the model (:func:`load_model`).
        scan: an image file or a DICOM-series folder.
        output: the label map file (its ending picks the format).
        tasks: the tasks to segment (:func:`resolve_tasks`).
        modality: a modality name the model has a prior for (:func:`resolve_modality`).
        options: inference settings.

    Returns:
        The label map path.

    Raises:
        ScanError: the scan cannot be read or is too small (one line naming the file and the problem).
    """
    options = options or InferenceOptions()
    scan, output = Path(scan), Path(output)
    canonical = canonical_modality(modality)
    mid = resolve_modality(canonical, loaded)
    settings = PreprocessSettings(modality=canonical, classes=(), target_spacing=options.spacing,
                                  min_size=(options.roi,) * 3)
    try:
        image_zyx, meta = preprocess_image(scan, settings)
    except CaseError as exc:
        problem = _first_line(exc)
        problem = problem[len(scan.name) + 2:] if problem.startswith(f"{scan.name}: ") else problem
        raise ScanError(f"{scan}: {problem}") from exc
    _check_extent(scan, meta)
    for warning in meta["warnings"]:
        logger.warning("%s: %s", scan, warning)
    device = loaded.device
    precision = _precision(device)
    probs = predict_volume(
        loaded.model, image_zyx, list(tasks.task_ids), mid, roi_size=options.roi, overlap=options.overlap,
        mode=options.blend, sw_batch_size=options.sw_batch_size, precision=precision, sw_device=device,
        device=_accumulation_device(device, len(tasks.task_ids), image_zyx.shape), progress=options.progress,
    ).cpu()
    stem, suffix = _output_stem(output)
    prob_paths = ([output.with_name(f"{stem}_prob_{v}{suffix}") for v in tasks.values]
                  if options.probabilities else None)
    labels = _to_original(probs, meta, tasks.values, prob_paths)
    _write_image(labels, output)
    info = _prediction_json(loaded, scan, output, tasks, canonical, options, precision, meta, prob_paths)
    atomic_write_json(output.with_name(f"{stem}_labels.json"), info)
    return output


def _prediction_json(
    loaded: LoadedModel, scan: Path, output: Path, tasks: TaskSelection, modality: str,
    options: InferenceOptions, precision: str, meta: Mapping[str, Any], prob_paths: Sequence[Path] | None,
) -> dict[str, Any]:
    body = {"format": PREDICTION_FORMAT, "label_map": output.name, **tasks.to_dict()}
    for entry, path in zip(body["tasks"], prob_paths or [None] * len(tasks.keys), strict=True):
        entry["probability_map"] = path.name if path is not None else None
    body.update({
        "threshold": LEVEL,
        "modality": modality,
        "modality_id": MODALITY_NAMES[modality],
        "input": scan.name,
        "model": {"file": loaded.path.name, "source": loaded.source},
        "inference": {"roi": options.roi, "overlap": options.overlap, "blend": options.blend,
                      "precision": precision, "device": str(loaded.device)},
        "preprocessing": {
            "target_spacing_xyz": list(options.spacing),
            "orientation_from": meta["orientation_applied"]["from"],
            "resampled_size_xyz": meta["resampled"]["size_xyz"],
            "intensity": meta["intensity"],
        },
        "original": {k: meta["original"][k] for k in ("size_xyz", "spacing_xyz", "origin_xyz", "direction")},
        "warnings": list(meta["warnings"]),
    })
    return body


# ------------------------------------------------------------------------------------------------ batch
@dataclass
class ScanResult:
    """What happened to one scan: ``output`` when written, else ``error`` (one line)."""

    scan: Path
    output: Path | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def _spacing(value: float | Sequence[float]) -> tuple[float, float, float]:
    values = [value] if isinstance(value, int | float) else list(value)
    if len(values) == 1:
        values = values * 3
    try:
        return tuple(float(v) for v in values)  # type: ignore[return-value]
    except (TypeError, ValueError):
        raise ValueError(f"--spacing must be 1 or 3 positive numbers (mm), got {value!r}") from None


def _run_one(loaded: LoadedModel, scan: Path, out: Path, tasks: TaskSelection, modality: str,
             options: InferenceOptions, taken: dict[Path, Path]) -> ScanResult:
    start = time.perf_counter()
    result = ScanResult(scan)
    try:
        if out in taken:
            raise ScanError(f"{scan}: its output {out.name} is also that of {taken[out]}; rename one of them")
        if out.resolve() == scan.resolve():
            raise ScanError(f"{scan}: the output would overwrite the input")
        taken[out] = scan
        result.output = predict_scan(loaded, scan, out, tasks, modality, options)
    except ScanError as exc:
        result.error = _first_line(exc)
    except Exception as exc:  # noqa: BLE001 - one bad scan never stops a batch
        logger.debug("unexpected failure on %s", scan, exc_info=True)
        result.error = f"{scan}: unexpected error: {type(exc).__name__}: {_first_line(exc)}"
    result.seconds = round(time.perf_counter() - start, 3)
    if result.error:
        logger.error("%s", result.error)
    return result


def predict(
    model: str | os.PathLike,
    input: str | os.PathLike,
    output: str | os.PathLike,
    modality: str,
    tasks: str | Sequence[str] | None = None,
    *,
    overlap: float = 0.5,
    blend: str = "constant",
    probabilities: bool = False,
    device: str = "auto",
    roi: int = 128,
    spacing: float | Sequence[float] = DEFAULT_SPACING,
    sw_batch_size: int = 1,
    catalog: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[ScanResult]:
    """Segment one scan or a folder of scans (the ``hermes-predict`` command; see the module docstring).

    Args:
        model: checkpoint file.
        input: an image file, a DICOM-series folder, or a folder of such.
        output: a label-map file name (one scan) or a folder.
        modality: modality name of the scans (``hermes_model.catalog.MODALITY_NAMES``).
        tasks: ``--tasks`` entries (comma-separated string or list); None = every task of the bank.
        overlap, blend, roi, sw_batch_size: sliding-window settings.
        probabilities: also write each task's probability map.
        device: ``auto``, ``cpu`` or ``cuda``.
        spacing: mm the scans are resampled to: one number or (x, y, z).
        catalog: catalog yaml overriding the checkpoint's.
        progress: progress bars.

    Returns:
        One :class:`ScanResult` per scan, in input order; a scan that fails does not stop the others.

    Raises:
        ValueError: bad arguments, an unusable model, unknown tasks or modality, tasks outside the model's
            bank, a modality it has no prior for, or an input without scans (one line each).
    """
    canonical = canonical_modality(modality)
    options = InferenceOptions(roi=roi, overlap=overlap, blend=blend, spacing=_spacing(spacing),
                               sw_batch_size=sw_batch_size, probabilities=probabilities, progress=progress)
    scans, batch = find_scans(input)
    outputs = _output_paths(scans, batch, Path(output))
    loaded = load_model(model, resolve_device(device), catalog)
    selection = resolve_tasks(tasks, loaded)
    resolve_modality(canonical, loaded)
    logger.info("segmenting %d scan(s), %d task(s), modality %s, on %s", len(scans), len(selection.keys),
                canonical, loaded.device)
    window_bars = options.progress and not batch
    one_options = dataclasses.replace(options, progress=window_bars)
    results: list[ScanResult] = []
    taken: dict[Path, Path] = {}
    bar = tqdm(list(zip(scans, outputs, strict=True)), desc="hermes-predict", unit="scan",
               disable=not (options.progress and batch))
    for scan, out in bar:
        results.append(_run_one(loaded, scan, out, selection, canonical, one_options, taken))
    return results


# ------------------------------------------------------------------------------------------------ CLI
def _modality_arg(text: str) -> str:
    try:
        return canonical_modality(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _spacing_arg(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        values = []
    if len(values) not in (1, 3) or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be 1 or 3 positive numbers (mm, x,y,z), got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The ``hermes-predict`` argument parser."""
    p = argparse.ArgumentParser(
        prog="hermes-predict",
        description="Segment scans with a trained Hermes model; outputs in each scan's original geometry.",
    )
    p.add_argument("--model", required=True, help="checkpoint (ours or the released Hermes-R file)")
    p.add_argument("--input", required=True, help="image file, DICOM-series folder, or a folder of such")
    p.add_argument("--output", required=True, help="label-map file (.nii.gz, .nii, .nrrd, .mha) or folder")
    p.add_argument("--modality", required=True, type=_modality_arg,
                   help=f"modality of the scans: one of {list(MODALITY_NAMES)}")
    p.add_argument("--tasks", action="append", default=None,
                   help="comma-separated datasets and '<dataset>/<class>' keys (repeatable); default: every "
                        "task of the model's bank")
    p.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1) (default 0.5)")
    p.add_argument("--blend", choices=MODES, default="constant", help="window blending (default constant)")
    p.add_argument("--probabilities", action="store_true", help="also write each task's probability map")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default auto (a GPU when present)")
    p.add_argument("--roi", type=int, default=128, help="window size in voxels, multiple of 16 (default 128)")
    p.add_argument("--spacing", type=_spacing_arg, default=[DEFAULT_SPACING],
                   help="resampling spacing in mm, one number or x,y,z (default 1.5, as in training)")
    p.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--catalog", default=None, help="task catalog yaml (default: the checkpoint's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hermes-predict``; returns the exit status (0 ok, 1 some scan failed, 2 usage)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    sitk.ProcessObject.SetGlobalWarningDisplay(args.verbose)  # ITK's own multi-line warnings: -v only
    try:
        with logging_redirect_tqdm():
            results = predict(
                args.model, args.input, args.output, args.modality, args.tasks, overlap=args.overlap,
                blend=args.blend, probabilities=args.probabilities, device=args.device, roi=args.roi,
                spacing=args.spacing, sw_batch_size=args.sw_batch_size, catalog=args.catalog,
                progress=not args.no_progress,
            )
    except ValueError as exc:
        print(f"hermes-predict: error: {_first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED {r.error}", file=sys.stderr)
    print(f"hermes-predict: {len(results) - len(failed)} scan(s) segmented, {len(failed)} failed")
    for r in results:
        if r.ok:
            print(f"  {r.scan.name} -> {r.output} ({r.seconds:.1f} s)")
    return EXIT_SCANS_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
