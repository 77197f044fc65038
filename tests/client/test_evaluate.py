"""Tests of ``hermes-evaluate`` (client/evaluate.py) on real sarcoma masks of ``shared/data`` (skipped when
absent) and small synthetic labels: exact values for identical and shifted masks, grids that differ,
label mappings, the paper's 1.5 mm Dice, and failures that do not stop the other cases."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from client.evaluate import ClassSpec, evaluate, evaluate_case, main, parse_labels
from client.preprocess import CaseError
from tests.client.conftest import make_image


def sarcoma_mask(shared_data: Path, case: str = "STS_001") -> sitk.Image:
    return sitk.ReadImage(str(shared_data / "ibsi_sts" / case / "CT_mask.nii.gz"))


def like(array_zyx: np.ndarray, image: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    out.CopyInformation(image)
    return out


def shifted(image: sitk.Image, axis: int, voxels: int) -> sitk.Image:
    """The mask moved by ``voxels`` along array ``axis`` (0 z, 1 y, 2 x) on the same grid."""
    return like(np.roll(sitk.GetArrayFromImage(image), voxels, axis=axis), image)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_mask_against_itself_and_against_shifted_copies(shared_data: Path) -> None:
    ref = sarcoma_mask(shared_data)  # 3 x 3 x 3.27 mm
    (row,) = evaluate_case(ref, ref)
    assert row["class"] == "1" and row["ref_voxels"] == row["pred_voxels"] > 1000
    assert row["dice"] == 1.0 and row["hd95_mm"] == 0.0 and row["surface_dice"] == 1.0
    assert row["dice_paper"] == 1.0
    for axis, voxels, mm in ((2, 1, 3.0), (1, -1, 3.0), (2, 2, 6.0)):
        (row,) = evaluate_case(shifted(ref, axis, voxels), ref, tolerance_mm=2.0)
        assert 0.5 < row["dice"] < 1.0 and 0.5 < row["dice_paper"] < 1.0
        assert row["hd95_mm"] == pytest.approx(mm, abs=1e-4), (axis, voxels)
        assert row["surface_dice"] < 1.0
    # a 3 mm shift is within a 3 mm tolerance everywhere
    (row,) = evaluate_case(shifted(ref, 2, 1), ref, tolerance_mm=3.0)
    assert row["surface_dice"] == pytest.approx(1.0)


def test_prediction_on_another_grid_fails_unless_resampling_is_asked_for(shared_data: Path) -> None:
    ref = sarcoma_mask(shared_data)
    # the same mask stored flipped (rows reversed, y direction negated): identical in physical space
    array = sitk.GetArrayFromImage(ref)
    flipped = sitk.GetImageFromArray(array[:, ::-1, :].copy())
    flipped.SetSpacing(ref.GetSpacing())
    flipped.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    flipped.SetOrigin(ref.TransformIndexToPhysicalPoint((0, ref.GetSize()[1] - 1, 0)))
    (row,) = evaluate_case(flipped, ref)
    assert row["dice"] == 1.0 and row["hd95_mm"] == 0.0 and row["dice_paper"] == 1.0
    naive = like(array[:, ::-1, :], ref)  # the array alone, without its geometry
    assert evaluate_case(naive, ref)[0]["dice"] < 0.9
    # the mask at 1.5 mm (a finer grid): refused by default, nearly the same when resampled back
    fine = sitk.Resample(ref, [s * 2 for s in ref.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                         ref.TransformContinuousIndexToPhysicalPoint((-0.25, -0.25, -0.25)),
                         [s / 2 for s in ref.GetSpacing()], ref.GetDirection(), 0, ref.GetPixelID())
    with pytest.raises(CaseError, match=r"grid differs from the reference's \(prediction: size \[128, 132, 118\]"):
        evaluate_case(fine, ref)
    assert evaluate_case(fine, ref, resample_pred=True)[0]["dice"] > 0.98
    # another patient's mask: other size, same origin: an error naming both sizes
    other = sitk.Image([s + 5 for s in ref.GetSize()], ref.GetPixelID())
    other.SetSpacing(ref.GetSpacing())
    other.SetOrigin(ref.GetOrigin())
    with pytest.raises(CaseError, match="is it paired with the right reference"):
        evaluate_case(other, ref)
    far = sitk.Image(ref)
    far.SetOrigin([o + 1000 for o in ref.GetOrigin()])
    with pytest.raises(CaseError, match="does not overlap the reference"):
        evaluate_case(far, ref, resample_pred=True)


def test_paper_dice_ignores_false_positives_far_from_the_labelled_region(shared_data: Path) -> None:
    ref = sarcoma_mask(shared_data)
    array = sitk.GetArrayFromImage(ref).copy()
    assert not array[:, :, :4].any()  # the tumour lies > 30 mm from the x = 0 face
    array[10:40, 10:40, :4] = 1  # a false positive near that face, outside the reference crop
    (row,) = evaluate_case(like(array, ref), ref)
    assert row["dice"] < 0.9 and row["dice_paper"] == 1.0
    assert row["hd95_mm"] > 30


def test_label_mapping_merged_values_and_classes_absent_from_a_case() -> None:
    ref_arr = np.zeros((16, 20, 24), np.uint8)
    ref_arr[4:10, 5:12, 6:14] = 1
    ref_arr[4:10, 12:16, 6:14] = 2
    pred_arr = np.zeros_like(ref_arr)
    pred_arr[ref_arr == 1] = 7
    pred_arr[ref_arr == 2] = 3
    ref, pred = make_image(ref_arr, (1.0, 1.0, 2.0)), make_image(pred_arr, (1.0, 1.0, 2.0))
    classes = parse_labels({"a": {"pred": 7, "ref": 1}, "b": {"pred": [3], "ref": 2}, "ab": {"pred": [3, 7],
                            "ref": [1, 2]}, "absent": 5})
    assert classes[2] == ClassSpec("ab", (3, 7), (1, 2))
    rows = {r["class"]: r for r in evaluate_case(pred, ref, classes)}
    assert rows["a"]["dice"] == rows["b"]["dice"] == rows["ab"]["dice"] == 1.0
    assert np.isnan(rows["absent"]["dice"]) and np.isnan(rows["absent"]["hd95_mm"])
    # without a mapping, every value is its own class: here they do not match
    by_value = {r["class"]: r for r in evaluate_case(pred, ref)}
    assert sorted(by_value) == ["1", "2", "3", "7"] and by_value["1"]["dice"] == 0.0
    assert np.isnan(by_value["7"]["dice"])  # absent from the reference: undefined, not penalised
    for bad in ({"a": 0}, {"a": {"pred": 1}}, {"a": "liver"}, [], {}):
        with pytest.raises(ValueError, match="--labels"):
            parse_labels(bad)


def test_command_on_folders_writes_the_csv_and_summary_and_reports_failures(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    refs, preds = tmp_path / "ref", tmp_path / "pred"
    refs.mkdir()
    preds.mkdir()
    for case in ("STS_001", "STS_002", "STS_003"):
        sitk.WriteImage(sarcoma_mask(shared_data, case), str(refs / f"{case}.nii.gz"))
    sitk.WriteImage(sarcoma_mask(shared_data, "STS_001"), str(preds / "STS_001.nrrd"))
    sitk.WriteImage(shifted(sarcoma_mask(shared_data, "STS_002"), 2, 1), str(preds / "STS_002.nii.gz"))
    (preds / "STS_003.nii.gz").write_bytes(b"not an image")  # unreadable: fails alone
    sitk.WriteImage(sarcoma_mask(shared_data, "STS_004"), str(preds / "STS_004_prob_1.nii.gz"))  # no ref
    sitk.WriteImage(sarcoma_mask(shared_data, "STS_005"), str(refs / "STS_005.nii.gz"))  # no prediction
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"sarcoma": 1}))
    out = tmp_path / "metrics.csv"
    status = main(["--pred", str(preds), "--ref", str(refs), "--labels", str(labels), "--output", str(out),
                   "--no-progress"])
    assert status == 1
    rows = read_csv(out)
    assert [(r["case"], r["class"]) for r in rows] == [("STS_001", "sarcoma"), ("STS_002", "sarcoma")]
    assert float(rows[0]["dice"]) == 1.0 and float(rows[0]["hd95_mm"]) == 0.0
    assert float(rows[1]["dice"]) < 1.0 and float(rows[1]["hd95_mm"]) == pytest.approx(3.0)
    captured = capsys.readouterr()
    failed = [ln for ln in captured.err.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 2 and any("STS_003" in ln for ln in failed)
    assert any("STS_005" in ln and "no prediction" in ln for ln in failed)
    summary = next(ln for ln in captured.out.splitlines() if ln.startswith("sarcoma"))
    mean_dice = (1.0 + float(rows[1]["dice"])) / 2
    assert summary.split()[1] == "2" and float(summary.split()[2]) == pytest.approx(mean_dice, abs=1e-4)
    # two files are one case; an empty cell marks an undefined metric
    result = evaluate(preds / "STS_001.nrrd", refs / "STS_001.nii.gz", tmp_path / "one.csv",
                      labels={"sarcoma": 1, "other": 2}, progress=False)
    assert result.ok and [r["class"] for r in read_csv(tmp_path / "one.csv")] == ["sarcoma", "other"]
    assert read_csv(tmp_path / "one.csv")[1]["dice"] == ""
    assert main(["--pred", str(preds), "--ref", str(refs / "STS_001.nii.gz"), "--output", str(out)]) == 2
    assert "both be files or both be folders" in capsys.readouterr().err
