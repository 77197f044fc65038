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
from hermes_model.plans import EVAL_CROP, RECIPE_PATCH, RECIPE_SPACING, Plans
from hermes_model.trained import (
    PLANS_KEY,
    TRAINED_TASKS_KEY,
    TrainedTask,
    trained_from_dict,
    trained_modality_rows,
)

__all__ = [
    "DEFAULT_SW_BATCH",
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
DEFAULT_SW_BATCH = 4  # benchmarks/inference.py: 3x the windows/s of 1 in fp32 on a CPU (batch 1 takes a slow conv path)
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
        trained: task id -> what trained it (:mod:`hermes_model.trained`); None = unknown (the published
            checkpoint: every task of its catalog was trained).
        plans: the plan the model was trained with (None: unknown, the recipe's is used).
        device: where the windows run.
    """

    model: nn.Module
    catalog: Catalog
    path: Path
    source: str
    task_slots: int | None
    modality_slots: int
    trained: dict[int, TrainedTask] | None = None
    plans: Plans | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def trained_modality_rows(self) -> frozenset[int] | None:
        return None if self.trained is None else trained_modality_rows(self.trained, self.modality_slots)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _trained(extra: Mapping[str, Any], path: Path) -> dict[int, TrainedTask] | None:
    if TRAINED_TASKS_KEY not in extra:
        return None
    try:
        return trained_from_dict(extra[TRAINED_TASKS_KEY])
    except ValueError as exc:
        raise ValueError(f"--model {path}: {_first_line(exc)}") from None


def _plans(extra: Mapping[str, Any], path: Path) -> Plans | None:
    if PLANS_KEY not in extra:
        logger.info("%s carries no plans record: the recipe's preprocessing is used", path.name)
        return None
    try:
        return Plans.from_dict(extra[PLANS_KEY])
    except ValueError as exc:
        raise ValueError(f"--model {path}: {_first_line(exc)}") from None


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
    weights: str = "ema",
) -> LoadedModel:
    """Load a checkpoint through :func:`hermes_model.load_checkpoint` with the catalog it names;
    ``weights`` ``ema`` (default) takes the EMA weights where the file has them, ``raw`` the raw ones.

    Raises:
        ValueError: the file is missing or not a usable checkpoint (one line naming the file).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"--model {path}: no such checkpoint file")
    try:
        loaded = load_checkpoint(path, use_ema=weights == "ema", map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch/pickle/shape errors: all mean "not a usable checkpoint"
        raise ValueError(f"--model {path}: {_first_line(exc)}") from exc
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
        trained=_trained(loaded.extra, path),
        plans=_plans(loaded.extra, path),
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


def _capacity(task_id: int, loaded: LoadedModel) -> str | None:
    """Why ``task_id`` has no row in the model's bank, or None when it has one."""
    if loaded.task_slots is not None and task_id > loaded.task_slots - 2:
        return f"the model has task_slots={loaded.task_slots}, i.e. task ids 0..{loaded.task_slots - 2}"
    return None


def _expand(entry: str, catalog: Catalog) -> list[str]:
    """Task keys of one ``--tasks`` entry: a dataset name (all its classes) or a ``dataset/class`` key."""
    if entry in catalog:
        return list(catalog.dataset(entry).task_keys())
    if "/" not in entry:
        catalog.dataset(entry)  # raises: unknown dataset, with close matches
    catalog.task_id(entry)  # raises: unknown task key, with close matches and the dataset's classes
    return [entry]


def default_task_keys(loaded: LoadedModel, modality: str | None = None) -> tuple[list[str], str]:
    """The tasks segmented when ``--tasks`` is not given, and the rule that chose them (for the log).

    The rule: the tasks this model was trained on, restricted to those trained on ``modality`` when some
    were (a prior learned on CT scans says little about an MR scan); every trained task when none was
    trained on it; for a checkpoint without a training record (the published one), every task of its
    catalog that fits its bank.
    """
    table = loaded.catalog.task_map()
    fits = {k: t for k, t in table.items() if _capacity(t, loaded) is None}
    if loaded.trained is None:
        return list(fits), "every task of the model's catalog (the checkpoint has no training record)"
    trained = {k: t for k, t in fits.items() if t in loaded.trained}
    if not trained:
        raise ValueError(f"--model {loaded.path}: its training record names no task of its catalog")
    if modality is not None:
        name = canonical_modality(modality)
        same = {k: t for k, t in trained.items() if name in loaded.trained[t].modalities}
        if same:
            return list(same), f"the tasks this model was trained on with {name} scans"
        return list(trained), (f"every task this model was trained on (none was trained on {name} scans: "
                               "expect a weaker result)")
    return list(trained), "every task this model was trained on"


def resolve_tasks(tasks: str | Sequence[str] | None, loaded: LoadedModel, modality: str | None = None
                  ) -> TaskSelection:
    """The tasks named by ``--tasks`` (see the module docstring), or :func:`default_task_keys`.

    A named task that no site trained is allowed with a warning: its prior row is still the random one.

    Raises:
        ValueError: an unknown dataset or task (close matches listed), or a task without a row in the bank.
    """
    catalog = loaded.catalog
    table = catalog.task_map()
    if tasks is None:
        keys, rule = default_task_keys(loaded, modality)
        logger.info("tasks: %s", rule)
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
            reason = _capacity(table[key], loaded)
            if reason is not None:
                raise ValueError(f"--model {loaded.path}: task {key!r} (id {table[key]}) is not in the model's "
                                 f"bank: {reason}")
        untrained = [k for k in keys if loaded.trained is not None and table[k] not in loaded.trained]
        if untrained:
            logger.warning("tasks %s were never trained in this model: their priors are the random initial "
                           "ones and their output means nothing", untrained)
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
        roi: window size in voxels, (x, y, z) or one number (positive multiples of 16): the plan's patch
            size; every axis is padded to at least this.
        overlap: window overlap fraction in [0, 1).
        blend: ``"constant"`` (plain average, as the reference) or ``"gaussian"``.
        spacing: (x, y, z) mm the image is resampled to (the plan's ``target_spacing``).
        sw_batch_size: windows per forward pass.
        probabilities: also write each task's probability map.
        progress: show progress bars.
    """

    roi: tuple[int, int, int] | int = RECIPE_PATCH
    overlap: float = 0.5
    blend: str = "constant"
    spacing: tuple[float, float, float] = RECIPE_SPACING
    sw_batch_size: int = DEFAULT_SW_BATCH
    probabilities: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        roi = (self.roi,) * 3 if isinstance(self.roi, int) and not isinstance(self.roi, bool) else tuple(self.roi)
        if len(roi) != 3 or not all(_positive_int(r) and r % ROI_DIVISOR == 0 for r in roi):
            raise ValueError(f"--roi must be one or three positive multiples of {ROI_DIVISOR}, got {self.roi!r}")
        object.__setattr__(self, "roi", roi)
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ValueError(f"--overlap must be in [0, 1), got {self.overlap!r}")
        if self.blend not in MODES:
            raise ValueError(f"--blend must be one of {list(MODES)}, got {self.blend!r}")
        if len(self.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(f"--spacing must be 1 or 3 positive numbers (mm), got {self.spacing!r}")
        if not _positive_int(self.sw_batch_size):
            raise ValueError(f"--sw-batch-size must be an int >= 1, got {self.sw_batch_size!r}")

    @property
    def roi_zyx(self) -> tuple[int, int, int]:
        return tuple(reversed(self.roi))  # type: ignore[return-value,arg-type]

    @classmethod
    def from_plans(cls, plans: Plans, **overrides: Any) -> InferenceOptions:
        """The plan's spacing and patch size as window, with other settings from ``overrides``."""
        return cls(roi=plans.patch_size, spacing=plans.target_spacing, **overrides)


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


def segment_preprocessed(
    model: nn.Module,
    image_zyx: np.ndarray,
    meta: Mapping[str, Any],
    task_ids: Sequence[int],
    modality_id: int,
    options: InferenceOptions,
    device: torch.device,
    prob_paths: Sequence[Path] | None = None,
) -> sitk.Image:
    """The label map, on the scan's original grid, of a preprocessed scan: sliding-window probabilities of
    ``task_ids`` (windows of ``options.roi``), restored to the original geometry, and task ``i`` written as
    value ``i + 1`` where it is the most probable task at or above :data:`LEVEL`.

    This is the one code path from a preprocessed volume to a label map: ``hermes-predict`` and the sites'
    whole-scan evaluation both use it.

    Args:
        model: the network (eval mode, on ``device``).
        image_zyx: (Z, Y, X) float32 preprocessed image; meta: its metadata (``restore_to_original``).
        task_ids: global task ids; modality_id: the scan's modality id.
        options: sliding-window settings; device: where the windows run.
        prob_paths: where to write each task's probability map on the original grid (None: not written).
    """
    probs = predict_volume(
        model, image_zyx, list(task_ids), modality_id, roi_size=options.roi_zyx, overlap=options.overlap,
        mode=options.blend, sw_batch_size=options.sw_batch_size, precision=_precision(device), sw_device=device,
        device=_accumulation_device(device, len(task_ids), image_zyx.shape), progress=options.progress,
    ).cpu()
    return _to_original(probs, meta, range(1, len(task_ids) + 1), prob_paths)


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
    plans = loaded.plans or Plans()
    settings = PreprocessSettings(modality=canonical, classes=(), target_spacing=options.spacing,
                                  min_size=options.roi, interpolation=plans.interpolation, crop=EVAL_CROP,
                                  intensity=plans.scheme(canonical))
    try:
        image_zyx, meta = preprocess_image(scan, settings)
    except CaseError as exc:
        problem = _first_line(exc)
        problem = problem[len(scan.name) + 2:] if problem.startswith(f"{scan.name}: ") else problem
        raise ScanError(f"{scan}: {problem}") from exc
    _check_extent(scan, meta)
    for warning in meta["warnings"]:
        logger.warning("%s: %s", scan, warning)
    precision = _precision(loaded.device)
    stem, suffix = _output_stem(output)
    prob_paths = ([output.with_name(f"{stem}_prob_{v}{suffix}") for v in tasks.values]
                  if options.probabilities else None)
    labels = segment_preprocessed(loaded.model, image_zyx, meta, tasks.task_ids, mid, options, loaded.device,
                                  prob_paths)
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
        "inference": {"roi": list(options.roi), "overlap": options.overlap, "blend": options.blend,
                      "precision": precision, "device": str(loaded.device)},
        "plans": (loaded.plans or Plans()).to_dict(),
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


def _three(value: float | Sequence[float], flag: str, kind: type) -> tuple:
    values = [value] if isinstance(value, int | float) else list(value)
    if len(values) == 1:
        values = values * 3
    try:
        return tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be 1 or 3 positive numbers, got {value!r}") from None


def _options_for(loaded: LoadedModel, roi: int | Sequence[int] | None, spacing: float | Sequence[float] | None,
                 **settings: Any) -> InferenceOptions:
    """The model's plan (spacing, window = patch size) unless a flag says otherwise, which is logged."""
    plans = loaded.plans or Plans()
    source = "the model's plan" if loaded.plans is not None else "the recipe (the model carries no plan)"
    chosen = {"spacing": plans.target_spacing, "roi": plans.patch_size}
    given = {"spacing": None if spacing is None else _three(spacing, "--spacing", float),
             "roi": None if roi is None else _three(roi, "--roi", int)}
    for name, value in given.items():
        if value is not None and tuple(value) != tuple(chosen[name]):
            logger.warning("--%s %s differs from %s (%s): the model was trained with the latter", name,
                           "x".join(f"{v:g}" for v in value), source, "x".join(f"{v:g}" for v in chosen[name]))
        if value is not None:
            chosen[name] = value
    logger.info("preprocessing: %s mm, %s windows (%s)", "x".join(f"{v:g}" for v in chosen["spacing"]),
                "x".join(str(v) for v in chosen["roi"]), source)
    return InferenceOptions(roi=chosen["roi"], spacing=chosen["spacing"], **settings)


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
    roi: int | Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    sw_batch_size: int = DEFAULT_SW_BATCH,
    catalog: str | os.PathLike | None = None,
    progress: bool = True,
    weights: str = "ema",
) -> list[ScanResult]:
    """Segment one scan or a folder of scans (the ``hermes-predict`` command; see the module docstring).

    Args:
        model: checkpoint file.
        input: an image file, a DICOM-series folder, or a folder of such.
        output: a label-map file name (one scan) or a folder.
        modality: modality name of the scans (``hermes_model.catalog.MODALITY_NAMES``).
        tasks: ``--tasks`` entries (comma-separated string or list); None = :func:`default_task_keys`.
        overlap, blend, sw_batch_size: sliding-window settings.
        roi: window size (x, y, z) or one number; None = the model's plan's patch size.
        probabilities: also write each task's probability map.
        device: ``auto``, ``cpu`` or ``cuda``.
        spacing: mm the scans are resampled to: one number or (x, y, z); None = the model's plan's.
        catalog: catalog yaml overriding the checkpoint's.
        progress: progress bars.
        weights: ``ema`` (default: the EMA weights where the model file has them) or ``raw``.

    Returns:
        One :class:`ScanResult` per scan, in input order; a scan that fails does not stop the others.

    Raises:
        ValueError: bad arguments, an unusable model, unknown tasks or modality, tasks outside the model's
            bank, a modality it has no prior for, or an input without scans (one line each).
    """
    canonical = canonical_modality(modality)
    scans, batch = find_scans(input)
    outputs = _output_paths(scans, batch, Path(output))
    loaded = load_model(model, resolve_device(device), catalog, weights)
    options = _options_for(loaded, roi=roi, overlap=overlap, blend=blend, spacing=spacing,
                           sw_batch_size=sw_batch_size, probabilities=probabilities, progress=progress)
    selection = resolve_tasks(tasks, loaded, canonical)
    resolve_modality(canonical, loaded)
    logger.info("segmenting %d scan(s), modality %s, on %s; label values: %s", len(scans), canonical,
                loaded.device, ", ".join(f"{v} = {k}" for v, k in zip(selection.values, selection.keys, strict=True)))
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


def _roi_arg(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        values = []
    if len(values) not in (1, 3) or not all(v > 0 and v % ROI_DIVISOR == 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be 1 or 3 positive multiples of {ROI_DIVISOR} (x,y,z), got {text!r}")
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
                   help="comma-separated datasets and '<dataset>/<class>' keys (repeatable); default: the "
                        "tasks the model was trained on with this modality (all trained tasks when none was)")
    p.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1) (default 0.5)")
    p.add_argument("--blend", choices=MODES, default="constant", help="window blending (default constant)")
    p.add_argument("--probabilities", action="store_true", help="also write each task's probability map")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default auto (a GPU when present)")
    p.add_argument("--roi", type=_roi_arg, default=None,
                   help="window size in voxels, one number or x,y,z, multiples of 16 (default: the model's "
                        "patch size, from its plan)")
    p.add_argument("--spacing", type=_spacing_arg, default=None,
                   help="resampling spacing in mm, one number or x,y,z (default: the model's plan)")
    p.add_argument("--sw-batch-size", type=int, default=DEFAULT_SW_BATCH,
                   help=f"windows per forward pass (default {DEFAULT_SW_BATCH})")
    p.add_argument("--catalog", default=None, help="task catalog yaml (default: the checkpoint's)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="the model file's EMA weights (default, where it has them) or its raw weights")
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
                progress=not args.no_progress, weights=args.weights,
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
