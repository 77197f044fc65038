"""Patch augmentations of the Hermes training recipe (spec section 4).

Spatial: random isotropic scale and per-axis rotation of an enlarged region (patch + margin), resampled
with MONAI's :class:`~monai.transforms.Affine` (bilinear for the image, nearest neighbour for the label,
the same matrix for both) straight onto the centred patch grid.  Resampling only the patch grid gives
exactly the centre crop of the transformed region, at a fraction of the cost.

Intensity: brightness, additive offset, gamma, contrast, Gaussian blur and Gaussian noise, each applied
with a per-dataset probability.  All randomness comes from the ``numpy.random.Generator`` passed in, so a
sample is a pure function of its seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

__all__ = ["SpatialParams", "IntensityParams", "random_spatial_params", "apply_affine", "intensity_augment"]


@dataclass(frozen=True)
class SpatialParams:
    """Ranges of the random spatial transform.

    Args:
        scale: relative scale range: the factor is drawn from U(1 - scale, 1 + scale) (isotropic).
        rotation_deg: rotation range per axis in degrees: each angle is drawn from U(-r, r).
    """

    scale: float = 0.3
    rotation_deg: float = 30.0


@dataclass(frozen=True)
class IntensityParams:
    """Ranges of the intensity augmentations (spec section 4)."""

    brightness: tuple[float, float] = (0.7, 1.3)
    offset_std: float = 0.1
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast: tuple[float, float] = (0.7, 1.3)
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    noise_std: tuple[float, float] = (0.0, 0.1)


def random_spatial_params(
    rng: np.random.Generator, params: SpatialParams = SpatialParams()
) -> tuple[tuple[float, float, float], float]:
    """Draw rotation angles (radians, one per axis) and an isotropic scale factor."""
    max_rad = math.radians(params.rotation_deg)
    angles = tuple(float(a) for a in rng.uniform(-max_rad, max_rad, size=3))
    scale = float(rng.uniform(1.0 - params.scale, 1.0 + params.scale))
    return angles, scale  # type: ignore[return-value]


def apply_affine(
    image: np.ndarray,
    label: np.ndarray,
    patch_size: Sequence[int],
    angles: Sequence[float],
    scale: float,
    pad_value: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate and scale a region about its centre and resample it onto the centred patch grid.

    Args:
        image: (Z, Y, X) float32 region, at least as large as the patch on every axis.
        label: (Z, Y, X) integer label of the same region.
        patch_size: output (D, H, W).
        angles: rotation angles in radians about the three axes.
        scale: isotropic scale factor of the sampling grid (> 1 samples a larger field of view).
        pad_value: image value for samples falling outside the region (the label gets 0).

    Returns:
        (D, H, W) float32 image and (D, H, W) label of ``label``'s dtype.
    """
    from monai.transforms import Affine  # heavy import, deferred to first use

    size = tuple(int(s) for s in patch_size)
    common = {"rotate_params": tuple(angles), "scale_params": (scale, scale, scale), "spatial_size": size}
    # zero padding of (image - pad_value) is padding of the image with pad_value
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32) - np.float32(pad_value))[None]
    lab = torch.from_numpy(np.ascontiguousarray(label).astype(np.float32))[None]
    img_out = Affine(**common, mode="bilinear", padding_mode="zeros", image_only=True)(img)
    lab_out = Affine(**common, mode="nearest", padding_mode="zeros", image_only=True)(lab)
    image_np = torch.as_tensor(img_out).numpy()[0] + np.float32(pad_value)
    label_np = np.rint(torch.as_tensor(lab_out).numpy()[0]).astype(label.dtype)
    return image_np.astype(np.float32, copy=False), label_np


def _gamma(x: np.ndarray, gamma: float) -> np.ndarray:
    """Gamma on min-max rescaled intensities, mapped back to the original range."""
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return x
    unit = (x - lo) / (hi - lo)
    return (np.power(unit, gamma) * (hi - lo) + lo).astype(np.float32, copy=False)


def intensity_augment(
    image: np.ndarray, rng: np.random.Generator, prob: float, params: IntensityParams = IntensityParams()
) -> np.ndarray:
    """Apply each intensity augmentation independently with probability ``prob``.

    Order: brightness x U, additive N(0, s) offset, gamma, contrast around the mean, Gaussian blur,
    Gaussian noise.

    Args:
        image: (D, H, W) float32 patch (not modified).
        rng: source of randomness.
        prob: probability of each augmentation, in [0, 1].

    Returns:
        (D, H, W) float32 augmented patch.
    """
    x = np.array(image, dtype=np.float32, copy=True)
    if rng.random() < prob:
        x *= np.float32(rng.uniform(*params.brightness))
    if rng.random() < prob:
        x += np.float32(rng.normal(0.0, params.offset_std))
    if rng.random() < prob:
        x = _gamma(x, float(rng.uniform(*params.gamma)))
    if rng.random() < prob:
        mean = np.float32(x.mean())
        x = (x - mean) * np.float32(rng.uniform(*params.contrast)) + mean
    if rng.random() < prob:
        x = gaussian_filter(x, sigma=float(rng.uniform(*params.blur_sigma)), truncate=3.0)
    if rng.random() < prob:
        std = float(rng.uniform(*params.noise_std))
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(std)
    return x.astype(np.float32, copy=False)
