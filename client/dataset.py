"""Training and validation data over preprocessed site data (spec sections 3-4).

A preprocessed dataset folder ``<root>/<dataset>/`` holds, per case, ``<case>.npy`` (float32 image,
(Z, Y, X)) and ``<case>_gt.npy`` (int8 label with the original label values), plus ``dataset.json``
(classes, splits, modality, sampling weight, intensity augmentation probability).

- :class:`PreprocessedDataset` reads ``dataset.json`` and memory-maps the arrays lazily, per process.
- :class:`TrainPatchDataset` draws patches with binary masks per task token: a dataset with probability
  proportional to its ``sample_weight``, then a case uniformly, then a crop with optional foreground
  oversampling and the augmentations of :mod:`client.augment`. Sample ``i`` is a pure function of
  ``(seed, i)``, so runs are reproducible and DataLoader workers never repeat each other.
- :func:`collate_padded` batches samples with different class counts (task id ``-1``, zero masks).
- :func:`make_loader` builds the DataLoader; each pass over it draws fresh indices (epoch-offset).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from client.augment import (
    IntensityParams,
    SpatialParams,
    apply_affine,
    intensity_augment,
    random_spatial_params,
)

__all__ = [
    "PreprocessedDataset",
    "TrainPatchDataset",
    "EpochSampler",
    "collate_padded",
    "derived_seed",
    "label_to_masks",
    "loader_generator",
    "make_loader",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")
MODALITY_IDS = (-1, 0, 1, 2, 3, 4)
# at most this many foreground voxels per class are kept (evenly strided) for foreground oversampling
FOREGROUND_POINTS_PER_CLASS = 4096


def label_to_masks(label: np.ndarray, class_values: Sequence[int]) -> np.ndarray:
    """Binary masks, one per class: channel k is ``label == class_values[k]``.

    Args:
        label: (Z, Y, X) integer label.
        class_values: the n label values, in task-token order.

    Returns:
        (n, Z, Y, X) uint8.
    """
    masks = np.empty((len(class_values), *label.shape), dtype=np.uint8)
    for k, value in enumerate(class_values):
        np.equal(label, value, out=masks[k], casting="unsafe")
    return masks


# ----------------------------------------------------------------------------------- dataset.json


def _require(meta: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise ValueError(f"{path}: missing key {key!r} (present: {sorted(meta)})")
    return meta[key]


def _parse_classes(meta: Mapping[str, Any], path: Path) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Class label values (ascending) and their names from ``classes``."""
    classes = _require(meta, "classes", path)
    if not isinstance(classes, Mapping) or not classes:
        raise ValueError(
            f"{path}: 'classes' must be a non-empty mapping label value -> name, got {classes!r}"
        )
    parsed: dict[int, str] = {}
    for key, name in classes.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: 'classes' key {key!r} is not an integer label value") from None
        if not 1 <= value <= 127:
            raise ValueError(f"{path}: 'classes' label value {value} outside the int8 label range 1..127")
        parsed[value] = str(name)
    values = tuple(sorted(parsed))
    return values, tuple(parsed[v] for v in values)


def _parse_number(meta: Mapping[str, Any], key: str, path: Path, low: float, high: float) -> float:
    value = _require(meta, key, path)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{path}: {key!r} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{path}: {key!r} = {value} outside the allowed range [{low}, {high}]")
    return float(value)


def _parse_modality_id(meta: Mapping[str, Any], path: Path) -> int:
    value = _require(meta, "modality_id", path)
    if isinstance(value, bool) or value not in MODALITY_IDS:
        raise ValueError(f"{path}: 'modality_id' = {value!r}, allowed: {list(MODALITY_IDS)}")
    return int(value)


def _parse_task_ids(task_ids: Sequence[int], n_classes: int, path: Path) -> tuple[int, ...]:
    ids = list(task_ids)
    if len(ids) != n_classes:
        raise ValueError(
            f"{path}: task_ids has {len(ids)} entries {ids} but the dataset has {n_classes} classes; "
            "pass one task id per class, in ascending label-value order"
        )
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 0]
    if bad:
        raise ValueError(f"{path}: task_ids must be non-negative integers, got {bad}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: task_ids must be distinct, got {ids}")
    return tuple(int(t) for t in ids)


def _split_cases(splits: Mapping[str, Any], cases: Sequence[str], split: str, path: Path) -> list[str]:
    if split == "all":
        return [str(c) for c in cases]
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}, allowed: {list(SPLITS)}")
    if split not in splits:
        raise ValueError(f"{path}: split {split!r} not in 'splits' (present: {sorted(splits)})")
    return [str(c) for c in splits[split]]


# --------------------------------------------------------------------------- preprocessed dataset


class PreprocessedDataset:
    """One preprocessed dataset folder, restricted to the labelled cases of one split.

    Construction reads only ``dataset.json`` (and checks that the case files exist); the arrays are
    memory-mapped on first access and the maps are cached per process, never pickled, so the object is
    cheap to send to DataLoader workers.

    Attributes:
        folder: the dataset folder.
        name: dataset name.
        modality_id: modality id (-1 = MR of unknown sequence).
        class_values: label values, ascending; ``task_ids[k]`` is the task of ``class_values[k]``.
        class_names: class names, in the same order.
        task_ids: global task ids, one per class.
        split: the split the cases come from.
        case_ids: labelled case ids of the split (site-local: never report them off-site).
        sample_weight: relative probability of drawing this dataset.
        intensity_aug_prob: probability of each intensity augmentation.
    """

    def __init__(
        self,
        folder: Path,
        meta: Mapping[str, Any],
        task_ids: Sequence[int],
        split: str = "train",
        sample_weight: float | None = None,
    ) -> None:
        path = folder / "dataset.json"
        self.folder = folder
        self.name = str(meta.get("dataset", folder.name))
        self.modality = str(meta.get("modality", ""))
        self.modality_id = _parse_modality_id(meta, path)
        self.class_values, self.class_names = _parse_classes(meta, path)
        self.task_ids = _parse_task_ids(task_ids, len(self.class_values), path)
        self.intensity_aug_prob = _parse_number(meta, "intensity_aug_prob", path, 0.0, 1.0)
        weight_meta = meta if sample_weight is None else {"sample_weight": sample_weight}
        self.sample_weight = _parse_number(weight_meta, "sample_weight", path, 0.0, math.inf)
        if self.sample_weight <= 0:
            raise ValueError(f"{path}: 'sample_weight' must be > 0, got {self.sample_weight}")
        self._meta = dict(meta)
        self.split = split
        labelled = meta.get("labelled") or {}
        cases = _split_cases(_require(meta, "splits", path), _require(meta, "cases", path), split, path)
        self.case_ids = [c for c in cases if labelled.get(c, True)]
        self._check_files()
        self._reset_caches()

    @classmethod
    def open(
        cls,
        folder: str | Path,
        task_ids: Sequence[int],
        split: str = "train",
        sample_weight: float | None = None,
    ) -> PreprocessedDataset:
        """Open ``folder/dataset.json``.

        Args:
            folder: the preprocessed dataset folder.
            task_ids: global task ids, one per class; class label values sorted ascending map to them
                in order.
            split: "train", "val", "test" or "all" (every case).
            sample_weight: overrides the ``sample_weight`` of ``dataset.json`` when given.
        """
        folder = Path(folder)
        path = folder / "dataset.json"
        if not path.is_file():
            raise FileNotFoundError(f"no dataset.json in {folder}")
        with path.open(encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
        ds = cls(folder, meta, task_ids, split, sample_weight)
        logger.info("dataset %s: %d labelled %s cases, %d classes", ds.name, len(ds), split, ds.num_classes)
        return ds

    def with_split(self, split: str) -> PreprocessedDataset:
        """The same dataset restricted to another split."""
        return PreprocessedDataset(self.folder, self._meta, self.task_ids, split, self.sample_weight)

    def _check_files(self) -> None:
        missing = [
            p.name
            for c in self.case_ids
            for p in (self._image_path(c), self._label_path(c))
            if not p.is_file()
        ]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{self.folder}: missing preprocessed files of split {self.split!r}: {shown}"
            )

    def _reset_caches(self) -> None:
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._foreground: dict[int, list[np.ndarray]] = {}
        self._minimum: dict[int, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_arrays", "_foreground", "_minimum"):
            state[key] = {}
        return state

    def __len__(self) -> int:
        return len(self.case_ids)

    def __repr__(self) -> str:
        return (
            f"PreprocessedDataset(name={self.name!r}, split={self.split!r}, cases={len(self)}, "
            f"task_ids={list(self.task_ids)}, modality_id={self.modality_id})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    def _image_path(self, case: str) -> Path:
        return self.folder / f"{case}.npy"

    def _label_path(self, case: str) -> Path:
        return self.folder / f"{case}_gt.npy"

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped (Z, Y, X) float32 image and (Z, Y, X) int8 label of case ``index``."""
        if index not in self._arrays:
            case = self.case_ids[index]
            image = np.load(self._image_path(case), mmap_mode="r", allow_pickle=False)
            label = np.load(self._label_path(case), mmap_mode="r", allow_pickle=False)
            if image.ndim != 3 or image.shape != label.shape:
                raise ValueError(
                    f"{self.folder}: case {case!r}: image shape {image.shape} and label shape {label.shape} "
                    "must be equal and 3-D (Z, Y, X)"
                )
            self._arrays[index] = (image, label)
        return self._arrays[index]

    def image(self, index: int) -> np.ndarray:
        """Memory-mapped (Z, Y, X) float32 image of case ``index``."""
        return self.arrays(index)[0]

    def label(self, index: int) -> np.ndarray:
        """Memory-mapped (Z, Y, X) int8 label of case ``index``."""
        return self.arrays(index)[1]

    def image_minimum(self, index: int) -> float:
        """Minimum intensity of case ``index`` (the padding value); one full read, then cached."""
        if index not in self._minimum:
            self._minimum[index] = float(np.min(self.image(index)))
        return self._minimum[index]

    def foreground(self, index: int) -> list[np.ndarray]:
        """Foreground voxels of case ``index``, per class present in its label.

        Returns:
            one (m, 3) int32 array of (z, y, x) coordinates per present class (m > 0), at most
            ``FOREGROUND_POINTS_PER_CLASS`` evenly strided voxels each; cached per process.
        """
        if index not in self._foreground:
            label = np.asarray(self.label(index))
            flat = np.flatnonzero(label)
            values = label.reshape(-1)[flat]
            points = []
            for value in self.class_values:
                idx = flat[values == value]
                if idx.size:
                    idx = idx[:: max(1, math.ceil(idx.size / FOREGROUND_POINTS_PER_CLASS))]
                    points.append(np.stack(np.unravel_index(idx, label.shape), axis=1).astype(np.int32))
            self._foreground[index] = points
        return self._foreground[index]


# ------------------------------------------------------------------------------------ cropping


def _crop(array: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float) -> np.ndarray:
    """Copy the box ``[start, start + size)`` out of ``array`` (e.g. a memmap), padding outside it.

    Returns:
        an in-memory array of shape ``size`` and ``array``'s dtype.
    """
    out = np.full(tuple(size), pad_value, dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape, strict=True):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _needs_padding(start: Sequence[int], size: Sequence[int], shape: Sequence[int]) -> bool:
    return any(s < 0 or s + n > dim for s, n, dim in zip(start, size, shape, strict=True))


def _region_start(rng: np.random.Generator, size: int, window: int, point: int | None, inner: int) -> int:
    """Start of a window along one axis.

    Without a point: uniform over the positions inside the volume (or, when the volume is smaller,
    over the positions containing it).  With a point: centred on it, shifted towards the volume as
    far as the point stays inside ``[start + inner, start + window - inner)``.
    """
    lo, hi = min(0, size - window), max(0, size - window)
    if point is None:
        return int(rng.integers(lo, hi + 1))
    start = min(max(point - window // 2, lo), hi)
    return min(max(start, point - window + inner + 1), point - inner)


# ------------------------------------------------------------------------------ training patches


def _check_patch_size(patch_size: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(patch_size)
    if len(size) != 3 or any(
        isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 1 for s in size
    ):
        raise ValueError(f"patch_size must be three positive integers (D, H, W), got {patch_size!r}")
    return tuple(int(s) for s in size)  # type: ignore[return-value]


def _check_probability(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


class TrainPatchDataset(Dataset):
    """Random training patches over one or more preprocessed datasets (spec section 4).

    Sample ``index`` (any integer >= 0; ``len`` is the epoch length) is drawn with a generator seeded by
    ``(seed, index)``: choose a dataset with probability proportional to its ``sample_weight``, a case
    uniformly, then (with ``foreground_prob``) a labelled voxel: a class present in the case uniformly,
    then a voxel of it. A ``(patch + margin)`` region is placed centred on that voxel (shifted to stay
    inside the volume while the voxel stays in the central patch) or uniformly at random. With
    ``spatial_prob`` the region is rotated (U(-30, 30) degrees per axis) and scaled (U(0.7, 1.3)) about its
    centre and centre-cropped to the patch; otherwise a random patch is cropped from the region (keeping
    the voxel inside). Then each intensity augmentation is applied with the dataset's
    ``intensity_aug_prob``. Regions beyond the volume are padded with the case's minimum intensity and
    label 0. ``augment=False`` turns off the spatial and intensity augmentations (foreground
    oversampling is governed by ``foreground_prob`` alone).

    Each item is a dict:
        - "image": (1, D, H, W) float32
        - "target": (n, D, H, W) uint8, channel k = (label == k-th class value of the dataset)
        - "task_ids": (n,) int64
        - "modality_ids": (1,) int64
    """

    def __init__(
        self,
        datasets: Sequence[PreprocessedDataset],
        patch_size: Sequence[int] = (128, 128, 128),
        samples_per_epoch: int = 400,
        seed: int = 0,
        foreground_prob: float = 0.33,
        augment: bool = True,
        *,
        spatial_prob: float = 0.5,
        margin: int = 30,
        spatial: SpatialParams | None = None,
        intensity: IntensityParams | None = None,
    ) -> None:
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("datasets must hold at least one PreprocessedDataset, got none")
        empty = [d.name for d in self.datasets if len(d) == 0]
        if empty:
            raise ValueError(f"datasets without labelled cases in their split: {empty}")
        self.patch_size = _check_patch_size(patch_size)
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.foreground_prob = _check_probability("foreground_prob", foreground_prob)
        self.spatial_prob = _check_probability("spatial_prob", spatial_prob)
        self.augment = bool(augment)
        self.margin = int(margin)
        self.spatial = spatial or SpatialParams()
        self.intensity = intensity or IntensityParams()
        weights = np.array([d.sample_weight for d in self.datasets], dtype=np.float64)
        self._cumulative = np.cumsum(weights / weights.sum())

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _rng(self, index: int) -> np.random.Generator:
        if index < 0:
            raise ValueError(f"sample index must be >= 0, got {index}")
        return np.random.default_rng(np.random.SeedSequence([self.seed, int(index)]))

    def _choose(self, rng: np.random.Generator) -> tuple[int, int]:
        d = min(int(np.searchsorted(self._cumulative, rng.random(), side="right")), len(self.datasets) - 1)
        return d, int(rng.integers(len(self.datasets[d])))

    def choose(self, index: int) -> tuple[int, int]:
        """(dataset index, case index) of sample ``index``, without reading any array."""
        return self._choose(self._rng(index))

    def _foreground_point(
        self, ds: PreprocessedDataset, case: int, rng: np.random.Generator
    ) -> np.ndarray | None:
        points = ds.foreground(case)
        if not points:
            return None
        cls_points = points[int(rng.integers(len(points)))]
        return cls_points[int(rng.integers(len(cls_points)))]

    def _crop_pair(
        self, ds: PreprocessedDataset, case: int, start: Sequence[int], size: Sequence[int], always_min: bool
    ) -> tuple[np.ndarray, np.ndarray, float]:
        image, label = ds.arrays(case)
        pad = ds.image_minimum(case) if always_min or _needs_padding(start, size, image.shape) else 0.0
        return _crop(image, start, size, pad), _crop(label, start, size, 0), pad

    def _spatial(
        self, ds: PreprocessedDataset, case: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(D, H, W) float32 image patch and (D, H, W) int8 label patch."""
        use_affine = self.augment and rng.random() < self.spatial_prob
        point = self._foreground_point(ds, case, rng) if rng.random() < self.foreground_prob else None
        shape = ds.image(case).shape
        window = [p + self.margin for p in self.patch_size]
        inner = self.margin // 2
        start = [
            _region_start(rng, shape[a], window[a], None if point is None else int(point[a]), inner)
            for a in range(3)
        ]
        if use_affine:
            image, label, pad = self._crop_pair(ds, case, start, window, always_min=True)
            angles, scale = random_spatial_params(rng, self.spatial)
            return apply_affine(image, label, self.patch_size, angles, scale, pad)
        offsets = []
        for a in range(3):
            lo, hi = 0, self.margin
            if point is not None:  # keep the chosen voxel inside the patch
                q = int(point[a]) - start[a]
                lo, hi = max(0, q - self.patch_size[a] + 1), min(self.margin, q)
            offsets.append(int(rng.integers(lo, hi + 1)))
        patch_start = [s + o for s, o in zip(start, offsets, strict=True)]
        image, label, _ = self._crop_pair(ds, case, patch_start, self.patch_size, always_min=False)
        return image, label

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        d, case = self._choose(rng)
        ds = self.datasets[d]
        image, label = self._spatial(ds, case, rng)
        if self.augment and ds.intensity_aug_prob > 0:
            image = intensity_augment(image, rng, ds.intensity_aug_prob, self.intensity)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)[None]),
            "target": torch.from_numpy(label_to_masks(label, ds.class_values)),
            "task_ids": torch.tensor(ds.task_ids, dtype=torch.long),
            "modality_ids": torch.tensor([ds.modality_id], dtype=torch.long),
        }


# --------------------------------------------------------------------------- batching and loading


def collate_padded(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch samples whose class counts differ.

    Args:
        samples: items of :class:`TrainPatchDataset` ("image" (1, D, H, W), "target" (n_i, D, H, W),
            "task_ids" (n_i,), "modality_ids" (1,)).

    Returns:
        "image" (B, 1, D, H, W) float32, "target" (B, n, D, H, W) uint8 with zero padding channels,
        "task_ids" (B, n) int64 padded with -1, "modality_ids" (B, 1) int64; n = max n_i.
    """
    if not samples:
        raise ValueError("collate_padded needs at least one sample, got none")
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"all images of a batch must have the same shape, got {sorted(shapes)}")
    n_max = max(int(s["task_ids"].numel()) for s in samples)
    spatial = samples[0]["image"].shape[1:]
    target = torch.zeros((len(samples), n_max, *spatial), dtype=samples[0]["target"].dtype)
    task_ids = torch.full((len(samples), n_max), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        n = int(s["task_ids"].numel())
        target[i, :n] = s["target"]
        task_ids[i, :n] = s["task_ids"]
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "target": target,
        "task_ids": task_ids,
        "modality_ids": torch.stack([s["modality_ids"].reshape(1) for s in samples]).long(),
    }


class EpochSampler(Sampler[int]):
    """Indices ``e * n .. e * n + n - 1`` for the e-th pass (e counts from ``start_epoch``).

    Each pass over the loader thus draws new samples of a :class:`TrainPatchDataset`, also with
    persistent workers (the indices come from the main process).
    """

    def __init__(self, num_samples: int, start_epoch: int = 0) -> None:
        if num_samples < 1 or start_epoch < 0:
            raise ValueError(
                f"num_samples must be >= 1 and start_epoch >= 0, got {num_samples} and {start_epoch}"
            )
        self.num_samples = int(num_samples)
        self.epoch = int(start_epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.num_samples
        self.epoch += 1
        return iter(range(base, base + self.num_samples))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    *,
    start_epoch: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    multiprocessing_context: str | None = None,
) -> DataLoader:
    """DataLoader batching with :func:`collate_padded`.

    For a :class:`TrainPatchDataset` the indices come from an :class:`EpochSampler` (new samples each
    pass; ``start_epoch`` resumes the sequence, e.g. the federated round) and the loader's own generator
    (the seeds of its worker processes) is seeded with the dataset's seed, so no pass draws from torch's
    global generator; other datasets are read in order. Workers are persistent when ``num_workers > 0``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = EpochSampler(len(dataset), start_epoch) if isinstance(dataset, TrainPatchDataset) else None
    generator = loader_generator(dataset.seed, start_epoch) if isinstance(dataset, TrainPatchDataset) else None
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {"persistent_workers": True, "multiprocessing_context": multiprocessing_context}
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_padded,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
        **extra,
    )


def loader_generator(seed: int, start_epoch: int = 0, rank: int = 0) -> torch.Generator:
    """The generator of a training DataLoader: a function of (seed, start pass, process rank) only.

    A DataLoader draws the base seed of its workers (torch and ``random`` in each worker) from its generator
    each time it is iterated, and from torch's global generator when it has none, which a new process
    seeds at random. The patches themselves never depend on it (sample ``i`` is a function of
    ``(seed, i)``), but any randomness a worker draws does, as does the global generator afterwards.
    """
    return torch.Generator().manual_seed(derived_seed(seed, start_epoch, rank))


def round_sampling_seed(run_seed: int, server_round: int, site: str, site_seed: int = 0) -> int:
    """The seed of the patches ``site`` draws in ``server_round`` of a run seeded ``run_seed`` (``site_seed``:
    the site config's own seed): the one sampling plan of the federated, centralized and local-only arms."""
    return derived_seed(run_seed, server_round, site_seed, *site.encode())


def concat_batches(batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch of several (:func:`collate_padded` form), task tokens padded to the largest count."""
    n_max = max(int(b["task_ids"].shape[1]) for b in batches)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        extra = n_max - t.shape[1]
        return t if extra == 0 else torch.cat([t, t.new_full((t.shape[0], extra, *t.shape[2:]), value)], dim=1)

    return {
        "image": torch.cat([b["image"] for b in batches]),
        "target": torch.cat([pad(b["target"], 0) for b in batches]),
        "task_ids": torch.cat([pad(b["task_ids"], -1) for b in batches]),
        "modality_ids": torch.cat([b["modality_ids"] for b in batches]),
    }


def derived_seed(*entropy: int) -> int:
    """A 64-bit seed that is a function of ``entropy`` only (independent streams for distinct tuples)."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, dtype=np.uint64)[0])
