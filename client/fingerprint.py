"""A site's data fingerprint (``hermes_model.fingerprint``) computed from its raw training scans.

Per dataset, every training case is read as preprocessing reads it (image, and the label on the image's
grid); spacing and size are collected, and up to :data:`SAMPLE_VOXELS` voxels of the image and of its
labelled foreground are drawn with a fixed stride and pooled over the cases. Only the aggregates leave
this module. The result is cached in ``<work_dir>/fingerprint.json``, keyed by the inputs' paths, sizes
and modification times, so a restarted site answers the server's query at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math

import numpy as np
import SimpleITK as sitk

from client.config import DatasetConfig, SiteConfig
from client.formats import CaseSpec
from client.preprocess import CaseError, align_label, dataset_splits, map_label_values, read_image, read_label
from hermes_model.catalog import Catalog
from hermes_model.fileio import atomic_write_json
from hermes_model.fingerprint import PERCENTILES, DatasetFingerprint

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
SAMPLE_VOXELS = 200_000


def _sample(values: np.ndarray) -> np.ndarray:
    """At most :data:`SAMPLE_VOXELS` values, evenly strided (deterministic)."""
    flat = values.reshape(-1)
    step = max(1, math.ceil(flat.size / SAMPLE_VOXELS))
    return flat[::step].astype(np.float64)


def _percentiles(values: list[np.ndarray]) -> dict[str, float]:
    pooled = np.concatenate(values) if values else np.zeros(0)
    if not pooled.size:
        return {}
    return {f"{p:g}": float(v) for p, v in zip(PERCENTILES, np.percentile(pooled, PERCENTILES), strict=True)}


def _train_cases(ds: DatasetConfig, catalog: Catalog) -> list[CaseSpec]:
    train = set(dataset_splits(ds, catalog)["train"])
    return [c for c in ds.cases() if c.case_id in train]


def fingerprint_dataset(ds: DatasetConfig, catalog: Catalog) -> DatasetFingerprint:
    """The fingerprint of ``ds``'s training cases; unreadable cases are left out (and logged)."""
    classes = tuple(sorted(ds.resolved_classes(catalog)))
    spacings, sizes, image_samples, fg_samples = [], [], [], []
    for case in _train_cases(ds, catalog):
        try:
            image = read_image(case.image, frame=case.frame)
            array = sitk.GetArrayViewFromImage(image)
            if case.label is not None:
                label, _ = align_label(map_label_values(read_label(case, image), classes, ds.ignore_values), image,
                                       ds.resample_label)
                foreground = sitk.GetArrayViewFromImage(label) > 0
                fg_samples.append(_sample(np.asarray(array)[foreground]))
        except CaseError as exc:
            logger.warning("fingerprint of %s: case %s left out: %s", ds.name, case.case_id, exc)
            continue
        spacings.append(image.GetSpacing())
        sizes.append(image.GetSize())
        image_samples.append(_sample(np.asarray(array)))
    fg = np.concatenate(fg_samples) if fg_samples else np.zeros(0)
    n = len(spacings)
    log_spacing = np.log(np.array(spacings, dtype=np.float64)) if n else np.zeros((0, 3))
    size = np.array(sizes, dtype=np.float64) if n else np.zeros((0, 3))

    def stat(values: np.ndarray, fn) -> tuple[float, float, float]:
        return tuple(float(v) for v in fn(values)) if n else (math.nan,) * 3  # type: ignore[return-value]

    return DatasetFingerprint(
        dataset=ds.name,
        modality=ds.modality,
        cases=n,
        spacing_xyz=stat(log_spacing, lambda a: np.exp(a.mean(0))),
        spacing_spread_xyz=stat(log_spacing, lambda a: np.exp(a.std(0))),
        size_xyz=stat(size, lambda a: a.mean(0)),
        size_std_xyz=stat(size, lambda a: a.std(0)),
        intensity=_percentiles(image_samples),
        foreground=_percentiles([fg]) if fg.size else {},
        foreground_mean=float(fg.mean()) if fg.size else math.nan,
        foreground_std=float(fg.std()) if fg.size else math.nan,
    )


def _inputs_key(config: SiteConfig, catalog: Catalog) -> str:
    """Digest of every training input's path, size and modification time, and the datasets' settings."""
    h = hashlib.sha256()
    for ds in config.datasets:
        settings = [ds.name, ds.modality, sorted(ds.resolved_classes(catalog)), list(ds.ignore_values)]
        h.update(json.dumps(settings).encode())
        for case in _train_cases(ds, catalog):
            for path in (case.image, case.label):
                if path is None:
                    continue
                files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
                for f in files:
                    stat = f.stat()
                    h.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
    return h.hexdigest()


def site_fingerprint(config: SiteConfig, catalog: Catalog) -> list[DatasetFingerprint]:
    """The fingerprint of every dataset of the site (from the cache when the inputs are unchanged)."""
    cache = config.work_dir / FINGERPRINT_FILE
    key = _inputs_key(config, catalog)
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text(encoding="utf-8"))
            if saved.get("key") == key:
                return [DatasetFingerprint.from_dict(d) for d in saved["datasets"]]
        except (OSError, ValueError, KeyError):
            logger.warning("site %s: unreadable fingerprint cache %s: recomputed", config.site, cache)
    logger.info("site %s: computing the data fingerprint of %d dataset(s)", config.site, len(config.datasets))
    out = [fingerprint_dataset(ds, catalog) for ds in config.datasets]
    atomic_write_json(cache, {"key": key, "datasets": [fp.to_dict() for fp in out]})
    return out


__all__ = ["FINGERPRINT_FILE", "fingerprint_dataset", "site_fingerprint"]

