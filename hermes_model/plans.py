"""The plans record: every preprocessing setting a model was trained with, in one place (Flower-free).

A federation agrees on one :class:`Plans` before round 1 (the server decides it from the recipe and its
own config, after checking the sites' data fingerprints, :mod:`hermes_model.fingerprint`), every site
preprocesses with it, and every checkpoint and ``final_model.pt`` carries it, so ``hermes-predict`` and
``hermes-evaluate`` reproduce training without a flag.

Preprocessing with a plan (``client.preprocess``): re-orient to LPS, resample to ``target_spacing``
(``interpolation`` for the image, nearest neighbour for the label), normalise the intensities of the
WHOLE resampled image with the modality's :class:`IntensityScheme`, then crop:

- training cases: to the labelled foreground box plus ``train_margin`` voxels (patches come from there);
- validation and test cases, and every scan ``hermes-predict`` segments: to the box of voxels above the
  image's minimum (the rule "above-minimum": it drops a constant background such as the zero outside a
  skull-stripped brain, and needs nothing but the image), so no label information reaches evaluation;

and pad every axis to at least ``patch_size``. Normalising before cropping makes a training crop a
sub-array of what inference sees, voxel for voxel.

Spatial quantities are (x, y, z), as SimpleITK orders them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hermes_model.catalog import MODALITY_NAMES, canonical_modality

PLANS_FORMAT = "hermes-fl/plans-v1"
ORIENTATION = "LPS"
TRAIN_CROP = "label-box"
EVAL_CROP = "above-minimum"
INTERPOLATIONS = ("bspline", "linear")
PATCH_DIVISOR = 16  # four poolings

# The published recipe (spec sections 4 and 5)
RECIPE_SPACING = (1.5, 1.5, 1.5)
RECIPE_PATCH = (128, 128, 128)
RECIPE_MARGIN = 20
RECIPE_INTERPOLATION = "bspline"
CT_WINDOW = (-991.0, 500.0)
PERCENTILE_WINDOW = (2.0, 98.0)

WINDOW, PERCENTILE = "window", "percentile"


@dataclass(frozen=True)
class IntensityScheme:
    """How one modality is normalised: clip, then z-score with the clipped image's mean and std.

    Attributes:
        kind: ``"window"`` (clip to the fixed values ``low``..``high``, e.g. CT in HU) or ``"percentile"``
            (clip to the image's ``low``-th..``high``-th percentiles).
        low, high: the window or the percentiles.
        unit: the physical unit the window assumes (``"HU"``; ``"SUV"`` for PET), None for MR.
    """

    kind: str
    low: float
    high: float
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in (WINDOW, PERCENTILE):
            raise ValueError(f"intensity scheme kind must be {WINDOW!r} or {PERCENTILE!r}, got {self.kind!r}")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"intensity scheme needs finite low < high, got {self.low!r}, {self.high!r}")
        if self.kind == PERCENTILE and not 0 <= self.low < self.high <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.low}, {self.high}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "low": self.low, "high": self.high, "unit": self.unit}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> IntensityScheme:
        return cls(str(raw["kind"]), float(raw["low"]), float(raw["high"]), raw.get("unit"))

    def describe(self) -> str:
        if self.kind == WINDOW:
            return f"clip to [{self.low:g}, {self.high:g}] {self.unit or ''}".rstrip() + ", z-score"
        return f"clip to percentiles {self.low:g}..{self.high:g}, z-score"


def recipe_intensity() -> dict[str, IntensityScheme]:
    """The recipe's scheme for every modality name: CT a fixed HU window, the others percentiles."""
    schemes = {}
    for name in MODALITY_NAMES:
        if name == "CT":
            schemes[name] = IntensityScheme(WINDOW, *CT_WINDOW, unit="HU")
        else:
            schemes[name] = IntensityScheme(PERCENTILE, *PERCENTILE_WINDOW, unit="SUV" if name == "PET" else None)
    return schemes


def _xyz(value: Any, name: str, kind: type) -> tuple:
    values = [value] * 3 if isinstance(value, int | float) and not isinstance(value, bool) else list(value)
    if len(values) != 3 or any(isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be one number or three (x, y, z), got {value!r}")
    out = tuple(kind(v) for v in values)
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return out


@dataclass(frozen=True)
class Plans:
    """The preprocessing (and model) plan of a federation; see the module docstring.

    Attributes:
        target_spacing: (x, y, z) mm.
        patch_size: (x, y, z) voxels of a training patch and an inference window (each divisible by 16);
            every preprocessed axis is padded to at least this.
        train_margin: voxels kept around the labelled foreground of a training case.
        interpolation: image interpolator (``bspline`` or ``linear``; labels: nearest neighbour).
        intensity: modality name -> :class:`IntensityScheme`.
        model: the network's build arguments (``{"name": ..., **kwargs}``), once the server built it.
        catalog_digest: SHA-256 of the task catalog the plan was made with (informational).
    """

    target_spacing: tuple[float, float, float] = RECIPE_SPACING
    patch_size: tuple[int, int, int] = RECIPE_PATCH
    train_margin: int = RECIPE_MARGIN
    interpolation: str = RECIPE_INTERPOLATION
    intensity: Mapping[str, IntensityScheme] = field(default_factory=recipe_intensity)
    model: Mapping[str, Any] = field(default_factory=dict)
    catalog_digest: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_spacing", _xyz(self.target_spacing, "target spacing", float))
        patch = _xyz(self.patch_size, "patch size", float)
        if any(p != int(p) or int(p) % PATCH_DIVISOR for p in patch):
            raise ValueError(f"patch size values must be whole multiples of {PATCH_DIVISOR}, got {self.patch_size!r}")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in patch))
        if isinstance(self.train_margin, bool) or not isinstance(self.train_margin, int) or self.train_margin < 0:
            raise ValueError(f"train margin must be an int >= 0, got {self.train_margin!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")
        schemes = {canonical_modality(k): v for k, v in dict(self.intensity).items()}
        object.__setattr__(self, "intensity", dict(sorted(schemes.items())))
        object.__setattr__(self, "model", dict(self.model))

    # -- use -----------------------------------------------------------------------------------------
    def scheme(self, modality: str) -> IntensityScheme:
        """The intensity scheme of ``modality``.

        Raises:
            ValueError: the plan has no scheme for it (the message lists those it has).
        """
        name = canonical_modality(modality)
        if name not in self.intensity:
            raise ValueError(f"the plan has no intensity scheme for modality {name!r}; it has {list(self.intensity)}")
        return self.intensity[name]

    def with_model(self, spec: Mapping[str, Any], catalog_digest: str = "") -> Plans:
        return replace(self, model=dict(spec), catalog_digest=catalog_digest or self.catalog_digest)

    def preprocessing(self, modality: str) -> dict[str, Any]:
        """Everything of the plan that determines the preprocessing of a ``modality`` case."""
        return {
            "target_spacing": list(self.target_spacing),
            "min_size": list(self.patch_size),
            "train_margin": self.train_margin,
            "interpolation": self.interpolation,
            "intensity": self.scheme(modality).to_dict(),
            "orientation": ORIENTATION,
            "crops": {"train": TRAIN_CROP, "eval": EVAL_CROP},
        }

    def describe(self) -> str:
        """One line for logs."""
        s, p = self.target_spacing, self.patch_size
        return (f"{'x'.join(f'{v:g}' for v in s)} mm, {'x'.join(map(str, p))} patches, {self.interpolation} "
                f"resampling, training crop = labelled box + {self.train_margin} voxels, evaluation on whole "
                f"scans ({EVAL_CROP} crop)")

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLANS_FORMAT,
            "target_spacing": list(self.target_spacing),
            "patch_size": list(self.patch_size),
            "train_margin": self.train_margin,
            "interpolation": self.interpolation,
            "orientation": ORIENTATION,
            "crops": {"train": TRAIN_CROP, "eval": EVAL_CROP},
            "intensity": {k: v.to_dict() for k, v in self.intensity.items()},
            "model": dict(self.model),
            "catalog_digest": self.catalog_digest,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Plans:
        """Read :meth:`to_dict` back; a ValueError names what is wrong."""
        if not isinstance(raw, Mapping) or raw.get("format") != PLANS_FORMAT:
            got = raw.get("format") if isinstance(raw, Mapping) else type(raw).__name__
            raise ValueError(f"not a plans record (format {PLANS_FORMAT!r} expected, got {got!r})")
        try:
            return cls(
                target_spacing=tuple(raw["target_spacing"]),
                patch_size=tuple(raw["patch_size"]),
                train_margin=raw["train_margin"],
                interpolation=raw["interpolation"],
                intensity={k: IntensityScheme.from_dict(v) for k, v in raw["intensity"].items()},
                model=raw.get("model", {}),
                catalog_digest=raw.get("catalog_digest", ""),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed plans record: {exc!r}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plans:
        try:
            raw = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"plans must be JSON: {exc}") from None
        return cls.from_dict(raw)

    def digest(self) -> str:
        """SHA-256 of the record (model and catalog included)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def catalog_digest(catalog_dict: Mapping[str, Any]) -> str:
    """SHA-256 of a catalog's :meth:`~hermes_model.catalog.Catalog.to_dict`."""
    return hashlib.sha256(json.dumps(catalog_dict, sort_keys=True).encode()).hexdigest()


def parse_xyz_setting(value: Any, name: str) -> tuple[float, float, float]:
    """A spacing or patch setting of a config: a number, a list of three, or a string ``"x,y,z"``."""
    if isinstance(value, str):
        parts = [p for p in value.replace(",", " ").split() if p]
        try:
            value = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"{name} must be one number or three (x, y, z), got {value!r}") from None
        value = value[0] if len(value) == 1 else value
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = list(value)
    return _xyz(value, name, float)
