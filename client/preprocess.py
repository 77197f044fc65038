"""Preprocessing of a site's raw scans into training arrays, with SimpleITK (spec section 5, done properly).

The settings come from the federation's plan (:class:`hermes_model.plans.Plans`); per case:

1. Read the image and the label: NIfTI / NRRD / MHA files, or a folder holding one DICOM series
   (``ImageSeriesReader``; slices must be evenly spaced). NIfTI files are checked to hold all the voxel
   data their header promises (ITK silently zero-fills a truncated NIfTI). A case with a ``frame`` uses
   that frame of a 4D image and label (M&Ms cine); a label with a ``label_format`` is read by the reader
   registered for it (CHAOS PNG slices, see :mod:`client.converters`).
2. Label values: every value must be 0 or one of the dataset's ``classes``; values listed in
   ``ignore_values`` become background; anything else fails the case and lists the values found.
3. Label geometry: size, spacing, origin and direction must equal the image's (within a small
   tolerance), else the case fails with both geometries in the reason (a label of another patient is
   the usual cause). A dataset with ``resample_label: true`` instead resamples the label onto the image
   grid in physical space with nearest neighbour, provided their physical extents overlap.
4. Re-orient to **LPS** (``sitk.DICOMOrient``), i.e. ITK's identity direction: the x, y, z voxel axes run
   towards patient left, posterior and superior. The numpy arrays are therefore (Z, Y, X) = (S, P, L).
5. Resample to ``target_spacing`` on an identity-direction grid that keeps the physical centre of the
   image (its extent divided by the spacing, rounded); B-spline or linear for the image, nearest for the
   label. An oblique image is resampled onto the axis-aligned grid that covers it.
6. Intensity, on the whole resampled image: the modality's scheme of the plan (CT clipped to
   [-991, 500] HU; MR and PET clipped to their 2nd..98th percentile), then z-scored with the clipped
   image's mean/std.
7. Crop: a training case to its labelled foreground bounding box plus ``margin`` voxels; a validation or
   test case, an unlabelled case and every scan of ``hermes-predict`` to the box of voxels above the
   image's minimum (:data:`hermes_model.plans.EVAL_CROP`: from the image alone, so no label information
   reaches evaluation). Normalising before cropping makes every crop a sub-array of the same volume.
8. Pad every axis symmetrically to at least ``min_size`` (the plan's patch size; image: the minimum
   after normalisation, label: 0).

Outputs under ``<work_dir>/preprocessed/<dataset>/`` (each written atomically, the JSON last, so a case
is complete exactly when its JSON carries the current hashes):

- ``<case>.npy``: float32 image, shape (Z, Y, X);
- ``<case>_gt.npy``: int8 label, shape (Z, Y, X), the original label values (0 = background); only for
  labelled cases;
- ``<case>.json``: original and resampled geometry, crop box and padding, intensity parameters, hashes:
  everything :func:`restore_to_original` needs to put a prediction back on the original image grid;
- ``dataset.json``: cases, splits, classes, modality, intensity fingerprint, the plan's preprocessing
  settings (written by the runner).

Array-index quantities in the JSON carry a ``_zyx`` suffix (numpy order); physical ones (size, spacing,
origin) a ``_xyz`` suffix (SimpleITK order).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import random
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from client.config import DatasetConfig, SiteConfig, SplitSpec
from client.formats import LABEL_READERS, CaseSpec, expand_split_lists
from hermes_model.catalog import Catalog, modality_id
from hermes_model.fileio import atomic_save_npy, atomic_write_json
from hermes_model.plans import EVAL_CROP, ORIENTATION, TRAIN_CROP, IntensityScheme, Plans, recipe_intensity

__all__ = [
    "ORIENTATION",
    "PREPROCESS_VERSION",
    "CaseError",
    "CaseOutcome",
    "PreprocessSettings",
    "Report",
    "compute_splits",
    "preprocess_case",
    "preprocess_image",
    "preprocess_site",
    "read_image",
    "read_label",
    "restore_to_original",
]

logger = logging.getLogger(__name__)

PREPROCESS_VERSION = 2  # 2: intensity statistics of the whole resampled image, crop rule per split
CROPS = (TRAIN_CROP, EVAL_CROP)
FINGERPRINT_PERCENTILES = (0.5, 2.0, 50.0, 98.0, 99.5)
# image/label geometry is "the same" within these tolerances (origin: fraction of a voxel)
SPACING_RTOL, ORIGIN_VOXEL_TOL, DIRECTION_ATOL = 1e-3, 1e-2, 1e-3
SLICE_SPACING_RTOL = 0.01
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


class CaseError(Exception):
    """A case cannot be preprocessed; the message is the reason shown in the report."""


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that determines a case's output (hashed: a change re-runs the case).

    Attributes:
        modality: canonical modality name (CT, PET, MR-T1, MR-T2, cine-MR, MR).
        classes: label values of the classes (sorted).
        ignore_values: label values mapped to background.
        target_spacing: (x, y, z) mm.
        margin: voxels kept around the foreground box (``crop="label-box"``).
        min_size: (x, y, z) voxels every output axis is padded to.
        interpolation: ``"bspline"`` or ``"linear"`` for the image.
        crop: ``"label-box"`` (training cases) or ``"above-minimum"`` (evaluation, inference: no label used).
        intensity: the modality's intensity scheme (None: the recipe's for ``modality``).
        resample_label: resample a label whose grid differs from the image's instead of failing the case.
    """

    modality: str
    classes: tuple[int, ...]
    ignore_values: tuple[int, ...] = ()
    target_spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    margin: int = 20
    min_size: tuple[int, int, int] = (128, 128, 128)
    interpolation: str = "bspline"
    crop: str = TRAIN_CROP
    intensity: IntensityScheme | None = None
    resample_label: bool = False

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {list(CROPS)}, got {self.crop!r}")
        if self.intensity is None:
            object.__setattr__(self, "intensity", recipe_intensity()[self.modality])

    @classmethod
    def from_plans(cls, plans: Plans, dataset: DatasetConfig | None, catalog: Catalog | None,
                   crop: str = TRAIN_CROP, modality: str | None = None) -> PreprocessSettings:
        """The settings of ``dataset`` (None: an unlabelled scan of ``modality``) under ``plans``.

        Raises:
            ValueError: the plan has no intensity scheme for the modality.
        """
        modality = dataset.modality if dataset is not None else modality
        assert modality is not None
        return cls(
            modality=modality,
            classes=tuple(sorted(dataset.resolved_classes(catalog))) if dataset is not None else (),
            ignore_values=tuple(sorted(set(dataset.ignore_values))) if dataset is not None else (),
            target_spacing=plans.target_spacing,
            margin=plans.train_margin,
            min_size=plans.patch_size,
            interpolation=plans.interpolation,
            crop=crop,
            intensity=plans.scheme(modality),
            resample_label=bool(dataset.resample_label) if dataset is not None else False,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "version": PREPROCESS_VERSION, "orientation": ORIENTATION}
        out["intensity"] = self.intensity.to_dict() if self.intensity is not None else None
        return out

    def digest(self) -> str:
        """SHA-256 of the settings and the preprocessing version."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class CaseOutcome:
    """What happened to one case: ``status`` is ``"done"``, ``"skipped"`` (up to date) or ``"failed"``."""

    dataset: str
    case_id: str
    status: str
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ reading
def _sitk_message(exc: RuntimeError) -> str:
    """The useful line of a SimpleITK exception (drops the C++ source location)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "sitk::ERROR:" in ln:
            return ln.split("sitk::ERROR:", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file must hold (offset of the data + voxel data), or None if not NIfTI."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    n_dim = max(1, min(int(dims[0]), 7))
    voxels = int(np.prod([max(1, int(d)) for d in dims[1 : 1 + n_dim]], dtype=np.int64))
    return max(offset, 348) + voxels * max(1, bitpix) // 8


def check_nifti_complete(path: Path) -> None:
    """Raise :class:`CaseError` when a NIfTI file is truncated or its gzip stream is corrupt."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
            total = len(header)
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError) as exc:  # gzip: BadGzipFile is an OSError, truncation an EOFError
        raise CaseError(f"{path.name}: corrupt or truncated compressed file ({exc})") from exc
    expected = _nifti_expected_bytes(header)
    if expected is None:
        raise CaseError(f"{path.name}: not a NIfTI file (no NIfTI-1/2 header)")
    if total < expected:
        raise CaseError(f"{path.name}: truncated file: {total} bytes, the header needs {expected}")


def _check_slice_spacing(files: Sequence[str], folder: Path) -> None:
    """Raise when the slices of a series are not evenly spaced (missing or duplicated slices)."""
    if len(files) < 3:
        return
    positions, normal = [], None
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        if not reader.HasMetaDataKey("0020|0032") or not reader.HasMetaDataKey("0020|0037"):
            return  # no position tags (e.g. secondary capture): nothing to check against
        if normal is None:
            cosines = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
            normal = np.cross(cosines[:3], cosines[3:])
        position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
        positions.append(float(np.dot(normal, position)))
    gaps = np.diff(np.sort(positions))
    step = float(np.median(gaps))
    if step <= 0 or np.max(np.abs(gaps - step)) > SLICE_SPACING_RTOL * step + 1e-3:
        raise CaseError(
            f"DICOM series in {folder.name!r}: slices are not evenly spaced "
            f"(gaps {np.round(gaps, 3).tolist()} mm): missing or duplicated slices"
        )


def _read_dicom_series(folder: Path) -> sitk.Image:
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise CaseError(f"no DICOM series found in folder {folder.name!r}")
    if len(ids) > 1:
        raise CaseError(f"folder {folder.name!r} holds {len(ids)} DICOM series; one series per case folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
    _check_slice_spacing(files, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def _frame_of(image: sitk.Image, frame: int, name: str) -> sitk.Image:
    """Frame ``frame`` (0-based) of a 4D image as a 3D image (geometry of the first three axes)."""
    if image.GetDimension() != 4:
        raise CaseError(f"{name!r}: frame {frame} asked for, but the image is {image.GetDimension()}D")
    n_frames = image.GetSize()[3]
    if not 0 <= frame < n_frames:
        raise CaseError(f"{name!r}: frame {frame} out of range; the image has frames 0..{n_frames - 1}")
    return image[:, :, :, frame]


def read_image(path: str | Path, frame: int | None = None) -> sitk.Image:
    """Read a 3D scalar image from a file (NIfTI, NRRD, MHA, ...) or a DICOM-series folder.

    Args:
        path: the file or DICOM folder.
        frame: for a 4D image (e.g. cine MR, X x Y x Z x T), the 0-based index of the frame to return;
            ``None`` for a 3D image (a 4D image with a single frame is accepted too).

    Raises:
        CaseError: unreadable, truncated, not 3D (or no such frame), not scalar, or with non-finite values.
    """
    path = Path(path)
    try:
        if path.is_dir():
            image = _read_dicom_series(path)
        else:
            if path.name.endswith((".nii", ".nii.gz")):
                check_nifti_complete(path)
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CaseError(f"cannot read {path.name!r}: {_sitk_message(exc)}") from exc
    if frame is not None:
        image = _frame_of(image, frame, path.name)
    elif image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise CaseError(
            f"{path.name!r}: a 3D image is required, got {image.GetDimension()}D {image.GetSize()}"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        n = image.GetNumberOfComponentsPerPixel()
        raise CaseError(f"{path.name!r}: a scalar image is required, got {n} components per voxel")
    return image


def read_label(case: CaseSpec, image: sitk.Image) -> sitk.Image:
    """The label of ``case`` as an image; ``image`` is the case's image (needed by some label formats).

    An ordinary label is read with :func:`read_image` (frame ``case.frame`` of a 4D label); a label
    with a ``case.label_format`` is read by the reader registered under that name in
    :data:`client.formats.LABEL_READERS`. A frame picked from a 4D label must not be all background
    (a wrong frame index would otherwise go unnoticed).

    Raises:
        CaseError: unreadable label, unknown label format, or an empty label frame.
    """
    if case.label is None:
        raise CaseError(f"case {case.case_id!r} has no label")
    if case.label_format is not None:
        if case.label_format not in LABEL_READERS:
            raise CaseError(f"unknown label format {case.label_format!r}; known: {sorted(LABEL_READERS)}")
        try:
            return LABEL_READERS[case.label_format](case, image)
        except ValueError as exc:
            raise CaseError(str(exc)) from exc
        except RuntimeError as exc:
            raise CaseError(f"cannot read the label of {case.case_id!r}: {_sitk_message(exc)}") from exc
    label = read_image(case.label, frame=case.frame)
    if case.frame is not None and not _has_foreground(label):
        raise CaseError(f"{case.label.name!r}: frame {case.frame} of the label is all background "
                        "(is the frame index right? indices are 0-based)")
    return label


# ------------------------------------------------------------------------------------------------ geometry
def _geometry(image: sitk.Image) -> dict[str, Any]:
    return {
        "size_xyz": list(image.GetSize()),
        "spacing_xyz": list(image.GetSpacing()),
        "origin_xyz": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    if a.GetSize() != b.GetSize():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    return (
        np.allclose(sa, sb, rtol=SPACING_RTOL, atol=0)
        and np.all(np.abs(np.array(a.GetOrigin()) - b.GetOrigin()) <= ORIGIN_VOXEL_TOL * np.minimum(sa, sb))
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=DIRECTION_ATOL)
    )


def physical_extent(image: sitk.Image) -> np.ndarray:
    """Axis-aligned physical box covered by the voxels (edges, not centres): array [[min, max] x 3] mm."""
    size = np.array(image.GetSize(), dtype=float)
    corners = [
        image.TransformContinuousIndexToPhysicalPoint(
            [(-0.5 if c == 0 else s - 0.5) for c, s in zip(cs, size, strict=True)]
        )
        for cs in np.ndindex(2, 2, 2)
    ]
    pts = np.array(corners)
    return np.stack([pts.min(axis=0), pts.max(axis=0)], axis=1)


def describe_grid(image: sitk.Image) -> str:
    """``size [x, y, z], spacing [...] mm, origin [...] mm, direction [...]`` rounded for messages."""
    return (f"size {list(image.GetSize())}, spacing {np.round(image.GetSpacing(), 3).tolist()} mm, origin "
            f"{np.round(image.GetOrigin(), 2).tolist()} mm, direction {np.round(image.GetDirection(), 3).tolist()}")


def align_label(label: sitk.Image, image: sitk.Image, resample: bool = False) -> tuple[sitk.Image, bool]:
    """The label on the image's voxel grid: ``(label, resampled)``.

    Within tolerance the image geometry is copied. A label stored in another axis order or direction over
    the very same voxels (the same grid once both are re-oriented to LPS) is resampled onto the image grid,
    which is exact. Otherwise, unless ``resample``, the case fails with both geometries (an image and a
    label of different grids are most often two different scans); with ``resample`` the label is
    resampled in physical space with nearest neighbour. Raises
    :class:`CaseError` when their physical extents do not overlap or the label's foreground falls outside
    the image.
    """
    if _same_grid(label, image):
        out = sitk.Image(label)
        out.CopyInformation(image)
        return out, False
    same_voxels = _same_grid(sitk.DICOMOrient(label, ORIENTATION), sitk.DICOMOrient(image, ORIENTATION))
    if not (resample or same_voxels):
        raise CaseError(
            f"the label's geometry differs from the image's (image: {describe_grid(image)}; label: "
            f"{describe_grid(label)}): is it the label of another scan? If the label must be resampled onto "
            "the image, set 'resample_label: true' for this dataset"
        )
    box_i, box_l = physical_extent(image), physical_extent(label)
    overlap = np.minimum(box_i[:, 1], box_l[:, 1]) - np.maximum(box_i[:, 0], box_l[:, 0])
    if np.any(overlap <= 0):
        raise CaseError(
            "image and label do not overlap in physical space: image spans "
            f"{np.round(box_i, 1).tolist()} mm, label spans {np.round(box_l, 1).tolist()} mm (x, y, z)"
        )
    had_foreground = _has_foreground(label)
    out = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    if had_foreground and not _has_foreground(out):
        raise CaseError("the label's foreground lies outside the image after resampling onto the image grid")
    return out, True


def _has_foreground(label: sitk.Image) -> bool:
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(label)
    return stats.GetMaximum() > 0 or stats.GetMinimum() < 0


def target_grid(image: sitk.Image, spacing_xyz: Sequence[float]) -> tuple[list[int], list[float]]:
    """``(size_xyz, origin_xyz)`` of the identity-direction grid at ``spacing_xyz`` keeping the image centre.

    The grid covers the image's physical extent (edge to edge, projected on the axes for an oblique
    image) rounded to whole voxels, centred on the image's centre.
    """
    direction = np.array(image.GetDirection()).reshape(3, 3)
    size, spacing = np.array(image.GetSize(), dtype=float), np.array(image.GetSpacing())
    extent = np.abs(direction) @ (size * spacing)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    target = np.array(spacing_xyz, dtype=float)
    new_size = np.maximum(1, np.round(extent / target)).astype(int)
    origin = centre - (new_size - 1) / 2 * target
    return new_size.tolist(), origin.tolist()


def _resample(image: sitk.Image, size: Sequence[int], origin: Sequence[float], spacing: Sequence[float],
              interpolator: int, default: float) -> sitk.Image:
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in size])
    f.SetOutputOrigin([float(o) for o in origin])
    f.SetOutputSpacing([float(s) for s in spacing])
    f.SetOutputDirection(_IDENTITY)
    f.SetInterpolator(interpolator)
    f.SetDefaultPixelValue(float(default))
    f.SetOutputPixelType(image.GetPixelID())
    return f.Execute(image)


# ------------------------------------------------------------------------------------------------ labels
def map_label_values(label: sitk.Image, classes: Iterable[int], ignore_values: Iterable[int]) -> sitk.Image:
    """Int8 label with ignored values set to 0; :class:`CaseError` lists values outside 0/classes/ignored."""
    arr = sitk.GetArrayViewFromImage(label)
    values = np.unique(arr)
    if values.dtype.kind == "f" and not np.all(np.isfinite(values) & (values == np.round(values))):
        examples = values[~np.isfinite(values) | (values != np.round(values))][:5].tolist()
        raise CaseError(f"label has non-integer values, e.g. {examples}")
    values = values.astype(np.int64)
    allowed, ignored = set(classes), set(ignore_values)
    unknown = sorted(int(v) for v in values if v != 0 and v not in allowed and v not in ignored)
    if unknown:
        raise CaseError(
            f"label values {unknown} are not in classes {sorted(allowed)} (values found: {values.tolist()}); "
            "add them to 'classes' or map them to background with 'ignore_values'"
        )
    out = np.asarray(arr).astype(np.int64)
    if ignored:
        out[np.isin(out, list(ignored))] = 0
    mapped = sitk.GetImageFromArray(out.astype(np.int8))
    mapped.CopyInformation(label)
    return mapped


def foreground_box(label_zyx: np.ndarray, margin: int) -> list[list[int]] | None:
    """Half-open ``[[z0, z1], [y0, y1], [x0, x1]]`` box of ``label > 0`` grown by ``margin``, or None."""
    nonzero = np.nonzero(label_zyx > 0)
    if not nonzero[0].size:
        return None
    return [
        [max(0, int(idx.min()) - margin), min(n, int(idx.max()) + 1 + margin)]
        for idx, n in zip(nonzero, label_zyx.shape, strict=True)
    ]


# ------------------------------------------------------------------------------------------------ intensity
def normalise_intensity(image_zyx: np.ndarray, scheme: IntensityScheme | str) -> tuple[np.ndarray, dict[str, Any]]:
    """Clip by ``scheme`` (a fixed window, e.g. CT [-991, 500] HU; or percentiles of the image, e.g. MR/PET
    2nd..98th), then z-score with the clipped image's mean and std.

    Args:
        image_zyx: float32 array (Z, Y, X), the whole resampled image.
        scheme: an :class:`~hermes_model.plans.IntensityScheme`, or a modality name (the recipe's scheme).

    Returns:
        The float32 normalised array (same shape) and ``{"scheme", "clip", "mean", "std"}``.
    """
    if isinstance(scheme, str):
        scheme = recipe_intensity()[scheme]
    if scheme.kind == "window":
        lo, hi = scheme.low, scheme.high
    else:
        lo, hi = (float(v) for v in np.percentile(image_zyx, (scheme.low, scheme.high)))
    clipped = np.clip(image_zyx, lo, hi)
    mean, std = float(clipped.mean(dtype=np.float64)), float(clipped.std(dtype=np.float64))
    std_used = std if std > 1e-8 else 1.0
    out = ((clipped - mean) / std_used).astype(np.float32)
    return out, {"scheme": scheme.kind, "clip": [float(lo), float(hi)], "mean": mean, "std": std_used}


def above_minimum_box(image_zyx: np.ndarray) -> list[list[int]]:
    """Half-open box of the voxels above the image's minimum (the whole image when it is constant)."""
    box = foreground_box((image_zyx > image_zyx.min()).astype(np.int8), 0)
    return box or [[0, n] for n in image_zyx.shape]


def _foreground_stats(image_zyx: np.ndarray, label_zyx: np.ndarray | None) -> dict[str, Any] | None:
    if label_zyx is None:
        return None
    values = image_zyx[label_zyx > 0].astype(np.float64)
    if not values.size:
        return None
    pct = np.percentile(values, FINGERPRINT_PERCENTILES)
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "percentiles": {f"{p:g}": float(v) for p, v in zip(FINGERPRINT_PERCENTILES, pct, strict=True)},
    }


def pad_to_min_size(array: np.ndarray, min_size_zyx: Sequence[int], value: float) -> tuple[np.ndarray, list]:
    """Pad every axis symmetrically (extra voxel after) to at least ``min_size_zyx``; returns pad widths."""
    pad = []
    for n, m in zip(array.shape, min_size_zyx, strict=True):
        need = max(0, int(m) - n)
        pad.append([need // 2, need - need // 2])
    if any(b or a for b, a in pad):
        array = np.pad(array, pad, mode="constant", constant_values=value)
    return array, pad


# ------------------------------------------------------------------------------------------------ hashing
def _hash_files(paths: Iterable[Path], h: Any) -> None:
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)


def input_hash(case: CaseSpec) -> str:
    """SHA-256 of the case's input bytes (every file of a DICOM folder, sorted by name) and its label."""
    h = hashlib.sha256()
    _hash_files(_files_of(case.image), h)
    h.update(b"\0label\0")
    if case.label is not None:
        _hash_files(_files_of(case.label), h)
    if case.frame is not None or case.label_format is not None:  # absent before: older hashes stay valid
        h.update(f"\0frame={case.frame}\0label_format={case.label_format}".encode())
    return h.hexdigest()


def _files_of(path: Path) -> list[Path]:
    """The file itself, or the files of a folder (a DICOM series, PNG label slices) sorted by name."""
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


# ------------------------------------------------------------------------------------------------ one case
def _case_paths(out_dir: Path, case_id: str) -> dict[str, Path]:
    return {
        "image": out_dir / f"{case_id}.npy",
        "label": out_dir / f"{case_id}_gt.npy",
        "json": out_dir / f"{case_id}.json",
    }


def _is_up_to_date(paths: Mapping[str, Path], in_hash: str, settings_hash: str) -> bool:
    try:
        meta = json.loads(paths["json"].read_text())
    except (OSError, ValueError):
        return False
    if meta.get("input_hash") != in_hash or meta.get("settings_hash") != settings_hash:
        return False
    return paths["image"].is_file() and (not meta.get("labelled") or paths["label"].is_file())


def _remove_outputs(paths: Mapping[str, Path]) -> None:
    paths["json"].unlink(missing_ok=True)  # first: a case without its json is not complete
    paths["image"].unlink(missing_ok=True)
    paths["label"].unlink(missing_ok=True)


def _orientation(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def _read_case(case: CaseSpec, settings: PreprocessSettings) -> tuple[sitk.Image, sitk.Image | None, dict]:
    """Image (float32) and label (int8, on the image grid, or None), and ``{"original", "warnings", ...}``."""
    warnings: list[str] = []
    image = read_image(case.image, frame=case.frame)
    original = {**_geometry(image), "orientation": _orientation(image),
                "pixel_type": image.GetPixelIDTypeAsString()}
    image = sitk.Cast(image, sitk.sitkFloat32)
    minmax = sitk.MinimumMaximumImageFilter()
    minmax.Execute(image)
    if not (np.isfinite(minmax.GetMinimum()) and np.isfinite(minmax.GetMaximum())):
        raise CaseError(f"{case.image.name!r}: image contains NaN or infinite values")
    if settings.modality == "CT" and minmax.GetMinimum() >= 0:
        warnings.append("CT intensities are all >= 0: are they Hounsfield units (rescale slope/intercept)?")
    label, label_resampled = None, False
    if case.label is not None:
        label = map_label_values(read_label(case, image), settings.classes, settings.ignore_values)
        label, label_resampled = align_label(label, image, settings.resample_label)
        if label_resampled:
            warnings.append("label geometry differs from the image: label resampled onto the image grid")
    info = {"original": original, "label_resampled_onto_image": label_resampled, "warnings": warnings,
            "minimum": minmax.GetMinimum()}
    return image, label, info


def _reorient_and_resample(
    image: sitk.Image, label: sitk.Image | None, settings: PreprocessSettings, background: float
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Arrays (Z, Y, X) on the LPS grid at the target spacing, and that grid's geometry."""
    image = sitk.DICOMOrient(image, ORIENTATION)
    size, origin = target_grid(image, settings.target_spacing)
    interp = sitk.sitkBSpline if settings.interpolation == "bspline" else sitk.sitkLinear
    image_zyx = sitk.GetArrayFromImage(
        _resample(image, size, origin, settings.target_spacing, interp, background)
    ).astype(np.float32)
    label_zyx = None
    if label is not None:
        label = sitk.DICOMOrient(label, ORIENTATION)
        label_zyx = sitk.GetArrayFromImage(
            _resample(label, size, origin, settings.target_spacing, sitk.sitkNearestNeighbor, 0)
        ).astype(np.int8)
    grid = {"size_xyz": size, "spacing_xyz": list(settings.target_spacing), "origin_xyz": origin,
            "direction": list(_IDENTITY)}
    return image_zyx, label_zyx, grid


def _crop_box(image_zyx: np.ndarray, label_zyx: np.ndarray | None, settings: PreprocessSettings,
              warnings: list[str]) -> list[list[int]]:
    """The crop of ``settings.crop``: the labelled box + margin (training; an unlabelled or empty label
    falls back to the image rule), or the box of voxels above the image's minimum."""
    if settings.crop == TRAIN_CROP and label_zyx is not None:
        box = foreground_box(label_zyx, settings.margin)
        if box is not None:
            return box
        warnings.append("label is all background")
    return above_minimum_box(image_zyx)


def _normalise_crop_pad(
    image_zyx: np.ndarray, label_zyx: np.ndarray | None, settings: PreprocessSettings, warnings: list[str]
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Normalise the whole image, crop (``settings.crop``), pad to ``min_size``; returns the parameters."""
    box = _crop_box(image_zyx, label_zyx, settings, warnings)
    foreground = _foreground_stats(image_zyx, label_zyx)
    image_zyx, intensity = normalise_intensity(image_zyx, settings.intensity)
    pad_value = float(image_zyx.min())
    crop = tuple(slice(a, b) for a, b in box)
    image_zyx = image_zyx[crop]
    label_zyx = label_zyx[crop] if label_zyx is not None else None
    min_zyx = tuple(reversed(settings.min_size))
    image_zyx, pad = pad_to_min_size(image_zyx, min_zyx, pad_value)
    if label_zyx is not None:
        label_zyx, _ = pad_to_min_size(label_zyx, min_zyx, 0)
    params = {
        "crop_rule": settings.crop,
        "crop_zyx": box,
        "pad_zyx": pad,
        "shape_zyx": list(image_zyx.shape),
        "intensity": {**intensity, "pad_value": pad_value},
        "foreground": foreground,
        "label_values": sorted(int(v) for v in np.unique(label_zyx) if v) if label_zyx is not None else [],
    }
    return image_zyx, label_zyx, params


def _run_pipeline(case: CaseSpec, settings: PreprocessSettings) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The preprocessing of one case: ``(image (Z,Y,X) float32, label (Z,Y,X) int8 or None, metadata)``."""
    image, label, info = _read_case(case, settings)
    image_zyx, label_zyx, grid = _reorient_and_resample(image, label, settings, info["minimum"])
    image_zyx, label_zyx, params = _normalise_crop_pad(image_zyx, label_zyx, settings, info["warnings"])
    meta = {
        "original": info["original"],
        "label_resampled_onto_image": info["label_resampled_onto_image"],
        "orientation_applied": {"from": info["original"]["orientation"], "to": ORIENTATION},
        "resampled": grid,
        "target_spacing_xyz": list(settings.target_spacing),
        **params,
        "warnings": info["warnings"],
    }
    return image_zyx, label_zyx, meta


def preprocess_image(image: str | Path, settings: PreprocessSettings) -> tuple[np.ndarray, dict[str, Any]]:
    """Preprocess one unlabelled image for inference, with the very code of evaluation (no label).

    Steps 1 and 4-8 of the module docstring: read, re-orient to LPS, resample to
    ``settings.target_spacing``, normalise by ``settings.intensity``, crop to the voxels above the image's
    minimum, pad to ``settings.min_size``.

    Args:
        image: an image file or a DICOM-series folder.
        settings: the preprocessing settings (``classes``, ``ignore_values`` and ``margin`` are unused;
            ``crop`` is taken as ``"above-minimum"``).

    Returns:
        ``(image_zyx, meta)``: the float32 array (Z, Y, X) and the metadata that
        :func:`restore_to_original` takes as ``case_json`` to put a prediction back on the input's grid.

    Raises:
        CaseError: the image cannot be read or holds non-finite values.
    """
    path = Path(image)
    settings = dataclasses.replace(settings, crop=EVAL_CROP)
    image_zyx, _, meta = _run_pipeline(CaseSpec(path.name, path, None), settings)
    return image_zyx, meta


def preprocess_case(
    case: CaseSpec, settings: PreprocessSettings, out_dir: str | Path, dataset: str = ""
) -> CaseOutcome:
    """Preprocess one case into ``out_dir`` unless it is up to date; never raises for a bad case.

    Returns:
        The outcome: ``done``, ``skipped`` (same input hash and settings hash as stored), or ``failed``
        with the reason (the case's previous outputs are then removed).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    paths = _case_paths(out_dir, case.case_id)
    outcome = CaseOutcome(dataset, case.case_id, "failed")
    try:
        in_hash, settings_hash = input_hash(case), settings.digest()
        if _is_up_to_date(paths, in_hash, settings_hash):
            outcome.status = "skipped"
            return outcome
        _remove_outputs(paths)
        image_zyx, label_zyx, meta = _run_pipeline(case, settings)
        atomic_save_npy(paths["image"], image_zyx)
        if label_zyx is not None:
            atomic_save_npy(paths["label"], label_zyx)
        meta = {
            "case_id": case.case_id, "dataset": dataset, "version": PREPROCESS_VERSION,
            "image_file": str(case.image), "label_file": str(case.label) if case.label else None,
            "labelled": label_zyx is not None, "input_hash": in_hash, "settings_hash": settings_hash,
            "settings": settings.to_dict(), **meta,
        }
        atomic_write_json(paths["json"], meta)
        outcome.status, outcome.warnings = "done", list(meta["warnings"])
    except CaseError as exc:
        outcome.reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad case must never stop the others
        logger.debug("unexpected failure of case %s", case.case_id, exc_info=True)
        outcome.reason = f"unexpected error: {type(exc).__name__}: {exc}"
    finally:
        outcome.seconds = round(time.perf_counter() - start, 3)
    if outcome.status == "failed":
        _remove_outputs(paths)
    return outcome


# ------------------------------------------------------------------------------------------------ restore
def restore_to_original(array_zyx: np.ndarray, case_json: Mapping[str, Any] | str | Path,
                        is_label: bool = True) -> sitk.Image:
    """Put a preprocessed-space array back on the original image grid (the inverse of the preprocessing).

    Args:
        array_zyx: array of the preprocessed shape ``case_json["shape_zyx"]`` (Z, Y, X), e.g. a predicted
            label map (int) or a probability map (float).
        case_json: the case's ``<case>.json`` (a mapping or its path).
        is_label: nearest-neighbour resampling (labels) instead of linear (images, probabilities).

    Returns:
        A SimpleITK image with the original size, spacing, origin and direction (write it with
        ``sitk.WriteImage``); voxels outside the cropped region are 0.
    """
    meta = json.loads(Path(case_json).read_text()) if isinstance(case_json, str | Path) else case_json
    array = np.asarray(array_zyx)
    if list(array.shape) != list(meta["shape_zyx"]):
        raise ValueError(f"array_zyx shape {list(array.shape)} does not match the case's shape_zyx "
                         f"{meta['shape_zyx']}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    unpad = tuple(slice(b, n - a) for (b, a), n in zip(meta["pad_zyx"], array.shape, strict=True))
    grid = meta["resampled"]
    full = np.zeros(tuple(reversed(grid["size_xyz"])), dtype=array.dtype)
    full[tuple(slice(a, b) for a, b in meta["crop_zyx"])] = array[unpad]
    resampled = sitk.GetImageFromArray(full)
    resampled.SetSpacing(grid["spacing_xyz"])
    resampled.SetOrigin(grid["origin_xyz"])
    resampled.SetDirection(grid["direction"])
    orig = meta["original"]
    reference = sitk.Image([int(s) for s in orig["size_xyz"]], resampled.GetPixelID())
    reference.SetSpacing(orig["spacing_xyz"])
    reference.SetOrigin(orig["origin_xyz"])
    reference.SetDirection(orig["direction"])
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(resampled, reference, sitk.Transform(), interp, 0, resampled.GetPixelID())


# ------------------------------------------------------------------------------------------------ splits
def compute_splits(cases: Sequence[CaseSpec], split: SplitSpec,
                   catalog_split: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """Train/val/test case ids of a dataset (deterministic; unlabelled cases always train).

    Fractions are applied to the sorted labelled case ids shuffled with ``split.seed`` (at least one case is
    left to train); explicit lists are taken as they are; ``split.catalog`` uses ``catalog_split``.
    """
    ids = sorted(c.case_id for c in cases)
    labelled = sorted(c.case_id for c in cases if c.label is not None)
    if split.catalog:
        listed = expand_split_lists(cases, catalog_split or {})
        val = [i for i in labelled if i in set(listed.get("val", ()))]
        test = [i for i in labelled if i in set(listed.get("test", ())) and i not in val]
    elif isinstance(split.val, list):
        val, test = sorted(set(split.val) & set(labelled)), sorted(set(split.test) & set(labelled))
    else:
        order = list(labelled)
        random.Random(split.seed).shuffle(order)
        n_test = round(split.test * len(order))
        n_val = round(split.val * len(order))
        while order and n_test + n_val > len(order) - 1:
            n_val, n_test = (n_val - 1, n_test) if n_val >= n_test else (n_val, n_test - 1)
        test, val = sorted(order[:n_test]), sorted(order[n_test : n_test + n_val])
    held = set(val) | set(test)
    return {"train": [i for i in ids if i not in held], "val": val, "test": test}


# ------------------------------------------------------------------------------------------------ runner
@dataclass
class Report:
    """Outcome of a preprocessing run: one :class:`CaseOutcome` per case."""

    outcomes: list[CaseOutcome] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def _with(self, status: str) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def done(self) -> list[CaseOutcome]:
        return self._with("done")

    @property
    def skipped(self) -> list[CaseOutcome]:
        return self._with("skipped")

    @property
    def failed(self) -> list[CaseOutcome]:
        return self._with("failed")

    @property
    def ok(self) -> bool:
        """True when no case failed."""
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "counts": {"done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed)},
            "seconds": round(self.seconds, 3),
            "failed": [{"dataset": o.dataset, "case": o.case_id, "reason": o.reason} for o in self.failed],
            "warnings": list(self.warnings),
            "cases": [asdict(o) for o in self.outcomes],
        }

    def summary(self) -> str:
        """Human-readable summary: counts, then every failure with its reason, then warnings."""
        lines = [
            f"preprocessing: {len(self.done)} done, {len(self.skipped)} skipped (up to date), "
            f"{len(self.failed)} failed, in {self.seconds:.1f} s"
        ]
        lines += [f"  FAILED {o.dataset}/{o.case_id}: {o.reason}" for o in self.failed]
        lines += [f"  warning {o.dataset}/{o.case_id}: {w}" for o in self.outcomes for w in o.warnings]
        lines += [f"  warning {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Job:
    dataset: str
    case: CaseSpec
    settings: PreprocessSettings
    out_dir: Path


def _run_job(job: _Job) -> CaseOutcome:
    return preprocess_case(job.case, job.settings, job.out_dir, dataset=job.dataset)


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _new_pool(workers: int) -> ProcessPoolExecutor:
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,))


def _crashed(job: _Job, exc: BaseException) -> CaseOutcome:
    reason = f"worker process crashed while processing this case (out of memory?): {type(exc).__name__}"
    return CaseOutcome(job.dataset, job.case.case_id, "failed", reason=reason)


def _run_pool(jobs: list[_Job], workers: int, bar: Any, run: Callable[[_Job], CaseOutcome],
              outcomes: dict[int, CaseOutcome]) -> list[int]:
    """Run every job in one pool; returns the jobs left unfinished when a worker process died."""
    with _new_pool(workers) as pool:
        futures = {pool.submit(run, job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                outcomes[i] = future.result()
            except BrokenProcessPool:
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. an outcome that cannot be sent back
                outcomes[i] = _crashed(jobs[i], exc)
            bar.update(1)
    return [i for i in range(len(jobs)) if i not in outcomes]


def _run_one_by_one(jobs: list[_Job], indices: list[int], bar: Any, run: Callable[[_Job], CaseOutcome],
                    outcomes: dict[int, CaseOutcome]) -> None:
    """Run jobs one at a time in a single worker, so that a crash names its case; the pool is renewed."""
    pool = None
    try:
        for i in indices:
            pool = pool or _new_pool(1)
            try:
                outcomes[i] = pool.submit(run, jobs[i]).result()
            except Exception as exc:  # noqa: BLE001 - BrokenProcessPool and anything unexpected
                outcomes[i] = _crashed(jobs[i], exc)
                pool.shutdown(wait=True)
                pool = None
            bar.update(1)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def _run_parallel(jobs: list[_Job], workers: int, bar: Any,
                  run: Callable[[_Job], CaseOutcome] = _run_job) -> list[CaseOutcome]:
    """Run ``jobs`` in ``workers`` processes; a worker that dies (e.g. killed for memory) fails only its case.

    When a worker dies the pool breaks: the cases it left unfinished are then run one at a time in a
    single worker, so that the case that kills a worker is the one reported as failed.
    """
    outcomes: dict[int, CaseOutcome] = {}
    unfinished = _run_pool(jobs, workers, bar, run, outcomes)
    if unfinished:
        logger.warning("a worker process died; running the %d unfinished cases one by one", len(unfinished))
        _run_one_by_one(jobs, unfinished, bar, run, outcomes)
    return [outcomes[i] for i in range(len(jobs))]


def _aggregate_fingerprint(metas: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Pooled foreground intensity statistics (before normalisation) and spacing/size statistics."""
    fg = [m["foreground"] for m in metas if m.get("foreground")]
    out: dict[str, Any] = {"foreground_intensity": None}
    if fg:
        n = np.array([f["n"] for f in fg], dtype=float)
        mean = np.array([f["mean"] for f in fg])
        std = np.array([f["std"] for f in fg])
        pooled_mean = float((n * mean).sum() / n.sum())
        pooled_var = float((n * (std**2 + mean**2)).sum() / n.sum() - pooled_mean**2)
        out["foreground_intensity"] = {
            "n_voxels": int(n.sum()),
            "mean": pooled_mean,
            "std": float(np.sqrt(max(pooled_var, 0.0))),
            "percentiles_median_over_cases": {
                k: float(np.median([f["percentiles"][k] for f in fg])) for k in fg[0]["percentiles"]
            },
        }
    spacing = np.array([m["original"]["spacing_xyz"] for m in metas]) if metas else np.zeros((0, 3))
    size = np.array([m["original"]["size_xyz"] for m in metas]) if metas else np.zeros((0, 3))
    if metas:
        out["spacing_xyz"] = {"median": np.median(spacing, 0).tolist(), "min": spacing.min(0).tolist(),
                              "max": spacing.max(0).tolist()}
        out["size_xyz"] = {"median": np.median(size, 0).tolist(), "min": size.min(0).tolist(),
                           "max": size.max(0).tolist()}
    return out


def write_dataset_json(site: SiteConfig, dataset: DatasetConfig, catalog: Catalog,
                       outcomes: Sequence[CaseOutcome], plans: Plans) -> tuple[Path, list[str]]:
    """Write ``<work_dir>/preprocessed/<dataset>/dataset.json`` for the cases done or up to date.

    Returns:
        The path and the dataset-level warnings (a declared class that occurs in no case).
    """
    out_dir = site.preprocessed_dir / dataset.name
    present = {o.case_id for o in outcomes if o.status in ("done", "skipped")}
    cases = [c for c in dataset.cases() if c.case_id in present]
    metas = [json.loads((out_dir / f"{c.case_id}.json").read_text()) for c in cases]
    splits = dataset_splits(dataset, catalog)
    splits = {k: [i for i in v if i in present] for k, v in splits.items()}
    weight, aug = dataset.resolved_weights(catalog)
    classes = dataset.resolved_classes(catalog)
    body = {
        "dataset": dataset.name,
        "site": site.site,
        "modality": dataset.modality,
        "modality_id": modality_id(dataset.modality),
        "classes": {str(k): v for k, v in sorted(classes.items())},
        "cases": [c.case_id for c in cases],
        "labelled": {c.case_id: bool(m["labelled"]) for c, m in zip(cases, metas, strict=True)},
        "splits": splits,
        "fingerprint": _aggregate_fingerprint(metas),
        "target_spacing": list(plans.target_spacing),
        "plans": plans.preprocessing(dataset.modality),
        "sample_weight": weight,
        "intensity_aug_prob": aug,
        "version": PREPROCESS_VERSION,
    }
    seen = {int(v) for m in metas for v in m.get("label_values", [])}
    labelled = sum(1 for m in metas if m["labelled"])
    warnings = [
        f"{dataset.name}: class {value} ({name!r}) occurs in none of its {labelled} labelled case(s): are the "
        "declared classes those of this dataset's labels?"
        for value, name in sorted(classes.items()) if labelled and value not in seen
    ]
    return atomic_write_json(out_dir / "dataset.json", body), warnings


def dataset_splits(dataset: DatasetConfig, catalog: Catalog) -> dict[str, list[str]]:
    """The train/val/test case ids of ``dataset`` (:func:`compute_splits` with the catalog's lists)."""
    entry = catalog.dataset(dataset.name) if dataset.name in catalog else None
    catalog_split = {k: entry.cases(k) for k in entry.split} if entry is not None and dataset.split.catalog else None
    return compute_splits(dataset.cases(), dataset.split, catalog_split)


def _jobs(config: SiteConfig, plans: Plans, catalog: Catalog) -> list[_Job]:
    """One job per case: training cases cropped around their label, the others by the image alone."""
    jobs = []
    for ds in config.datasets:
        train = set(dataset_splits(ds, catalog)["train"])
        settings = {crop: PreprocessSettings.from_plans(plans, ds, catalog, crop) for crop in CROPS}
        out_dir = config.preprocessed_dir / ds.name
        for case in ds.cases():
            crop = TRAIN_CROP if case.case_id in train and case.label is not None else EVAL_CROP
            jobs.append(_Job(ds.name, case, settings[crop], out_dir))
    return jobs


def preprocess_site(config: SiteConfig, plans: Plans | None = None, workers: int = 1, progress: bool = True,
                    catalog: Catalog | None = None) -> Report:
    """Preprocess every case of every dataset of a site; resumable, one bad case never stops the others.

    Args:
        config: the validated site config.
        plans: the federation's plan (None: the recipe's, :class:`~hermes_model.plans.Plans`).
        workers: worker processes (1 runs in this process).
        progress: show a progress bar (tqdm, on stderr); without it, one log line per tenth of the cases.
        catalog: task catalog (default: the bundled one).

    Returns:
        The :class:`Report`, also written to ``<work_dir>/preprocessed/report.json``.

    Raises:
        ValueError: bad ``workers``, or a modality the plan has no intensity scheme for.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    catalog = catalog if catalog is not None else Catalog.load()
    plans = plans if plans is not None else Plans()
    start = time.perf_counter()
    jobs = _jobs(config, plans, catalog)
    with tqdm(total=len(jobs), desc=f"preprocess {config.site}", unit="case", disable=not progress) as bar:
        bar = bar if progress else _LogProgress(config.site, len(jobs))
        if workers == 1:
            outcomes = []
            for job in jobs:
                outcomes.append(_run_job(job))
                bar.update(1)
        else:
            outcomes = _run_parallel(jobs, min(workers, max(1, len(jobs))), bar)
    report = Report(outcomes, seconds=time.perf_counter() - start)
    for ds in config.datasets:
        _, warnings = write_dataset_json(config, ds, catalog, [o for o in outcomes if o.dataset == ds.name], plans)
        report.warnings += warnings
    atomic_write_json(config.preprocessed_dir / "report.json", report.to_dict())
    for o in report.outcomes:
        for w in o.warnings:
            logger.warning("%s/%s: %s", o.dataset, o.case_id, w)
        if o.status == "failed":
            logger.error("%s/%s failed: %s", o.dataset, o.case_id, o.reason)
    for w in report.warnings:
        logger.warning("%s", w)
    return report


class _LogProgress:
    """Progress as log lines (every tenth of the cases), where no progress bar is shown."""

    def __init__(self, site: str, total: int) -> None:
        self.site, self.total, self.done = site, total, 0
        self.every = max(1, total // 10)

    def update(self, n: int) -> None:
        self.done += n
        if self.done % self.every == 0 or self.done == self.total:
            logger.info("site %s: preprocessed %d/%d case(s)", self.site, self.done, self.total)
