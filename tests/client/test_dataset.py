"""Tests of the training data pipeline (client/dataset.py, client/augment.py) on synthetic folders."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from client.augment import IntensityParams, intensity_augment
from client.dataset import (
    EpochSampler,
    PreprocessedDataset,
    TrainPatchDataset,
    _crop,
    collate_padded,
    make_loader,
)


def write_dataset(
    root: Path,
    name: str,
    classes: dict[int, str],
    cases: dict[str, tuple[np.ndarray, np.ndarray]],
    splits: dict[str, list[str]] | None = None,
    *,
    sample_weight: float = 1.0,
    intensity_aug_prob: float = 0.0,
    modality_id: int = 0,
    unlabelled: tuple[str, ...] = (),
) -> Path:
    """Write a preprocessed dataset folder as the preprocessing step does; return the folder."""
    folder = root / name
    folder.mkdir(parents=True)
    for case, (image, label) in cases.items():
        np.save(folder / f"{case}.npy", image.astype(np.float32))
        np.save(folder / f"{case}_gt.npy", label.astype(np.int8))
    ids = list(cases) + list(unlabelled)
    meta = {
        "dataset": name,
        "modality": "CT",
        "modality_id": modality_id,
        "classes": {str(k): v for k, v in classes.items()},
        "cases": ids,
        "labelled": {c: c not in unlabelled for c in ids},
        "splits": splits or {"train": ids, "val": [], "test": []},
        "sample_weight": sample_weight,
        "intensity_aug_prob": intensity_aug_prob,
    }
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def ball(shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    """Boolean ellipsoid."""
    grid = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def sphere_case(shape=(40, 40, 40), value: int = 1) -> tuple[np.ndarray, np.ndarray]:
    inside = ball(shape, tuple(s / 2 for s in shape), (10, 10, 10))
    return inside.astype(np.float32), (inside * value).astype(np.int8)


def layered_case(shape=(40, 40, 40), values=(1, 2, 3)) -> tuple[np.ndarray, np.ndarray]:
    """Label bands along z with the given values (and background); the image equals the label."""
    label = np.zeros(shape, np.int8)
    for i, v in enumerate(values):
        label[4 + 10 * i : 12 + 10 * i] = v
    return label.astype(np.float32), label


@pytest.fixture
def two_datasets(tmp_path: Path) -> tuple[PreprocessedDataset, PreprocessedDataset]:
    """A 1-class dataset (label value 1) and a 3-class dataset (values 1, 2, 5)."""
    one = write_dataset(tmp_path, "one", {1: "tumour"}, {"a": sphere_case(), "b": sphere_case((36, 44, 40))})
    three = write_dataset(
        tmp_path,
        "three",
        {5: "c", 1: "a", 2: "b"},
        {"x": layered_case(values=(1, 2, 5)), "y": layered_case((44, 40, 40), values=(5, 1, 2))},
        modality_id=-1,
    )
    return (
        PreprocessedDataset.open(one, task_ids=[7]),
        PreprocessedDataset.open(three, task_ids=[30, 31, 32]),
    )


# ------------------------------------------------------------------------------- dataset.json


def test_open_maps_sorted_class_values_to_task_ids(tmp_path: Path) -> None:
    folder = write_dataset(
        tmp_path,
        "d",
        {3: "c", 1: "a", 2: "b"},
        {"p1": layered_case(), "p2": layered_case(), "p3": layered_case()},
        {"train": ["p1", "p4"], "val": ["p2"], "test": ["p3"]},
        unlabelled=("p4",),
        sample_weight=0.7,
    )
    ds = PreprocessedDataset.open(folder, task_ids=[10, 11, 12])
    assert ds.class_values == (1, 2, 3)
    assert ds.class_names == ("a", "b", "c")
    assert ds.task_ids == (10, 11, 12)
    assert ds.case_ids == ["p1"]  # the unlabelled p4 is left out
    assert ds.sample_weight == 0.7
    assert ds.with_split("val").case_ids == ["p2"]
    assert PreprocessedDataset.open(folder, [10, 11, 12], split="all").case_ids == ["p1", "p2", "p3"]
    assert PreprocessedDataset.open(folder, [10, 11, 12], sample_weight=2.0).sample_weight == 2.0


def test_open_rejects_bad_input(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path, "d", {1: "a", 2: "b"}, {"p": layered_case(values=(1, 2))})
    with pytest.raises(ValueError, match="task_ids has 1 entries"):
        PreprocessedDataset.open(folder, task_ids=[4])
    with pytest.raises(ValueError, match="distinct"):
        PreprocessedDataset.open(folder, task_ids=[4, 4])
    with pytest.raises(ValueError, match="split = 'training'"):
        PreprocessedDataset.open(folder, task_ids=[4, 5], split="training")
    meta = json.loads((folder / "dataset.json").read_text())
    for key, value, message in [
        ("modality_id", 7, "'modality_id' = 7"),
        ("sample_weight", 0, "'sample_weight' must be > 0"),
        ("intensity_aug_prob", 1.5, "'intensity_aug_prob' = 1.5"),
        ("classes", {"x": "a", "2": "b"}, "'classes' key 'x'"),
        ("splits", None, "missing key 'splits'"),
    ]:
        broken = dict(meta)
        if value is None:
            del broken[key]
        else:
            broken[key] = value
        (folder / "dataset.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            PreprocessedDataset.open(folder, task_ids=[4, 5])


def test_open_reports_missing_case_files(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path, "d", {1: "a"}, {"p": sphere_case(), "q": sphere_case()})
    (folder / "q_gt.npy").unlink()
    with pytest.raises(FileNotFoundError, match="q_gt.npy"):
        PreprocessedDataset.open(folder, task_ids=[0])


# ------------------------------------------------------------------------------ memory mapping


def test_arrays_are_memory_mapped_until_cropped_and_pickle_cheaply(two_datasets) -> None:
    ds, _ = two_datasets
    image, label = ds.arrays(0)
    assert isinstance(image, np.memmap) and isinstance(label, np.memmap)
    assert image.dtype == np.float32 and label.dtype == np.int8
    crop = _crop(image, (-3, 5, 5), (16, 16, 16), pad_value=-1.0)
    assert type(crop) is np.ndarray and crop.shape == (16, 16, 16)
    assert np.all(crop[:3] == -1.0) and np.array_equal(crop[3:], image[:13, 5:21, 5:21])
    # the maps are per process: a pickled dataset carries none of them
    blob = pickle.dumps(ds)
    assert len(blob) < 4000
    clone = pickle.loads(blob)
    assert clone._arrays == {}
    assert np.array_equal(clone.image(0), image)


# ------------------------------------------------------------------------------- batching


def test_batch_mixing_class_counts_is_padded(two_datasets) -> None:
    data = TrainPatchDataset(two_datasets, patch_size=(24, 24, 24), samples_per_epoch=50, augment=False)
    by_dataset: dict[int, list[int]] = {0: [], 1: []}
    for i in range(50):
        by_dataset[data.choose(i)[0]].append(i)
    indices = by_dataset[0][:2] + by_dataset[1][:2]
    samples = [data[i] for i in indices]
    batch = collate_padded(samples)
    assert batch["image"].shape == (4, 1, 24, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["target"].shape == (4, 3, 24, 24, 24) and batch["target"].dtype == torch.uint8
    assert batch["task_ids"].tolist() == [[7, -1, -1], [7, -1, -1], [30, 31, 32], [30, 31, 32]]
    assert batch["modality_ids"].tolist() == [[0], [0], [-1], [-1]]
    assert batch["task_ids"].dtype == torch.long and batch["modality_ids"].dtype == torch.long
    assert not batch["target"][:2, 1:].any()  # padding channels are all zero
    values = {0: (1,), 1: (1, 2, 5)}
    for b, i in enumerate(indices):
        # without augmentation the image equals the label, so each mask is image == its class value
        image = batch["image"][b, 0]
        for k, v in enumerate(values[data.choose(i)[0]]):
            assert torch.equal(batch["target"][b, k], (image == v).to(torch.uint8))
    assert batch["target"][2:].sum() > 0


def test_sampling_frequencies_follow_sample_weight(tmp_path: Path) -> None:
    weights = (1.0, 2.0, 5.0)
    datasets = [
        PreprocessedDataset.open(
            write_dataset(tmp_path, f"d{j}", {1: "a"}, {f"c{i}": sphere_case((8, 8, 8)) for i in range(4)}),
            task_ids=[j],
            sample_weight=w,
        )
        for j, w in enumerate(weights)
    ]
    data = TrainPatchDataset(datasets, patch_size=(8, 8, 8), samples_per_epoch=4000, seed=3)
    draws = np.array([data.choose(i) for i in range(4000)])
    counts = np.bincount(draws[:, 0], minlength=3)
    expected = 4000 * np.array(weights) / sum(weights)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, (counts, expected)  # df 2, p = 0.001
    case_counts = np.bincount(draws[draws[:, 0] == 2, 1], minlength=4)
    assert case_counts.min() > 0.8 * case_counts.mean()  # cases uniform within a dataset
    for i in range(5):  # choose() is the choice __getitem__ makes
        assert data[i]["task_ids"].tolist() == [int(draws[i, 0])]


def test_samples_are_deterministic_in_seed_and_index(two_datasets) -> None:
    kwargs = {"patch_size": (24, 24, 24), "samples_per_epoch": 10, "foreground_prob": 0.5}
    data = TrainPatchDataset(two_datasets, seed=1, **kwargs)
    again = TrainPatchDataset(two_datasets, seed=1, **kwargs)
    other_seed = TrainPatchDataset(two_datasets, seed=2, **kwargs)
    for i in (0, 3, 123):
        a, b = data[i], again[i]
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(data[0]["image"], data[1]["image"])
    assert not torch.equal(data[0]["image"], other_seed[0]["image"])
    with pytest.raises(ValueError, match="index must be >= 0"):
        data[-1]


# ------------------------------------------------------------------------------ cropping


def test_patch_shape_is_patch_size_also_for_small_cases(tmp_path: Path) -> None:
    image = np.full((20, 50, 12), 3.0, np.float32)
    image[0, 0, 0] = -2.0  # the case minimum, used for padding
    label = np.zeros(image.shape, np.int8)
    label[8:12, 20:30, 4:8] = 1
    small = PreprocessedDataset.open(write_dataset(tmp_path, "s", {1: "a"}, {"c": (image, label)}), [0])
    for augment in (True, False):
        data = TrainPatchDataset([small], patch_size=(32, 32, 32), samples_per_epoch=8, augment=augment)
        for i in range(8):
            sample = data[i]
            assert sample["image"].shape == (1, 32, 32, 32)
            assert sample["target"].shape == (1, 32, 32, 32)
    plain = TrainPatchDataset([small], patch_size=(32, 32, 32), foreground_prob=0.0, augment=False)[0][
        "image"
    ]
    assert set(np.unique(plain.numpy())) <= {-2.0, 3.0}
    assert (plain == -2.0).sum() >= 32**3 - 20 * 32 * 12  # the padding is the case minimum


def test_rotation_and_scale_keep_image_and_label_aligned(tmp_path: Path) -> None:
    shape = (48, 48, 48)
    inside = ball(shape, (20, 26, 24), (11, 6, 8))  # an off-centre ellipsoid: rotations matter
    folder = write_dataset(
        tmp_path, "e", {1: "a"}, {"c": (inside.astype(np.float32), inside.astype(np.int8))}
    )
    ds = PreprocessedDataset.open(folder, [0])
    data = TrainPatchDataset([ds], patch_size=(32, 32, 32), foreground_prob=1.0, spatial_prob=1.0)
    interpolated = 0
    for i in range(8):
        sample = data[i]
        image, mask = sample["image"][0].numpy(), sample["target"][0].numpy().astype(bool)
        bright = image > 0.5
        dice = 2 * (bright & mask).sum() / (bright.sum() + mask.sum())
        assert dice > 0.95, (i, dice)
        assert (bright == mask).mean() > 0.99
        interpolated += int(((image > 0.05) & (image < 0.95)).sum() > 100)
    assert interpolated >= 6  # the transform did resample (not an identity crop)


def test_foreground_oversampling(tmp_path: Path) -> None:
    image = np.zeros((96, 96, 96), np.float32)
    label = np.zeros(image.shape, np.int8)
    label[70:76, 10:16, 60:66] = 1
    ds = PreprocessedDataset.open(write_dataset(tmp_path, "f", {1: "a"}, {"c": (image, label)}), [0])

    def hit_rate(fg_prob: float, augment: bool) -> float:
        data = TrainPatchDataset([ds], patch_size=(16, 16, 16), foreground_prob=fg_prob, augment=augment)
        return float(np.mean([data[i]["target"].any().item() for i in range(40)]))

    assert hit_rate(1.0, augment=False) == 1.0
    assert hit_rate(1.0, augment=True) >= 0.8
    assert hit_rate(0.0, augment=True) <= 0.15


# ------------------------------------------------------------------------------- loading


def test_loader_with_two_workers_matches_direct_samples(two_datasets) -> None:
    data = TrainPatchDataset(two_datasets, patch_size=(16, 16, 16), samples_per_epoch=6, seed=5)
    assert pickle.loads(pickle.dumps(data))[2]["image"].equal(data[2]["image"])
    loader = make_loader(data, batch_size=3, num_workers=2)
    assert loader.persistent_workers
    seen = []
    for epoch in range(2):
        for b, batch in enumerate(loader):
            expected = collate_padded([data[epoch * 6 + b * 3 + j] for j in range(3)])
            for key in expected:
                assert torch.equal(batch[key], expected[key]), (epoch, b, key)
            seen.append(batch["image"])
    assert len(seen) == 4
    assert not torch.equal(seen[0], seen[2])  # the second pass draws new samples


def test_epoch_sampler_resumes() -> None:
    sampler = EpochSampler(4, start_epoch=2)
    assert list(sampler) == [8, 9, 10, 11]
    assert list(sampler) == [12, 13, 14, 15]
    with pytest.raises(ValueError, match="num_samples"):
        EpochSampler(0)


# --------------------------------------------------------------------------- augmentation


def test_intensity_augment() -> None:
    x = np.linspace(-2, 3, 16**3, dtype=np.float32).reshape(16, 16, 16)
    assert np.array_equal(intensity_augment(x, np.random.default_rng(0), 0.0), x)
    a = intensity_augment(x, np.random.default_rng(0), 1.0)
    b = intensity_augment(x, np.random.default_rng(0), 1.0)
    assert a.dtype == np.float32 and np.array_equal(a, b) and np.isfinite(a).all()
    assert not np.allclose(a, x)
    # gamma alone keeps the intensity range
    gamma_only = IntensityParams(
        brightness=(1, 1), offset_std=0.0, contrast=(1, 1), blur_sigma=(1e-3, 1e-3), noise_std=(0, 0)
    )
    g = intensity_augment(x, np.random.default_rng(1), 1.0, gamma_only)
    assert np.isclose(g.min(), x.min(), atol=1e-5) and np.isclose(g.max(), x.max(), atol=1e-5)
    assert not np.allclose(g, x, atol=1e-3)


def test_padded_batch_trains_the_model(two_datasets) -> None:
    from hermes_model import build_model
    from hermes_model.losses import hermes_loss

    torch.manual_seed(0)
    data = TrainPatchDataset(two_datasets, patch_size=(32, 32, 32), samples_per_epoch=4, seed=2)
    batch = next(iter(make_loader(data, batch_size=4)))
    assert (batch["task_ids"] == -1).any() and (batch["task_ids"] >= 0).all(dim=1).any()  # mixed batch
    model = build_model("hermes-r", base_channels=8, task_slots=72, modality_slots=6)
    seg, modality = model(batch["image"], batch["task_ids"], batch["modality_ids"])
    assert seg.shape == batch["target"].shape
    loss = hermes_loss(seg, modality, batch["target"], batch["task_ids"], batch["modality_ids"])
    loss.total.backward()
    assert torch.isfinite(loss.total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
