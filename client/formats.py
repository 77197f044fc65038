"""Raw dataset layouts: each format lists the cases (image, optional label) of a dataset's ``source``.

A format is a function ``lister(source: Path, options: Mapping) -> list[CaseSpec]`` registered in
:data:`FORMATS` under the name a site config gives as ``format: <name>``. Listers only look at the
file tree (cheap, no image is read); every problem they find is reported in one :class:`FormatError`.
Converters for the raw layouts of other datasets are added with :func:`register_format`.

Built-in formats:

``csv``
    ``source`` is a CSV file with the columns ``case,image,label`` (header row required). ``label`` may
    be empty (unlabelled case). Relative paths are relative to the CSV file's folder. ``image`` may be
    an image file (NIfTI, NRRD, MHA, ...) or a folder holding one DICOM series.
``msd``
    ``source`` is a Medical Segmentation Decathlon / nnU-Net raw dataset folder: ``dataset.json``,
    ``imagesTr/`` and ``labelsTr/``. Images are named ``<case>.nii.gz`` (MSD) or ``<case>_0000.nii.gz``
    (nnU-Net; only single-channel datasets are supported); the file ending comes from
    ``dataset.json``'s ``file_ending`` when present, else ``.nii.gz``. The label of a case is
    ``labelsTr/<case><ending>``; a case without one is unlabelled. Hidden files (the ``._*`` files of
    the MSD archives) are ignored.
``dicom``
    ``source`` is a folder with one sub-folder per case (the case id is the sub-folder's name), each
    holding one DICOM series. The optional label of a case is a file *beside* its folder named
    ``<case>_label.nii.gz`` (or ``.nii``, ``.nrrd``, ``.mha``).

Case ids must be usable as file names: letters, digits, ``.``, ``_`` and ``-``, not starting with
``.``, not ending with ``_gt`` and not ``dataset`` or ``report`` (those names are taken by the
preprocessed output).

Converters for the raw layouts of the Hermes datasets live in :mod:`client.converters` (imported at the
end of this module, so they are registered whenever formats are used). Some of those layouts need more
than "an image file or a DICOM folder" per case; the optional :class:`CaseSpec` fields say how to read
them: ``frame`` (one frame of a 4D image and label), ``label_format`` (a label stored in another form,
read by a function registered with :func:`register_label_reader`), ``sequence`` (the catalog's
``modality_ids`` key of a multi-sequence dataset) and ``group`` (the subject id under which the catalog's
split lists name a case that is one of several per subject, see :func:`expand_split_lists`).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FORMATS",
    "LABEL_READERS",
    "CaseSpec",
    "FormatError",
    "check_case_id",
    "expand_split_lists",
    "list_cases",
    "register_format",
    "register_label_reader",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")  # what SimpleITK reads as one file
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_CASE_ID = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9._\-]*$")
_RESERVED_IDS = frozenset({"dataset", "report"})


class FormatError(ValueError):
    """A dataset source does not follow its format; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class CaseSpec:
    """One case of a dataset.

    Attributes:
        case_id: unique id within the dataset (used as file name of the preprocessed output).
        image: an image file, or a folder holding one DICOM series.
        label: the label image file, or ``None`` for an unlabelled case (a folder when ``label_format``
            says so).
        group: the subject id that the catalog's split lists use for this case when a subject gives
            several cases (CHAOS sequences, M&Ms ED/ES frames); ``None``: the case id itself.
        sequence: for a dataset of several MR sequences, the key of the catalog's ``modality_ids``
            (e.g. ``"t2"``); ``None`` otherwise.
        frame: index (0-based) along the 4th axis of a 4D image and label (cine MR); ``None`` for 3D.
        label_format: name of a reader in :data:`LABEL_READERS` for a label that is not an image file
            (e.g. ``"chaos_png"``, a folder of PNG slices); ``None``: an ordinary label image.
    """

    case_id: str
    image: Path
    label: Path | None = None
    group: str | None = None
    sequence: str | None = None
    frame: int | None = None
    label_format: str | None = None


Lister = Callable[[Path, Mapping[str, Any]], list[CaseSpec]]
FORMATS: dict[str, Lister] = {}
# label_format -> reader(case, image) returning the label on the image grid (a SimpleITK image); a reader
# raises ValueError with the reason when the label cannot be read
LABEL_READERS: dict[str, Callable[[CaseSpec, Any], Any]] = {}


def register_format(name: str) -> Callable[[Lister], Lister]:
    """Decorator registering ``lister`` as format ``name`` (``format: <name>`` in a site config)."""

    def decorate(lister: Lister) -> Lister:
        if name in FORMATS:
            raise ValueError(f"format {name!r} is already registered")
        FORMATS[name] = lister
        return lister

    return decorate


def register_label_reader(name: str) -> Callable[[Callable], Callable]:
    """Decorator registering ``reader(case, image) -> label image`` as ``CaseSpec.label_format`` ``name``."""

    def decorate(reader: Callable) -> Callable:
        if name in LABEL_READERS:
            raise ValueError(f"label reader {name!r} is already registered")
        LABEL_READERS[name] = reader
        return reader

    return decorate


def expand_split_lists(cases: Sequence[CaseSpec], lists: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Split lists of subject ids (e.g. the catalog's) as lists of the case ids of ``cases``.

    A case is listed under every key whose list holds its ``group`` (or its case id when it has no
    group): the CHAOS case ``"22_t2"`` (group ``"22"``) follows subject ``"22"``.

    Args:
        cases: the cases of a dataset.
        lists: e.g. ``{"train": [...], "val": [...], "test": [...]}`` of subject ids.

    Returns:
        The same keys, each with the sorted case ids whose subject is listed there.
    """
    out: dict[str, list[str]] = {}
    for key, ids in lists.items():
        wanted = set(ids)
        out[key] = sorted(c.case_id for c in cases if (c.group or c.case_id) in wanted)
    return out


def check_case_id(case_id: str) -> str | None:
    """The reason ``case_id`` cannot be used, or ``None`` when it is fine."""
    if not _CASE_ID.match(case_id):
        return (
            f"case id {case_id!r} must consist of letters, digits, '.', '_' and '-' and not start with '.'"
        )
    if case_id.endswith("_gt"):
        return f"case id {case_id!r} must not end with '_gt' (taken by label files)"
    if case_id in _RESERVED_IDS:
        return f"case id {case_id!r} is reserved (allowed: anything but {sorted(_RESERVED_IDS)})"
    return None


def list_cases(format: str, source: str | Path, options: Mapping[str, Any] | None = None) -> list[CaseSpec]:
    """The cases of a dataset stored in layout ``format`` at ``source``, sorted by case id.

    Raises:
        ValueError: unknown format.
        FormatError: the source does not follow the format (all problems listed), a case id is unusable or
            repeated, or no case was found.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; allowed: {sorted(FORMATS)}")
    cases = FORMATS[format](Path(source), options or {})
    problems = [p for c in cases if (p := check_case_id(c.case_id)) is not None]
    seen: set[str] = set()
    for case in cases:
        if case.case_id in seen:
            problems.append(f"case id {case.case_id!r} appears more than once")
        seen.add(case.case_id)
    if not cases:
        problems.append(f"no cases found in {str(source)!r} (format {format!r})")
    if problems:
        raise FormatError(problems)
    return sorted(cases, key=lambda c: c.case_id)


def _strip_suffix(name: str, suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


# ------------------------------------------------------------------------------------------------ csv
@register_format("csv")
def list_csv(source: Path, options: Mapping[str, Any]) -> list[CaseSpec]:
    """Cases of a CSV file with columns ``case,image,label`` (paths relative to the file's folder)."""
    if not source.is_file():
        raise FormatError([f"csv file {str(source)!r} does not exist"])
    with source.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
        header = rows[0].keys() if rows else []
    missing = [c for c in ("case", "image", "label") if c not in header]
    if rows and missing:
        raise FormatError(
            [f"{source.name}: missing column(s) {missing}; required: ['case', 'image', 'label']"]
        )
    cases, problems = [], []
    for line, row in enumerate(rows, start=2):
        case_id, image, label = ((row.get(k) or "").strip() for k in ("case", "image", "label"))
        where = f"{source.name} line {line}"
        if not case_id or not image:
            problems.append(f"{where}: 'case' and 'image' must not be empty")
            continue
        image_path = source.parent / image
        label_path = source.parent / label if label else None
        if not image_path.exists():
            problems.append(f"{where}: image {str(image_path)!r} does not exist")
        if label_path is not None and not label_path.is_file():
            problems.append(f"{where}: label {str(label_path)!r} does not exist")
        cases.append(CaseSpec(case_id, image_path, label_path))
    if problems:
        raise FormatError(problems)
    return cases


# ------------------------------------------------------------------------------------------------ msd
@register_format("msd")
def list_msd(source: Path, options: Mapping[str, Any]) -> list[CaseSpec]:
    """Cases of an MSD / nnU-Net raw folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``)."""
    problems = [f"{str(source / p)!r} does not exist" for p in ("dataset.json", "imagesTr")
                if not (source / p).exists()]
    if problems:
        raise FormatError(problems)
    try:
        meta = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FormatError([f"{source / 'dataset.json'}: not readable JSON ({exc})"]) from exc
    ending = meta.get("file_ending", ".nii.gz") if isinstance(meta, dict) else ".nii.gz"
    images = sorted(p for p in (source / "imagesTr").iterdir() if not p.name.startswith(".") and p.is_file())
    stems = {}
    for path in images:
        stem = _strip_suffix(path.name, (ending,))
        if stem is not None:
            stems[stem] = path
    nnunet = bool(stems) and all(re.search(r"_\d{4}$", s) for s in stems)
    cases = []
    for stem, path in stems.items():
        case_id = stem
        if nnunet:
            case_id, channel = stem[:-5], stem[-4:]
            if channel != "0000":
                problems.append(
                    f"{path.name}: channel {channel}; only single-channel (_0000) data is supported"
                )
                continue
        label = source / "labelsTr" / f"{case_id}{ending}"
        cases.append(CaseSpec(case_id, path, label if label.is_file() else None))
    if problems:
        raise FormatError(problems)
    return cases


# ---------------------------------------------------------------------------------------------- dicom
@register_format("dicom")
def list_dicom(source: Path, options: Mapping[str, Any]) -> list[CaseSpec]:
    """Cases of a folder with one DICOM-series sub-folder per case (label ``<case>_label.nii.gz`` beside)."""
    if not source.is_dir():
        raise FormatError([f"dicom source {str(source)!r} is not a folder"])
    cases, problems = [], []
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        labels = [source / f"{folder.name}_label{s}" for s in LABEL_SUFFIXES]
        found = [p for p in labels if p.is_file()]
        if len(found) > 1:
            problems.append(f"case {folder.name!r} has several label files: {[p.name for p in found]}")
            continue
        cases.append(CaseSpec(folder.name, folder, found[0] if found else None))
    if problems:
        raise FormatError(problems)
    return cases


# the converters of the Hermes datasets register themselves on import (they import this module's names,
# all defined above, so there is no cycle)
from client import converters as _converters  # noqa: E402,F401
