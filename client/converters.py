"""Converters for the raw layouts of the Hermes datasets: one lister per catalog dataset.

Each lister is registered under the catalog name (``format: <name>`` in a site config, with ``source``
the folder named below) and produces case ids that match the catalog's split lists, so that
``split: catalog`` works. Listers only look at the file tree; every problem found is reported in one
:class:`~client.formats.FormatError`. Layouts, and where they were established:

``lits`` (LiTS, CT)
    ``<source>/**/volume-<n>.nii[.gz]`` with ``segmentation-<n>.nii[.gz]`` beside it (the two
    "Training Batch" folders of the release may be kept or merged). Case id ``"<n>"`` (``volume-7`` ->
    ``"7"``, catalog ``'0'..'130'``). Labels 1 liver, 2 tumour. Source: the LiTS benchmark paper
    (arXiv 1901.04056; 131 training volumes) and the Hermes authors' converter
    (yhygao/universal-medical-image-segmentation, ``dataset_conversion/lits_3d.py``), which reads
    exactly these names; the Codalab page itself was not reachable with the search tools.
``kits`` (KiTS19, CT)
    ``<source>/case_<5 digits>/imaging.nii.gz`` and ``segmentation.nii.gz`` (``source`` is the
    repository's ``data/`` folder, or the repository root). Case id: the number without leading zeros
    (``case_00000`` -> ``"0"``); a case without ``segmentation.nii.gz`` is unlabelled. Labels 0
    background, 1 kidney, 2 tumour. Source: the official repository's README (neheller/kits19).
``amos_ct`` / ``amos_mr`` (AMOS 2022)
    ``<source>/imagesTr/amos_<4 digits>.nii.gz`` with ``labelsTr/`` and ``imagesVa/`` with
    ``labelsVa/`` (``source`` is the ``amos22`` folder of the Zenodo release, record 7155725; the test
    images ``imagesTs/`` have no labels and are not listed). Ids up to 500 are CT, above 500 MR; each
    lister keeps its own. Case id: the number without leading zeros (``amos_0001`` -> ``"1"``).
    Source: the release layout as used by the nnU-Net AMOS converters (which cite the Zenodo record)
    and the Hermes authors' ``amos_3d.py`` (CT below 500); the catalog's lists agree (CT 1..410, MR
    507..600). AMOS MR labels carry no bladder/prostate; should a file hold values 14/15, give
    ``ignore_values: [14, 15]``.
``bcv`` (BTCV, Synapse "Multi-Atlas Labeling Beyond the Cranial Vault", CT)
    ``<source>/Training/img/img<4 digits>.nii.gz`` with ``Training/label/label<4 digits>.nii.gz``
    (``source`` is the unzipped ``RawData`` folder of ``Abdomen/RawData.zip``, or a folder holding it).
    Case id ``"img0001"``. Source: the Synapse download as described by MONAI's BTCV tutorial and many
    users (``RawData/Training/img``, ``RawData/Training/label``), and the Hermes ``bcv_3d.py``.
``structseg_oar`` / ``structseg_head_oar`` (StructSeg 2019 tasks 3 and 1, CT)
    ``<source>/<n>/data.nii.gz`` and ``<n>/label.nii.gz`` (``source`` is the ``Thoracic_OAR`` resp.
    ``HaN_OAR`` folder, or a folder holding it). Case id ``"<n>"`` (1..50). Source: the Hermes
    ``structseg_3d.py`` and other code using the release (``Thoracic_OAR/*/data.nii.gz``); the
    challenge's own page was not reachable with the search tools.
``chaos`` (CHAOS MR: T1-DUAL in/opposed phase and T2-SPIR)
    ``<source>/<patient>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm``, ``T1DUAL/Ground/*.png``,
    ``T2SPIR/DICOM_anon/*.dcm``, ``T2SPIR/Ground/*.png`` (``source`` is ``Train_Sets/MR``, or a folder
    holding ``Train_Sets/MR`` or ``MR``). One case per patient and sequence: ``"<patient>_t1_in"``,
    ``"<patient>_t1_out"``, ``"<patient>_t2"`` with ``group`` the patient id (the catalog lists
    patients) and ``sequence`` the catalog's ``modality_ids`` key. Option ``sequences`` (default all
    three) picks some. The in- and opposed-phase series share the T1 ground truth. The label is the
    stack of PNG slices, read by the ``chaos_png`` label reader: the k-th PNG (name order) belongs to
    the k-th DICOM file (name order) - the CHAOS evaluation code states that slice order comes from the
    image names, not the position tags - and is placed on the image slice through that DICOM file's
    ``ImagePositionPatient``; PNG values 55-70, 110-135, 175-200, 240-255 are liver (1), right kidney
    (2), left kidney (3), spleen (4) (the released files hold 63, 126, 189, 252). Sources: the CHAOS
    data page (chaos.grand-challenge.org/Data), the official evaluation repository
    (emrekavur/CHAOS-evaluation, ``CHAOSmetrics.py``) and code using the Zenodo release (record 3431873).
    CHAOS CT (liver only) is not part of the catalog's ``chaos`` dataset and is not listed.
``mnm`` (M&Ms, cine MR)
    ``<source>/**/<code>/<code>_sa.nii.gz`` (4D: X x Y x Z x T) with ``<code>_sa_gt.nii.gz`` (labels
    at the ED and ES frames only) and the information CSV of the release
    (``*M&Ms_Dataset_Information*.csv`` in ``source``, or option ``info_csv``) with the columns
    ``External code``, ``ED``, ``ES`` (0-based frame indices). Two cases per subject,
    ``"<code>_ED"`` and ``"<code>_ES"``, each with ``frame`` set and ``group`` the subject code (the
    catalog lists subject codes). Labels 1 left ventricle, 2 myocardium, 3 right ventricle. Source: the
    M&Ms challenge paper (Campello et al., IEEE TMI 2021) and code using the open dataset
    (``Training/Labeled``, ``Training/Unlabeled``, ``Validation``, ``Testing``; CSV
    ``211230_M&Ms_Dataset_information_diagnosis_opendataset.csv`` and earlier versions); the ub.edu
    data page was not reachable with the search tools. A label frame that is all background fails the
    case (a wrong index would otherwise pass silently).
``autopet`` (autoPET FDG-PET/CT lesions, PET)
    ``<source>/PETCT_<hash>/<study folder>/SUV.nii.gz`` with ``SEG.nii.gz`` (also ``CTres.nii.gz``,
    ``CT.nii.gz``, ``PET.nii.gz``, unused). The image is the PET in SUV. Case id
    ``"PETCT_<hash>_<k>"`` with k the 0-based index of the study among the patient's studies, ordered
    by the date that starts the study folder name (``MM-DD-YYYY-...``), then by name. Source: the
    dataset record (fdat.uni-tuebingen.de, FDG-PET-CT-Lesions, "Structure and usage"). Caveat: the
    Hermes converter numbered studies in unsorted directory order, so for the 74 catalog patients with
    several studies the k of a given study may differ from theirs; only one catalog patient
    (``PETCT_b5923963ac``) has studies in two different split lists.

Not registered: ``brain_structure``. Its catalog ids (``dlbs_<7 digits>``) and the Hermes converter's
local folders (``{train,valid,test}/image/<name>_img.nii`` with ``mask/<name>_probmask_{graymatter,
whitematter,csf}.nii``, probability maps merged by argmax) do not identify a published release whose
documentation could be found with the search tools, so its layout is not established and no converter
is guessed. Such data can be given with the ``csv`` format after merging the masks into one label.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from client.formats import CaseSpec, FormatError, register_format, register_label_reader

__all__ = [
    "CHAOS_PNG_RANGES",
    "CHAOS_SEQUENCES",
    "list_amos_ct",
    "list_amos_mr",
    "list_autopet",
    "list_bcv",
    "list_chaos",
    "list_kits",
    "list_lits",
    "list_mnm",
    "list_structseg_head_oar",
    "list_structseg_oar",
    "read_chaos_label",
]

NII = (".nii.gz", ".nii")
AMOS_MR_FIRST_ID = 501  # AMOS ids up to 500 are CT, the rest MR
# CHAOS MR ground-truth PNG value ranges (inclusive) -> class value
CHAOS_PNG_RANGES = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))
# catalog sequence key -> (image folder, ground-truth folder), relative to the patient folder
CHAOS_SEQUENCES = {
    "t1_in": ("T1DUAL/DICOM_anon/InPhase", "T1DUAL/Ground"),
    "t1_out": ("T1DUAL/DICOM_anon/OutPhase", "T1DUAL/Ground"),
    "t2": ("T2SPIR/DICOM_anon", "T2SPIR/Ground"),
}


# ------------------------------------------------------------------------------------------------ helpers
def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FormatError([f"{what}: {str(path)!r} is not a folder"])


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _first_existing(paths: Iterable[Path]) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def _nifti(folder: Path, stem: str) -> Path | None:
    """``<folder>/<stem>.nii.gz`` or ``.nii``, whichever exists."""
    return _first_existing(folder / f"{stem}{ext}" for ext in NII)


def _descend(source: Path, candidates: Sequence[str]) -> Path:
    """``source`` or the first of its sub-paths ``candidates`` that is a folder."""
    for rel in candidates:
        if (source / rel).is_dir():
            return source / rel
    return source


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _number_id(digits: str) -> str:
    return str(int(digits))


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise FormatError(problems)


# ------------------------------------------------------------------------------------------------ LiTS
_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")


@register_format("lits")
def list_lits(source: Path, options: Mapping[str, Any]) -> list[CaseSpec]:
    """LiTS: ``**/volume-<n>.nii[.gz]`` with ``segmentation-<n>.nii[.gz]`` beside; case id ``"<n>"``."""
    _require_dir(source, "lits source")
    cases, problems, seen = [], [], {}
    for path in sorted(source.rglob("volume-*.nii*")):
        match = _LITS_VOLUME.match(path.name)
        if match is None or path.name.startswith("."):
            continue
        case_id = _number_id(match.group(1))
        if case_id in seen:
            problems.append(f"LiTS volume {case_id} found twice: {seen[case_id]} and {path}")
            continue
        seen[case_id] = path
        cases.append(CaseSpec(case_id, path, _nifti(path.parent, f"segmentation-{match.group(1)}")))
    _raise_if(problems)
    return cases


# ------------------------------------------------------------------------------------------------ KiTS19
_KITS_CASE = re.compile(r"^case_(\d{5})$")


@register_format("kits")
def list_kits(source: Path, options: Mapping[str, Any]) -> list[CaseSpec]:
    """KiTS19: ``case_<5 digits>/imaging.nii.gz`` (+ ``segmentation.nii.gz``); ``case_00012`` -> ``"12"``."""
    _require_dir(source, "kits source")
    root = _descend(source, ["data"])
    cases, problems = [], []
    for folder in _visible_dirs(root):
        match = _KITS_CASE.match(folder.name)
        if match is None:
            continue
        image = _nifti(folder, "imaging")
        if image is None:
            problems.append(f"{folder.name}: no imaging.nii.gz")
            continue
        cases.append(CaseSpec(_number_id(match.group(1)), image, _nifti(folder, "segmentation")))
    _raise_if(problems)
    return cases


# ------------------------------------------------------------------------------------------------ AMOS
_AMOS_FILE = re.compile(r"^amos_(\d{4})\.nii\.gz$")


def _list_amos(source: Path, keep: Callable[[int], bool]) -> list[CaseSpec]:
    _require_dir(source, "amos source")
    root = _descend(source, ["amos22"])
    pairs = [("imagesTr", "labelsTr"), ("imagesVa", "labelsVa")]
    if not any((root / images).is_dir() for images, _ in pairs):
        raise FormatError([f"amos source {str(root)!r} has neither imagesTr/ nor imagesVa/"])
    cases = []
    for images, labels in pairs:
        if not (root / images).is_dir():
            continue
        for path in sorted((root / images).iterdir()):
            match = _AMOS_FILE.match(path.name)
            if match is None or not keep(int(match.group(1))):
                continue
            label = root / labels / path.name
            cases.append(CaseSpec(_number_id(match.group(1)), path, label if label.is_file() else None))
    return cases


@register_format("amos_ct")
def list_amos_ct(source: Path, options: Mapping[str, Any]) -> list[CaseSpec]:
    """AMOS 2022 CT cases (ids up to 500) of ``imagesTr``/``imagesVa``; ``amos_0001`` -> ``"1"``."""
    return _list_amos(source, lambda n: n < AMOS_MR_FIRST_ID)


@register_format("amos_mr")
def list_amos_mr(source: Path, options: Mapping[str, Any]) -> list[CaseSpec]:
    """AMOS 2022 MR cases (ids above 500) of ``imagesTr``/``imagesVa``; ``amos_0507`` -> ``"507"``."""
    return _list_amos(source, lambda n: n >= AMOS_MR_FIRST_ID)


# ------------------------------------------------------------------------------------------------ BTCV
_BCV_IMAGE = re.compile(r"^img(\d{4})\.nii\.gz$")


@register_format("bcv")
def list_bcv(source: Path, options: Mapping[str, Any]) -> list[CaseSpec]:
    """BTCV: ``Training/img/img<4 digits>.nii.gz`` with ``Training/label/label<4 digits>.nii.gz``."""
    _require_dir(source, "bcv source")
    root = _descend(source, ["RawData", "Abdomen/RawData"])
    folder = root / "Training" / "img"
    _require_dir(folder, "bcv source (the RawData folder, holding Training/img)")
    cases = []
    for path in sorted(folder.iterdir()):
        match = _BCV_IMAGE.match(path.name)
        if match is None:
            continue
        label = root / "Training" / "label" / f"label{match.group(1)}.nii.gz"
        cases.append(CaseSpec(f"img{match.group(1)}", path, label if label.is_file() else None))
    return cases


# ------------------------------------------------------------------------------------------------ StructSeg
def _list_structseg(source: Path, task_folder: str) -> list[CaseSpec]:
    _require_dir(source, "structseg source")
    root = _descend(source, [task_folder])
    cases, problems = [], []
    for folder in _visible_dirs(root):
        if not folder.name.isdigit():
            continue
        image = _nifti(folder, "data")
        if image is None:
            problems.append(f"{task_folder} case {folder.name}: no data.nii.gz")
            continue
        cases.append(CaseSpec(_number_id(folder.name), image, _nifti(folder, "label")))
    _raise_if(problems)
    return cases


@register_format("structseg_oar")
def list_structseg_oar(source: Path, options: Mapping[str, Any]) -> list[CaseSpec]:
    """StructSeg 2019 thoracic OARs: ``Thoracic_OAR/<n>/data.nii.gz`` and ``label.nii.gz``."""
    return _list_structseg(source, "Thoracic_OAR")


@register_format("structseg_head_oar")
def list_structseg_head_oar(source: Path, options: Mapping[str, Any]) -> list[CaseSpec]:
    """StructSeg 2019 head-and-neck OARs: ``HaN_OAR/<n>/data.nii.gz`` and ``label.nii.gz``."""
    return _list_structseg(source, "HaN_OAR")


# ------------------------------------------------------------------------------------------------ CHAOS
def _files(folder: Path, suffix: str) -> list[Path]:
    """Visible files of ``folder`` ending in ``suffix`` (case-insensitive), in natural name order."""
    found = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
             and p.name.lower().endswith(suffix)]
    return sorted(found, key=lambda p: _natural_key(p.name))


def _chaos_sequences(options: Mapping[str, Any]) -> list[str]:
    wanted = options.get("sequences", list(CHAOS_SEQUENCES))
    if isinstance(wanted, str):
        wanted = [wanted]
    bad = [s for s in wanted if s not in CHAOS_SEQUENCES] if isinstance(wanted, list) else [wanted]
    if bad or not wanted:
        raise FormatError([
            f"options.sequences = {wanted!r}: a non-empty list of {list(CHAOS_SEQUENCES)} is required"
        ])
    return list(dict.fromkeys(wanted))


def _chaos_case(patient: Path, sequence: str, problems: list[str]) -> CaseSpec | None:
    image_rel, ground_rel = CHAOS_SEQUENCES[sequence]
    image, ground = patient / image_rel, patient / ground_rel
    if not image.is_dir():
        problems.append(f"CHAOS patient {patient.name}: no {image_rel}/ folder")
        return None
    n_dicom = len(_files(image, ".dcm"))
    if n_dicom == 0:
        problems.append(f"CHAOS patient {patient.name}: no .dcm files in {image_rel}/")
        return None
    label = ground if ground.is_dir() else None
    if label is not None and len(_files(ground, ".png")) != n_dicom:
        problems.append(f"CHAOS patient {patient.name}: {len(_files(ground, '.png'))} PNG slices in "
                        f"{ground_rel}/ for {n_dicom} DICOM files in {image_rel}/")
        return None
    return CaseSpec(f"{patient.name}_{sequence}", image, label, group=patient.name, sequence=sequence,
                    label_format="chaos_png" if label is not None else None)


@register_format("chaos")
def list_chaos(source: Path, options: Mapping[str, Any]) -> list[CaseSpec]:
    """CHAOS MR: one case per patient and sequence (``"<patient>_t1_in"``, ``"_t1_out"``, ``"_t2"``).

    Options:
        sequences: the sequences to list, a subset of ``["t1_in", "t1_out", "t2"]`` (default all).
    """
    sequences = _chaos_sequences(options)
    _require_dir(source, "chaos source")
    root = _descend(source, ["Train_Sets/MR", "CHAOS_Train_Sets/Train_Sets/MR", "MR"])
    cases, problems = [], []
    for patient in _visible_dirs(root):
        if not patient.name.isdigit():
            continue
        for sequence in sequences:
            case = _chaos_case(patient, sequence, problems)
            if case is not None:
                cases.append(case)
    _raise_if(problems)
    return cases


def chaos_png_to_labels(png: np.ndarray) -> np.ndarray:
    """CHAOS MR ground-truth PNG values -> class values 0..4 (uint8, same shape).

    Raises:
        ValueError: a value is neither 0 nor in one of :data:`CHAOS_PNG_RANGES` (the values are listed).
    """
    out = np.zeros(png.shape, np.uint8)
    known = png == 0
    for low, high, value in CHAOS_PNG_RANGES:
        inside = (png >= low) & (png <= high)
        out[inside] = value
        known |= inside
    if not known.all():
        bad = np.unique(png[~known])[:10].tolist()
        raise ValueError(f"CHAOS ground truth has values {bad} outside 0 and the organ ranges "
                         f"{[(lo, hi) for lo, hi, _ in CHAOS_PNG_RANGES]}")
    return out


def _slice_index(image: sitk.Image, dicom: Path) -> int:
    """Index along z of the image slice that DICOM file ``dicom`` holds (from its ImagePositionPatient)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(dicom))
    reader.ReadImageInformation()
    if not reader.HasMetaDataKey("0020|0032"):
        raise ValueError(f"{dicom.name}: no ImagePositionPatient (0020,0032) to place its label slice")
    position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
    index = np.array(image.TransformPhysicalPointToContinuousIndex(position))
    k = int(round(index[2]))
    if np.any(np.abs(index - [0.0, 0.0, k]) > 0.05) or not 0 <= k < image.GetSize()[2]:
        raise ValueError(f"{dicom.name}: its position {position} is not the corner of a slice of the series")
    return k


def _read_png_slice(path: Path, shape_yx: tuple[int, int]) -> np.ndarray:
    png = sitk.ReadImage(str(path))
    if png.GetNumberOfComponentsPerPixel() != 1 or png.GetDimension() != 2:
        raise ValueError(f"{path.name}: a single-channel 2D PNG is required")
    array = sitk.GetArrayFromImage(png)
    if array.shape != shape_yx:
        raise ValueError(f"{path.name}: {array.shape[1]} x {array.shape[0]} pixels, the DICOM slices have "
                         f"{shape_yx[1]} x {shape_yx[0]}")
    return array


def _pair_slices(dicoms: list[Path], pngs: list[Path]) -> list[tuple[Path, Path]]:
    """PNG slice of each DICOM file: by equal stem when every stem matches, else by name order."""
    by_stem = {p.stem: p for p in pngs}
    if len(by_stem) == len(dicoms) and all(d.stem in by_stem for d in dicoms):
        return [(d, by_stem[d.stem]) for d in dicoms]
    if len(dicoms) != len(pngs):
        raise ValueError(f"{len(pngs)} PNG label slices for {len(dicoms)} DICOM files")
    return list(zip(dicoms, pngs, strict=True))


@register_label_reader("chaos_png")
def read_chaos_label(case: CaseSpec, image: sitk.Image) -> sitk.Image:
    """The CHAOS label volume of ``case`` on the grid of its DICOM series ``image``.

    Args:
        case: a CHAOS case; ``case.image`` is the DICOM folder, ``case.label`` the ``Ground`` folder.
        image: the series read from ``case.image`` (any slice order: each PNG is placed through the
            position of its DICOM file).

    Returns:
        uint8 label image (values 0..4) with the geometry of ``image``; array shape (Z, Y, X).

    Raises:
        ValueError: slice counts differ, a slice does not belong to the series, or unknown values.
    """
    if case.label is None:
        raise ValueError(f"case {case.case_id!r} has no label folder")
    dicoms, pngs = _files(case.image, ".dcm"), _files(case.label, ".png")
    size_x, size_y, size_z = image.GetSize()
    label = np.zeros((size_z, size_y, size_x), np.uint8)
    filled = set()
    for dicom, png in _pair_slices(dicoms, pngs):
        k = _slice_index(image, dicom)
        if k in filled:
            raise ValueError(f"{dicom.name}: two DICOM files lie on slice {k}")
        filled.add(k)
        label[k] = chaos_png_to_labels(_read_png_slice(png, (size_y, size_x)))
    out = sitk.GetImageFromArray(label)
    out.CopyInformation(image)
    return out


# ------------------------------------------------------------------------------------------------ M&Ms
def _mnm_info_csv(source: Path, options: Mapping[str, Any]) -> Path:
    if "info_csv" in options:
        path = source / str(options["info_csv"])
        if not path.is_file():
            raise FormatError([f"options.info_csv: {str(path)!r} does not exist"])
        return path
    found = sorted(p for p in source.glob("*.csv") if "m&ms_dataset_information" in p.name.lower())
    if len(found) != 1:
        raise FormatError([
            f"mnm source {str(source)!r}: expected one '*M&Ms_Dataset_Information*.csv', found "
            f"{[p.name for p in found]}; name it with options.info_csv"
        ])
    return found[0]


def _mnm_frames(path: Path) -> dict[str, tuple[int, int]]:
    """``{subject code: (ED, ES)}`` from the release's information CSV."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    header = [h.strip() for h in (rows[0].keys() if rows else [])]
    missing = [c for c in ("External code", "ED", "ES") if c not in header]
    if missing:
        raise FormatError([f"{path.name}: missing column(s) {missing}; found {header}"])
    frames, problems = {}, []
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        try:
            frames[row["External code"]] = (int(row["ED"]), int(row["ES"]))
        except ValueError:
            problems.append(f"{path.name} line {line}: ED/ES must be frame numbers, got "
                            f"{row['ED']!r}/{row['ES']!r}")
    _raise_if(problems)
    return frames


@register_format("mnm")
def list_mnm(source: Path, options: Mapping[str, Any]) -> list[CaseSpec]:
    """M&Ms: two cases per subject, ``"<code>_ED"`` and ``"<code>_ES"`` (frames from the info CSV).

    Options:
        info_csv: the information CSV, relative to ``source`` (default: the one
            ``*M&Ms_Dataset_Information*.csv`` in ``source``).
    """
    _require_dir(source, "mnm source")
    frames = _mnm_frames(_mnm_info_csv(source, options))
    cases, problems, seen = [], [], {}
    for image in sorted(source.rglob("*_sa.nii.gz")):
        code = image.name[: -len("_sa.nii.gz")]
        if image.parent.name != code or code.startswith("."):
            continue
        if code in seen:
            problems.append(f"M&Ms subject {code} found twice: {seen[code]} and {image.parent}")
            continue
        seen[code] = image.parent
        if code not in frames:
            problems.append(f"M&Ms subject {code} is not in the information CSV")
            continue
        label = image.parent / f"{code}_sa_gt.nii.gz"
        for phase, frame in zip(("ED", "ES"), frames[code], strict=True):
            cases.append(CaseSpec(f"{code}_{phase}", image, label if label.is_file() else None,
                                  group=code, frame=frame))
    _raise_if(problems)
    return cases


# ------------------------------------------------------------------------------------------------ autoPET
_AUTOPET_PATIENT = re.compile(r"^PETCT_[0-9a-f]+$")
_STUDY_DATE = re.compile(r"^(\d{2})-(\d{2})-(\d{4})")


def _study_order(folder: Path) -> tuple:
    """Sort key of a study folder: its leading ``MM-DD-YYYY`` date (undated last), then its name."""
    match = _STUDY_DATE.match(folder.name)
    if match is None:
        return (1, 0, 0, 0, folder.name)
    month, day, year = (int(g) for g in match.groups())
    return (0, year, month, day, folder.name)


@register_format("autopet")
def list_autopet(source: Path, options: Mapping[str, Any]) -> list[CaseSpec]:
    """autoPET: ``PETCT_<hash>/<study>/SUV.nii.gz`` (+ ``SEG.nii.gz``); case ``"PETCT_<hash>_<k>"``."""
    _require_dir(source, "autopet source")
    root = _descend(source, ["FDG-PET-CT-Lesions"])
    cases, problems = [], []
    for patient in _visible_dirs(root):
        if not _AUTOPET_PATIENT.match(patient.name):
            continue
        for k, study in enumerate(sorted(_visible_dirs(patient), key=_study_order)):
            image = study / "SUV.nii.gz"
            if not image.is_file():
                problems.append(f"{patient.name}/{study.name}: no SUV.nii.gz")
                continue
            label = study / "SEG.nii.gz"
            cases.append(CaseSpec(f"{patient.name}_{k}", image, label if label.is_file() else None))
    _raise_if(problems)
    return cases
