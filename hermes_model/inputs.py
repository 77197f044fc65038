"""Input validation shared by the Hermes networks: clear ValueErrors instead of shape errors deep in torch."""

from __future__ import annotations

import torch

SPATIAL_MULTIPLE = 16


def check_inputs(
    x: torch.Tensor, task_ids: torch.Tensor, modality_ids: torch.Tensor, task_slots: int, modality_slots: int
) -> None:
    """Validate ``x`` (B, 1, D, H, W), ``task_ids`` (B, n) and ``modality_ids`` (B, 1)."""
    if torch.compiler.is_compiling():
        return
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"x must be (B, 1, D, H, W); got shape {tuple(x.shape)}")
    bad = [s for s in x.shape[2:] if s % SPATIAL_MULTIPLE]
    if bad:
        raise ValueError(
            f"spatial size {tuple(x.shape[2:])} must be divisible by {SPATIAL_MULTIPLE} on every axis"
        )
    if x.shape[2:].numel() // SPATIAL_MULTIPLE**3 < 2:
        # The deepest stage would hold one voxel, where instance normalisation is undefined.
        raise ValueError(
            f"spatial size {tuple(x.shape[2:])} is too small: at least 32 voxels along one axis are needed"
        )
    b = x.shape[0]
    # task_slots counts the null token (spec: tn = 72 = 71 tasks + null): task ids are 0..task_slots-2,
    # the same capacity rule as Catalog.check_capacity.
    _check_ids("task_ids", task_ids, b, None, -1, task_slots - 2)
    if task_ids.shape[1] == 0:
        raise ValueError("task_ids is empty: give at least one task per sample, shape (B, n) with n >= 1")
    _check_ids("modality_ids", modality_ids, b, 1, -1, modality_slots - 1)


def _check_ids(name: str, ids: torch.Tensor, batch: int, width: int | None, low: int, high: int) -> None:
    expected = f"(B={batch}, {'n' if width is None else width})"
    if ids.ndim != 2 or ids.shape[0] != batch or (width is not None and ids.shape[1] != width):
        raise ValueError(f"{name} must be {expected}; got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor (torch.long); got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < low or int(ids.max()) > high):
        raise ValueError(
            f"{name} out of range: values must lie in [{low}, {high}] (-1 = null/unknown); "
            f"got min {int(ids.min())}, max {int(ids.max())}"
        )
