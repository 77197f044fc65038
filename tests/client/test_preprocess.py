"""Tests of the preprocessing (client/preprocess.py) and its command line (client/cli.py).

Synthetic cases check exactness (round trip, geometry handling, label rules, resume); the real scans of
``shared/data`` (skipped when absent) check the sarcoma cases, a flipped TotalSegmentator label, the
RAS/LPS/PSR copies of one T1, a real DICOM series and real failures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from tqdm import tqdm

from client.cli import main as cli_main
from client.config import SplitSpec, load_site_config
from client.formats import CaseSpec
from client.preprocess import (
    CaseError,
    CaseOutcome,
    PreprocessSettings,
    _Job,
    _run_parallel,
    compute_splits,
    normalise_intensity,
    preprocess_case,
    preprocess_site,
    read_image,
    restore_to_original,
)
from hermes_model.catalog import Catalog
from hermes_model.plans import CT_WINDOW as CT_CLIP
from hermes_model.plans import EVAL_CROP, TRAIN_CROP, Plans
from tests.client.conftest import SMALL_PLANS, blob_case, make_image, write_csv

SETTINGS = PreprocessSettings(modality="CT", classes=(1, 2), target_spacing=(1.5, 1.5, 1.5), margin=2,
                              min_size=(16, 16, 16))
LPS = (1, 0, 0, 0, 1, 0, 0, 0, 1)
RAS = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
PSR = (0, 0, -1, 1, 0, 0, 0, 1, 0)


def write_pair(folder: Path, name: str, image: sitk.Image, label: sitk.Image | None) -> CaseSpec:
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    if label is None:
        return CaseSpec(name, folder / f"{name}.nii.gz", None)
    sitk.WriteImage(label, str(folder / f"{name}_seg.nii.gz"))
    return CaseSpec(name, folder / f"{name}.nii.gz", folder / f"{name}_seg.nii.gz")


def load_case(out_dir: Path, case: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
    gt = out_dir / f"{case}_gt.npy"
    return (np.load(out_dir / f"{case}.npy"), np.load(gt) if gt.exists() else None,
            json.loads((out_dir / f"{case}.json").read_text()))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


# ----------------------------------------------------------------------------------- synthetic: exactness
@pytest.mark.parametrize("direction", [LPS, RAS, PSR], ids=["LPS", "RAS", "PSR"])
def test_round_trip_is_exact_when_spacing_equals_target(tmp_path: Path, direction: tuple) -> None:
    image, label = blob_case((12, 30, 26))
    case = write_pair(tmp_path / "raw", "c1", make_image(image, (1.5,) * 3, (10, -20, 5), direction),
                      make_image(label, (1.5,) * 3, (10, -20, 5), direction))
    outcome = preprocess_case(case, SETTINGS, tmp_path / "out", dataset="d")
    assert outcome.status == "done", outcome.reason
    img, gt, meta = load_case(tmp_path / "out", "c1")
    assert img.dtype == np.float32 and gt.dtype == np.int8 and img.shape == gt.shape
    assert min(img.shape) == 16  # the 12-voxel axis is padded
    for (lo, hi), (before, after) in zip(meta["crop_zyx"], meta["pad_zyx"], strict=True):
        assert before + after == max(0, 16 - (hi - lo)) and after - before in (0, 1)
    assert meta["orientation_applied"]["to"] == "LPS" and meta["labelled"] is True
    assert sorted(np.unique(gt).tolist()) == [0, 1, 2] and meta["label_values"] == [1, 2]
    restored = restore_to_original(gt, tmp_path / "out" / "c1.json")
    original = sitk.ReadImage(str(case.label))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(original))
    assert restored.GetSize() == original.GetSize()
    np.testing.assert_allclose(restored.GetDirection(), original.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(restored.GetOrigin(), original.GetOrigin(), atol=1e-4)
    # the image comes back too (linear; z-scored values) wherever it was kept
    back = sitk.GetArrayFromImage(restore_to_original(img, meta, is_label=False))
    z = (np.clip(image, *CT_CLIP) - meta["intensity"]["mean"]) / meta["intensity"]["std"]
    inside = sitk.GetArrayFromImage(restore_to_original(np.ones_like(gt), meta)) > 0
    np.testing.assert_allclose(back[inside], z[inside], atol=1e-3)


def test_restore_rejects_a_wrong_shape(tmp_path: Path) -> None:
    image, label = blob_case()
    case = write_pair(tmp_path, "c", make_image(image, (1.5,) * 3), make_image(label, (1.5,) * 3))
    preprocess_case(case, SETTINGS, tmp_path / "out")
    with pytest.raises(ValueError, match="does not match the case's shape_zyx"):
        restore_to_original(np.zeros((3, 3, 3), np.int8), tmp_path / "out" / "c.json")


def test_resampling_keeps_the_physical_centre_and_extent(tmp_path: Path) -> None:
    image, label = blob_case((20, 30, 40))
    spacing, origin = (0.75, 1.0, 3.0), (5.0, 7.0, -100.0)
    case = write_pair(tmp_path, "c", make_image(image, spacing, origin), make_image(label, spacing, origin))
    settings = PreprocessSettings(modality="CT", classes=(1, 2), margin=100, min_size=(1, 1, 1))
    assert preprocess_case(case, settings, tmp_path / "out").status == "done"
    _, gt, meta = load_case(tmp_path / "out", "c")
    grid = meta["resampled"]
    assert grid["size_xyz"] == [20, 20, 40]  # 40*0.75/1.5, 30*1/1.5, 20*3/1.5
    centre_in = np.array(origin) + (np.array([40, 30, 20]) - 1) / 2 * spacing
    centre_out = np.array(grid["origin_xyz"]) + (np.array(grid["size_xyz"]) - 1) / 2 * 1.5
    np.testing.assert_allclose(centre_out, centre_in, atol=1e-6)
    assert meta["crop_zyx"] == [[0, 40], [0, 20], [0, 20]]  # margin larger than the image: whole image
    restored = sitk.GetArrayFromImage(restore_to_original(gt, meta))
    assert dice(restored > 0, label > 0) > 0.9
    assert dice(restored == 2, label == 2) > 0.6  # a small object, resampled twice


def test_an_evaluation_case_is_not_cropped_around_its_label(tmp_path: Path) -> None:
    """A small label in a corner of a scan whose body fills the field of view: the training crop is a box
    around the label; the evaluation crop (val/test/inference) keeps the whole scan, so its position
    tells the model nothing."""
    rng = np.random.default_rng(0)
    image = rng.normal(40.0, 10.0, (32, 32, 32)).astype(np.float32)  # soft tissue everywhere: no air border
    label = np.zeros((32, 32, 32), np.uint8)
    label[2:6, 24:29, 25:30] = 1  # far from the centre
    case = write_pair(tmp_path, "c", make_image(image, (1.5,) * 3), make_image(label, (1.5,) * 3))
    train = dataclasses.replace(SETTINGS, classes=(1,), crop=TRAIN_CROP)
    evaluation = dataclasses.replace(train, crop=EVAL_CROP)
    assert preprocess_case(case, train, tmp_path / "train").status == "done"
    assert preprocess_case(case, evaluation, tmp_path / "eval").status == "done"
    _, _, train_meta = load_case(tmp_path / "train", "c")
    eval_image, eval_gt, eval_meta = load_case(tmp_path / "eval", "c")
    assert eval_meta["crop_zyx"] == [[0, 32], [0, 32], [0, 32]] and eval_image.shape == (32, 32, 32)
    assert np.array_equal(eval_gt, label)  # the label is stored whole, for scoring only
    (z0, z1), (y0, y1), (x0, x1) = train_meta["crop_zyx"]
    assert z0 <= 2 and y0 <= 24 and x0 <= 25 and z1 >= 6 and y1 >= 29 and x1 >= 30  # holds the label
    assert z1 <= 24 and y0 >= 8 and x0 >= 8  # and is the box around it, away from the centre


def test_intensity_schemes() -> None:
    rng = np.random.default_rng(0)
    ct = rng.uniform(-3000, 3000, (10, 10, 10)).astype(np.float32)
    out, info = normalise_intensity(ct, "CT")
    assert info["clip"] == [-991.0, 500.0] and info["scheme"] == "window"
    clipped = np.clip(ct, -991, 500)
    np.testing.assert_allclose(out, (clipped - clipped.mean()) / clipped.std(), atol=1e-5)
    assert abs(float(out.mean())) < 1e-5 and abs(float(out.std()) - 1) < 1e-4
    mr = rng.gamma(2.0, 100.0, (10, 10, 10)).astype(np.float32)
    out, info = normalise_intensity(mr, "MR-T1")
    lo, hi = np.percentile(mr, [2, 98])
    assert info["scheme"] == "percentile" and info["clip"] == pytest.approx([lo, hi])
    assert out.max() == pytest.approx((hi - info["mean"]) / info["std"], rel=1e-5)
    flat, info = normalise_intensity(np.full((4, 4, 4), 7.0, np.float32), "PET")
    assert np.all(flat == 0) and info["std"] == 1.0  # constant image: no division by zero


# ---------------------------------------------------------------------------------------- label rules
def test_unexpected_label_values_fail_listing_the_values(tmp_path: Path) -> None:
    image, label = blob_case()
    label[0, 0, :3] = [7, 255, 255]
    case = write_pair(tmp_path, "c", make_image(image), make_image(label))
    outcome = preprocess_case(case, SETTINGS, tmp_path / "out")
    assert outcome.status == "failed"
    assert "label values [7, 255] are not in classes [1, 2]" in outcome.reason
    assert "values found: [0, 1, 2, 7, 255]" in outcome.reason
    assert not list((tmp_path / "out").glob("c*"))
    ignoring = dataclasses.replace(SETTINGS, ignore_values=(7, 255))
    assert preprocess_case(case, ignoring, tmp_path / "out").status == "done"
    assert set(np.unique(np.load(tmp_path / "out" / "c_gt.npy")).tolist()) == {0, 1, 2}


def test_non_integer_label_fails(tmp_path: Path) -> None:
    image, label = blob_case()
    case = write_pair(tmp_path, "c", make_image(image), make_image(label.astype(np.float32) * 0.5))
    outcome = preprocess_case(case, SETTINGS, tmp_path / "out")
    assert outcome.status == "failed" and "non-integer" in outcome.reason


def test_all_background_label_warns_and_keeps_the_whole_image(tmp_path: Path) -> None:
    image, label = blob_case((10, 20, 24))
    case = write_pair(tmp_path, "c", make_image(image, (1.5,) * 3), make_image(label * 0, (1.5,) * 3))
    outcome = preprocess_case(case, SETTINGS, tmp_path / "out")
    assert outcome.status == "done" and outcome.warnings == ["label is all background"]
    _, gt, meta = load_case(tmp_path / "out", "c")
    assert meta["crop_zyx"] == [[0, 10], [0, 20], [0, 24]] and not gt.any() and meta["labelled"]


def test_label_on_another_grid_fails_naming_both_geometries(tmp_path: Path) -> None:
    # another patient's label: other size, same origin and spacing
    image, label = blob_case((16, 24, 24))
    other, other_label = blob_case((16, 24, 30), seed=3)
    case = write_pair(tmp_path, "c", make_image(image, (1.5,) * 3), make_image(other_label, (1.5,) * 3))
    outcome = preprocess_case(case, SETTINGS, tmp_path / "out")
    assert outcome.status == "failed"
    assert "label's geometry differs from the image's" in outcome.reason
    assert "size [24, 24, 16]" in outcome.reason and "size [30, 24, 16]" in outcome.reason
    assert "resample_label: true" in outcome.reason and not list((tmp_path / "out").glob("c*"))


def test_label_on_another_grid_is_resampled_in_physical_space_when_asked(tmp_path: Path) -> None:
    image, label = blob_case((16, 24, 24))
    full = make_image(label, (1.5,) * 3, (3, 4, 5))
    sub = full[2:22, 3:20, 1:15]  # a sub-box of the label grid (its origin moves), foreground inside it
    assert sub.GetOrigin() != full.GetOrigin() and int(sitk.GetArrayFromImage(sub).sum()) == int(label.sum())
    case = write_pair(tmp_path, "c", make_image(image, (1.5,) * 3, (3, 4, 5)), sub)
    outcome = preprocess_case(case, dataclasses.replace(SETTINGS, resample_label=True), tmp_path / "out")
    assert outcome.status == "done"
    assert any("label resampled onto the image grid" in w for w in outcome.warnings)
    restored = restore_to_original(np.load(tmp_path / "out" / "c_gt.npy"), tmp_path / "out" / "c.json")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(restored), label)


def test_label_that_does_not_overlap_is_rejected(tmp_path: Path) -> None:
    image, label = blob_case()
    case = write_pair(tmp_path, "c", make_image(image), make_image(label, origin=(0, 0, 1000)))
    outcome = preprocess_case(case, dataclasses.replace(SETTINGS, resample_label=True), tmp_path / "out")
    assert outcome.status == "failed"
    assert "do not overlap in physical space" in outcome.reason and "label spans" in outcome.reason


def test_oblique_image_is_resampled_onto_an_axis_aligned_grid(tmp_path: Path) -> None:
    image, label = blob_case((16, 30, 30))
    a = np.deg2rad(25)
    rotation = (np.cos(a), -np.sin(a), 0, np.sin(a), np.cos(a), 0, 0, 0, 1)
    case = write_pair(tmp_path, "c", make_image(image, (1.2, 1.2, 2.0), (0, 0, 0), rotation),
                      make_image(label, (1.2, 1.2, 2.0), (0, 0, 0), rotation))
    assert preprocess_case(case, SETTINGS, tmp_path / "out").status == "done"
    _, gt, meta = load_case(tmp_path / "out", "c")
    assert meta["resampled"]["direction"] == [1, 0, 0, 0, 1, 0, 0, 0, 1]
    restored = sitk.GetArrayFromImage(restore_to_original(gt, meta))
    assert dice(restored > 0, label > 0) > 0.9


def test_unreadable_files_give_clear_reasons(tmp_path: Path) -> None:
    image, _ = blob_case()
    sitk.WriteImage(make_image(image), str(tmp_path / "a.nii"))
    data = (tmp_path / "a.nii").read_bytes()
    (tmp_path / "a.nii").write_bytes(data[: len(data) - 1000])  # ITK would zero-fill the missing voxels
    (tmp_path / "b.nii").write_bytes(b"\0" * 400)
    (tmp_path / "c.mha").write_bytes(np.random.default_rng(1).bytes(3000))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.float32)), str(tmp_path / "flat.nrrd"))
    for name, reason in [("a.nii", "truncated file"), ("b.nii", "not a NIfTI file"),
                         ("c.mha", "cannot read 'c.mha'"), ("missing.nrrd", "does not exist"),
                         ("flat.nrrd", "a 3D image is required")]:
        with pytest.raises(CaseError, match=reason):
            read_image(tmp_path / name)


# ------------------------------------------------------------------------------------- runner and CLI
@pytest.fixture
def synthetic_site(tmp_path: Path, write_site: Callable[..., Path]) -> Path:
    """A site with 5 labelled synthetic cases and 1 unlabelled one (CT, classes 1 and 2)."""
    rows = []
    for i in range(6):
        image, label = blob_case((10 + i, 20, 22), seed=i)
        case = write_pair(tmp_path / "raw", f"p{i}", make_image(image, (1.5, 1.5, 2.0)),
                          make_image(label, (1.5, 1.5, 2.0)) if i < 5 else None)
        rows.append((case.case_id, case.image, case.label))
    write_csv(tmp_path / "cases.csv", rows)
    return write_site([{"name": "syn", "modality": "CT", "format": "csv", "source": "cases.csv",
                        "classes": {1: "organ", 2: "lesion"}, "split": {"val": 0.2, "test": 0.2, "seed": 3}}])


def test_site_run_writes_dataset_json_and_resumes(synthetic_site: Path, catalog: Catalog) -> None:
    config = load_site_config(synthetic_site, catalog=catalog)
    report = preprocess_site(config, SMALL_PLANS, progress=False, catalog=catalog)
    assert report.ok and len(report.done) == 6 and not report.warnings
    out = config.preprocessed_dir / "syn"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["dataset"] == "syn" and meta["modality"] == "CT" and meta["modality_id"] == 0
    assert meta["classes"] == {"1": "organ", "2": "lesion"}
    assert meta["cases"] == [f"p{i}" for i in range(6)]
    assert meta["labelled"] == {f"p{i}": i < 5 for i in range(6)}
    assert sorted(sum(meta["splits"].values(), [])) == meta["cases"]
    assert len(meta["splits"]["val"]) == 1 and len(meta["splits"]["test"]) == 1
    assert "p5" in meta["splits"]["train"]  # unlabelled
    assert meta["sample_weight"] == 1.0 and meta["intensity_aug_prob"] == 0.1
    assert meta["target_spacing"] == [1.5] * 3 and meta["plans"] == json.loads(
        json.dumps(SMALL_PLANS.preprocessing("CT")))
    fg = meta["fingerprint"]["foreground_intensity"]
    assert 40 < fg["mean"] < 140 and fg["n_voxels"] > 0  # soft tissue (40) and lesion (140) HU, not air
    assert meta["fingerprint"]["spacing_xyz"]["median"] == [1.5, 1.5, 2.0]
    assert not (out / "p5_gt.npy").exists() and (out / "p5.npy").exists()
    assert json.loads((config.preprocessed_dir / "report.json").read_text())["counts"] == {
        "done": 6, "skipped": 0, "failed": 0}

    again = preprocess_site(config, SMALL_PLANS, progress=False, catalog=catalog)
    assert len(again.skipped) == 6 and not again.done
    (out / "p2.json").unlink()  # as if a crash hit p2 after its arrays were written
    image, label = blob_case((11, 20, 22), seed=9)  # new content for p1
    sitk.WriteImage(make_image(image, (1.5, 1.5, 2.0)), str(synthetic_site.parent / "raw" / "p1.nii.gz"))
    third = preprocess_site(config, SMALL_PLANS, progress=False, catalog=catalog)
    assert sorted(o.case_id for o in third.done) == ["p1", "p2"] and len(third.skipped) == 4
    wider = dataclasses.replace(SMALL_PLANS, train_margin=3)  # the plan changed: everything re-runs
    assert len(preprocess_site(config, wider, progress=False, catalog=catalog).done) == 6


def test_two_workers_give_the_same_arrays(synthetic_site: Path, catalog: Catalog, tmp_path: Path) -> None:
    config = load_site_config(synthetic_site, catalog=catalog)
    one = preprocess_site(config, SMALL_PLANS, workers=1, progress=False, catalog=catalog)
    first = {p.name: np.load(p) for p in (config.preprocessed_dir / "syn").glob("*.npy")}
    config.work_dir = tmp_path / "work2"
    two = preprocess_site(config, SMALL_PLANS, workers=2, progress=False, catalog=catalog)
    assert one.ok and two.ok and len(two.done) == 6
    for name, array in first.items():
        np.testing.assert_array_equal(np.load(config.preprocessed_dir / "syn" / name), array)


def _die_on_p3(job: _Job) -> CaseOutcome:
    """Job runner of the crash test: the worker processing case p3 dies (as if killed for memory)."""
    if job.case.case_id == "p3":
        os._exit(3)
    return CaseOutcome(job.dataset, job.case.case_id, "done")


def test_a_dying_worker_fails_only_its_case(tmp_path: Path) -> None:
    jobs = [_Job("d", CaseSpec(f"p{i}", tmp_path, None), SETTINGS, tmp_path) for i in range(6)]
    with tqdm(disable=True) as bar:
        outcomes = _run_parallel(jobs, 2, bar, run=_die_on_p3)
    assert [o.case_id for o in outcomes] == [f"p{i}" for i in range(6)]
    assert [o.status for o in outcomes] == ["done"] * 3 + ["failed"] + ["done"] * 2
    assert "worker process crashed" in outcomes[3].reason


def test_splits_are_deterministic_and_explicit_lists_are_kept() -> None:
    cases = [CaseSpec(f"c{i:02d}", Path("x"), Path("y") if i < 20 else None) for i in range(24)]
    split = SplitSpec(val=0.2, test=0.1, seed=5)
    a, b = compute_splits(cases, split), compute_splits(list(reversed(cases)), split)
    assert a == b and len(a["val"]) == 4 and len(a["test"]) == 2
    assert {"c20", "c21", "c22", "c23"} <= set(a["train"])  # unlabelled cases always train
    assert compute_splits(cases, SplitSpec(val=0.2, test=0.1, seed=6)) != a
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(c.case_id for c in cases)
    explicit = compute_splits(cases, SplitSpec(val=["c03"], test=["c01", "c02"]))
    assert explicit["val"] == ["c03"] and explicit["test"] == ["c01", "c02"] and "c00" in explicit["train"]
    catalog_split = compute_splits(cases, SplitSpec(catalog=True), {"val": ["c05", "zz"], "test": ["c06"]})
    assert catalog_split["val"] == ["c05"] and catalog_split["test"] == ["c06"]
    tiny = compute_splits(cases[:2], SplitSpec(val=0.4, test=0.4))
    assert len(tiny["train"]) == 1  # at least one case is left to train


# ---------------------------------------------------------------------------------------- real data
def sarcoma_rows(data: Path) -> list[tuple[str, Path, Path]]:
    root = data / "ibsi_sts_original"
    return [(c, root / c / "CT_image.nii.gz", root / c / "CT_mask.nii.gz") for c in ("STS_002", "STS_003")]


def test_real_failures_are_reported_and_the_rest_done(
    shared_data: Path, tmp_path: Path, write_site: Callable[..., Path], capsys: pytest.CaptureFixture
) -> None:
    rows: list = sarcoma_rows(shared_data)[:1]
    (tmp_path / "garbage.nii.gz").write_bytes(np.random.default_rng(0).bytes(20000))
    real = (shared_data / "ibsi_sts" / "STS_005" / "CT_image.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(real[: len(real) // 2])
    mask = sitk.ReadImage(str(shared_data / "ibsi_sts" / "STS_005" / "CT_mask.nii.gz"))
    mask.SetOrigin([o + d for o, d in zip(mask.GetOrigin(), (0, 0, 1000), strict=True)])  # 1 m away
    sitk.WriteImage(mask, str(tmp_path / "moved_mask.nii.gz"))
    sts = shared_data / "ibsi_sts"
    rows += [("garbage", tmp_path / "garbage.nii.gz", None),
             ("truncated", tmp_path / "truncated.nii.gz", None),
             ("moved", sts / "STS_005" / "CT_image.nii.gz", tmp_path / "moved_mask.nii.gz"),
             ("STS_006", sts / "STS_006" / "CT_image.nii.gz", sts / "STS_006" / "CT_mask.nii.gz")]
    write_csv(tmp_path / "cases.csv", rows)
    site = write_site([{"name": "sts", "modality": "CT", "format": "csv", "source": "cases.csv",
                        "classes": {1: "tumour"}, "split": {"val": 0, "test": 0}}])
    plans = tmp_path / "plans.json"
    plans.write_text(Plans(patch_size=16, train_margin=2).to_json())
    assert cli_main(["preprocess", "--site", str(site), "--plans", str(plans), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "2 done, 0 skipped (up to date), 3 failed" in printed
    report = json.loads((tmp_path / "work" / "preprocessed" / "report.json").read_text())
    reasons = {f["case"]: f["reason"] for f in report["failed"]}
    assert set(reasons) == {"garbage", "truncated", "moved"} and report["ok"] is False
    assert "garbage.nii.gz" in reasons["garbage"] and "corrupt" in reasons["garbage"]
    assert "truncated.nii.gz" in reasons["truncated"] and "truncated" in reasons["truncated"]
    assert "geometry differs" in reasons["moved"] and "origin" in reasons["moved"]
    meta = json.loads((tmp_path / "work" / "preprocessed" / "sts" / "dataset.json").read_text())
    assert meta["cases"] == ["STS_002", "STS_006"] and meta["splits"]["train"] == ["STS_002", "STS_006"]


def test_cli_reports_an_invalid_config_without_traceback(
    tmp_path: Path, write_site: Callable[..., Path], capsys: pytest.CaptureFixture
) -> None:
    site = write_site([{"name": "x", "modality": "XR", "format": "csv", "source": "none.csv"}])
    assert cli_main(["preprocess", "--site", str(site)]) == 2
    err = capsys.readouterr().err
    assert "unknown modality 'XR'" in err and "none.csv" in err and "Traceback" not in err


def test_real_sarcoma_cases_full_resolution(shared_data: Path, tmp_path: Path) -> None:
    settings = PreprocessSettings(modality="CT", classes=(1,), margin=20, min_size=(32, 32, 32))
    for case_id, image, label in sarcoma_rows(shared_data):
        outcome = preprocess_case(CaseSpec(case_id, image, label), settings, tmp_path, dataset="sts")
        assert outcome.status == "done", outcome.reason
        img, gt, meta = load_case(tmp_path, case_id)
        assert meta["original"]["spacing_xyz"] == pytest.approx([0.9765620, 0.9765620, 3.27], abs=1e-5)
        assert meta["resampled"]["spacing_xyz"] == [1.5, 1.5, 1.5] and meta["label_values"] == [1]
        nz = np.nonzero(gt)
        grid_zyx = meta["resampled"]["size_xyz"][::-1]
        for axis, ((lo, hi), (pad_b, _)) in enumerate(zip(meta["crop_zyx"], meta["pad_zyx"], strict=True)):
            first, last = lo + nz[axis].min() - pad_b, lo + nz[axis].max() - pad_b  # in the resampled grid
            assert first - lo == min(20, first)  # 20 voxels kept unless the image ends first
            assert (hi - 1) - last == min(20, grid_zyx[axis] - 1 - last)
        assert np.isfinite(img).all() and -1.2 < img[gt > 0].mean() < 1.5
        assert 0 < meta["foreground"]["mean"] < 100  # a soft-tissue sarcoma in HU
        restored = sitk.GetArrayFromImage(restore_to_original(gt, tmp_path / f"{case_id}.json"))
        assert dice(restored > 0, sitk.GetArrayFromImage(sitk.ReadImage(str(label))) > 0) > 0.9


def test_real_mr_uses_percentile_clipping(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "ibsi_sts_original" / "STS_003"
    settings = PreprocessSettings(modality="MR-T1", classes=(1,), margin=5, min_size=(16, 16, 16))
    case = CaseSpec("mr", root / "MR_T1_image.nii.gz", root / "MR_T1_mask.nii.gz")
    assert preprocess_case(case, settings, tmp_path).status == "done"
    img, gt, meta = load_case(tmp_path, "mr")
    assert meta["intensity"]["scheme"] == "percentile"
    lo, hi = meta["intensity"]["clip"]
    assert lo < hi and img.max() == pytest.approx((hi - meta["intensity"]["mean"]) / meta["intensity"]["std"])


def organ_means_hu(img: np.ndarray, gt: np.ndarray, meta: dict, values: list[int]) -> dict[int, float]:
    hu = img * meta["intensity"]["std"] + meta["intensity"]["mean"]
    return {v: float(hu[gt == v].mean()) for v in values}


def test_totalseg_labels_land_on_the_organs_even_stored_flipped(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "totalseg"
    names = json.loads((root / "classmap.json").read_text())["total"]
    value = {n: int(v) for v, n in names.items()}
    settings = PreprocessSettings(modality="CT", classes=tuple(sorted(value.values())), margin=0,
                                  min_size=(16, 16, 16))
    seg = sitk.ReadImage(str(root / "ct_dicom_seg.nii.gz"))
    # the same label stored with its y axis flipped: reversed rows, direction -y, origin at the last row
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(seg)[:, ::-1, :].copy())
    flipped.SetSpacing(seg.GetSpacing())
    flipped.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    flipped.SetOrigin(seg.TransformIndexToPhysicalPoint((0, seg.GetSize()[1] - 1, 0)))
    sitk.WriteImage(flipped, str(tmp_path / "seg_flipped.nii.gz"))
    image = root / "ct_dicom_image.nii.gz"
    labels = {"plain": root / "ct_dicom_seg.nii.gz", "flipped": tmp_path / "seg_flipped.nii.gz"}
    for name, label in labels.items():
        assert preprocess_case(CaseSpec(name, image, label), settings, tmp_path / "out").status == "done"
    img, gt, meta = load_case(tmp_path / "out", "flipped")
    np.testing.assert_array_equal(gt, np.load(tmp_path / "out" / "plain_gt.npy"))
    organs = ["liver", "spleen", "vertebrae_T12", "autochthon_left"]
    means = organ_means_hu(img, gt, meta, [value[o] for o in organs])
    assert 40 < means[value["liver"]] < 150 and 40 < means[value["spleen"]] < 150
    assert means[value["vertebrae_T12"]] > 150 and -50 < means[value["autochthon_left"]] < 100
    # a naive array read of the flipped file puts the labels elsewhere: the check above can fail
    naive_img = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    naive_gt = sitk.GetArrayFromImage(flipped)
    assert naive_img[naive_gt == value["liver"]].mean() < 0
    assert naive_img[naive_gt == value["autochthon_left"]].mean() < -500


def test_ras_lps_psr_copies_give_the_same_array(shared_data: Path, tmp_path: Path) -> None:
    settings = PreprocessSettings(modality="MR-T1", classes=(1,), target_spacing=(2.0, 2.0, 2.0),
                                  min_size=(16, 16, 16))
    arrays, froms = {}, set()
    for code in ("RAS", "LPS", "PSR"):
        case = CaseSpec(code, shared_data / "unlabelled" / f"niivue_orient_{code}.nii.gz", None)
        assert preprocess_case(case, settings, tmp_path).status == "done"
        img, gt, meta = load_case(tmp_path, code)
        assert gt is None and meta["labelled"] is False
        arrays[code] = img
        froms.add(meta["orientation_applied"]["from"])
    assert froms == {"RAS", "LPS", "PSR"}
    assert arrays["RAS"].shape == arrays["LPS"].shape == arrays["PSR"].shape
    np.testing.assert_allclose(arrays["RAS"], arrays["LPS"], atol=1e-5)
    np.testing.assert_allclose(arrays["PSR"], arrays["LPS"], atol=1e-5)
    raw = [sitk.GetArrayFromImage(read_image(shared_data / "unlabelled" / f"niivue_orient_{c}.nii.gz"))
           for c in ("LPS", "PSR")]
    assert raw[0].shape != raw[1].shape  # the stored arrays really differ


def test_real_dicom_series(shared_data: Path, tmp_path: Path, write_site: Callable[..., Path],
                           catalog: Catalog) -> None:
    series = shared_data / "unlabelled" / "totalseg_ct_dicom_series"
    image = read_image(series)
    assert image.GetSize() == (512, 512, 20) and image.GetSpacing()[2] == pytest.approx(2.0)
    # a one-folder-per-case tree: the series, and the same series with a slice missing
    (tmp_path / "dicom").mkdir()
    shutil.copytree(series, tmp_path / "dicom" / "ct1")
    files = sorted((tmp_path / "dicom" / "ct1").iterdir())
    (tmp_path / "dicom" / "gap").mkdir()
    for f in files[:9] + files[10:]:
        shutil.copy(f, tmp_path / "dicom" / "gap" / f.name)
    site = write_site([{"name": "ctdicom", "modality": "CT", "format": "dicom", "source": "dicom",
                        "classes": {1: "x"}}])
    config = load_site_config(site, catalog=catalog)
    report = preprocess_site(config, SMALL_PLANS, progress=False, catalog=catalog)
    assert [o.case_id for o in report.done] == ["ct1"]
    assert [o.case_id for o in report.failed] == ["gap"] and "not evenly spaced" in report.failed[0].reason
    img, gt, meta = load_case(config.preprocessed_dir / "ctdicom", "ct1")
    assert gt is None and meta["labelled"] is False and meta["crop_zyx"][0] == [0, img.shape[0]]
    # same scan as totalseg/ct_dicom_image.nii.gz (HU, rebuilt at 1.5 mm): same mean intensity
    nifti = preprocess_case(CaseSpec("nii", shared_data / "totalseg" / "ct_dicom_image.nii.gz", None),
                            PreprocessSettings(modality="CT", classes=(1,), min_size=(16, 16, 16)), tmp_path)
    assert nifti.status == "done"
    other = json.loads((tmp_path / "nii.json").read_text())
    assert meta["intensity"]["mean"] == pytest.approx(other["intensity"]["mean"], abs=10)
    assert dataset_cases(config) == ["ct1"]


def dataset_cases(config) -> list[str]:
    return json.loads((config.preprocessed_dir / "ctdicom" / "dataset.json").read_text())["cases"]
