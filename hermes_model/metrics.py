"""Per-task segmentation metrics for one case, and their summary over cases (spec section 4).

Inputs are binary masks ``pred`` and ``ref`` of shape (n, D, H, W), one channel per task (bool, or
0/1 numbers; tensors or arrays). Each function returns an (n,) float64 array. NaN marks "not defined
for this case" and is left out of :func:`summarise`, which is the reference's convention: Dice per
class averaged over the cases where that class is present in the reference.

Empty masks:

============================  ==========  ==========  =================
ref / pred                    Dice        HD95        surface Dice
============================  ==========  ==========  =================
ref empty (any pred)          NaN         NaN         NaN
ref non-empty, pred empty     0.0         NaN         0.0
both non-empty                value       value (mm)  value
============================  ==========  ==========  =================

So a false positive on a case without the structure is not penalised (as in the reference), a missed
structure scores 0 in Dice and surface Dice, and HD95 is only defined when both surfaces exist (a
distance to nothing has no value; read it together with Dice).

Surface Dice is the area-weighted normalised surface Dice of the literature (Nikolov et al. 2021;
DeepMind's ``surface-distance`` package), through MONAI's ``compute_surface_dice(use_subvoxels=True)``:
each surface is a mesh of surface elements, one per 2x2x2 voxel neighbourhood that the mask crosses, with
the marching-cubes area of that element at the voxel spacing; the score is the area of both surfaces lying
within the tolerance (distance <= tolerance) of the other surface over their total area. It is not
MONAI's default, which counts boundary voxels (every voxel the same weight, whatever the spacing).
Distances are measured between the element positions, which lie on the voxel grid shifted by half a voxel,
so the score only changes with the tolerance where the tolerance passes one of the grid's distances: any
tolerance below the smallest spacing counts only the elements that coincide with an element of the other
surface.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

logger = logging.getLogger(__name__)

HD_PERCENTILE = 95


def _as_masks(pred: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, ...]:
    """Both masks as (1, n, D, H, W) float32 0/1 tensors on the CPU, after shape checks."""
    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).detach().cpu()
    r = torch.as_tensor(np.asarray(ref) if not isinstance(ref, torch.Tensor) else ref).detach().cpu()
    if p.ndim != 4 or r.ndim != 4:
        raise ValueError(
            f"pred and ref must have shape (n, D, H, W), got pred {tuple(p.shape)} and ref {tuple(r.shape)}"
        )
    if p.shape != r.shape:
        raise ValueError(f"pred {tuple(p.shape)} and ref {tuple(r.shape)} must have the same shape")
    return (p != 0).float()[None], (r != 0).float()[None]


def _check_spacing(spacing: float | Sequence[float]) -> list[float]:
    if not isinstance(spacing, Sequence | np.ndarray):
        spacing = [spacing] * 3
    values = [float(s) for s in spacing]
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be 3 positive finite numbers (mm along D, H, W), got {spacing!r}")
    return values


def _present(masks: torch.Tensor) -> np.ndarray:
    """(1, n, ...) -> (n,) bool: which channels have any foreground."""
    return masks[0].flatten(1).any(dim=1).numpy()


def dice_per_task(pred: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> np.ndarray:
    """Dice 2|P & R| / (|P| + |R|) per task: (n, D, H, W) masks -> (n,), NaN where ``ref`` is empty."""
    p, r = _as_masks(pred, ref)
    dice = compute_dice(p, r, include_background=True, ignore_empty=True)[0].double().numpy()
    dice[~_present(r)] = np.nan
    return dice


def _both_present(p: torch.Tensor, r: torch.Tensor) -> np.ndarray:
    return _present(p) & _present(r)


@contextmanager
def _quiet_monai():
    """Hide MONAI 1.6's internal FutureWarning about ``always_return_as_numpy`` (not ours to fix)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        yield


def hd95_per_task(
    pred: torch.Tensor | np.ndarray,
    ref: torch.Tensor | np.ndarray,
    spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Symmetric 95th-percentile Hausdorff distance in mm between mask surfaces, per task.

    ``spacing`` is the voxel size in mm along (D, H, W). Returns (n,), NaN where either mask is empty.
    """
    p, r = _as_masks(pred, ref)
    sp = _check_spacing(spacing)
    out = np.full(p.shape[1], np.nan)
    both = _both_present(p, r)
    if both.any():
        idx = torch.from_numpy(np.flatnonzero(both))
        with _quiet_monai():
            hd = compute_hausdorff_distance(
                p[:, idx], r[:, idx], include_background=True, percentile=HD_PERCENTILE, spacing=sp
            )
        out[both] = hd[0].double().numpy()
    return out


def surface_dice_per_task(
    pred: torch.Tensor | np.ndarray,
    ref: torch.Tensor | np.ndarray,
    tolerance_mm: float = 1.0,
    spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Area-weighted normalised surface Dice per task: the share of both surfaces' AREA within ``tolerance_mm``.

    The convention of Nikolov et al. and DeepMind's ``surface-distance`` (MONAI ``use_subvoxels=True``, see
    the module docstring): surface elements of the 2x2x2-neighbourhood mesh weighted by their area in mm²,
    an element counted when its distance to the other surface is <= ``tolerance_mm``. ``spacing`` is the
    voxel size in mm along (D, H, W); distances, areas and the tolerance are in mm. Returns (n,): NaN where
    ``ref`` is empty, 0 where only ``pred`` is empty.
    """
    p, r = _as_masks(pred, ref)
    sp = _check_spacing(spacing)
    tol = float(tolerance_mm)
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    out = np.where(_present(r), 0.0, np.nan)
    both = _both_present(p, r)
    if both.any():
        idx = torch.from_numpy(np.flatnonzero(both))
        with _quiet_monai():
            nsd = compute_surface_dice(
                p[:, idx],
                r[:, idx],
                class_thresholds=[tol] * len(idx),
                include_background=True,
                spacing=sp,
                use_subvoxels=True,
            )
        out[both] = nsd[0].double().numpy()
    return out


def summarise(per_case: list[np.ndarray]) -> np.ndarray:
    """NaN-mean per task over cases: a list of (n,) arrays -> (n,); NaN for a task with no value at all."""
    if len(per_case) == 0:
        raise ValueError("per_case must hold at least one (n,) array, got an empty list")
    rows = [np.asarray(c, dtype=np.float64) for c in per_case]
    shapes = {r.shape for r in rows}
    if len(shapes) != 1 or rows[0].ndim != 1:
        raise ValueError(f"per_case arrays must all have the same shape (n,), got shapes {sorted(shapes)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN column -> NaN, on purpose
        return np.nanmean(np.stack(rows), axis=0)
