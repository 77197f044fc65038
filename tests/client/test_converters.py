"""Converters of the Hermes datasets' raw layouts (client.converters), each on a tiny tree in that layout.

Every test builds the folder tree the dataset is published in (tiny NIfTI volumes, a tiny DICOM series
with PNG label slices for CHAOS, a 4D cine NIfTI with its information CSV for M&Ms), lists it with the
dataset's converter and checks case ids (against the catalog's split ids), image/label pairing, and for
the datasets with custom reading (CHAOS, M&Ms) that preprocessing puts the right label values on the
right voxels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from client.config import load_site_config
from client.converters import CHAOS_SEQUENCES, chaos_png_to_labels, read_chaos_label
from client.formats import FORMATS, CaseSpec, FormatError, expand_split_lists, list_cases
from client.preprocess import PreprocessSettings, compute_splits, preprocess_case, read_image, read_label
from hermes_model.catalog import Catalog


# ------------------------------------------------------------------------------------------------ helpers
def write_nii(path: Path, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Path:
    """Write ``array`` ((Z, Y, X) or (T, Z, Y, X)) as an image file, creating the folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 4:  # GetImageFromArray would read the last axis as vector components
        image = sitk.JoinSeries([sitk.GetImageFromArray(frame) for frame in array])
    else:
        image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing] + [1.0] * (image.GetDimension() - len(spacing)))
    sitk.WriteImage(image, str(path))
    return path


def tiny(value: int = 0, dtype: type = np.int16) -> np.ndarray:
    return np.full((2, 3, 4), value, dtype)


def pair(folder: Path, image_name: str, label_name: str | None) -> None:
    write_nii(folder / image_name, tiny(7))
    if label_name is not None:
        write_nii(folder / label_name, tiny(1, np.uint8))


def ids(cases: Sequence[CaseSpec]) -> list[str]:
    return [c.case_id for c in cases]


def names(cases: Sequence[CaseSpec]) -> dict[str, tuple[str, str | None]]:
    """case id -> (image path relative name, label file name)."""
    return {c.case_id: (c.image.name, c.label.name if c.label else None) for c in cases}


def catalog_ids(catalog: Catalog, name: str) -> set[str]:
    return {i for v in catalog.dataset(name).split.values() for i in v}


def load_outputs(out: Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(out / f"{case_id}.npy"), np.load(out / f"{case_id}_gt.npy")


def mr_settings(classes: Sequence[int], spacing_xyz: Sequence[float]) -> PreprocessSettings:
    """MR settings that keep the original grid (target spacing = image spacing, linear interpolation)."""
    return PreprocessSettings(modality="MR-T2", classes=tuple(classes), target_spacing=tuple(spacing_xyz),
                              margin=1, min_size=(4, 4, 4), interpolation="linear")


def test_every_catalog_dataset_but_brain_structure_has_a_converter(catalog: Catalog) -> None:
    assert set(catalog.datasets) - {"brain_structure"} <= set(FORMATS)
    assert "brain_structure" not in FORMATS  # layout not established: no guessed converter


# ------------------------------------------------------------------------------------------------ LiTS
def test_lits_pairs_volumes_with_segmentations_across_batches(tmp_path: Path, catalog: Catalog) -> None:
    pair(tmp_path / "Training Batch 1", "volume-0.nii", "segmentation-0.nii")
    pair(tmp_path / "Training Batch 2", "volume-130.nii.gz", "segmentation-130.nii.gz")
    pair(tmp_path / "Training Batch 2", "volume-28.nii", None)
    pair(tmp_path / "Test", "test-volume-3.nii", None)  # the test set is not a training volume
    cases = list_cases("lits", tmp_path)
    assert ids(cases) == ["0", "130", "28"]
    assert names(cases) == {"0": ("volume-0.nii", "segmentation-0.nii"),
                            "130": ("volume-130.nii.gz", "segmentation-130.nii.gz"),
                            "28": ("volume-28.nii", None)}
    assert set(ids(cases)) <= catalog_ids(catalog, "lits")


# ------------------------------------------------------------------------------------------------ KiTS19
def test_kits_case_folders_map_to_numbers(tmp_path: Path, catalog: Catalog) -> None:
    data = tmp_path / "kits19" / "data"
    for n in (0, 1, 209):
        pair(data / f"case_{n:05d}", "imaging.nii.gz", "segmentation.nii.gz")
    pair(data / "case_00210", "imaging.nii.gz", None)  # test case: no segmentation
    (data / "kits.json").write_text("[]")
    cases = list_cases("kits", tmp_path / "kits19")  # the repository root works too
    assert ids(cases) == ["0", "1", "209", "210"]
    assert names(cases)["209"] == ("imaging.nii.gz", "segmentation.nii.gz")
    assert cases[-1].label is None
    assert all(c.image.parent.name == f"case_{int(c.case_id):05d}" for c in cases)
    assert set(ids(cases[:3])) <= catalog_ids(catalog, "kits")


def test_kits_split_catalog_through_the_site_config(tmp_path: Path, catalog: Catalog,
                                                    write_site: Callable[..., Path]) -> None:
    for n in (0, 1, 43):
        pair(tmp_path / "data" / f"case_{n:05d}", "imaging.nii.gz", "segmentation.nii.gz")
    site = write_site([{"name": "kits", "modality": "CT", "format": "kits", "source": "data",
                        "split": "catalog"}])
    ds = load_site_config(site, catalog).dataset("kits")
    splits = compute_splits(ds.cases(), ds.split, catalog.dataset("kits").split)
    assert splits == {"train": ["0"], "val": ["1"], "test": ["43"]}  # as the catalog lists them


def test_kits_missing_imaging_is_reported(tmp_path: Path) -> None:
    (tmp_path / "case_00003").mkdir()
    with pytest.raises(FormatError, match=r"case_00003: no imaging.nii.gz"):
        list_cases("kits", tmp_path)


# ------------------------------------------------------------------------------------------------ AMOS
def test_amos_ct_and_mr_share_the_release_and_split_by_id(tmp_path: Path, catalog: Catalog) -> None:
    root = tmp_path / "amos22"
    pair(root, "imagesTr/amos_0001.nii.gz", "labelsTr/amos_0001.nii.gz")
    pair(root, "imagesVa/amos_0013.nii.gz", "labelsVa/amos_0013.nii.gz")
    pair(root, "imagesTr/amos_0507.nii.gz", "labelsTr/amos_0507.nii.gz")
    pair(root, "imagesVa/amos_0588.nii.gz", None)
    pair(root, "imagesTs/amos_0002.nii.gz", None)  # test images: not listed
    ct, mr = list_cases("amos_ct", tmp_path), list_cases("amos_mr", root)
    assert ids(ct) == ["1", "13"] and ids(mr) == ["507", "588"]
    assert names(ct)["13"] == ("amos_0013.nii.gz", "amos_0013.nii.gz")
    assert ct[1].label is not None and ct[1].label.parent.name == "labelsVa"
    assert mr[1].label is None
    assert set(ids(ct)) <= catalog_ids(catalog, "amos_ct")
    assert set(ids(mr)) <= catalog_ids(catalog, "amos_mr")


def test_amos_without_image_folders_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="neither imagesTr/ nor imagesVa/"):
        list_cases("amos_ct", tmp_path)


# ------------------------------------------------------------------------------------------------ BTCV
def test_bcv_raw_data_training_folders(tmp_path: Path, catalog: Catalog) -> None:
    raw = tmp_path / "Abdomen" / "RawData"
    pair(raw / "Training", "img/img0001.nii.gz", "label/label0001.nii.gz")
    pair(raw / "Training", "img/img0040.nii.gz", "label/label0040.nii.gz")
    pair(raw / "Training", "img/img0002.nii.gz", None)
    pair(raw / "Testing", "img/img0061.nii.gz", None)
    cases = list_cases("bcv", tmp_path)
    assert ids(cases) == ["img0001", "img0002", "img0040"]
    assert names(cases)["img0040"] == ("img0040.nii.gz", "label0040.nii.gz")
    assert names(cases)["img0002"][1] is None
    assert {"img0001", "img0040"} <= catalog_ids(catalog, "bcv")


# ------------------------------------------------------------------------------------------------ StructSeg
def test_structseg_thoracic_and_head_neck(tmp_path: Path, catalog: Catalog) -> None:
    for n in (1, 12):
        pair(tmp_path / "Thoracic_OAR" / str(n), "data.nii.gz", "label.nii.gz")
    pair(tmp_path / "HaN_OAR" / "3", "data.nii.gz", "label.nii.gz")
    thoracic = list_cases("structseg_oar", tmp_path)
    head = list_cases("structseg_head_oar", tmp_path / "HaN_OAR")
    assert ids(thoracic) == ["1", "12"] and ids(head) == ["3"]
    assert all(c.image.parent.parent.name == "Thoracic_OAR" for c in thoracic)
    assert names(head)["3"] == ("data.nii.gz", "label.nii.gz")
    assert set(ids(thoracic)) <= catalog_ids(catalog, "structseg_oar")
    (tmp_path / "HaN_OAR" / "4").mkdir()
    with pytest.raises(FormatError, match="HaN_OAR case 4: no data.nii.gz"):
        list_cases("structseg_head_oar", tmp_path)


# ------------------------------------------------------------------------------------------------ autoPET
def test_autopet_studies_are_numbered_by_date(tmp_path: Path, catalog: Catalog) -> None:
    root = tmp_path / "FDG-PET-CT-Lesions"
    pair(root / "PETCT_0011f3deaf" / "03-02-2003-NA-PET-CT Ganzkoerper-12345", "SUV.nii.gz", "SEG.nii.gz")
    studies = ["12-01-2004-NA-PET-CT-3", "01-15-2003-NA-PET-CT-1", "06-30-2003-NA-PET-CT-2"]
    for study in studies:
        pair(root / "PETCT_fde79b6aa9" / study, "SUV.nii.gz", "SEG.nii.gz")
        write_nii(root / "PETCT_fde79b6aa9" / study / "CTres.nii.gz", tiny())
    cases = list_cases("autopet", tmp_path)
    assert ids(cases) == ["PETCT_0011f3deaf_0", "PETCT_fde79b6aa9_0", "PETCT_fde79b6aa9_1",
                          "PETCT_fde79b6aa9_2"]
    by_id = {c.case_id: c for c in cases}
    assert by_id["PETCT_fde79b6aa9_0"].image.parent.name == studies[1]  # earliest study first
    assert by_id["PETCT_fde79b6aa9_2"].image.parent.name == studies[0]
    assert all(c.image.name == "SUV.nii.gz" and c.label.name == "SEG.nii.gz" for c in cases)
    assert set(ids(cases)) <= catalog_ids(catalog, "autopet")


# ------------------------------------------------------------------------------------------------ M&Ms
MNM_CODE, MNM_ED, MNM_ES = "A4B5U4", 1, 3  # a catalog training subject


def write_mnm(root: Path) -> Path:
    """OpenDataset tree: one labelled subject (4D cine + labels at ED/ES), one unlabelled, and the CSV.

    Frame ED is bright (300) in the box where its label is left ventricle (1); frame ES is bright in
    another box labelled right ventricle (3); the other frames are flat (10).
    """
    t, z, y, x = 5, 4, 12, 12
    image, label = np.full((t, z, y, x), 10, np.int16), np.zeros((t, z, y, x), np.uint8)
    image[MNM_ED, :, 2:6, 2:6], label[MNM_ED, :, 2:6, 2:6] = 300, 1
    image[MNM_ES, :, 6:10, 6:10], label[MNM_ES, :, 6:10, 6:10] = 300, 3
    folder = root / "Training" / "Labeled" / MNM_CODE
    write_nii(folder / f"{MNM_CODE}_sa.nii.gz", image, (1.5, 1.5, 8.0))
    write_nii(folder / f"{MNM_CODE}_sa_gt.nii.gz", label, (1.5, 1.5, 8.0))
    write_nii(root / "Training" / "Unlabeled" / "Z9Z9Z9" / "Z9Z9Z9_sa.nii.gz", image, (1.5, 1.5, 8.0))
    (root / "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv").write_text(
        "External code,VendorName,Vendor,Centre,ED,ES\n"
        f"{MNM_CODE},Siemens,A,1,{MNM_ED},{MNM_ES}\nZ9Z9Z9,Canon,C,5,0,2\n"
    )
    return root


def test_mnm_lists_ed_and_es_frames_grouped_by_subject(tmp_path: Path, catalog: Catalog) -> None:
    cases = list_cases("mnm", write_mnm(tmp_path / "OpenDataset"))
    assert ids(cases) == [f"{MNM_CODE}_ED", f"{MNM_CODE}_ES", "Z9Z9Z9_ED", "Z9Z9Z9_ES"]
    assert [c.frame for c in cases] == [MNM_ED, MNM_ES, 0, 2]
    assert [c.group for c in cases] == [MNM_CODE, MNM_CODE, "Z9Z9Z9", "Z9Z9Z9"]
    assert cases[0].label is not None and cases[0].label.name == f"{MNM_CODE}_sa_gt.nii.gz"
    assert cases[2].label is None
    split = expand_split_lists(cases, catalog.dataset("mnm").split)
    assert split["train"] == [f"{MNM_CODE}_ED", f"{MNM_CODE}_ES"]


def test_mnm_subject_missing_from_the_csv_is_reported(tmp_path: Path) -> None:
    root = write_mnm(tmp_path)
    write_nii(root / "Validation" / "B0B0B0" / "B0B0B0_sa.nii.gz", np.zeros((2, 2, 3, 3), np.int16))
    with pytest.raises(FormatError, match="B0B0B0 is not in the information CSV"):
        list_cases("mnm", root)


def test_mnm_preprocessing_uses_the_listed_frame(tmp_path: Path) -> None:
    cases = {c.case_id: c for c in list_cases("mnm", write_mnm(tmp_path / "OpenDataset"))}
    settings = mr_settings((1, 2, 3), (1.5, 1.5, 8.0))
    out = tmp_path / "out"
    for phase, value in (("ED", 1), ("ES", 3)):
        outcome = preprocess_case(cases[f"{MNM_CODE}_{phase}"], settings, out, dataset="mnm")
        assert outcome.status == "done", outcome.reason
        image, label = load_outputs(out, f"{MNM_CODE}_{phase}")
        assert set(np.unique(label)) == {0, value}
        # the frame's bright box is exactly where its label is
        assert image[label > 0].min() > image[label == 0].max()
    wrong = CaseSpec("wrong", cases[f"{MNM_CODE}_ED"].image, cases[f"{MNM_CODE}_ED"].label, frame=0)
    outcome = preprocess_case(wrong, settings, out, dataset="mnm")
    assert outcome.status == "failed" and "frame 0 of the label is all background" in outcome.reason
    beyond = CaseSpec("beyond", wrong.image, wrong.label, frame=9)
    assert "frame 9 out of range" in preprocess_case(beyond, settings, out).reason


# ------------------------------------------------------------------------------------------------ CHAOS
SLICES, ROWS, COLS, SPACING = 4, 8, 10, (1.5, 1.5, 6.0)
PNG_VALUES = (63, 126, 189, 252)  # liver, right kidney, left kidney, spleen


def _dicom_tags(series_uid: str, k: int, position: Sequence[float]) -> dict[str, str]:
    return {
        "0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0010|0020": "chaos",
        "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": series_uid,
        "0020|0052": "1.2.826.0.1.3680043.2.1125.3", "0020|0013": str(k + 1),
        "0020|0032": "\\".join(f"{v:.4f}" for v in position), "0020|0037": "1\\0\\0\\0\\1\\0",
        "0018|0050": str(SPACING[2]),
    }


def write_chaos_series(folder: Path, series_uid: str, stem: str) -> None:
    """A DICOM series whose file names run from superior to inferior (name order = reversed z order).

    The slice of name index i (0-based) has intensity 100 * c in a box, c = i % 4 + 1, and 50 elsewhere.
    """
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(SLICES):
        k = SLICES - 1 - i  # physical slice (z increasing) held by the i-th file in name order
        pixels = np.full((ROWS, COLS), 50, np.int16)
        pixels[2:6, 3:8] = 100 * (i % 4 + 1)
        image = sitk.GetImageFromArray(pixels)
        image.SetSpacing(SPACING[:2])
        origin = (-7.0, -6.0, 10.0 + k * SPACING[2])
        image.SetOrigin(origin[:2])
        for tag, value in _dicom_tags(series_uid, k, origin).items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{stem}{i + 1:05d}.dcm"))
        writer.Execute(image)


def write_chaos_ground(folder: Path, png_names: Sequence[str]) -> None:
    """PNG slices in name order: the i-th holds organ i % 4 + 1 (PNG value) in the intensity box."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(png_names):
        png = np.zeros((ROWS, COLS), np.uint8)
        png[2:6, 3:8] = PNG_VALUES[i % 4]
        sitk.WriteImage(sitk.GetImageFromArray(png), str(folder / name))


def write_chaos(root: Path) -> Path:
    """Train_Sets/MR with patient 1 (T1-DUAL and T2-SPIR, all labelled) and 22 (no Ground: unlabelled)."""
    mr = root / "Train_Sets" / "MR"
    p1 = mr / "1"
    write_chaos_series(p1 / "T1DUAL/DICOM_anon/InPhase", "1.2.3.11", "IMG-0004-")
    write_chaos_series(p1 / "T1DUAL/DICOM_anon/OutPhase", "1.2.3.12", "IMG-0005-")
    write_chaos_ground(p1 / "T1DUAL/Ground", [f"gt{i:03d}.png" for i in range(SLICES)])  # order pairing
    write_chaos_series(p1 / "T2SPIR/DICOM_anon", "1.2.3.13", "IMG-0002-")
    write_chaos_ground(p1 / "T2SPIR/Ground", [f"IMG-0002-{i + 1:05d}.png" for i in range(SLICES)])
    write_chaos_series(mr / "22" / "T1DUAL/DICOM_anon/InPhase", "1.2.3.21", "IMG-0004-")
    write_chaos_series(mr / "22" / "T1DUAL/DICOM_anon/OutPhase", "1.2.3.22", "IMG-0005-")
    write_chaos_series(mr / "22" / "T2SPIR/DICOM_anon", "1.2.3.23", "IMG-0002-")
    return root


@pytest.fixture(scope="module")
def chaos_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chaos(tmp_path_factory.mktemp("chaos"))


def test_chaos_lists_one_case_per_patient_and_sequence(chaos_root: Path, catalog: Catalog) -> None:
    cases = list_cases("chaos", chaos_root)
    assert ids(cases) == ["1_t1_in", "1_t1_out", "1_t2", "22_t1_in", "22_t1_out", "22_t2"]
    assert [c.label.name if c.label else None for c in cases] == ["Ground"] * 3 + [None] * 3
    assert cases[0].label == cases[1].label == chaos_root / "Train_Sets/MR/1/T1DUAL/Ground"
    assert cases[1].image.name == "OutPhase"
    t2 = list_cases("chaos", chaos_root / "Train_Sets" / "MR", {"sequences": ["t2"]})
    assert ids(t2) == ["1_t2", "22_t2"]
    assert [(c.group, c.sequence, c.label_format) for c in t2] == [("1", "t2", "chaos_png"), ("22", "t2", None)]
    assert t2[0].image.name == "DICOM_anon" and t2[0].label is not None and t2[0].label.name == "Ground"
    assert {c.sequence for c in cases} == set(CHAOS_SEQUENCES) == set(catalog.dataset("chaos").modality_ids)
    split = expand_split_lists(t2, catalog.dataset("chaos").split)
    assert split["train"] == ["1_t2"] and split["val"] == ["22_t2"]


def test_chaos_bad_options_and_slice_counts_are_reported(chaos_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"options.sequences = \['t3'\]"):
        list_cases("chaos", chaos_root, {"sequences": ["t3"]})
    (tmp_path / "MR/6/T2SPIR").mkdir(parents=True)
    with pytest.raises(FormatError, match="CHAOS patient 6: no T2SPIR/DICOM_anon/ folder"):
        list_cases("chaos", tmp_path, {"sequences": "t2"})
    (tmp_path / "MR/6/T2SPIR").rmdir()
    write_chaos_series(tmp_path / "MR/5/T2SPIR/DICOM_anon", "1.2.3.51", "IMG-0002-")
    write_chaos_ground(tmp_path / "MR/5/T2SPIR/Ground", ["a.png"])
    with pytest.raises(FormatError, match="1 PNG slices in T2SPIR/Ground/ for 4 DICOM files"):
        list_cases("chaos", tmp_path, {"sequences": ["t2"]})


def test_chaos_png_values_map_to_classes() -> None:
    png = np.array([[0, 63, 55, 70], [126, 189, 200, 252]], np.uint8)
    assert chaos_png_to_labels(png).tolist() == [[0, 1, 1, 1], [2, 3, 3, 4]]
    with pytest.raises(ValueError, match=r"values \[90\]"):
        chaos_png_to_labels(np.array([[0, 90]], np.uint8))


@pytest.mark.parametrize("case_id", ["1_t1_in", "1_t1_out", "1_t2"])
def test_chaos_label_slices_land_on_their_dicom_slices(chaos_root: Path, case_id: str) -> None:
    case = {c.case_id: c for c in list_cases("chaos", chaos_root)}[case_id]
    image = read_image(case.image)
    label = read_label(case, image)
    assert label.GetSize() == image.GetSize() == (COLS, ROWS, SLICES)
    assert np.allclose(label.GetOrigin(), image.GetOrigin()) and np.allclose(label.GetSpacing(), SPACING)
    img, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    for value in (1, 2, 3, 4):  # every organ sits exactly on the voxels of its intensity
        assert np.array_equal(lab == value, img == 100 * value)


def test_chaos_preprocessing_keeps_organs_on_their_voxels(chaos_root: Path, tmp_path: Path) -> None:
    case = {c.case_id: c for c in list_cases("chaos", chaos_root)}["1_t2"]
    outcome = preprocess_case(case, mr_settings((1, 2, 3, 4), SPACING), tmp_path, dataset="chaos")
    assert outcome.status == "done", outcome.reason
    image, label = load_outputs(tmp_path, "1_t2")
    assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    means = [float(image[label == v].mean()) for v in (1, 2, 3, 4)]
    assert means == sorted(means) and len(set(np.round(means, 4))) == 4  # organ c has intensity 100 c
    assert float(image[label == 0].mean()) < means[0]
    again = preprocess_case(case, mr_settings((1, 2, 3, 4), SPACING), tmp_path, dataset="chaos")
    assert again.status == "skipped"  # the PNG folder is hashed like a DICOM folder


def test_chaos_slice_outside_the_series_fails_the_case(chaos_root: Path, tmp_path: Path) -> None:
    case = {c.case_id: c for c in list_cases("chaos", chaos_root)}["1_t2"]
    image = read_image(case.image)
    image.SetOrigin((-7.0, -6.0, 100.0))  # a series elsewhere: no DICOM file of the case lies on it
    with pytest.raises(ValueError, match="is not the corner of a slice of the series"):
        read_chaos_label(case, image)
    outcome = preprocess_case(CaseSpec("bad", case.image, case.label / "IMG-0002-00001.png",
                                       label_format="chaos_png"), mr_settings((1, 2, 3, 4), SPACING), tmp_path)
    assert outcome.status == "failed"  # a label "folder" that is a file: a clear failure, not a crash


def test_chaos_split_catalog_follows_the_patient(chaos_root: Path, catalog: Catalog,
                                                 write_site: Callable[..., Path]) -> None:
    site = write_site([{"name": "chaos", "modality": "MR-T2", "format": "chaos", "source": str(chaos_root),
                        "split": "catalog", "options": {"sequences": ["t2"]}}])
    ds = load_site_config(site, catalog).dataset("chaos")  # case ids "1_t2" are checked via patient "1"
    cases = ds.cases()
    # Pretend patient 22 is labelled: the catalog lists it under val, so its T2 case must go there.
    labelled = [c if c.label else CaseSpec(c.case_id, c.image, c.image, group=c.group) for c in cases]
    splits = compute_splits(labelled, ds.split, catalog.dataset("chaos").split)
    assert splits == {"train": ["1_t2"], "val": ["22_t2"], "test": []}
