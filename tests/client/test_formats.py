"""Tests of the raw-layout listers (client/formats.py) on small trees the tests build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.formats import FORMATS, CaseSpec, FormatError, check_case_id, list_cases, register_format
from tests.client.conftest import write_csv


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


# ------------------------------------------------------------------------------------------------ csv
def test_csv_lists_labelled_and_unlabelled_cases_relative_to_the_file(tmp_path: Path) -> None:
    touch(tmp_path / "img" / "b.nii.gz")
    touch(tmp_path / "img" / "a.nii.gz")
    touch(tmp_path / "lab" / "a.nii.gz")
    (tmp_path / "dicom_b2").mkdir()
    rows = [("b", "img/b.nii.gz", None), ("a", "img/a.nii.gz", "lab/a.nii.gz"), ("b2", "dicom_b2", None)]
    csv = write_csv(tmp_path / "cases.csv", rows)
    cases = list_cases("csv", csv)
    assert [c.case_id for c in cases] == ["a", "b", "b2"]  # sorted by id
    assert cases[0] == CaseSpec("a", tmp_path / "img" / "a.nii.gz", tmp_path / "lab" / "a.nii.gz")
    assert cases[1].label is None
    assert cases[2].image.is_dir()


def test_csv_reports_every_problem_at_once(tmp_path: Path) -> None:
    touch(tmp_path / "a.nii.gz")
    rows = [("a", "a.nii.gz", "missing_label.nii.gz"), ("b", "nope.nii.gz", None), ("", "a.nii.gz", None)]
    csv = write_csv(tmp_path / "cases.csv", rows)
    with pytest.raises(FormatError) as info:
        list_cases("csv", csv)
    text = str(info.value)
    assert len(info.value.problems) == 3
    assert "missing_label.nii.gz" in text and "nope.nii.gz" in text and "line 4" in text


def test_csv_needs_its_columns_and_unique_usable_ids(tmp_path: Path) -> None:
    touch(tmp_path / "a.nii.gz")
    (tmp_path / "cols.csv").write_text("id,image\nx,a.nii.gz\n")
    with pytest.raises(FormatError, match=r"missing column\(s\) \['case', 'label'\]"):
        list_cases("csv", tmp_path / "cols.csv")
    dup = write_csv(tmp_path / "dup.csv", [("a", "a.nii.gz", None), ("a", "a.nii.gz", None),
                                          ("x_gt", "a.nii.gz", None), ("dataset", "a.nii.gz", None)])
    with pytest.raises(FormatError) as info:
        list_cases("csv", dup)
    assert any("appears more than once" in p for p in info.value.problems)
    assert any("'_gt'" in p for p in info.value.problems)
    assert any("reserved" in p for p in info.value.problems)
    with pytest.raises(FormatError, match="no cases found"):
        list_cases("csv", write_csv(tmp_path / "empty.csv", []))


def test_case_id_rules() -> None:
    assert check_case_id("STS_002") is None and check_case_id("la-003.v2") is None
    for bad in ("../x", "a/b", ".hidden", "a b", "x_gt", "report", ""):
        assert check_case_id(bad) is not None, bad


# ------------------------------------------------------------------------------------------------ msd
def test_msd_naming_with_hidden_files_and_unlabelled_case(tmp_path: Path) -> None:
    root = tmp_path / "Task02_Heart"
    (root / "dataset.json").parent.mkdir(parents=True)
    meta = {"name": "LeftAtrium", "labels": {"0": "background", "1": "left atrium"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    for case in ("la_003", "la_004"):
        touch(root / "imagesTr" / f"{case}.nii.gz")
        touch(root / "imagesTr" / f"._{case}.nii.gz")  # macOS resource forks shipped in the MSD tarballs
    touch(root / "labelsTr" / "la_003.nii.gz")
    cases = list_cases("msd", root)
    assert [(c.case_id, c.image.name, c.label.name if c.label else None) for c in cases] == [
        ("la_003", "la_003.nii.gz", "la_003.nii.gz"),
        ("la_004", "la_004.nii.gz", None),
    ]


def test_msd_nnunet_naming_and_file_ending(tmp_path: Path) -> None:
    root = tmp_path / "Dataset001_X"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".mha"}))
    touch(root / "imagesTr" / "case_7_0000.mha")
    touch(root / "imagesTr" / "case_8_0000.mha")
    touch(root / "imagesTr" / "notes.txt")
    touch(root / "labelsTr" / "case_7.mha")
    touch(root / "labelsTr" / "case_8.mha")
    cases = list_cases("msd", root)
    assert [c.case_id for c in cases] == ["case_7", "case_8"]
    assert cases[1].label == root / "labelsTr" / "case_8.mha"
    touch(root / "imagesTr" / "case_7_0001.mha")
    with pytest.raises(FormatError, match="single-channel"):
        list_cases("msd", root)


def test_msd_requires_dataset_json_and_images(tmp_path: Path) -> None:
    with pytest.raises(FormatError) as info:
        list_cases("msd", tmp_path)
    assert len(info.value.problems) == 2


# ---------------------------------------------------------------------------------------------- dicom
def test_dicom_folders_with_label_beside(tmp_path: Path) -> None:
    for case in ("p1", "p2", ".trash"):
        touch(tmp_path / case / "IM0001.dcm")
    touch(tmp_path / "p1_label.nii.gz")
    cases = list_cases("dicom", tmp_path)
    assert [(c.case_id, c.image, c.label) for c in cases] == [
        ("p1", tmp_path / "p1", tmp_path / "p1_label.nii.gz"),
        ("p2", tmp_path / "p2", None),
    ]
    touch(tmp_path / "p1_label.nrrd")
    with pytest.raises(FormatError, match="several label files"):
        list_cases("dicom", tmp_path)


# ------------------------------------------------------------------------------------------- registry
def test_registered_format_is_listed_and_names_are_unique(tmp_path: Path) -> None:
    @register_format("test_flat")
    def flat(source: Path, options: dict) -> list[CaseSpec]:
        return [CaseSpec(p.name.split(".")[0], p, None) for p in source.glob(options.get("pattern", "*"))]

    try:
        touch(tmp_path / "z.nii.gz")
        touch(tmp_path / "y.nrrd")
        assert [c.case_id for c in list_cases("test_flat", tmp_path, {"pattern": "*.nii.gz"})] == ["z"]
        with pytest.raises(ValueError, match="already registered"):
            register_format("test_flat")(flat)
    finally:
        FORMATS.pop("test_flat")
    allowed = r"unknown format 'test_flat'; allowed: \['amos_ct', .*'csv', 'dicom', .*'msd'"
    with pytest.raises(ValueError, match=allowed):
        list_cases("test_flat", tmp_path)
