"""Data fingerprints: what a site tells the server about its training data before round 1 (Flower-free).

A :class:`DatasetFingerprint` holds aggregate statistics of one dataset's training cases, never a case
id, a path or a value of a single case: the number of cases, the geometric mean and spread of their
spacings, the mean and spread of their sizes, and intensity percentiles of voxels pooled over all
cases (of the whole images and inside the labelled foreground). Sites compute them
(``client.fingerprint``); the server merges them per modality (:func:`merge_fingerprints`) and refuses a
site whose data contradicts the plan (:func:`plan_problems`): CT not in Hounsfield units, PET not in
SUV, a spacing more than :data:`MAX_SPACING_RATIO` times away from the plan's, a modality the plan has no
intensity scheme for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hermes_model.catalog import canonical_modality
from hermes_model.plans import Plans

PERCENTILES = (0.5, 2.0, 50.0, 98.0, 99.5)
MAX_SPACING_RATIO = 3.0
# CT in HU: air (-1000) and fat (about -100) put the lowest half percent of a scan's voxels below 0 HU;
# a CT whose 0.5th percentile is >= 0 is almost surely stored with an unapplied rescale intercept.
CT_LOW_PERCENTILE, CT_LOW_MAX = "0.5", 0.0
# PET in SUV: tumour uptake rarely exceeds 50 SUV; activity concentrations (Bq/ml) are thousands.
PET_HIGH_PERCENTILE, PET_HIGH_MAX = "99.5", 100.0


@dataclass(frozen=True)
class DatasetFingerprint:
    """Aggregate statistics of one dataset's training cases at a site.

    Attributes:
        dataset: dataset name; modality: canonical modality name.
        cases: training cases that were read.
        spacing_xyz: geometric mean spacing (mm) over the cases; spacing_spread_xyz: geometric standard
            deviation factor (1 = all equal).
        size_xyz / size_std_xyz: mean and standard deviation of the image sizes (voxels).
        intensity: percentile (``"0.5"``, ``"2"``, ``"50"``, ``"98"``, ``"99.5"``) -> value, of voxels pooled
            over every case; foreground: the same inside the labelled foreground (empty when none).
        foreground_mean / foreground_std: of the pooled foreground voxels (NaN when none).
    """

    dataset: str
    modality: str
    cases: int
    spacing_xyz: tuple[float, float, float]
    spacing_spread_xyz: tuple[float, float, float]
    size_xyz: tuple[float, float, float]
    size_std_xyz: tuple[float, float, float]
    intensity: Mapping[str, float] = field(default_factory=dict)
    foreground: Mapping[str, float] = field(default_factory=dict)
    foreground_mean: float = math.nan
    foreground_std: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("spacing_xyz", "spacing_spread_xyz", "size_xyz", "size_std_xyz"):
            out[key] = list(out[key])
        out["intensity"], out["foreground"] = dict(self.intensity), dict(self.foreground)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DatasetFingerprint:
        """Parse one entry of a site's fingerprint; ValueError names the bad field."""
        try:
            fp = cls(
                dataset=str(raw["dataset"]),
                modality=canonical_modality(raw["modality"]),
                cases=int(raw["cases"]),
                spacing_xyz=_three(raw["spacing_xyz"]),
                spacing_spread_xyz=_three(raw["spacing_spread_xyz"]),
                size_xyz=_three(raw["size_xyz"]),
                size_std_xyz=_three(raw["size_std_xyz"]),
                intensity={str(k): float(v) for k, v in dict(raw.get("intensity", {})).items()},
                foreground={str(k): float(v) for k, v in dict(raw.get("foreground", {})).items()},
                foreground_mean=float(raw.get("foreground_mean", math.nan)),
                foreground_std=float(raw.get("foreground_std", math.nan)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed dataset fingerprint: {exc!r}") from None
        if fp.cases < 0:
            raise ValueError(f"malformed dataset fingerprint: cases must be >= 0, got {fp.cases}")
        return fp


def _three(value: Any) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"three values (x, y, z) expected, got {value!r}")
    return values  # type: ignore[return-value]


def fingerprints_to_json(fingerprints: Sequence[DatasetFingerprint]) -> str:
    return json.dumps([f.to_dict() for f in fingerprints], sort_keys=True, allow_nan=True)


def fingerprints_from_json(text: str) -> list[DatasetFingerprint]:
    try:
        raw = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"fingerprint must be a JSON list: {exc}") from None
    if not isinstance(raw, list):
        raise ValueError(f"fingerprint must be a JSON list, got {type(raw).__name__}")
    return [DatasetFingerprint.from_dict(item) for item in raw]


# ----------------------------------------------------------------------------------------------- checks
def plan_problems(site: str, fingerprint: DatasetFingerprint, plans: Plans) -> list[str]:
    """Why ``site``'s dataset contradicts ``plans`` (one sentence each, naming the site and the statistic);
    empty when it fits."""
    where = f"site {site!r}, dataset {fingerprint.dataset!r} ({fingerprint.modality})"
    try:
        plans.scheme(fingerprint.modality)
    except ValueError as exc:
        return [f"{where}: {exc}"]
    if fingerprint.cases == 0:
        return []
    problems = []
    low = fingerprint.intensity.get(CT_LOW_PERCENTILE)
    if fingerprint.modality == "CT" and low is not None and low >= CT_LOW_MAX:
        problems.append(
            f"{where}: CT is not in Hounsfield units: the {CT_LOW_PERCENTILE}th percentile of its voxels is "
            f"{low:g}, but air and fat are negative in HU; is a rescale intercept (e.g. -1024) unapplied?"
        )
    high = fingerprint.foreground.get(PET_HIGH_PERCENTILE)
    if fingerprint.modality == "PET" and high is not None and high > PET_HIGH_MAX:
        problems.append(
            f"{where}: PET is not in SUV: the {PET_HIGH_PERCENTILE}th percentile inside the labelled "
            f"foreground is {high:g} (SUV rarely exceeds 50; activity concentrations in Bq/ml are thousands)"
        )
    for axis, have, want in zip("xyz", fingerprint.spacing_xyz, plans.target_spacing, strict=True):
        ratio = max(have / want, want / have) if have > 0 else math.inf
        if ratio > MAX_SPACING_RATIO:
            problems.append(
                f"{where}: its typical spacing along {axis} is {have:.3g} mm, {ratio:.1f}x the plan's "
                f"{want:g} mm (at most {MAX_SPACING_RATIO:g}x)"
            )
    return problems


# ----------------------------------------------------------------------------------------------- merging
def merge_fingerprints(per_site: Mapping[str, Sequence[DatasetFingerprint]]) -> dict[str, Any]:
    """The federation's fingerprint: per modality, the case-weighted combination of every site's datasets
    (geometric mean spacing, mean size, case-weighted mean of the percentiles, which approximates the
    pooled percentiles), the number of cases and of sites; plus every site's own aggregates."""
    by_modality: dict[str, list[DatasetFingerprint]] = {}
    for fps in per_site.values():
        for fp in fps:
            by_modality.setdefault(fp.modality, []).append(fp)
    merged = {}
    for modality, fps in sorted(by_modality.items()):
        weights = [max(fp.cases, 0) for fp in fps]
        total = sum(weights)
        merged[modality] = {
            "cases": total,
            "datasets": len(fps),
            "spacing_xyz": _weighted_geomean([fp.spacing_xyz for fp in fps], weights),
            "size_xyz": _weighted_mean([fp.size_xyz for fp in fps], weights),
            "intensity": _weighted_percentiles([fp.intensity for fp in fps], weights),
            "foreground": _weighted_percentiles([fp.foreground for fp in fps], weights),
        }
    sites = {site: [fp.to_dict() for fp in fps] for site, fps in sorted(per_site.items())}
    return {"modalities": merged, "sites": sites}


def _weighted_mean(vectors: Sequence[Sequence[float]], weights: Sequence[float]) -> list[float]:
    total = sum(weights)
    if not total:
        return [math.nan] * 3
    return [sum(w * v[i] for v, w in zip(vectors, weights, strict=True)) / total for i in range(3)]


def _weighted_geomean(vectors: Sequence[Sequence[float]], weights: Sequence[float]) -> list[float]:
    logs = [[math.log(x) for x in v] for v in vectors]
    return [math.exp(x) for x in _weighted_mean(logs, weights)]


def _weighted_percentiles(tables: Sequence[Mapping[str, float]], weights: Sequence[float]) -> dict[str, float]:
    keys = sorted({k for t in tables for k in t}, key=float)
    out = {}
    for key in keys:
        held = [(t[key], w) for t, w in zip(tables, weights, strict=True) if key in t and w > 0]
        if held:
            out[key] = sum(v * w for v, w in held) / sum(w for _, w in held)
    return out


__all__ = [
    "MAX_SPACING_RATIO",
    "PERCENTILES",
    "DatasetFingerprint",
    "fingerprints_from_json",
    "fingerprints_to_json",
    "merge_fingerprints",
    "plan_problems",
]
